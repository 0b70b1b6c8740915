"""Names, labels and owner references of the objects the operator makes."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from lora_operator.build import names

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
lorajob_names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)


def owner() -> names.Owner:
    return names.Owner(name="support-bot", namespace="ml", uid="u-1",
                       labels={"kueue.x-k8s.io/queue-name": "gpu"})


def test_short_names_are_readable() -> None:
    assert names.job_name("support-bot", 1) == "support-bot-a1"
    assert names.trainer_name("support-bot") == "support-bot-trainer"


@given(lorajob_names, st.integers(min_value=1, max_value=99))
def test_names_are_deterministic_dns_labels(name: str, attempt: int) -> None:
    for made in (names.job_name(name, attempt), names.trainer_name(name)):
        assert len(made) <= 63
        assert DNS_LABEL.match(made), made
    assert names.job_name(name, attempt) == names.job_name(name, attempt)


def test_long_names_keep_suffix_and_stay_distinct() -> None:
    a, b = "x" * 60 + "-one", "x" * 60 + "-two"
    ja, jb = names.job_name(a, 3), names.job_name(b, 3)
    assert ja != jb
    assert ja.endswith("-a3") and len(ja) == 63
    assert names.trainer_name(a).endswith("-trainer")


def test_labels_and_owner_reference() -> None:
    o = owner()
    meta = names.metadata(o, "x", attempt=2)
    assert meta["labels"] == {"app.kubernetes.io/managed-by": "lora-operator",
                              "lorajob.dev/job-name": "support-bot", "lorajob.dev/attempt": "2"}
    ref = meta["ownerReferences"][0]
    assert ref == {"apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRAJob",
                   "name": "support-bot", "uid": "u-1", "controller": True,
                   "blockOwnerDeletion": True}
    assert meta["namespace"] == "ml"


def test_owner_from_body() -> None:
    o = names.Owner.from_body({"metadata": {"name": "a", "namespace": "n", "uid": "u",
                                            "labels": {"kueue.x-k8s.io/queue-name": "q"}}})
    assert (o.name, o.namespace, o.uid, o.queue_name) == ("a", "n", "u", "q")
    assert names.Owner.from_body({"metadata": {"name": "a"}}).queue_name is None

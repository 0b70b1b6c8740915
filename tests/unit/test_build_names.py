"""Names, labels and owner references of the objects the operator makes."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_operator import api
from lora_operator.build import names
from lora_operator.build.preflight_job import preflight_job_name

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

lorajob_names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?", fullmatch=True)
MAX_ATTEMPT = 21  # runPolicy.backoffLimit is at most 20


def owner() -> names.Owner:
    return names.Owner(name="support-bot", namespace="ml", uid="u-1",
                       labels={"kueue.x-k8s.io/queue-name": "gpu"})


def test_short_names_are_readable() -> None:
    assert names.job_name("support-bot", 1) == "support-bot-a1"
    assert preflight_job_name("support-bot") == "support-bot-preflight"


@given(lorajob_names, st.integers(min_value=1, max_value=MAX_ATTEMPT))
def test_names_are_deterministic_dns_labels(name: str, attempt: int) -> None:
    """Every name the CRD admits gives child names that fit as they are, unshortened."""
    assert len(name) <= api.MAX_NAME_LENGTH
    for made in (names.job_name(name, attempt), preflight_job_name(name)):
        assert len(made) <= 63
        assert DNS_LABEL.match(made), made
        assert made.startswith(name)
    assert names.job_name(name, attempt) == names.job_name(name, attempt)


@given(lorajob_names, lorajob_names, st.integers(min_value=1, max_value=MAX_ATTEMPT))
def test_two_lorajobs_never_share_a_child_name(a: str, b: str, attempt: int) -> None:
    """The collision of issue 13 (hash-shortened names) cannot happen: distinct LoRAJob
    names give distinct preflight and trainer Jobs."""
    if a != b:
        assert preflight_job_name(a) != preflight_job_name(b)
        assert names.job_name(a, attempt) != names.job_name(b, attempt)


def test_names_too_long_for_their_children_are_refused_not_hashed() -> None:
    """The 55- and 67-character pair that used to share child objects: both refused
    (the CRD refuses them first; the operator fails one created before the rule)."""
    a = "x" * 47 + "-support"  # 55
    b = a + "-" + "y" * 11  # 67
    for long_name in (a, b):
        with pytest.raises(names.NameTooLongError, match=r"at most 52"):
            names.job_name(long_name, 1)
        with pytest.raises(names.NameTooLongError, match=r"at most 52"):
            preflight_job_name(long_name)
    longest = "z" * api.MAX_NAME_LENGTH
    assert preflight_job_name(longest) == longest + "-preflight"
    assert names.job_name(longest, MAX_ATTEMPT) == longest + f"-a{MAX_ATTEMPT}"


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

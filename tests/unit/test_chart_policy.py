"""The chart's multi-tenant parts (issue 13): the policy settings reach the operator's
configuration, and the default-deny egress NetworkPolicies select the pods the operator
really creates and allow only the listed exceptions. Server-side acceptance of the rendered
manifests is in tests/e2e/test_chart_server.py."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from lora_operator import api
from lora_operator.build import job, names
from lora_operator.settings import load_settings, parse_settings
from tests.unit.test_chart_helpers import by_kind, helm_binary, one, render

HELM = helm_binary()


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    assert HELM is not None
    return render(HELM, values=values)


def _settings(values: dict[str, Any]) -> Any:
    cm = one(_render(values), "ConfigMap")
    return parse_settings(yaml.safe_load(cm["data"]["config.yaml"]), "chart ConfigMap")


def test_policy_defaults_reach_the_settings() -> None:
    s = _settings({})
    assert s.signed_endpoints is None and s.storage_prefixes == {}
    assert s.allow_trust_remote_code is False and s.dev_mode is False
    assert (s.allowed_toleration_keys, s.allowed_priority_classes, s.allowed_secrets) == \
        (None, None, None)


def test_policy_values_reach_the_settings() -> None:
    s = _settings({"config": {
        "signedEndpoints": ["https://s3.internal:9000"],
        "storagePrefixes": {"*": ["s3://adapters/{namespace}/"]},
        "allowTrustRemoteCode": True, "allowedTolerationKeys": [],
        "allowedPriorityClasses": ["batch-low"], "allowedSecrets": ["lora-*"]}})
    assert s.signed_endpoints == ["https://s3.internal:9000"]
    assert s.storage_prefixes == {"*": ["s3://adapters/{namespace}/"]}
    assert s.allow_trust_remote_code is True
    assert s.allowed_toleration_keys == []  # an empty list: no toleration at all
    assert s.allowed_priority_classes == ["batch-low"] and s.allowed_secrets == ["lora-*"]


@pytest.mark.parametrize("bad", [
    {"config": {"storagePrefixes": {"ml": ["adapters/ml/"]}}},
    {"networkPolicy": {"s3": {"cidrs": ["not-a-cidr"], "ports": [9000]}}},
    {"networkPolicy": {"apiServer": {"cidrs": [], "ports": [70000]}}},
])
def test_schema_rejects_bad_policy_values(bad: dict[str, Any]) -> None:
    with pytest.raises(subprocess.CalledProcessError) as err:
        _render(bad)
    assert "schema" in err.value.stderr


def _policies(values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for np in by_kind(_render(values), "NetworkPolicy"):
        out.setdefault(np["metadata"]["name"].rsplit("-", 2)[-2], []).append(np)
    return out


def _allowed_ports(np: dict[str, Any]) -> set[int]:
    ports: set[int] = set()
    for rule in np["spec"]["egress"]:
        assert rule.get("ports"), f"an egress rule without ports allows everything: {rule}"
        ports |= {int(p["port"]) for p in rule["ports"]}
    return ports


def test_egress_is_default_deny_with_only_the_listed_exceptions() -> None:
    """The operator may reach the API server; a trainer, which holds no API credentials,
    only DNS, S3 and public HTTPS (no 6443, the API server's own port)."""
    nps = _policies({})
    (operator,) = nps["operator"]
    (trainer,) = nps["trainer"]
    assert _allowed_ports(operator) == {53, 443, 6443, 8333, 9000}
    assert _allowed_ports(trainer) == {53, 443, 8333, 9000}
    for np in (operator, trainer):
        assert np["spec"]["policyTypes"] == ["Egress"]
        for rule in np["spec"]["egress"]:
            for peer in rule.get("to", []):
                assert "169.254.0.0/16" in peer["ipBlock"].get("except", []) or \
                    peer["ipBlock"]["cidr"] == "::/0", "the metadata endpoint must stay closed"
    assert trainer["metadata"]["namespace"] == "lora-system"


def test_egress_cidrs_and_namespaces_from_values() -> None:
    nps = _policies({"watchNamespaces": ["ml"], "networkPolicy": {
        "trainerNamespaces": ["research"], "trainerPublicHttps": False,
        "apiServer": {"cidrs": ["10.96.0.1/32"], "ports": [443]},
        "s3": {"cidrs": ["10.20.0.0/16"], "ports": [9000]}}})
    assert sorted(np["metadata"]["namespace"] for np in nps["trainer"]) == ["ml", "research"]
    api_rule = {"to": [{"ipBlock": {"cidr": "10.96.0.1/32"}}],
                "ports": [{"port": 443, "protocol": "TCP"}]}
    s3_rule = {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
               "ports": [{"port": 9000, "protocol": "TCP"}]}
    (operator,) = nps["operator"]
    assert operator["spec"]["egress"][1:] == [api_rule, s3_rule]
    for trainer in nps["trainer"]:
        assert trainer["spec"]["egress"][1:] == [s3_rule]  # DNS, then S3 only: no API server
        assert _allowed_ports(trainer) == {53, 9000}
    assert not by_kind(_render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    return all(e["operator"] == "Exists" and e["key"] in labels
               for e in selector.get("matchExpressions") or [])


def test_policies_select_the_pods_that_are_really_created() -> None:
    docs = _render({})
    nps = {np["metadata"]["name"]: np for np in by_kind(docs, "NetworkPolicy")}
    operator_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert _selects(nps["lora-lora-operator-operator-egress"]["spec"]["podSelector"],
                    operator_labels)
    owner = names.Owner(name="bot", namespace="lora-system", uid="u-1")
    spec = api.parse_spec({"baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
                           "dataset": {"uri": "s3://data/train.jsonl"},
                           "output": {"uri": "s3://adapters/bot/"}})
    inputs = job.JobInputs(attempt=1, placement=api.Placement(method="lora", gpus=1),
                           vram_class=None)
    pod_labels = job.build_job(owner, spec, inputs, load_settings())["spec"]["template"][
        "metadata"]["labels"]
    trainer = nps["lora-lora-operator-trainer-egress"]["spec"]["podSelector"]
    assert _selects(trainer, pod_labels)
    assert not _selects(trainer, operator_labels)

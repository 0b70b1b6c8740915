"""operator/plan/policy.py (issue 13, items 8, 9 and the pvc:// part of 12): each rule refuses
with a message naming the field and what is allowed, and the defaults let an ordinary job
through. The trainer's half of the storage rules: tests/unit/trainer/test_trainer_tenancy.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lora_operator import api, contract
from lora_operator.build import names, trainer_config
from lora_operator.plan import policy
from lora_operator.settings import load_settings

BASE = load_settings()
UID = "0b6a5c1e-1111-2222-3333-444455556666"


def spec(**parts: Any) -> api.LoRAJobSpec:
    data: dict[str, Any] = {"baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
                            "dataset": {"uri": "s3://data/train.jsonl"},
                            "output": {"uri": "s3://adapters/team-a/bot/"}}
    data.update(parts)
    return api.parse_spec(data)


def test_an_ordinary_job_passes_the_defaults() -> None:
    assert policy.violation(spec(), "team-a", BASE) is None


def test_trust_remote_code_needs_the_setting() -> None:
    s = spec(baseModel={"uri": "hf://acme/custom", "trustRemoteCode": True})
    got = policy.violation(s, "team-a", BASE)
    assert got is not None and got.message.startswith("spec.baseModel.trustRemoteCode")
    assert policy.violation(s, "team-a",
                            BASE.model_copy(update={"allow_trust_remote_code": True})) is None


def test_tolerations_by_key() -> None:
    everything = spec(resources={"tolerations": [{"operator": "Exists"}]})
    got = policy.violation(everything, "team-a", BASE)
    assert got is not None and "spec.resources.tolerations[0].key" in got.message
    listed = BASE.model_copy(update={"allowed_toleration_keys": ["nvidia.com/gpu"]})
    other = spec(resources={"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"},
                                            {"key": "dedicated", "operator": "Exists"}]})
    got = policy.violation(other, "team-a", listed)
    assert got is not None
    assert "tolerations[1].key: 'dedicated'" in got.message and "nvidia.com/gpu" in got.message


def test_priority_classes() -> None:
    critical = spec(resources={"priorityClassName": "system-node-critical"})
    got = policy.violation(critical, "team-a", BASE)
    assert got is not None and "spec.resources.priorityClassName" in got.message
    listed = BASE.model_copy(update={"allowed_priority_classes": ["batch-low"]})
    assert policy.violation(spec(resources={"priorityClassName": "batch-low"}), "a", listed) is None
    got = policy.violation(spec(resources={"priorityClassName": "batch-high"}), "a", listed)
    assert got is not None and "allowed: batch-low" in got.message


def test_secrets_by_pattern() -> None:
    listed = BASE.model_copy(update={"allowed_secrets": ["lora-*"]})
    ok = spec(output={"uri": "s3://adapters/b/", "credentialsSecret": "lora-s3"})
    assert policy.violation(ok, "team-a", listed) is None
    bad = spec(dataset={"uri": "s3://data/x.jsonl", "credentialsSecret": "db-admin"})
    got = policy.violation(bad, "team-a", listed)
    assert got is not None
    assert got.message.startswith("spec.dataset.credentialsSecret: Secret 'db-admin'")
    assert "lora-*" in got.message


@pytest.mark.parametrize("part", [{"baseModel": {"uri": "pvc://models/llama"}},
                                  {"output": {"uri": "pvc://adapters/x/"}}])
def test_pvc_is_refused_at_plan(part: dict[str, Any]) -> None:
    got = policy.violation(spec(**part), "team-a", BASE)
    assert got is not None and got.reason == "PVCNotSupported" and "pvc://" in got.message


def test_storage_prefixes_templated_and_per_namespace() -> None:
    s = BASE.model_copy(update={"storage_prefixes": {
        "*": ["s3://adapters/{namespace}/"], "research": ["s3://research/"]}})
    assert policy.allowed_prefixes("team-a", s) == ["s3://adapters/team-a/"]
    assert policy.allowed_prefixes("research", s) == ["s3://research/"]
    assert policy.allowed_prefixes("x", BASE) is None
    assert policy.violation(spec(), "team-a", s) is None
    got = policy.violation(spec(), "team-b", s)
    assert got is not None and got.reason == "StorageNotAllowed"
    assert "spec.output.uri" in got.message and "s3://adapters/team-b/" in got.message
    sneaky = spec(output={"uri": "s3://adapters/team-b/../team-a/bot/"})
    assert policy.violation(sneaky, "team-b", s) is not None
    only_listed = BASE.model_copy(update={"storage_prefixes": {"research": ["s3://research/"]}})
    got = policy.violation(spec(), "team-a", only_listed)
    assert got is not None and "allowed: none" in got.message


def test_prefixes_travel_to_the_trainer_config() -> None:
    s = BASE.model_copy(update={"storage_prefixes": {"*": ["s3://adapters/{namespace}/"]}})
    owner = names.Owner(name="bot", namespace="team-a", uid=UID)
    placement = api.Placement(method="lora", gpus=1)
    cfg = trainer_config.trainer_config(owner, spec(), placement, 1, s)
    assert cfg.allowed_output_prefixes == ["s3://adapters/team-a/"]
    rendered = trainer_config.render(cfg)
    assert "allowedOutputPrefixes" in rendered
    assert trainer_config.trainer_config(owner, spec(), placement, 1, BASE) \
        .allowed_output_prefixes is None


def test_presigned_url_secrets_are_redacted_from_messages() -> None:
    url = ("https://b.s3.amazonaws.com/d.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256"
           "&X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature=deadbeef&X-Amz-Expires=60")
    patch = {"message": f"dataset {url} is not JSON",
             "conditions": [{"type": "Failed", "message": f"GET {url}: 403"}]}
    out = contract.redact_messages(patch)
    text = json.dumps(out)
    assert "deadbeef" not in text and "AKIAEXAMPLE" not in text
    assert "X-Amz-Signature=<redacted>" in out["message"]
    assert "X-Amz-Expires=60" in out["message"]  # not a secret: kept for the reader

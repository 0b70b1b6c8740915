"""The LoRAJob model: defaults, round trips, refusals with field paths, and agreement with
the generated CRD schema (checked with a JSON-schema validator; the real API server checks
are in tests/integration)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lora_operator import api, crd, localrun
from tests.cases import INVALID, Invalid, patched, valid_manifest

ROOT = Path(__file__).resolve().parents[2]


def crd_validator() -> jsonschema.Draft4Validator:
    """The CRD's schema as the API server reads it (OpenAPI v3.0 ≈ draft 4 with boolean
    exclusive bounds); int-or-string becomes an explicit union so booleans are refused."""
    schema = copy.deepcopy(crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])

    def fix(node: Any) -> None:
        if isinstance(node, dict):
            if node.pop("x-kubernetes-int-or-string", False):
                node["type"] = ["integer", "string"]
            for key in [k for k in node if k.startswith("x-kubernetes")]:
                del node[key]
            for value in node.values():
                fix(value)
        elif isinstance(node, list):
            for value in node:
                fix(value)

    fix(schema)
    return jsonschema.Draft4Validator(schema)


VALIDATOR = crd_validator()


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    return [".".join(str(p) for p in e.absolute_path) for e in VALIDATOR.iter_errors(manifest)]


def test_defaults_match_the_design() -> None:
    job = api.parse_lorajob(valid_manifest())
    s = job.spec
    assert s.method == "auto"
    assert (s.lora.r, s.lora.alpha, s.lora.dropout) == (16, 32, 0.05)
    assert s.lora.target_modules == ["all-linear"]
    assert s.training.effective_epochs == 3 and s.training.max_steps is None
    assert s.training.learning_rate == 2e-4 and s.training.scheduler == "cosine"
    assert (s.training.micro_batch_size, s.training.gradient_accumulation_steps) == (4, 4)
    assert s.training.max_seq_length == 2048 and s.training.packing is True
    assert s.dataset.validation.fraction == 0.05
    assert s.resources.gpus == "auto" and s.resources.deepspeed == "auto"
    # No region in the spec: the operator's s3Region applies (issue 13; it used to be shadowed).
    assert s.output.region is None and s.output.overwrite is False
    assert s.run_policy.backoff_limit == 2 and s.run_policy.suspend is False
    assert s.run_policy.ttl_seconds_after_finished == 604800


def test_crd_defaults_equal_model_defaults() -> None:
    """Every default the API server applies is the default pydantic applies."""
    spec_schema = crd.spec_schema()["properties"]["spec"]
    model = api.LoRAJobSpec.model_validate(valid_manifest()["spec"]).model_dump(
        by_alias=True, mode="json", exclude_none=True)

    def walk(node: dict[str, Any], value: Any, path: str) -> int:
        checked = 0
        for key, child in node.get("properties", {}).items():
            if "default" in child and child["default"] != {}:
                assert value[key] == child["default"], f"{path}.{key}"
                checked += 1
            if isinstance(value.get(key), dict):
                checked += walk(child, value[key], f"{path}.{key}")
        return checked

    assert walk(spec_schema, model, "spec") >= 25


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_round_trip(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or doc.get("kind") != "LoRAJob":
            continue
        localrun.resolve_local_uris(doc, path.parent)  # examples/local-*.yaml shorthands
        job = api.parse_lorajob(doc)
        again = api.parse_lorajob(yaml.safe_load(yaml.safe_dump(api.to_manifest(job))))
        assert again == job
        assert schema_errors(api.to_manifest(job)) == []


def test_round_trip_yaml_model_yaml() -> None:
    text = yaml.safe_dump(patched({"spec": {
        "lora": {"r": 8, "targetModules": ["q_proj", "v_proj"], "useDora": True},
        "training": {"maxSteps": 500, "precision": "bf16"},
        "resources": {"gpus": 2, "deepspeed": "zero3",
                      "tolerations": [{"key": "x", "operator": "Exists"}]},
        "dataset": {"validation": {"uri": "s3://data/val.jsonl"},
                    "test": {"uri": "s3://data/test.jsonl"}},
    }}))
    job = api.parse_lorajob(yaml.safe_load(text))
    dumped = yaml.safe_dump(api.to_manifest(job))
    assert api.parse_lorajob(yaml.safe_load(dumped)) == job
    assert job.spec.resources.gpus == 2
    assert job.spec.resources.tolerations[0].operator == "Exists"
    assert "maxSteps: 500" in dumped and "epochs" not in dumped


def test_at_least_thirty_invalid_cases() -> None:
    assert len(INVALID) >= 30


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.name)
def test_model_refuses_with_field_path(case: Invalid) -> None:
    with pytest.raises(api.SpecError) as info:
        api.parse_lorajob(case.manifest())
    paths = [p for p, _ in info.value.errors]
    assert case.path in paths, info.value.errors
    if case.message:
        assert case.message in str(info.value)


@pytest.mark.parametrize("case", [c for c in INVALID if c.schema], ids=lambda c: c.name)
def test_crd_schema_refuses_what_the_model_refuses(case: Invalid) -> None:
    errors = schema_errors(case.manifest())
    wanted = case.path.replace("[", ".").replace("]", "")
    parent = wanted.rsplit(".", 1)[0]
    assert errors, "the CRD schema accepted it"
    assert any(e in (wanted, parent) for e in errors), errors


def test_error_messages_say_what_is_allowed() -> None:
    with pytest.raises(api.SpecError) as info:
        api.parse_lorajob(patched({"spec": {"resources": {"gpus": 12},
                                            "baseModel": {"uri": "ftp://x"}}}))
    text = str(info.value)
    assert "spec.resources.gpus: must be 'auto' or an integer 1..8 (got 12)" in text
    assert "spec.baseModel.uri: must be hf://org/name" in text


def test_parse_spec_prefixes_paths() -> None:
    spec = valid_manifest()["spec"] | {"method": "full"}
    with pytest.raises(api.SpecError) as info:
        api.parse_spec(spec)
    assert info.value.errors[0][0] == "spec.method"


# ----------------------------------------------------------------- model ⇔ schema property

URIS = {
    ("baseModel", "uri"): ["hf://meta-llama/Llama-3.1-8B", "s3://models/llama", "pvc://models/l3",
                           "file:///models/x", "hf://x", "http://x/y", "s3://A/b", "", "pvc://"],
    ("dataset", "uri"): ["s3://data/a.jsonl", "https://host/d.parquet", "file:///d.json",
                         "pvc://claim/d.jsonl", "s3://data", "ftp://x/y", "https://host"],
    ("output", "uri"): ["s3://adapters/x/", "file:///tmp/out", "pvc://out/a", "https://x/y",
                        "s3://-bad/x"],
    ("output", "endpoint"): ["http://127.0.0.1:9000", "https://minio.storage:9000", "minio:9000"],
}
LEAVES: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    **{k: st.sampled_from(v) for k, v in URIS.items()},
    ("method",): st.sampled_from(["lora", "qlora", "auto", "full", "LoRA"]),
    ("lora", "r"): st.integers(-4, 2048),
    ("lora", "alpha"): st.floats(-8, 5000, allow_nan=False),
    ("lora", "dropout"): st.floats(-0.5, 1.5, allow_nan=False),
    ("lora", "useDora"): st.sampled_from([True, False, "true", 1]),
    ("training", "epochs"): st.integers(-1, 1200),
    ("training", "learningRate"): st.floats(-1, 2, allow_nan=False),
    ("training", "warmupRatio"): st.floats(-0.2, 1, allow_nan=False),
    ("training", "microBatchSize"): st.integers(-2, 2000),
    ("training", "maxSeqLength"): st.one_of(st.integers(0, 2_000_000), st.just("2048")),
    ("training", "scheduler"): st.sampled_from(["cosine", "linear", "constant", "exp", ""]),
    ("training", "precision"): st.sampled_from(["auto", "bf16", "fp16", "fp32", "int4"]),
    ("resources", "gpus"): st.one_of(st.integers(-2, 12), st.sampled_from(
        ["auto", "all", "8", "", True])),
    ("resources", "vramClass"): st.sampled_from(["auto", "h100-80gb", "H100", "-x", "a" * 64]),
    ("resources", "deepspeed"): st.sampled_from(["auto", "zero2", "zero3", "zero3-offload", "z1"]),
    ("dataset", "validation", "fraction"): st.floats(-0.1, 1, allow_nan=False),
    ("dataset", "format"): st.sampled_from(["auto", "chat", "alpaca", "csv"]),
    ("evaluation", "minImprovement"): st.floats(-0.5, 1.5, allow_nan=False),
    ("runPolicy", "backoffLimit"): st.integers(-3, 30),
    ("runPolicy", "activeDeadlineSeconds"): st.integers(0, 40_000_000),
}


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(sorted(LEAVES)), max_size=6, unique=True))
    manifest = valid_manifest()
    for key in keys:
        node = manifest["spec"]
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = draw(LEAVES[key])
    res = manifest["spec"].get("resources", {})
    # The one CEL rule these leaves can reach: the schema alone cannot express it.
    assume(not (isinstance(res.get("gpus"), int) and not isinstance(res.get("gpus"), bool)
                and res["gpus"] > 1 and res.get("deepspeed") == "none"))
    return manifest


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifests())
def test_model_and_crd_schema_agree(manifest: dict[str, Any]) -> None:
    try:
        api.parse_lorajob(manifest)
        model_ok = True
    except api.SpecError:
        model_ok = False
    schema_ok = not schema_errors(manifest)
    assert model_ok == schema_ok, (manifest["spec"], schema_errors(manifest))

"""The generated CRD as the real API server serves it: what `kubectl` users see and what
the server itself refuses (the same invalid cases as the unit tests, CEL rules included)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.cases import INVALID, Invalid, patched, valid_manifest

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def namespace(local_cluster: Any) -> Iterator[str]:
    name = f"crd-{uuid.uuid4().hex[:6]}"
    local_cluster.kubectl_run("create", "namespace", name)
    yield name
    local_cluster.kubectl_run("delete", "namespace", name, "--wait=false", check=False)


def _create(cluster: Any, ns: str, manifest: dict[str, Any], *extra: str) -> Any:
    return cluster.kubectl_run("create", "-n", ns, "--validate=strict", "-f", "-", *extra,
                               check=False, input=yaml.safe_dump(manifest))


def test_crd_is_established(local_cluster: Any) -> None:
    out = local_cluster.kubectl_run("get", "crd", "lorajobs.lorajob.dev", "-o", "json").stdout
    conditions = {c["type"]: c["status"] for c in json.loads(out)["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"


def test_valid_job_is_accepted_and_defaulted(local_cluster: Any, namespace: str) -> None:
    manifest = valid_manifest("accepted")
    done = _create(local_cluster, namespace, manifest)
    assert done.returncode == 0, done.stderr
    got = json.loads(local_cluster.kubectl_run("get", "lj", "accepted", "-n", namespace,
                                               "-o", "json").stdout)
    spec = got["spec"]
    # Defaults applied by the server itself, from the schema generated from the model.
    assert spec["lora"] == {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"],
                            "useDora": False, "useRslora": False}
    assert spec["dataset"]["validation"] == {"fraction": 0.05}
    assert spec["resources"]["gpus"] == "auto"
    assert spec["runPolicy"]["backoffLimit"] == 2


def test_get_shows_the_printer_columns(local_cluster: Any, namespace: str) -> None:
    _create(local_cluster, namespace, valid_manifest("columns"))
    header = local_cluster.kubectl_run("get", "lorajobs", "-n", namespace).stdout.splitlines()[0]
    assert header.split() == ["NAME", "PHASE", "MODEL", "METHOD", "VRAM", "PROGRESS", "LOSS", "AGE"]
    wide = local_cluster.kubectl_run("get", "lj", "-n", namespace, "-o", "wide").stdout
    assert wide.splitlines()[0].split()[-2:] == ["ADAPTER", "NODE"]
    assert "hf://Qwen/Qwen2.5-7B-Instruct" in wide
    # `ml` names both kinds (LoRAJob, LoRASweep), so kubectl qualifies each row's name.
    by_category = local_cluster.kubectl_run("get", "ml", "-n", namespace).stdout
    assert "lorajob.lorajob.dev/columns" in by_category.split()


def test_explain_prints_descriptions(local_cluster: Any) -> None:
    out = local_cluster.kubectl_run("explain", "lorajob.spec.lora.r").stdout
    assert "LoRA rank" in out
    spec = local_cluster.kubectl_run("explain", "lorajob.spec").stdout
    assert "baseModel" in spec and "The model to adapt." in spec


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.name)
def test_server_refuses_invalid_spec(local_cluster: Any, namespace: str, case: Invalid) -> None:
    manifest = case.manifest()
    manifest["metadata"]["name"] = "invalid"
    done = _create(local_cluster, namespace, manifest, "--dry-run=server")
    assert done.returncode != 0, f"server accepted {case.name}"
    assert case.path in done.stderr, done.stderr
    if case.cel and case.message:
        assert case.message in done.stderr


def test_run_changing_fields_are_immutable(local_cluster: Any, namespace: str) -> None:
    _create(local_cluster, namespace, valid_manifest("frozen"))
    refused = local_cluster.kubectl_run(
        "patch", "lj", "frozen", "-n", namespace, "--type=merge",
        "-p", '{"spec":{"lora":{"r":64}}}', check=False)
    assert refused.returncode != 0
    assert "spec.lora cannot change once the job exists" in refused.stderr
    allowed = local_cluster.kubectl_run(
        "patch", "lj", "frozen", "-n", namespace, "--type=merge",
        "-p", '{"spec":{"runPolicy":{"suspend":true}}}', check=False)
    assert allowed.returncode == 0, allowed.stderr


def test_status_is_a_subresource(local_cluster: Any, namespace: str) -> None:
    _create(local_cluster, namespace, patched({"metadata": {"name": "sub"}}))
    local_cluster.kubectl_run(
        "patch", "lj", "sub", "-n", namespace, "--type=merge",
        "-p", '{"status":{"phase":"Running"}}')
    got = json.loads(local_cluster.kubectl_run("get", "lj", "sub", "-n", namespace,
                                               "-o", "json").stdout)
    assert "status" not in got or got["status"].get("phase") != "Running"
    local_cluster.kubectl_run(
        "patch", "lj", "sub", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", '{"status":{"phase":"Running","progress":{"percent":12.5,"loss":1.5}}}')
    row = local_cluster.kubectl_run("get", "lj", "sub", "-n", namespace,
                                    "--no-headers").stdout.split()
    assert row[1] == "Running" and "12.5" in row and "1.5" in row

"""A full secret scan end to end through the dev node agent: a real tiny-model training job
runs to Succeeded with its S3 credentials from a Secret made for this test, and the secret
key appears nowhere it could leak to: the operator's log, the trainer pod's log (`kubectl
logs` and the node agent's file), `kubectl get lorajob -o yaml`, the namespace's Events, and
every object under the job's output prefix in S3 (model card README.md, metrics.json,
manifest.json, adapter_config.json, checkpoints).

The secret key is the one SeaweedFS accepts (the job must authenticate for real, and the
local S3 has a fixed identity table), so the Secret holds the cluster's generated 40-char
key; the Secret also carries a unique per-run value under an extra key, scanned too.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import TinyModel, kubectl, tiny_job, trainer_pods, write_job
from tests.e2e.test_lifecycle import wait_phase

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1200)]


def test_secret_never_surfaces_end_to_end(cluster: Any, operator: Any, namespace: str, s3: Any,
                                          tiny_model: TinyModel, dataset: dict[str, str],
                                          tmp_path: Path) -> None:
    name = "scan"
    secret_name = f"s3-scan-{uuid.uuid4().hex[:6]}"
    planted = f"planted-{uuid.uuid4().hex}"
    secret_key = cluster.s3_secret_key
    assert len(secret_key) >= 20
    kubectl(cluster, "-n", namespace, "create", "secret", "generic", secret_name,
            f"--from-literal=AWS_ACCESS_KEY_ID={cluster.s3_access_key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={secret_key}",
            f"--from-literal=PLANTED={planted}")
    job = tiny_job(name, namespace, tiny_model, dataset, cluster.s3_bucket,
                   max_steps=4, save_steps=2)
    job["spec"]["output"]["credentialsSecret"] = secret_name
    manifest = write_job(job, tmp_path)
    kubectl(cluster, "apply", "-f", str(manifest))
    obj = wait_phase(cluster, namespace, name, {"Succeeded", "Failed"}, 900)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]

    pods = trainer_pods(cluster, namespace, name)
    assert pods
    # The job really used this Secret (by reference), so the scan is meaningful.
    env = pods[0]["spec"]["containers"][0]["env"]
    refs = {e["name"]: (e.get("valueFrom") or {}).get("secretKeyRef") for e in env}
    assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": secret_name, "key": "AWS_SECRET_ACCESS_KEY"}
    log_dir = Path(cluster.state_dir) / "logs"
    haystacks: dict[str, str] = {
        "operator log": (log_dir / f"e2e-operator-{namespace}.log").read_text(errors="replace"),
        "lorajob -o yaml": kubectl(cluster, "-n", namespace, "get", "lorajob", name,
                                   "-o", "yaml").stdout,
        "events": kubectl(cluster, "-n", namespace, "get", "events", "-o", "yaml").stdout,
    }
    for pod in pods:
        pname = pod["metadata"]["name"]
        haystacks[f"kubectl logs {pname}"] = kubectl(cluster, "-n", namespace, "logs",
                                                     pname).stdout
        haystacks[f"pod log file {pname}"] = (
            log_dir / "pods" / f"{namespace}_{pname}_trainer.log").read_text(errors="replace")
        haystacks[f"pod {pname} -o yaml"] = kubectl(cluster, "-n", namespace, "get", "pod",
                                                   pname, "-o", "yaml").stdout
    assert "train" in haystacks[f"kubectl logs {pods[-1]['metadata']['name']}"]
    bucket, _, prefix = obj["status"]["result"]["adapterUri"][len("s3://"):].partition("/")
    objects = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])]
    names = {k.rsplit("/", 1)[-1] for k in objects}
    assert {"README.md", "metrics.json", "manifest.json", "adapter_config.json",
            "adapter_model.safetensors"} <= names, sorted(names)
    for key in objects:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        haystacks[f"s3://{bucket}/{key}"] = body.decode("latin-1")
    for where, text in haystacks.items():
        assert secret_key not in text, f"the S3 secret key is in {where}"
        assert planted not in text, f"the planted value is in {where}"
    print(f"\nSECRET-SCAN {len(haystacks)} places, {sum(map(len, haystacks.values()))} bytes, "
          f"{len(objects)} S3 objects: clean")

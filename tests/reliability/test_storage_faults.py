"""S3 goes down under a running trainer: during a checkpoint, during the final upload, and
for good. The trainer runs as `lora-trainer run` (the pod's code path, minus Kubernetes,
which adds nothing to these faults) against the real SeaweedFS through `faults.S3Outage`.

Expectations (DESIGN §4, contract.ExitCode):
- a short outage is ridden out with retries and backoff; the job still finishes and its
  manifest lists every file with the right size and sha256;
- a permanent outage ends with exit 75 (StorageUnavailable, retryable by the Job) and no
  manifest.json: nothing is ever reported as an adapter without a complete manifest.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import keys_under, run_trainer, s3_env, tiny_cli_job
from tests.reliability.faults import S3Outage

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def outage(local_cluster: Any) -> Any:
    host, _, port = local_cluster.s3_endpoint.removeprefix("http://").partition(":")
    proxy = S3Outage(host, int(port))
    yield proxy
    proxy.stop()


def assert_complete_manifest(s3: Any, bucket: str, prefix: str) -> dict[str, Any]:
    """manifest.json exists and every file it lists is in storage with its size and sha256."""
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    assert manifest["files"], manifest
    assert "adapter_model.safetensors" in manifest["files"]
    for name, digest in manifest["files"].items():
        body = s3.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
        assert len(body) == digest["size"], name
        assert hashlib.sha256(body).hexdigest() == digest["sha256"], name
    return dict(manifest)


def _job(ci: Any, tiny_model: Any, proxy: S3Outage, name: str) -> tuple[dict[str, Any], str]:
    prefix = f"reliability/storage/{name}-{uuid.uuid4().hex[:6]}/"
    job = tiny_cli_job(name, f"file://{tiny_model.local}", f"s3://{ci.s3_bucket}/{prefix}",
                       endpoint=proxy.endpoint, max_steps=6, save_steps=2)
    return job, prefix


def test_s3_down_during_checkpoint_is_ridden_out(local_cluster: Any, tiny_model: Any, s3: Any,
                                                 outage: S3Outage, tmp_path: Path) -> None:
    ci = local_cluster
    job, prefix = _job(ci, tiny_model, outage, "ckpt-outage")
    trig = outage.on("PUT", "/.checkpoints/", seconds=4.0)
    run = run_trainer(job, tmp_path, env=s3_env(ci, outage.endpoint))
    assert trig.fired_at is not None, "no checkpoint upload went through the proxy"
    assert run.code == 0, run.output[-4000:]
    assert "retrying" in run.output, "the outage was not retried with backoff"
    assert any(e["event"] == "checkpoint" for e in run.events)
    assert_complete_manifest(s3, ci.s3_bucket, prefix)
    assert run.result["reason"] == "Completed"


def test_s3_down_during_final_upload_is_ridden_out(local_cluster: Any, tiny_model: Any, s3: Any,
                                                   outage: S3Outage, tmp_path: Path) -> None:
    ci = local_cluster
    job, prefix = _job(ci, tiny_model, outage, "upload-outage")
    trig = outage.on("PUT", "/adapter_model.safetensors", seconds=4.0, unless="/.checkpoints/")
    run = run_trainer(job, tmp_path, env=s3_env(ci, outage.endpoint))
    assert trig.fired_at is not None, "the final upload never went through the proxy"
    assert run.code == 0, run.output[-4000:]
    assert "retrying" in run.output
    manifest = assert_complete_manifest(s3, ci.s3_bucket, prefix)
    assert run.result["manifestSha256"] == hashlib.sha256(
        s3.get_object(Bucket=ci.s3_bucket, Key=prefix + "manifest.json")["Body"].read()
    ).hexdigest()
    assert run.result["sizeBytes"] == manifest["files"]["adapter_model.safetensors"]["size"] + \
        manifest["files"]["adapter_config.json"]["size"]


def test_s3_gone_for_good_fails_retryable_without_manifest(local_cluster: Any, tiny_model: Any,
                                                           s3: Any, outage: S3Outage,
                                                           tmp_path: Path) -> None:
    ci = local_cluster
    job, prefix = _job(ci, tiny_model, outage, "upload-dead")
    trig = outage.on("PUT", "/adapter_model.safetensors", seconds=None, unless="/.checkpoints/")
    run = run_trainer(job, tmp_path, env=s3_env(ci, outage.endpoint))
    assert trig.fired_at is not None
    assert run.code == 75, run.output[-4000:]
    assert run.result["reason"] == "StorageUnavailable"
    assert "S3" in run.result["message"], run.result
    assert "adapterUri" not in run.result and "manifestUri" not in run.result
    keys = keys_under(s3, ci.s3_bucket, prefix)
    assert "manifest.json" not in keys, keys
    assert any(k.startswith(".checkpoints/") for k in keys), "checkpoints kept for the retry"

"""End to end: a LoRASweep of three real SmolLM2-135M-Instruct fine-tunes on CPU.

The sweep (a grid over the learning rate, two trials at a time) runs on the real local
cluster: the operator creates the trial LoRAJobs, the Job controller their pods, the dev node
agent runs the real trainer, which reads the GGUF model and the task data from S3 and writes
each adapter to its own prefix. The sweep must end Succeeded with the trial of the lowest
held-out adapter loss as its best, that loss below the base model's, and the best adapter's
URI in its status, where storage really holds it. Steps are few, so it takes minutes.

Run alone (the dev node agent is shared): `flock /tmp/lora-e2e.lock .venv/bin/python -m
pytest tests/e2e/test_sweep_smollm2.py`.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import kubectl, kubectl_json

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(1500)]
LEARNING_RATES = [1e-5, 1e-3, 4e-3]


def _upload_smollm2(cluster: Any, s3: Any) -> str:
    from lora_trainer.model import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    prefix = "e2e/models/smollm2-135m/"
    s3.upload_file(str(gguf), cluster.s3_bucket, prefix + gguf.name)
    return str(gguf.name)


def _sweep(name: str, namespace: str, bucket: str, gguf: str,
           data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRASweep",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "parallelism": 2,
            "searchSpace": {"training": {"learningRate": {"values": LEARNING_RATES}}},
            "template": {"spec": {
                "baseModel": {"uri": f"s3://{bucket}/e2e/models/smollm2-135m/", "ggufFile": gguf,
                              "architecture": "smollm2-135m"},
                "dataset": {"uri": data["train"], "format": "chat",
                            "validation": {"uri": data["validation"]}},
                "method": "lora",
                "lora": {"r": 8, "alpha": 16},
                "training": {"maxSteps": 6, "microBatchSize": 2, "gradientAccumulationSteps": 1,
                             "maxSeqLength": 128, "gradientCheckpointing": False,
                             "evalSteps": 6, "saveSteps": 6, "warmupRatio": 0.0},
                "resources": {"nodeSelector": {"lorajob.dev/dev-node": "true"},
                              "tolerations": [{"key": "lorajob.dev/dev-node",
                                               "operator": "Exists", "effect": "NoSchedule"}]},
                "output": {"uri": f"s3://{bucket}/e2e/sweeps/{namespace}/{name}/",
                           "credentialsSecret": "s3-creds", "overwrite": True},
                "runPolicy": {"backoffLimit": 1},
            }},
        },
    }


def test_sweep_of_three_smollm2_trials_names_the_best_adapter(
        cluster: Any, s3: Any, operator: subprocess.Popen[bytes], namespace: str,
        dataset: dict[str, str]) -> None:
    gguf = _upload_smollm2(cluster, s3)
    name = "smol-sweep"
    kubectl(cluster, "apply", "-f", "-", input=yaml.safe_dump(
        _sweep(name, namespace, cluster.s3_bucket, gguf, dataset)))
    deadline = time.monotonic() + 1400
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = (kubectl_json(cluster, "-n", namespace, "get", "lorasweep", name) or {}).get(
            "status") or {}
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        assert operator.poll() is None, "the operator exited"
        time.sleep(2)
    assert status.get("phase") == "Succeeded", status

    trials = status["trials"]
    assert [t["params"]["training.learningRate"] for t in trials] == LEARNING_RATES
    assert [t["phase"] for t in trials] == ["Succeeded"] * 3, trials
    losses = {t["name"]: t["adapterEvalLoss"] for t in trials}
    best = status["bestTrial"]
    assert best["adapterEvalLoss"] == min(losses.values()) == losses[best["name"]]
    assert len(set(losses.values())) == 3, f"the learning rate made no difference: {losses}"

    child = kubectl_json(cluster, "-n", namespace, "get", "lorajob", best["name"])
    result = child["status"]["result"]
    assert result["adapterEvalLoss"] == best["adapterEvalLoss"]
    assert best["adapterEvalLoss"] < result["baseEvalLoss"], result
    assert best["adapterUri"] == result["adapterUri"] == (
        f"s3://{cluster.s3_bucket}/e2e/sweeps/{namespace}/{name}/{best['name']}/")
    key = best["adapterUri"].removeprefix(f"s3://{cluster.s3_bucket}/")
    listed = s3.list_objects_v2(Bucket=cluster.s3_bucket, Prefix=key)
    files = {o["Key"].removeprefix(key) for o in listed.get("Contents", [])}
    assert {"adapter_model.safetensors", "adapter_config.json", "manifest.json"} <= files

    table = kubectl(cluster, "-n", namespace, "get", "lsw", name, "-o", "wide").stdout
    assert best["name"] in table and best["adapterUri"] in table
    print(f"\nsweep {name}: base loss {result['baseEvalLoss']:.4f}; "
          + ", ".join(f"{n} {v:.4f}" for n, v in losses.items()) + f"; best {best['name']}")

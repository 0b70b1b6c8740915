"""Helpers for the kwok-backed reliability tests: LoRAJobs whose trainer pod outcome is set
by `kwok.lorajob.dev/*` annotations (hack/cluster/kwok-stages.yaml), an operator subprocess
per test with its own instance label, and scans of what the operator left behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any

from tests.integration.operator_harness import Kube, OperatorProcess, write_settings

INSTANCE_LABEL = "lorajob.dev/operator-instance"
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
SHAPE_8B = {"hiddenSize": 4096, "intermediateSize": 14336, "numHiddenLayers": 32,
            "numAttentionHeads": 32, "numKeyValueHeads": 8, "vocabSize": 128256}
MODEL_KEY = "reliability/models/llama-3.1-8b/config.json"
MODEL_URI = "s3://lora-test/reliability/models/llama-3.1-8b/"
# Tracebacks kopf/our code print for failures they *handle*: none are expected at all.
TRACEBACK = re.compile(r"Traceback \(most recent call last\)")


def put_model_config(s3: Any) -> None:
    s3.put_object(Bucket="lora-test", Key=MODEL_KEY, Body=json.dumps(LLAMA_8B).encode())


def lorajob(name: str, ns: str, instance: str, *, annotations: dict[str, str] | None = None,
            **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        # The shape too: a config.json read that times out on a loaded machine falls back to it.
        "baseModel": {"uri": MODEL_URI, "shape": SHAPE_8B},
        # kwok plays the trainer pod and nothing reads this file: the dataset preflight is
        # off here (tests/integration/test_preflight.py covers it, with kwok and for real).
        "dataset": {"uri": "s3://lora-test/data/train.jsonl", "preflight": {"enabled": False}},
        "method": "lora",
        "output": {"uri": f"s3://lora-test/reliability/adapters/{ns}/{name}/"},
    }
    body.update(spec)
    return {"apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRAJob",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations or {},
                         "labels": {INSTANCE_LABEL: instance}},
            "spec": body}


def success(ns: str, name: str, s3: Any, run_seconds: float = 1) -> dict[str, str]:
    """A trainer pod that exits 0 with a result; the manifest is put where it says."""
    key = f"reliability/adapters/{ns}/{name}/manifest.json"
    manifest = json.dumps({"files": {}}).encode()  # the operator checks its sha256
    s3.put_object(Bucket="lora-test", Key=key, Body=manifest)
    result = {"exitCode": 0, "reason": "Completed",
              "adapterUri": f"s3://lora-test/reliability/adapters/{ns}/{name}/",
              "manifestUri": f"s3://lora-test/{key}",
              "manifestSha256": hashlib.sha256(manifest).hexdigest(),
              "sizeBytes": 4096, "baseEvalLoss": 2.0, "adapterEvalLoss": 1.2, "improvement": 0.4}
    return {"kwok.lorajob.dev/termination-message": json.dumps(result),
            "kwok.lorajob.dev/exit-code": "0", "kwok.lorajob.dev/run-seconds": str(run_seconds)}


def failure(code: int, reason: str, message: str) -> dict[str, str]:
    result = {"exitCode": code, "reason": reason, "message": message}
    return {"kwok.lorajob.dev/exit-code": str(code),
            "kwok.lorajob.dev/termination-message": json.dumps(result)}


def start_operator(ci: Any, namespaces: list[str], log_dir: Path, instance: str,
                   **settings: Any) -> OperatorProcess:
    settings = {"configReadTimeoutSeconds": 10, **settings}
    cfg = write_settings(log_dir / f"settings-{uuid.uuid4().hex[:4]}.yaml", ci.s3_endpoint,
                         **settings)
    return OperatorProcess(str(ci.kubeconfig), ci.env, cfg, namespaces, log_dir=log_dir,
                           instance=instance).start()


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    out: dict[str, Any] = next((c for c in status.get("conditions") or []
                                if c["type"] == ctype), {})
    return out


def jobs_of(kube: Kube, ns: str, name: str) -> list[dict[str, Any]]:
    return kube.list("jobs", ns, f"lorajob.dev/job-name={name}")


def tracebacks(log: str) -> list[str]:
    """Unhandled-exception tracebacks in an operator log, with a little context."""
    return [log[m.start(): m.start() + 1500] for m in TRACEBACK.finditer(log)]

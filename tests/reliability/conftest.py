"""Reliability and security suite: faults, hostile input and least privilege (issue #9).

Everything runs against the real local cluster (hack/cluster) and the real SeaweedFS S3;
faults are injected for real (SIGKILL, a deleted node, an S3 proxy that goes down, a
restarted kube-apiserver), never mocked. The shared fixtures come from the integration and
e2e suites: `local_cluster` / `cluster` (the same running cluster), `node_agent`, `s3`,
`tiny_model` (a tiny random Llama in S3 and on disk) and `dataset`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.e2e.conftest import cluster, dataset, node_agent, s3, tiny_model  # noqa: F401
from tests.integration.conftest import local_cluster  # noqa: F401
from tests.integration.operator_harness import Kube
from tests.reliability.kwokjobs import put_model_config

REPO = Path(__file__).resolve().parents[2]
TRAINER = str(REPO / ".venv" / "bin" / "lora-trainer")
DATA = REPO / "examples" / "data"


@pytest.fixture(scope="module")
def kube(local_cluster: Any) -> Kube:  # noqa: F811 (the fixture imported above)
    return Kube(str(local_cluster.kubectl), str(local_cluster.kubeconfig))


@pytest.fixture(scope="module")
def s3k(local_cluster: Any) -> Any:  # noqa: F811 (the fixture imported above)
    client = boto3.client("s3", endpoint_url=local_cluster.s3_endpoint,
                          aws_access_key_id=local_cluster.s3_access_key,
                          aws_secret_access_key=local_cluster.s3_secret_key,
                          region_name=local_cluster.s3_region)
    put_model_config(client)
    return client


@dataclass
class TrainerRun:
    """One `lora-trainer run` process: exit status, combined output, termination result."""

    code: int
    output: str
    result: dict[str, Any]

    @property
    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output.splitlines():
            if line.startswith('{"event"'):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out


def tiny_cli_job(name: str, model_uri: str, output_uri: str, *, endpoint: str | None = None,
                 max_steps: int = 6, save_steps: int = 2, data: dict[str, str] | None = None,
                 ) -> dict[str, Any]:
    """A LoRAJob manifest for `lora-trainer run` with the tiny model: seconds on a CPU."""
    data = data or {k: f"file://{DATA / f'{k}.jsonl'}" for k in ("train", "validation", "test")}
    output: dict[str, Any] = {"uri": output_uri, "overwrite": True}
    if endpoint:
        output["endpoint"] = endpoint
    return {
        "apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRAJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "baseModel": {"uri": model_uri},
            "dataset": {"uri": data["train"], "format": "chat",
                        "validation": {"uri": data["validation"]}, "test": {"uri": data["test"]}},
            "method": "lora",
            "lora": {"r": 4, "alpha": 8},
            "training": {"maxSteps": max_steps, "learningRate": 5e-3, "microBatchSize": 2,
                         "gradientAccumulationSteps": 1, "maxSeqLength": 128,
                         "gradientCheckpointing": False, "evalSteps": max_steps,
                         "saveSteps": save_steps, "warmupRatio": 0.0},
            "evaluation": {"prompts": ["Extract the order: 2 mugs to Oslo."], "maxNewTokens": 4},
            "output": output,
        },
    }


def run_trainer(job: dict[str, Any], workdir: Path, *, env: dict[str, str] | None = None,
                timeout: float = 420) -> TrainerRun:
    """`lora-trainer run --job` as a subprocess, as a user (or the pod) would run it."""
    workdir.mkdir(parents=True, exist_ok=True)
    manifest = workdir / f"{job['metadata']['name']}-{uuid.uuid4().hex[:6]}.yaml"
    manifest.write_text(yaml.safe_dump(job))
    term = manifest.with_suffix(".result")
    full_env = {**os.environ, "LORA_TERMINATION_MESSAGE_PATH": str(term),
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([TRAINER, "run", "--job", str(manifest), "--device", "cpu"],
                          capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=workdir)
    result = json.loads(term.read_text()) if term.exists() else {}
    return TrainerRun(proc.returncode, proc.stdout + proc.stderr, result)


def s3_env(ci: Any, endpoint: str | None = None, secret: str | None = None) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ci.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": secret or ci.s3_secret_key,
            "AWS_REGION": ci.s3_region, "AWS_DEFAULT_REGION": ci.s3_region,
            "AWS_ENDPOINT_URL": endpoint or ci.s3_endpoint,
            "AWS_ENDPOINT_URL_S3": endpoint or ci.s3_endpoint}


def keys_under(s3_client: Any, bucket: str, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix):]] = int(obj["Size"])
    return out


@pytest.fixture
def python() -> str:
    return sys.executable

"""The dataset preflight stage against the real local cluster: the operator creates a CPU-only
preflight Job before any trainer Job, reads the report from its pod's termination message,
and either Fails the LoRAJob (InvalidDataset, nothing asks for a GPU) or goes on.

kwok plays the preflight pod here (its outcome comes from `kwok.lorajob.dev/preflight.*`
annotations, as the trainer's does from `kwok.lorajob.dev/*`); tests/e2e/test_preflight.py
runs the real `lora-trainer preflight` on the dev node agent.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from tests.integration.operator_harness import Kube
from tests.reliability import kwokjobs

pytestmark = pytest.mark.cluster
INSTANCE = f"pf-{uuid.uuid4().hex[:6]}"
PASSED = {"verdict": "Passed", "reason": "DatasetValidated",
          "message": "chat rows: train 320, validation 48; train p95 71 of 2048 tokens",
          "format": "chat", "maxSeqLength": 2048,
          "splits": {"train": {"rows": 320, "tokenLength": {"p50": 67, "p95": 71, "max": 75},
                               "truncatedPercent": 0.0},
                     "validation": {"rows": 48, "tokenLength": {"p50": 66, "p95": 69, "max": 72},
                                    "truncatedPercent": 0.0}},
          "overlap": {"maxFraction": 0.0}}
FAILED = {"verdict": "Failed", "reason": "InvalidDataset",
          "message": "1 row(s) refused, the trainer stops at the first: "
                     "train.jsonl:7: messages has no assistant turn to learn from",
          "format": "chat", "splits": {"train": {"rows": 320, "refused": 1}},
          "refused": [{"file": "train.jsonl", "line": 7,
                       "reason": "messages has no assistant turn to learn from"}]}


def preflight(code: int, report: dict[str, Any]) -> dict[str, str]:
    return {"kwok.lorajob.dev/preflight.exit-code": str(code),
            "kwok.lorajob.dev/preflight.termination-message": json.dumps(report)}


@pytest.fixture(scope="module")
def kube(local_cluster: Any) -> Kube:
    return Kube(str(local_cluster.kubectl), str(local_cluster.kubeconfig))


@pytest.fixture(scope="module")
def s3(local_cluster: Any) -> Any:
    client = boto3.client("s3", endpoint_url=local_cluster.s3_endpoint,
                          aws_access_key_id=local_cluster.s3_access_key,
                          aws_secret_access_key=local_cluster.s3_secret_key,
                          region_name=local_cluster.s3_region)
    kwokjobs.put_model_config(client)
    return client


@pytest.fixture(scope="module")
def ns(kube: Kube, local_cluster: Any, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[str]:
    name = kube.create_namespace("pf")
    # Pod Security "restricted" is enforced: the preflight pod must be admitted under it.
    kube.run("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted",
             "pod-security.kubernetes.io/enforce-version=latest")
    op = kwokjobs.start_operator(local_cluster, [name], tmp_path_factory.mktemp("op"), INSTANCE)
    try:
        yield name
    finally:
        op.stop()
        kube.delete_namespace(name)


def job(name: str, ns: str, annotations: dict[str, str]) -> dict[str, Any]:
    """A LoRAJob with the preflight on (kwokjobs' default turns it off)."""
    return kwokjobs.lorajob(name, ns, INSTANCE, annotations=annotations,
                            dataset={"uri": "s3://lora-test/data/train.jsonl"})


def preflight_pod(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    (pod,) = kube.list("pods", ns, f"lorajob.dev/job-name={name},lorajob.dev/component=preflight")
    return pod


def test_bad_dataset_fails_before_any_gpu_is_requested(kube: Kube, s3: Any, ns: str) -> None:
    kube.apply(job("bad", ns, {**preflight(3, FAILED), **kwokjobs.success(ns, "bad", s3)}))
    st = kube.wait_phase(ns, "bad", "Failed", timeout=90)
    assert kwokjobs.condition(st, "Failed")["reason"] == "InvalidDataset"
    assert "train.jsonl:7" in st["message"]
    validated = kwokjobs.condition(st, "DatasetValidated")
    assert (validated["status"], validated["reason"]) == ("False", "InvalidDataset")
    assert st["dataset"]["verdict"] == "Failed"
    assert st["dataset"]["refused"] == FAILED["refused"]
    # Only the preflight Job exists: no trainer Job, no pod that asks for a GPU.
    assert [j["metadata"]["name"] for j in kwokjobs.jobs_of(kube, ns, "bad")] == ["bad-preflight"]
    for pod in kube.list("pods", ns, "lorajob.dev/job-name=bad"):
        for c in pod["spec"]["containers"]:
            assert "nvidia.com/gpu" not in (c.get("resources") or {}).get("limits", {})
    node = json.loads(kube.run("get", "node", preflight_pod(kube, ns, "bad")["spec"]["nodeName"],
                               "-o", "json"))
    assert "nvidia.com/gpu" not in node["status"]["capacity"]


def test_good_dataset_is_reported_and_the_trainer_job_follows(kube: Kube, s3: Any,
                                                              ns: str) -> None:
    kube.apply(job("good", ns, {**preflight(0, PASSED), **kwokjobs.success(ns, "good", s3)}))
    st = kube.wait_phase(ns, "good", "Succeeded", timeout=120)
    assert st["dataset"]["verdict"] == "Passed"
    assert st["dataset"]["splits"]["train"]["rows"] == 320
    assert st["dataset"]["splits"]["validation"]["tokenLength"] == {"p50": 66, "p95": 69, "max": 72}
    assert st["dataset"]["checkedAt"]
    validated = kwokjobs.condition(st, "DatasetValidated")
    assert (validated["status"], validated["reason"]) == ("True", "DatasetValidated")
    jobs = {j["metadata"]["name"]: j for j in kwokjobs.jobs_of(kube, ns, "good")}
    assert set(jobs) == {"good-preflight", "good-a1"}
    # The trainer Job was created only after the preflight Job had completed.
    assert jobs["good-a1"]["metadata"]["creationTimestamp"] >= \
        jobs["good-preflight"]["status"]["completionTime"]
    pod = preflight_pod(kube, ns, "good")
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert "lorajob.dev/attempt" not in pod["metadata"]["labels"]


def test_disabled_preflight_goes_straight_to_the_trainer(kube: Kube, s3: Any, ns: str) -> None:
    kube.apply(kwokjobs.lorajob("off", ns, INSTANCE, annotations=kwokjobs.success(ns, "off", s3)))
    st = kube.wait_phase(ns, "off", "Succeeded", timeout=90)
    assert "dataset" not in st
    assert [j["metadata"]["name"] for j in kwokjobs.jobs_of(kube, ns, "off")] == ["off-a1"]


def test_only_tokenizer_files_are_downloaded_from_s3(s3: Any, local_cluster: Any,
                                                     tmp_path: Any) -> None:
    """What the preflight's fetch takes from a model folder in real S3: tokenizer, never weights."""
    from lora_trainer import preflight as trainer_preflight
    from lora_trainer import storage

    prefix = f"preflight/{uuid.uuid4().hex[:6]}/model/"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors",
                 "model-00001-of-00002.safetensors", "pytorch_model.bin"):
        s3.put_object(Bucket="lora-test", Key=prefix + name, Body=b"{}")
    opts = storage.StorageOptions(endpoint=local_cluster.s3_endpoint)
    env = {"AWS_ACCESS_KEY_ID": local_cluster.s3_access_key,
           "AWS_SECRET_ACCESS_KEY": local_cluster.s3_secret_key}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        got = storage.download(f"s3://lora-test/{prefix}", tmp_path, opts, missing=storage.ExitCode.MODEL,
                               include=trainer_preflight.tokenizer_files(None))
    assert sorted(p.name for p in got.iterdir()) == ["config.json", "tokenizer.json",
                                                      "tokenizer_config.json"]

"""The dataset preflight for real: the operator's CPU-only preflight Job runs
`lora-trainer preflight` on the dev node agent against SeaweedFS, with the tiny model's
tokenizer (only its tokenizer files are fetched) and the example data.

A dataset with a malformed row Fails with InvalidDataset, naming the file and line, before a
trainer Job exists; the example dataset is reported in status.dataset and the trainer Job
follows.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.e2e.conftest import REPO, TinyModel, kubectl, kubectl_json, tiny_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]


def wait_for(what: str, fn: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}: {last}")


def status_of(ci: Any, ns: str, name: str) -> dict[str, Any]:
    return ((kubectl_json(ci, "-n", ns, "get", "lorajob", name) or {}).get("status")) or {}


def jobs_of(ci: Any, ns: str, name: str) -> list[str]:
    out = kubectl_json(ci, "-n", ns, "get", "jobs", "-l", f"lorajob.dev/job-name={name}") or {}
    return sorted(j["metadata"]["name"] for j in out.get("items", []))


def test_bad_dataset_fails_with_the_row_before_any_trainer_job(
        cluster: Any, operator: Any, namespace: str, s3: Any, tiny_model: TinyModel,
        dataset: dict[str, str]) -> None:
    lines = (REPO / "examples" / "data" / "train.jsonl").read_text().splitlines()
    lines[6] = json.dumps({"messages": [{"role": "user", "content": "where is my order?"}]})
    key = "e2e/data/bad/train.jsonl"
    s3.put_object(Bucket=cluster.s3_bucket, Key=key, Body=("\n".join(lines) + "\n").encode())
    job = tiny_job("bad-data", namespace, tiny_model,
                   {**dataset, "train": f"s3://{cluster.s3_bucket}/{key}"}, cluster.s3_bucket,
                   max_steps=2, save_steps=2)
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(job))
    st = wait_for("Failed", lambda: (s := status_of(cluster, namespace, "bad-data")).get(
        "phase") == "Failed" and s, 300)
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidDataset", st
    assert st["dataset"]["refused"][0] == {"file": "train.jsonl", "line": 7,
                                           "reason": "messages has no assistant turn to learn from"}
    assert st["dataset"]["splits"]["train"]["rows"] == 320
    assert jobs_of(cluster, namespace, "bad-data") == ["bad-data-preflight"]


def test_good_dataset_is_reported_and_training_starts(
        cluster: Any, operator: Any, namespace: str, tiny_model: TinyModel,
        dataset: dict[str, str]) -> None:
    job = tiny_job("good-data", namespace, tiny_model, dataset, cluster.s3_bucket,
                   max_steps=2, save_steps=2)
    kubectl(cluster, "apply", "-f", "-", input=json.dumps(job))
    try:
        st = wait_for("status.dataset", lambda: (s := status_of(cluster, namespace, "good-data"))
                      .get("dataset") and s, 300)
        report = st["dataset"]
        assert report["verdict"] == "Passed", report
        assert report["format"] == "chat"
        assert {k: v["rows"] for k, v in report["splits"].items()} == \
            {"train": 320, "validation": 48, "test": 48}
        tl = report["splits"]["train"]["tokenLength"]
        assert 0 < tl["p50"] <= tl["p95"] <= tl["max"]
        assert report["overlap"]["maxFraction"] == 0.0
        validated = next(c for c in st["conditions"] if c["type"] == "DatasetValidated")
        assert validated["status"] == "True"
        wait_for("the trainer Job", lambda: "good-data-a1" in jobs_of(cluster, namespace,
                                                                      "good-data"), 60)
        # The preflight fetched the tokenizer files, never the weights (its log says which).
        log = kubectl(cluster, "-n", namespace, "logs", "job/good-data-preflight").stdout
        fetched = next(line for line in log.splitlines() if "tokenizer files fetched" in line)
        assert "tokenizer.json" in fetched and "config.json" in fetched, fetched
        assert "safetensors" not in fetched, fetched
        event = json.loads(next(line for line in log.splitlines() if '"preflight"' in line))
        assert event["verdict"] == "Passed"
    finally:
        kubectl(cluster, "-n", namespace, "delete", "lorajob", "good-data", "--wait=false",
                check=False)

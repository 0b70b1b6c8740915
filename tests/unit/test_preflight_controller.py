"""The controller's preflight stage against the in-memory API of test_status_controller: the
preflight Job comes first, the trainer Job only after it passed, a bad dataset fails the
job without a trainer Job, and status.dataset (trainer-writable) decides nothing."""

from __future__ import annotations

import copy
import json
from typing import Any

from lora_operator.build import preflight_job
from tests.unit.test_status_controller import (  # fake_planner: autouse, no network
    KEY,
    fake_planner,  # noqa: F401
    make,
    new_lorajob,
    reconcile,
)

PASSED = {"verdict": "Passed", "reason": "DatasetValidated", "message": "chat rows: train 9",
          "format": "chat", "splits": {"train": {"rows": 9}}}
FAILED = {"verdict": "Failed", "reason": "InvalidDataset",
          "message": "1 row(s) refused: train.jsonl:3: field 'messages' must be a non-empty list",
          "refused": [{"file": "train.jsonl", "line": 3,
                       "reason": "field 'messages' must be a non-empty list"}]}


def with_preflight() -> dict[str, Any]:
    lj = new_lorajob()
    lj["spec"]["dataset"] = {"uri": "s3://data/train.jsonl"}
    return lj


def finish(view: Any, kube: Any, condition: str, code: int, report: dict[str, Any]) -> None:
    """The watch sees the preflight Job finished and its pod terminated with `report`."""
    job = copy.deepcopy(kube.jobs()["bot-preflight"])
    job["status"] = {"conditions": [{"type": condition, "status": "True", "reason": ""}],
                     "completionTime": "2025-01-01T00:01:00Z"}
    view.job_map[KEY] = {"bot-preflight": job}
    phase = "Succeeded" if code == 0 else "Failed"
    pod = {"metadata": {"name": "bot-preflight-x", "labels": job["spec"]["template"]["metadata"]
                        ["labels"], "creationTimestamp": "2025-01-01T00:00:30Z"},
           "status": {"phase": phase, "containerStatuses": [{"name": "preflight", "state": {
               "terminated": {"exitCode": code, "message": json.dumps(report)}}}]}}
    view.pod_map[KEY] = {"bot-preflight-x": pod}


def test_preflight_job_comes_before_any_trainer_job() -> None:
    ctl, kube, _, _ = make(with_preflight())
    reconcile(ctl)
    assert set(kube.jobs()) == {"bot-preflight"}
    assert preflight_job.is_preflight(kube.jobs()["bot-preflight"])
    st = kube.lorajob["status"]
    assert st["phase"] == "Pending" and st["message"] == "creating the dataset preflight Job"
    validated = next(c for c in st["conditions"] if c["type"] == "DatasetValidated")
    assert validated["status"] == "Unknown"


def test_passed_preflight_writes_the_report_then_creates_the_trainer_job() -> None:
    ctl, kube, view, events = make(with_preflight())
    reconcile(ctl)
    finish(view, kube, "Complete", 0, PASSED)
    reconcile(ctl)
    assert set(kube.jobs()) == {"bot-preflight", "bot-a1"}
    st = kube.lorajob["status"]
    assert st["dataset"]["splits"]["train"]["rows"] == 9
    assert next(c for c in st["conditions"] if c["type"] == "DatasetValidated")["status"] == "True"
    assert events == []  # a passed check needs no attention: the condition says it


def test_bad_dataset_fails_without_a_trainer_job() -> None:
    ctl, kube, view, events = make(with_preflight())
    reconcile(ctl)
    finish(view, kube, "Failed", 3, FAILED)
    reconcile(ctl)
    reconcile(ctl)  # a Failed job stays failed and still has no trainer Job
    st = kube.lorajob["status"]
    assert st["phase"] == "Failed"
    assert next(c for c in st["conditions"] if c["type"] == "Failed")["reason"] == "InvalidDataset"
    assert st["dataset"]["refused"][0]["line"] == 3
    assert set(kube.jobs()) == {"bot-preflight"}
    assert ("Warning", "InvalidDataset") in [(e.type, e.reason) for e in events]


def test_a_forged_status_dataset_does_not_skip_the_preflight() -> None:
    lj = with_preflight()
    lj["status"] = {"dataset": PASSED, "conditions": [
        {"type": "DatasetValidated", "status": "True", "reason": "DatasetValidated"}]}
    ctl, kube, _, _ = make(lj)
    reconcile(ctl)
    assert set(kube.jobs()) == {"bot-preflight"}

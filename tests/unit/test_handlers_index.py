"""The operator's watch indexes keep only what the controller reads: the status it derives
from a projected Job and pod is the one it derives from the whole objects."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from lora_operator.reconcile import handlers
from tests.unit.test_build_job import build
from tests.unit.test_status import derive, job, lorajob, pod, result_json

MANAGED = [{"manager": "kube-controller-manager", "operation": "Update",
            "fieldsV1": {"f:status": {"f:conditions": {}}}}]


def real_job(*conds: tuple[str, str], **kw: Any) -> dict[str, Any]:
    """`test_status.job` with everything a served Job has: kind, our pod template, managedFields."""
    out = {"apiVersion": "batch/v1", "kind": "Job", **job(*conds, **kw)}
    built = build()
    out["spec"] = {**built["spec"], **out["spec"]}
    out["metadata"]["managedFields"] = MANAGED
    return out


def real_pod(phase: str, **kw: Any) -> dict[str, Any]:
    """`test_status.pod` with its kind and the trainer's whole container (env, volumes,
    security context)."""
    out = {"apiVersion": "v1", "kind": "Pod", **pod(phase, **kw)}
    template = build()["spec"]["template"]["spec"]
    container = {**template["containers"][0], **out["spec"]["containers"][0]}
    out["spec"] = {**template, **out["spec"], "containers": [container]}
    out["metadata"]["managedFields"] = MANAGED
    return out


def index(fn: Any, body: dict[str, Any]) -> dict[str, Any]:
    got: dict[Any, dict[str, Any]] = asyncio.run(fn(namespace="ml", labels={
        "lorajob.dev/job-name": "bot"}, body=copy.deepcopy(body)))
    return next(iter(got.values()))


SCENARIOS = {
    "scheduling": (real_job(), [real_pod("Pending", unschedulable="0/9 nodes are available")]),
    "running": (real_job(), [real_pod("Running")]),
    "succeeded": (real_job(("Complete", "Completed")),
                  [real_pod("Succeeded", message=result_json())]),
    "oom": (real_job(("Failed", "PodFailurePolicy")),
            [real_pod("Failed", exit_code=137, message="OOMKilled")]),
    "suspended": (real_job(suspend=True), []),
    "deadline": (real_job(("Failed", "DeadlineExceeded"), deadline=60), [real_pod("Failed")]),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_projection_derives_the_same_status(name: str) -> None:
    full_job, full_pods = SCENARIOS[name]
    slim_job = index(handlers.job_index, full_job)
    slim_pods = [index(handlers.pod_index, p) for p in full_pods]
    lj = lorajob("Running")
    assert derive(lj, slim_job, slim_pods).patch == derive(lj, full_job, full_pods).patch


def test_projection_drops_the_bulk() -> None:
    full_job, (full_pod,) = SCENARIOS["running"]
    slim_job, slim_pod = index(handlers.job_index, full_job), index(handlers.pod_index, full_pod)
    assert "template" in full_job["spec"] and "template" not in slim_job["spec"]
    assert "managedFields" not in slim_job["metadata"] | slim_pod["metadata"]
    assert full_pod["spec"]["containers"][0]["env"]
    assert slim_pod["spec"]["containers"] == [{"name": "trainer",
                                               "resources": full_pod["spec"]["containers"][0]["resources"]}]
    assert set(slim_pod["spec"]) == {"nodeName", "containers"}
    assert len(repr(slim_pod)) < len(repr(full_pod)) / 2

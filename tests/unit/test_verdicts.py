"""Each verdict branch on its own: it answers only when its facts hold."""

from __future__ import annotations

import json
from typing import Any

from lora_operator import api
from lora_operator.build import names
from lora_operator.reconcile import verdicts as v
from tests.unit.test_status import NOW, job, lorajob, pod, result_json

Phase = api.Phase


def facts(lj: dict[str, Any], j: dict[str, Any] | None, pods: list[dict[str, Any]],
          manifest: v.ManifestCheck | None = None, attempt: int = 1) -> v.Facts:
    return v.Facts.of(lj, j, pods, attempt, manifest, NOW, 600.0)


def test_no_job_creates_or_stays_suspended() -> None:
    assert v.no_job(facts(lorajob(), job(), [])) is None
    creating = v.no_job(facts(lorajob(), None, []))
    assert creating is not None and creating.reason == "CreatingJob"
    got = v.no_job(facts(lorajob(suspend=True), None, []))
    assert got is not None and got.phase == Phase.SUSPENDED


def test_completed_needs_the_result_and_the_manifest() -> None:
    assert v.completed(facts(lorajob(), job(), [pod("Running")])) is None
    done = job(("Complete", ""))
    ok = [pod("Succeeded", message=result_json())]
    waiting = v.completed(facts(lorajob(), done, []))
    assert waiting is not None and (waiting.reason, waiting.requeue) == ("WaitingForPodStatus", True)
    verifying = v.completed(facts(lorajob(), done, ok))
    assert verifying is not None and verifying.reason == "VerifyingManifest"
    missing = v.completed(facts(lorajob(), done, ok, v.ManifestCheck(False, "gone")))
    assert missing is not None and (missing.phase, missing.reason) == (Phase.FAILED, "ManifestMissing")
    success = v.completed(facts(lorajob(), done, ok, v.ManifestCheck(True, "ok")))
    assert success is not None and success.phase == Phase.SUCCEEDED
    assert success.node == "gpu-l4-0" and success.result is not None


def test_failed_reads_the_job_condition_and_the_exit() -> None:
    assert v.failed(facts(lorajob(), job(), [pod("Failed", exit_code=3)])) is None
    assert v.failed(facts(lorajob(), None, [])) is None
    deadline = v.failed(facts(lorajob(), job(("Failed", "DeadlineExceeded"), deadline=60), []))
    assert deadline is not None and deadline.reason == "DeadlineExceeded"
    oom = v.failed(facts(lorajob(), job(("FailureTarget", "PodFailurePolicy")),
                         [pod("Failed", exit_code=42)]))
    assert oom is not None and oom.escalate and oom.phase == Phase.SCHEDULING
    msg = json.dumps({"exitCode": 1, "reason": "CustomReason", "message": "boom"})
    other = v.failed(facts(lorajob(), job(("Failed", "PodFailurePolicy")),
                           [pod("Failed", exit_code=1, message=msg)]))
    assert other is not None and (other.reason, other.message) == ("CustomReason", "exit code 1: boom")


def test_suspended_by_user_by_kueue_or_resuming() -> None:
    assert v.suspended(facts(lorajob(), job(), [])) is None
    by_user = v.suspended(facts(lorajob(suspend=True), job(suspend=True), []))
    assert by_user is not None and by_user.phase == Phase.SUSPENDED
    queued = v.suspended(facts(lorajob(labels={names.KUEUE_QUEUE_LABEL: "q"}), job(suspend=True), []))
    assert queued is not None and queued.phase == Phase.QUEUED and "queue q" in queued.message
    resuming = v.suspended(facts(lorajob(), job(suspend=True), []))
    assert resuming is not None and resuming.reason == "Resuming"
    suspending = v.suspended(facts(lorajob(suspend=True), job(), [pod("Running")]))
    assert suspending is not None and suspending.message == "suspending the trainer"


def _lost() -> dict[str, Any]:
    p = pod("Failed", name="gone", node="n1")
    p["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True",
                                      "reason": "EvictionByEvictionAPI", "message": "evicted"})
    return p


def test_pod_lost_until_a_replacement_runs() -> None:
    assert v.pod_lost(facts(lorajob(), job(), [pod("Pending")])) is None
    lost = v.pod_lost(facts(lorajob(), job(), [_lost()]))
    assert lost is not None and lost.reason == "PodLost" and "gone on node n1" in lost.message
    replaced = [_lost(), pod("Running", name="new", created="2025-01-01T11:10:00Z")]
    assert v.pod_lost(facts(lorajob(), job(), replaced)) is None
    remembered = v.pod_lost(facts(lorajob(message=lost.message), job(), []))
    assert remembered is not None and remembered.message == lost.message


def test_pod_state_running_exporting_retrying_and_scheduling() -> None:
    def reason(lj: dict[str, Any], pods: list[dict[str, Any]]) -> str:
        return v.pod_state(facts(lj, job(), pods)).reason

    assert reason(lorajob(), []) == "WaitingForPod"
    assert reason(lorajob(), [pod("Running")]) == "TrainerRunning"
    assert reason(lorajob(progress={"step": 5, "totalSteps": 5}), [pod("Running")]) == "Exporting"
    assert reason(lorajob(), [pod("Succeeded")]) == "Exporting"
    assert reason(lorajob(), [pod("Failed", exit_code=75)]) == "Retrying"
    assert reason(lorajob(), [pod("Pending", unschedulable="no gpu")]) == "Unschedulable"
    assert reason(lorajob(), [pod("Pending")]) == "ContainerCreating"
    assert reason(lorajob(), [pod("Pending", node=None)]) == "Pending"


def test_verdict_asks_in_order_and_only_about_the_current_attempt() -> None:
    # A finished Job outranks a suspend request and its pods' states.
    done = v.verdict(lorajob(suspend=True), job(("Failed", "DeadlineExceeded"), deadline=5),
                     [pod("Running")], 1, None, NOW, 600.0)
    assert done.reason == "DeadlineExceeded"
    old_and_new = [pod("Running", attempt=1, name="old"), pod("Pending", attempt=2, name="new")]
    assert v.verdict(lorajob(), job(attempt=2), old_and_new, 2, None, NOW, 600.0).reason == \
        "ContainerCreating"

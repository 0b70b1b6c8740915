"""derive_status over child-state combinations, with plain dicts (no cluster)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from lora_operator import api, contract
from lora_operator.build import names
from lora_operator.reconcile import children
from lora_operator.reconcile import status as st
from lora_operator.reconcile.status import ManifestCheck, derive_status
from lora_operator.settings import load_settings

SETTINGS = load_settings()
NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
T0 = "2025-01-01T11:00:00Z"
PLACEMENT = {"method": "lora", "vramClass": "l4-24gb", "gpus": 1, "deepspeed": "none",
             "estimatedVramGiB": 17.5}


def lorajob(phase: str | None = "Pending", *, attempts: int = 1, suspend: bool = False,
            labels: dict[str, str] | None = None, progress: dict[str, Any] | None = None,
            conditions: list[dict[str, Any]] | None = None, backoff: int = 2,
            spec_extra: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"placement": dict(PLACEMENT), "attempts": attempts, **status}
    if phase:
        s["phase"] = phase
    if progress:
        s["progress"] = progress
    if conditions is not None:
        s["conditions"] = conditions
    spec = {"baseModel": {"uri": "hf://a/b"}, "runPolicy": {"suspend": suspend,
                                                            "backoffLimit": backoff}}
    spec.update(spec_extra or {})
    return {"metadata": {"name": "bot", "namespace": "ml", "uid": "u", "generation": 1,
                         "labels": labels or {}},
            "spec": spec, "status": s}


def job(*conds: tuple[str, str], suspend: bool = False, attempt: int = 1,
        deadline: int | None = None, spec_hash: str | None = None) -> dict[str, Any]:
    ann = {names.SPEC_HASH_ANNOTATION: spec_hash} if spec_hash else {}
    spec: dict[str, Any] = {"suspend": suspend}
    if deadline:
        spec["activeDeadlineSeconds"] = deadline
    return {"metadata": {"name": f"bot-a{attempt}", "labels": {names.ATTEMPT_LABEL: str(attempt)},
                         "annotations": ann},
            "spec": spec,
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": r}
                                      for t, r in conds]}}


def pod(phase: str, *, attempt: int = 1, node: str | None = "gpu-l4-0", name: str = "p1",
        exit_code: int | None = None, message: str | None = None,
        unschedulable: str | None = None, started: str = T0, finished: str | None = None,
        gpus: int = 1, created: str = T0) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if phase == "Running":
        state = {"running": {"startedAt": started}}
    elif phase in ("Succeeded", "Failed"):
        state = {"terminated": {"exitCode": exit_code or 0, "startedAt": started,
                                "finishedAt": finished or "2025-01-01T11:30:00Z"}}
        if message is not None:
            state["terminated"]["message"] = message
    conditions = []
    if unschedulable:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                           "message": unschedulable})
    return {"metadata": {"name": name, "creationTimestamp": created,
                         "labels": {names.ATTEMPT_LABEL: str(attempt),
                                    names.VRAM_CLASS_LABEL: "l4-24gb"}},
            "spec": {"nodeName": node if not unschedulable else None,
                     "containers": [{"name": "trainer",
                                     "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
            "status": {"phase": phase, "conditions": conditions,
                       "containerStatuses": [{"name": "trainer", "state": state}]}}


def result_json(**kw: Any) -> str:
    data = {"exitCode": 0, "reason": "Completed", "adapterUri": "s3://b/bot/",
            "manifestUri": "s3://b/bot/manifest.json", "sizeBytes": 1234,
            "baseEvalLoss": 2.0, "adapterEvalLoss": 1.5, **kw}
    return json.dumps(data)


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Apply a JSON merge patch (RFC 7386), as the API server does."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            merge(target[k], v)
        else:
            target[k] = v


def derive(lj: dict[str, Any], j: dict[str, Any] | None, pods: list[dict[str, Any]],
           **kw: Any) -> st.Derived:
    return derive_status(lj, j, pods, SETTINGS, now=NOW, **kw)


def conds(d: st.Derived) -> dict[str, str]:
    return {c["type"]: c["status"] for c in d.patch["conditions"]}


# ------------------------------------------------------------------ phases


def test_no_job_yet_is_pending_and_planned() -> None:
    d = derive(lorajob(None), None, [])
    assert d.phase == api.Phase.PENDING
    assert conds(d) == {"Planned": "True"}
    assert d.patch["observedGeneration"] == 1


def test_unschedulable_pod_carries_scheduler_message() -> None:
    msg = "0/9 nodes are available: 9 Insufficient nvidia.com/gpu."
    d = derive(lorajob(), job(), [pod("Pending", unschedulable=msg)])
    assert d.phase == api.Phase.SCHEDULING
    sched = next(c for c in d.patch["conditions"] if c["type"] == "Scheduled")
    assert (sched["status"], sched["reason"], sched["message"]) == ("False", "Unschedulable", msg)
    assert d.events and d.events[0].type == "Warning"


def test_bound_pod_is_scheduling_with_scheduled_true() -> None:
    d = derive(lorajob(), job(), [pod("Pending")])
    assert d.phase == api.Phase.SCHEDULING
    assert conds(d)["Scheduled"] == "True"
    assert d.patch["placement"] == {"node": "gpu-l4-0"}


def test_running_sets_start_time_and_conditions() -> None:
    d = derive(lorajob("Scheduling"), job(), [pod("Running")])
    assert d.phase == api.Phase.RUNNING
    assert conds(d) == {"Planned": "True", "Scheduled": "True", "Running": "True"}
    assert d.patch["startTime"] == "2025-01-01T12:00:00Z"
    assert d.events[0].reason == "TrainerRunning"
    assert "progress" not in d.patch


def test_last_step_reported_means_uploading() -> None:
    lj = lorajob("Running", progress={"step": 900, "totalSteps": 900}, startTime=T0)
    d = derive(lj, job(), [pod("Running")])
    assert d.phase == api.Phase.UPLOADING
    assert conds(d)["Uploading"] == "True" and conds(d)["Running"] == "True"


def test_completed_job_waits_for_manifest_check() -> None:
    pods = [pod("Succeeded", message=result_json())]
    d = derive(lorajob("Running"), job(("Complete", "")), pods)
    assert d.phase == api.Phase.UPLOADING
    assert d.result is not None and d.result.manifest_uri == "s3://b/bot/manifest.json"


def test_success_with_result_cost_and_completion() -> None:
    pods = [pod("Succeeded", message=result_json(), gpus=2)]
    d = derive(lorajob("Uploading", startTime=T0), job(("Complete", "")), pods,
               manifest=ManifestCheck(True, "manifest verified in storage"))
    assert d.phase == api.Phase.SUCCEEDED
    assert conds(d)["Succeeded"] == "True"
    assert d.patch["result"]["adapterUri"] == "s3://b/bot/"
    assert d.patch["result"]["adapterEvalLoss"] == 1.5
    assert d.patch["completionTime"] == "2025-01-01T12:00:00Z"
    # 30 minutes × 2 GPUs at 0.80 USD / GPU-hour
    assert d.patch["cost"] == {"gpuHours": 1.0, "estimatedUSD": 0.8}


def test_missing_manifest_fails() -> None:
    d = derive(lorajob("Uploading"), job(("Complete", "")),
               [pod("Succeeded", message=result_json())],
               manifest=ManifestCheck(False, "s3://b/bot/manifest.json is not in storage"))
    assert d.phase == api.Phase.FAILED
    failed = next(c for c in d.patch["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ManifestMissing"


def test_success_without_result_fails() -> None:
    d = derive(lorajob("Running"), job(("Complete", "")), [pod("Succeeded")])
    assert d.phase == api.Phase.FAILED
    assert d.patch["message"].startswith("the trainer exited 0 but left no result")


def _completed_at(j: dict[str, Any], when: str) -> dict[str, Any]:
    j["status"]["completionTime"] = when
    return j


@pytest.mark.parametrize("pods", [[pod("Running")], []], ids=["pod-not-updated-yet", "pod-not-listed-yet"])
def test_job_complete_before_the_pod_status_waits_for_the_result(pods: list[dict[str, Any]]) -> None:
    """The Job's watch event can overtake the pod's: not a failure (it cost 21 of 1,000
    jobs in the burst benchmark before this rule)."""
    d = derive(lorajob("Running"), _completed_at(job(("Complete", "")), "2025-01-01T11:59:30Z"), pods)
    assert d.phase == api.Phase.UPLOADING
    assert d.requeue
    assert "Failed" not in conds(d)


def test_job_complete_long_ago_without_a_pod_result_fails() -> None:
    d = derive(lorajob("Uploading"), _completed_at(job(("Complete", "")), "2025-01-01T11:58:00Z"),
               [pod("Running")])
    assert d.phase == api.Phase.FAILED
    assert d.patch["message"].startswith("the trainer exited 0 but left no result")


@pytest.mark.parametrize("code", [c for c in contract.ExitCode if c.permanent])
def test_permanent_exit_fails_with_reason_and_message(code: contract.ExitCode) -> None:
    msg = json.dumps({"exitCode": int(code), "reason": code.reason, "message": "bad thing"})
    d = derive(lorajob("Running"), job(("Failed", "PodFailurePolicy")),
               [pod("Failed", exit_code=int(code), message=msg)])
    assert d.phase == api.Phase.FAILED
    failed = next(c for c in d.patch["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == code.reason
    assert "bad thing" in failed["message"]
    assert "Running" not in conds(d)  # never held, so not listed
    assert d.patch["completionTime"]
    assert d.events[0].type == "Warning"


def test_plain_log_termination_message_is_used() -> None:
    d = derive(lorajob("Running"), job(("Failed", "PodFailurePolicy")),
               [pod("Failed", exit_code=3, message="Traceback...\nKeyError: 'text'")])
    assert d.patch["conditions"][-1]["reason"] == "InvalidDataset"
    assert "KeyError" in d.patch["message"]


def test_out_of_memory_escalates_within_budget() -> None:
    d = derive(lorajob("Running"), job(("Failed", "PodFailurePolicy")),
               [pod("Failed", exit_code=42)])
    assert d.escalate is True


def test_out_of_memory_past_budget_fails() -> None:
    d = derive(lorajob("Running", attempts=3, backoff=2),
               job(("Failed", "PodFailurePolicy"), attempt=3),
               [pod("Failed", exit_code=42, attempt=3)])
    assert not d.escalate
    assert d.phase == api.Phase.FAILED
    assert d.patch["conditions"][-1]["reason"] == "OutOfMemory"


def test_only_current_attempt_pods_decide() -> None:
    pods = [pod("Failed", exit_code=42, attempt=1, name="old"),
            pod("Running", attempt=2, name="new", created="2025-01-01T11:40:00Z")]
    d = derive(lorajob("Scheduling", attempts=2), job(attempt=2), pods)
    assert d.phase == api.Phase.RUNNING
    assert "cost" in d.patch  # the old attempt's GPU time counts


def test_deadline_exceeded() -> None:
    d = derive(lorajob("Running"), job(("Failed", "DeadlineExceeded"), deadline=600), [])
    assert d.phase == api.Phase.FAILED
    assert d.patch["conditions"][-1]["reason"] == "DeadlineExceeded"
    assert "600s" in d.patch["message"]


def test_backoff_limit_exceeded_names_last_exit() -> None:
    d = derive(lorajob("Running"), job(("Failed", "BackoffLimitExceeded")),
               [pod("Failed", exit_code=75)])
    assert d.phase == api.Phase.FAILED
    assert d.patch["conditions"][-1]["reason"] == "StorageUnavailable"


def test_retryable_pod_failure_while_job_active_is_scheduling() -> None:
    d = derive(lorajob("Running"), job(), [pod("Failed", exit_code=75)])
    assert d.phase == api.Phase.SCHEDULING
    assert "Retrying" in [e.reason for e in d.events]


def test_pod_lost_with_its_node_names_pod_and_node_until_the_replacement_runs() -> None:
    lost = pod("Failed", name="bot-a1-x", node="gpu-h100-3")
    lost["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True",
                                         "reason": "DeletionByPodGC",
                                         "message": "PodGC: node no longer exists"})
    lj = lorajob("Running")
    d = derive(lj, job(), [lost, pod("Pending", name="bot-a1-y", created="2025-01-01T11:10:00Z",
                                     unschedulable="0/9 nodes are available")])
    assert d.phase == api.Phase.SCHEDULING
    msg = d.patch["message"]
    assert "bot-a1-x" in msg and "gpu-h100-3" in msg and "DeletionByPodGC" in msg, msg
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "PodLost")]
    # The lost pod is gone from the API: the stored message still says what happened.
    merge(lj["status"], d.patch)
    d2 = derive(lj, job(), [pod("Pending", name="bot-a1-y", created="2025-01-01T11:10:00Z",
                                unschedulable="0/9 nodes are available")])
    assert d2.phase == api.Phase.SCHEDULING and "message" not in d2.patch
    merge(lj["status"], d2.patch)
    assert "bot-a1-x" in lj["status"]["message"]
    # The replacement runs: back to Running.
    d3 = derive(lj, job(), [pod("Running", name="bot-a1-y", created="2025-01-01T11:10:00Z")])
    assert d3.phase == api.Phase.RUNNING


def test_suspended_by_user() -> None:
    lj = lorajob("Running", suspend=True, conditions=[
        {"type": "Running", "status": "True", "reason": "TrainerRunning", "message": "",
         "lastTransitionTime": T0, "observedGeneration": 1}])
    d = derive(lj, job(suspend=True), [])
    assert d.phase == api.Phase.SUSPENDED
    assert conds(d)["Suspended"] == "True"
    assert conds(d)["Running"] == "False"


def test_suspend_requested_before_job_reacts() -> None:
    d = derive(lorajob("Running", suspend=True), job(), [pod("Running")])
    assert d.phase == api.Phase.SUSPENDED


def test_resume_clears_suspended() -> None:
    lj = lorajob("Suspended", conditions=[
        {"type": "Suspended", "status": "True", "reason": "SuspendedByUser", "message": "",
         "lastTransitionTime": T0, "observedGeneration": 1}])
    d = derive(lj, job(), [pod("Running")])
    assert d.phase == api.Phase.RUNNING
    assert conds(d)["Suspended"] == "False"


def test_kueue_job_is_queued_until_admitted() -> None:
    lj = lorajob(labels={names.KUEUE_QUEUE_LABEL: "team-a"})
    d = derive(lj, job(suspend=True), [])
    assert d.phase == api.Phase.QUEUED
    assert conds(d)["Queued"] == "True"
    d2 = derive(lorajob("Queued", labels={names.KUEUE_QUEUE_LABEL: "team-a"},
                        conditions=d.patch["conditions"]), job(), [pod("Running")])
    assert d2.phase == api.Phase.RUNNING
    assert conds(d2)["Queued"] == "False"


def test_full_lifecycle_converges_step_by_step() -> None:
    """Pending → Scheduling → Running → Uploading → Succeeded, re-deriving from each status."""
    lj = lorajob(None)
    steps = [(None, [], "Pending"), (job(), [pod("Pending", unschedulable="no gpu")], "Scheduling"),
             (job(), [pod("Pending")], "Scheduling"), (job(), [pod("Running")], "Running"),
             (job(("Complete", "")), [pod("Succeeded", message=result_json())], "Uploading")]
    for j, pods, phase in steps:
        d = derive(lj, j, pods)
        assert d.phase.value == phase
        merge(lj["status"], d.patch)
        assert derive(lj, j, pods).patch == {}  # converged
    d = derive(lj, job(("Complete", "")), [pod("Succeeded", message=result_json())],
               manifest=ManifestCheck(True, "ok"))
    merge(lj["status"], d.patch)
    final = {c["type"]: c["status"] for c in lj["status"]["conditions"]}
    assert final == {"Planned": "True", "Scheduled": "True", "Running": "False",
                     "Uploading": "False", "Succeeded": "True"}
    assert lj["status"]["placement"]["node"] == "gpu-l4-0"


def test_finished_is_final() -> None:
    for phase in ("Succeeded", "Failed"):
        d = derive(lorajob(phase), job(), [pod("Running")])
        assert d.patch == {} and d.phase.value == phase


def test_no_placement_yet_no_patch() -> None:
    lj = lorajob(None)
    del lj["status"]["placement"]
    assert derive(lj, None, []).patch == {}


# ------------------------------------------------------------------ idempotence


def test_same_inputs_twice_give_empty_patch_and_stable_times() -> None:
    lj = lorajob("Scheduling")
    first = derive(lj, job(), [pod("Running")])
    merge(lj["status"], first.patch)
    later = derive_status(lj, job(), [pod("Running")], SETTINGS,
                          now=NOW + dt.timedelta(minutes=5))
    assert later.patch == {}
    assert later.events == []


def test_transition_time_only_changes_with_status() -> None:
    lj = lorajob("Scheduling")
    merge(lj["status"], derive(lj, job(), [pod("Running")]).patch)
    lj["status"]["progress"] = {"step": 10, "totalSteps": 10}
    d = derive_status(lj, job(), [pod("Running")], SETTINGS, now=NOW + dt.timedelta(minutes=1))
    by = {c["type"]: c for c in d.patch["conditions"]}
    assert by["Running"]["lastTransitionTime"] == "2025-01-01T12:00:00Z"
    assert by["Uploading"]["lastTransitionTime"] == "2025-01-01T12:01:00Z"


def test_spec_change_after_start_is_reported() -> None:
    from lora_operator.build.job import spec_hash

    lj = lorajob("Running")
    original = spec_hash(lj["spec"])
    lj["spec"]["baseModel"] = {"uri": "hf://a/other"}
    d = derive(lj, job(spec_hash=original), [pod("Running")])
    assert conds(d)[st.SPEC_CHANGE_REJECTED] == "True"
    assert "ImmutableFieldChanged" in [e.reason for e in d.events]
    d2 = derive(lorajob("Running"), job(spec_hash=original), [pod("Running")])
    assert st.SPEC_CHANGE_REJECTED not in conds(d2)


# ------------------------------------------------------------------ other patches and helpers


def test_planned_patch_replaces_placement_on_replan() -> None:
    lj = lorajob("Running")
    lj["status"]["placement"].update(node="gpu-l4-0", breakdown={"weights": 1.0, "lora": 2.0})
    p = st.planned_patch(lj, api.Placement(method="lora", vram_class="a100-40gb", gpus=1,
                                           deepspeed="none", breakdown={"weights": 1.0}),
                         now=NOW, attempts=2)
    assert p["attempts"] == 2 and p["phase"] == "Pending"
    assert p["placement"]["node"] is None
    assert p["placement"]["vramClass"] == "a100-40gb"
    assert p["placement"]["breakdown"] == {"weights": 1.0, "lora": None}


def test_failed_patch_for_planning() -> None:
    p = st.failed_patch(lorajob(None), "InsufficientGPUMemory", "needs 300 GiB", now=NOW,
                        planning=True)
    by = {c["type"]: c for c in p["conditions"]}
    assert by["Failed"]["status"] == "True" and by["Planned"]["status"] == "False"
    assert p["phase"] == "Failed" and p["message"] == "needs 300 GiB"


def test_ttl_deadline() -> None:
    lj = lorajob("Succeeded", completionTime="2025-01-01T12:00:00Z")
    lj["spec"]["runPolicy"]["ttlSecondsAfterFinished"] = 60
    assert st.ttl_deadline(lj) == NOW + dt.timedelta(seconds=60)
    assert st.ttl_deadline(lorajob("Running")) is None
    del lj["spec"]["runPolicy"]["ttlSecondsAfterFinished"]
    assert st.ttl_deadline(lj) is None


def test_parse_result_variants() -> None:
    assert children.parse_result(None) == (None, "")
    res, _ = children.parse_result(result_json())
    assert res is not None and res.adapter_uri == "s3://b/bot/"
    res, raw = children.parse_result("not json")
    assert res is None and raw == "not json"


def test_cost_unpriced_class_has_hours_only() -> None:
    p = pod("Succeeded")
    p["metadata"]["labels"][names.VRAM_CLASS_LABEL] = "unknown"
    assert st.cost([p], SETTINGS) == {"gpuHours": 0.5}
    assert st.cost([pod("Running")], SETTINGS) is None


def test_only_warnings_are_posted_as_events() -> None:
    """The way through the phases is in the conditions; an Event is posted only for what
    needs attention (every Event is one more API write per job)."""
    assert st.milestone(st.Event("Warning", "Unschedulable", "0/3 nodes are available"))
    assert st.milestone(st.Event("Warning", "ManifestMissing", "no manifest in storage"))
    for reason in ("TrainerRunning", "Completed", "WaitingForPod", "Exporting", "CreatingJob"):
        assert not st.milestone(st.Event("Normal", reason, "a step")), reason
    unschedulable = derive(lorajob(), job(), [pod("Pending", unschedulable="no gpu")])
    assert [e.reason for e in unschedulable.events if st.milestone(e)] == ["Unschedulable"]
    running = derive(lorajob("Scheduling"), job(), [pod("Running")])
    assert running.events and not any(st.milestone(e) for e in running.events)


@pytest.mark.parametrize(("j", "pods", "phase", "brief"), [
    (None, [], "Pending", ""),  # CreatingJob: the Job is made in the same reconcile
    (job(), [], "Scheduling", "WaitingForPod"),
    (job(), [pod("Pending", node=None)], "Scheduling", "Pending"),
    (job(), [pod("Pending")], "Scheduling", "ContainerCreating"),
    (job(), [pod("Pending", unschedulable="no gpu")], "Scheduling", ""),  # Unschedulable
    (job(), [pod("Running")], "Running", ""),
    (job(), [pod("Succeeded", message=result_json())], "Uploading", "Exporting"),
    (_completed_at(job(("Complete", "")), "2025-01-01T11:59:30Z"), [pod("Running")],
     "Uploading", "WaitingForPodStatus"),
], ids=["creating-job", "waiting-for-pod", "pending", "container-creating", "unschedulable",
        "running", "exporting", "waiting-for-pod-status"])
def test_brief_steps_are_flagged(j: dict[str, Any] | None, pods: list[dict[str, Any]],
                                 phase: str, brief: str) -> None:
    """Steps that usually last moments may wait a progress interval before they are
    written (`brief` names the step); what a user acts on (unschedulable, running) may not."""
    d = derive(lorajob("Scheduling"), j, pods)
    assert (d.phase.value, d.brief) == (phase, brief)


def test_progress_read_from_the_log_replaces_the_status_progress() -> None:
    lj = lorajob("Scheduling")
    merge(lj["status"], derive(lj, job(), [pod("Running")]).patch)
    lj["status"]["progress"] = {"step": 10, "totalSteps": 900, "loss": 2.0}
    assert "progress" not in derive(lj, job(), [pod("Running")]).patch  # nothing read: kept
    read = {"step": 450, "totalSteps": 900, "percent": 50.0}
    d = derive(lj, job(), [pod("Running")], progress=read)
    assert d.phase == api.Phase.RUNNING
    merge(lj["status"], d.patch)
    assert lj["status"]["progress"] == read  # replaced whole: the stale loss is gone
    assert derive(lj, job(), [pod("Running")], progress=read).patch == {}  # converged


def test_progress_at_the_last_step_means_uploading() -> None:
    lj = lorajob("Running", progress={"step": 10, "totalSteps": 900}, startTime=T0)
    d = derive(lj, job(), [pod("Running")], progress={"step": 900, "totalSteps": 900})
    assert d.phase == api.Phase.UPLOADING
    assert d.patch["progress"]["step"] == 900
    assert conds(d)["Uploading"] == "True"


def test_success_completes_the_progress_from_the_result() -> None:
    """The last log read may have missed the last steps: at Succeeded the status shows the
    run finished (the trainer's own step count), keeping what it last read otherwise."""
    lj = lorajob("Uploading", startTime=T0, progress={
        "step": 880, "totalSteps": 900, "percent": 97.78, "loss": 0.5, "etaSeconds": 12.0})
    d = derive(lj, job(("Complete", "")), [pod("Succeeded", message=result_json(steps=900))],
               manifest=ManifestCheck(True, "manifest verified in storage"))
    assert d.phase == api.Phase.SUCCEEDED
    merge(lj["status"], d.patch)
    assert lj["status"]["progress"] == {"step": 900, "totalSteps": 900, "percent": 100.0,
                                        "loss": 0.5, "etaSeconds": 0.0}
    unknown = lorajob("Uploading", startTime=T0, progress={"step": 880, "totalSteps": 900})
    d = derive(unknown, job(("Complete", "")), [pod("Succeeded", message=result_json())],
               manifest=ManifestCheck(True, "manifest verified in storage"))
    assert d.phase == api.Phase.SUCCEEDED and "progress" not in d.patch


def test_a_succeeded_pod_with_a_verified_manifest_is_success_before_its_job_completes() -> None:
    """The Job controller marks the Job complete some time after its pod succeeded (seconds
    in a busy cluster): a verified manifest decides at once; an unverified or refused one
    waits for the Job, as before."""
    pods = [pod("Succeeded", message=result_json())]
    done = derive(lorajob("Running"), job(), pods, manifest=ManifestCheck(True, "verified"))
    assert done.phase == api.Phase.SUCCEEDED and done.patch["result"]["adapterUri"]
    for check in (None, ManifestCheck(None, "storage not answering"),
                  ManifestCheck(False, "not in storage", reason="ManifestMissing")):
        waiting = derive(lorajob("Running"), job(), pods, manifest=check)
        assert (waiting.phase, waiting.brief) == (api.Phase.UPLOADING, "Exporting"), check

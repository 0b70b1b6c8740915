"""The LoRAJob's status, derived in one place from the objects the operator owns.

`derive_status` is a pure function of the LoRAJob, the current attempt's Job, the trainer
pods and the settings (plus the clock and the result of the manifest check, passed in), so
every state combination is unit-tested with plain dicts and a restarted operator computes
the same status from the same cluster. Handlers only gather inputs, apply the patch and
act on the few decisions returned here (escalate after out-of-memory).

Phases and the conditions that hold (each True while it holds, so `kubectl wait
--for=condition=X` works; a condition that stopped holding turns False, keeping history):

    Pending     Planned                      placement written, Job not created yet
    Queued      Planned, Queued              Job suspended and waiting for Kueue
    Scheduling  Planned (+Scheduled=False)   pod not bound yet (Unschedulable carries the
                                             scheduler's message) or container starting
    Running     Planned, Scheduled, Running  trainer container running
    Uploading   ..., Running, Uploading      trainer reported its last step (progress.step
                                             == totalSteps) and is exporting, or the pod
                                             succeeded and the manifest is being verified
    Succeeded   Planned, Scheduled, Succeeded
    Failed      Failed (+Planned=False when planning failed)
    Suspended   Planned, Suspended           runPolicy.suspend: the Job is suspended

Succeeded and Failed are final: nothing here moves a job out of them.

`progress` is what the operator last read from the trainer's log (the controller passes
it in); at Succeeded it is completed from the trainer's result.

This module only assembles: the verdict (`reconcile.verdicts`) says which phase and why, the
phase table (`reconcile.conditions`) which conditions hold, and the patch is one diff of
the desired status against the stored one (`reconcile.merge_patch`), so the writers here
(`derive_status`, `planned_patch`, `failed_patch`) state what the status should be, never
how to get there.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_operator import api, contract
from lora_operator.build import names
from lora_operator.build.job import spec_hash
from lora_operator.reconcile.children import Obj, cost
from lora_operator.reconcile.conditions import (
    MAX_MESSAGE,
    Desired,
    is_true,
    merge_conditions,
    phase_conditions,
    placement_summary,
)
from lora_operator.reconcile.merge_patch import status_patch
from lora_operator.reconcile.timestamps import now_rfc3339, parse_time
from lora_operator.reconcile.verdicts import ManifestCheck, Verdict, verdict
from lora_operator.settings import Settings

Phase = api.Phase
CT = api.ConditionType
SPEC_CHANGE_REJECTED = "SpecChangeRejected"


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post about a transition."""

    type: str  # Normal | Warning
    reason: str
    message: str


# Steps that usually last moments: the Job has not made its pod yet, the pod waits for the
# scheduler or starts its container, the trainer has finished and its Job not yet noticed.
# The controller writes one only if it still holds a progress interval after it was first
# seen, so a burst's jobs cost a write at each phase a user acts on, not at every step in
# between (an honest status: at most one interval behind).
BRIEF_REASONS = frozenset({"WaitingForPod", "Pending", "ContainerCreating", "Exporting",
                           "WaitingForPodStatus"})


def milestone(event: Event) -> bool:
    """Whether an Event is worth posting: only what needs attention (a Warning). The normal
    way through the phases is in the conditions, with their transition times; an Event per
    step would be one more API write per job per step."""
    return event.type == "Warning"


@dataclass
class Derived:
    """The outcome of one derivation."""

    phase: api.Phase
    patch: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    escalate: bool = False  # the attempt ran out of memory and budget remains: re-plan up
    result: contract.TrainerResult | None = None  # when the current attempt's pod succeeded
    requeue: bool = False  # look again later even if no watch event comes
    brief: str = ""  # the verdict's reason when it is one of BRIEF_REASONS


def result_status(result: contract.TrainerResult) -> dict[str, Any]:
    """`status.result` from the trainer's termination-message result."""
    data = result.model_dump(exclude_none=True)
    wanted = api.Result.model_fields.keys()
    res = api.Result.model_validate({k: v for k, v in data.items() if k in wanted})
    return res.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------- the derivation


def derive_status(lorajob: Obj, job: Obj | None, pods: Sequence[Obj], settings: Settings,
                  *, manifest: ManifestCheck | None = None,
                  now: dt.datetime | None = None, attempt: int | None = None,
                  trust_finished: bool = True, progress: Obj | None = None) -> Derived:
    """The status `lorajob` should have, given its current Job and trainer pods.

    `job` is the Job of the current attempt, `pods` every trainer pod of every attempt (cost
    covers them all). The attempt is the caller's (the operator counts it from the Jobs it
    made; `status.attempts` is only the default, for tests). With `trust_finished` False a
    Succeeded/Failed phase in the status is not taken as final but derived afresh.
    `progress`: the trainer's newest progress line, when the caller read one.
    Returns the merge patch to reach it (empty when nothing changed), the Events to post,
    and whether to escalate after out-of-memory.
    """
    status = lorajob.get("status") or {}
    old_phase = status.get("phase")
    if trust_finished and old_phase in (Phase.SUCCEEDED.value, Phase.FAILED.value):
        return Derived(phase=Phase(old_phase))
    if not status.get("placement"):
        return Derived(phase=Phase.PENDING)  # the handler plans first

    now = now or dt.datetime.now(dt.UTC)
    attempt = attempt or int(status.get("attempts") or 1)
    if progress is not None:
        lorajob = {**lorajob, "status": {**status, "progress": dict(progress)}}
    found = verdict(lorajob, job, pods, attempt, manifest, now,
                    settings.manifest_verify_timeout_seconds)
    desired = _desired_conditions(lorajob, job, found)
    want = _desired_status(lorajob, found, desired, attempt, now_rfc3339(now))
    spent = cost(pods, settings)
    if spent is not None:
        want["cost"] = spent
    patch = status_patch(status, want)
    return Derived(phase=found.phase, patch=patch,
                   events=_events(status, found, desired, patch), escalate=found.escalate,
                   result=found.result, requeue=found.requeue,
                   brief=found.reason if found.reason in BRIEF_REASONS else "")


def _desired_conditions(lorajob: Obj, job: Obj | None, found: Verdict) -> Desired:
    """The conditions that hold: the phase's, the verdict's Scheduled, a rejected spec change."""
    status = lorajob.get("status") or {}
    desired = phase_conditions(found.phase, found.reason, found.message, status.get("placement"))
    if found.scheduled is not None:
        desired[CT.SCHEDULED.value] = found.scheduled
    if job is not None and _spec_changed(lorajob, job):
        desired[SPEC_CHANGE_REJECTED] = (
            "True", "ImmutableFieldChanged",
            "the spec changed after the job started; the trainer keeps running the "
            "original spec (only runPolicy may change). Delete and re-create the "
            "LoRAJob to change the rest.")
    return desired


def _spec_changed(lorajob: Obj, job: Obj) -> bool:
    """Whether the LoRAJob's spec differs from the one its Job was made from."""
    want_hash = ((job.get("metadata") or {}).get("annotations") or {}).get(
        names.SPEC_HASH_ANNOTATION)
    return bool(want_hash) and want_hash != spec_hash(dict(lorajob.get("spec") or {}))


def _desired_status(lorajob: Obj, found: Verdict, desired: Desired, attempt: int,
                    stamp: str) -> dict[str, Any]:
    """The whole status after this derivation (keys it does not own kept as they are)."""
    status = lorajob.get("status") or {}
    generation = (lorajob.get("metadata") or {}).get("generation")
    # Retrying or escalating: leave Scheduled as it was.
    keep = [CT.SCHEDULED.value] if found.phase == Phase.SCHEDULING and found.scheduled is None \
        else []
    want: dict[str, Any] = {
        **status,
        "phase": found.phase.value,
        "conditions": merge_conditions(status.get("conditions") or [], desired, generation,
                                       stamp, keep=keep),
        "observedGeneration": generation,
        "message": found.message[:MAX_MESSAGE],
        "attempts": attempt,
    }
    if found.node:
        want["placement"] = {**(status.get("placement") or {}), "node": found.node}
    if found.phase in (Phase.RUNNING, Phase.UPLOADING, Phase.SUCCEEDED) and \
            not status.get("startTime"):
        want["startTime"] = stamp
    if found.phase.finished:
        want["completionTime"] = stamp
        if found.result is not None and found.phase == Phase.SUCCEEDED:
            want["result"] = result_status(found.result)
            if found.result.steps:  # the last step, which the last log read may have missed
                want["progress"] = {**(status.get("progress") or {}), "step": found.result.steps,
                                    "totalSteps": found.result.steps, "percent": 100.0,
                                    "etaSeconds": 0.0}
    if status.get("result") and found.phase != Phase.SUCCEEDED:
        del want["result"]  # only a verified success has a result (a forged one goes)
    return want


def _events(status: Obj, found: Verdict, desired: Desired, patch: Obj) -> list[Event]:
    """The transition, a new Unschedulable, a newly rejected spec change."""
    old_phase = status.get("phase")
    events: list[Event] = []
    if found.phase.value != old_phase:
        events.append(Event(found.event_type, found.reason,
                            f"{old_phase or 'New'} → {found.phase.value}: {found.message}"))
    elif found.scheduled and found.scheduled[0] == "False" and \
            "conditions" in patch and found.reason == "Unschedulable":
        events.append(Event("Warning", "Unschedulable", found.message))
    if SPEC_CHANGE_REJECTED in desired and "conditions" in patch and \
            not is_true({"status": status}, SPEC_CHANGE_REJECTED):
        events.append(Event("Warning", "ImmutableFieldChanged", desired[SPEC_CHANGE_REJECTED][2]))
    return events


# --------------------------------------------------------------------------- other patches


def plan_message(placement: api.Placement) -> str:
    """The status message after planning `placement` (the Planned Event says it too)."""
    return f"planned: {placement_summary(_placement_dict(placement))}"


def planned_patch(lorajob: Obj, placement: api.Placement, now: dt.datetime | None = None,
                  attempts: int = 1, message: str | None = None) -> dict[str, Any]:
    """Status after planning (or re-planning after out-of-memory): placement, Pending, Planned.

    The new placement replaces the old one whole (the old attempt's node and breakdown go)."""
    status = lorajob.get("status") or {}
    generation = (lorajob.get("metadata") or {}).get("generation")
    pl = _placement_dict(placement)
    summary = message or plan_message(placement)
    desired = phase_conditions(Phase.PENDING, "Planned", summary, pl)
    return status_patch(status, {
        **status,
        "phase": Phase.PENDING.value,
        "placement": pl,
        "attempts": attempts,
        "conditions": merge_conditions(status.get("conditions") or [], desired, generation,
                                       now_rfc3339(now), keep=[CT.SCHEDULED.value]),
        "observedGeneration": generation,
        "message": summary[:MAX_MESSAGE],
    })


def _placement_dict(placement: api.Placement) -> dict[str, Any]:
    return placement.model_dump(by_alias=True, exclude_none=True, mode="json")


def failed_patch(lorajob: Obj, reason: str, message: str, now: dt.datetime | None = None,
                 planning: bool = False) -> dict[str, Any]:
    """Status of a job that fails before any pod exists (bad spec, fits nowhere, no shape)."""
    status = lorajob.get("status") or {}
    generation = (lorajob.get("metadata") or {}).get("generation")
    desired: Desired = {CT.FAILED.value: ("True", reason, message)}
    if planning:
        desired[CT.PLANNED.value] = ("False", reason, message)
    stamp = now_rfc3339(now)
    return status_patch(status, {
        **status,
        "phase": Phase.FAILED.value,
        "conditions": merge_conditions(status.get("conditions") or [], desired, generation, stamp),
        "observedGeneration": generation,
        "message": message[:MAX_MESSAGE],
        "completionTime": stamp,
    })


def ttl_deadline(lorajob: Obj) -> dt.datetime | None:
    """When a finished LoRAJob is due for deletion (runPolicy.ttlSecondsAfterFinished)."""
    status = lorajob.get("status") or {}
    if status.get("phase") not in (Phase.SUCCEEDED.value, Phase.FAILED.value):
        return None
    ttl = ((lorajob.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    done = parse_time(status.get("completionTime"))
    if ttl is None or done is None:
        return None
    return done + dt.timedelta(seconds=int(ttl))

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

The status merge patch never contains `progress`: the trainer owns it (server-side apply,
field manager `lora-trainer`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from lora_operator import api, contract
from lora_operator.build import names
from lora_operator.build.job import CONTAINER, GPU_RESOURCE, spec_hash
from lora_operator.settings import Settings

Phase = api.Phase
CT = api.ConditionType
SPEC_CHANGE_REJECTED = "SpecChangeRejected"
MAX_MESSAGE = 2048
# How long after a Job completed its trainer pod's final state may still be on its way (the
# Job's watch event can arrive first); past it, a missing result is the trainer's fault.
POD_STATUS_GRACE_SECONDS = 60.0

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class ManifestCheck:
    """What the operator learnt about the adapter's manifest.json in storage.

    verified: True (found, or vouched for by the trainer), False (missing or not this job's:
    `reason` says which), None (could not check yet, e.g. storage unreachable: stay
    Uploading and try again until `Settings.manifest_verify_timeout_seconds`).
    """

    verified: bool | None
    message: str = ""
    reason: str = "ManifestMissing"


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post about a transition."""

    type: str  # Normal | Warning
    reason: str
    message: str


# Normal steps between milestones: shown in status.phase, message and conditions, not posted
# as Events (one Event is one more API write per job per step, and `kubectl describe` reads
# better without them). Warnings and every other reason are milestones.
TRANSITIONAL_REASONS = frozenset({"CreatingJob", "WaitingForPod", "Pending", "ContainerCreating",
                                  "Exporting", "WaitingForPodStatus", "VerifyingManifest"})


def milestone(event: Event) -> bool:
    """Whether an Event is worth posting: a Warning, or a Normal step users act on."""
    return event.type != "Normal" or event.reason not in TRANSITIONAL_REASONS


@dataclass
class Derived:
    """The outcome of one derivation."""

    phase: api.Phase
    patch: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    escalate: bool = False  # the attempt ran out of memory and budget remains: re-plan up
    result: contract.TrainerResult | None = None  # when the current attempt's pod succeeded
    requeue: bool = False  # look again later even if no watch event comes


# --------------------------------------------------------------------------- small readers


def now_rfc3339(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _cond(obj: Obj | None, ctype: str) -> Obj | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c  # type: ignore[no-any-return]
    return None


def _true(obj: Obj | None, ctype: str) -> bool:
    c = _cond(obj, ctype)
    return bool(c and c.get("status") == "True")


def attempt_of(obj: Obj) -> int:
    """The attempt number a Job or pod belongs to (its `lorajob.dev/attempt` label)."""
    raw = ((obj.get("metadata") or {}).get("labels") or {}).get(names.ATTEMPT_LABEL, "0")
    try:
        return int(raw)
    except ValueError:
        return 0


def trainer_state(pod: Obj) -> Obj:
    """The trainer container's `state` (running / waiting / terminated), or {}."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            state: Obj = cs.get("state") or {}
            return state
    return {}


def parse_result(message: str | None) -> tuple[contract.TrainerResult | None, str]:
    """A pod's termination message: the trainer's JSON result, or raw text (log fallback)."""
    text = (message or "").strip()
    if not text:
        return None, ""
    try:
        return contract.TrainerResult.model_validate(json.loads(text)), text
    except (ValueError, ValidationError):
        return None, text[-MAX_MESSAGE:]


def _exit_reason(code: int | None) -> str:
    try:
        return contract.ExitCode(code).reason if code is not None else "Unknown"
    except ValueError:
        return "TrainerError" if code else "Unknown"


def _sorted_pods(pods: Sequence[Obj]) -> list[Obj]:
    return sorted(pods, key=lambda p: ((p.get("metadata") or {}).get("creationTimestamp") or "",
                                       (p.get("metadata") or {}).get("name") or ""))


def _placement_summary(placement: Obj) -> str:
    est = placement.get("estimatedVramGiB")
    est_txt = f", estimated {est:.1f} GiB per GPU" if isinstance(est, int | float) else ""
    ds = placement.get("deepspeed")
    ds_txt = f", DeepSpeed {ds}" if ds and ds != "none" else ""
    return (f"{placement.get('method')} on {placement.get('vramClass') or 'any node'} × "
            f"{placement.get('gpus') or 0} GPU{est_txt}{ds_txt}")


# --------------------------------------------------------------------------- conditions

# Set by their own stage (`reconcile.preflight`), not by the phase table: never turned False
# by a later phase's conditions.
STAGE_CONDITIONS = (CT.DATASET_VALIDATED.value,)


def merge_conditions(existing: Sequence[Obj], desired: Mapping[str, tuple[str, str, str]],
                     generation: int | None, now: str,
                     keep: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Conditions after a reconcile.

    `desired` maps type → (status, reason, message). A type present before but not desired
    now turns False (reason = `keep`-less default "NotApplicable") so the history stays
    readable; lastTransitionTime changes only when status changes. `STAGE_CONDITIONS`
    belong to a stage of their own (the dataset preflight) and are always kept.
    """
    by_type = {c.get("type"): c for c in existing}
    out: list[dict[str, Any]] = []
    order = [c.get("type") for c in existing] + [t for t in desired if t not in by_type]
    for ctype in order:
        if not isinstance(ctype, str):
            continue
        old = by_type.get(ctype)
        if ctype in desired:
            status, reason, message = desired[ctype]
        elif (ctype in keep or ctype in STAGE_CONDITIONS) and old is not None:
            out.append(dict(old))
            continue
        elif old is not None and old.get("status") == "True":
            status, reason, message = "False", "NotApplicable", ""
        elif old is not None:
            out.append(dict(old))
            continue
        else:
            continue
        changed = old is None or old.get("status") != status
        out.append({
            "type": ctype,
            "status": status,
            "reason": reason,
            "message": message[:MAX_MESSAGE],
            "lastTransitionTime": now if changed else (old or {}).get("lastTransitionTime", now),
            "observedGeneration": generation,
        })
    return out


def _phase_conditions(phase: api.Phase, reason: str, message: str,
                      placement: Obj | None) -> dict[str, tuple[str, str, str]]:
    """The conditions that hold in `phase` (the module docstring's table)."""
    desired: dict[str, tuple[str, str, str]] = {}
    if placement:
        desired[CT.PLANNED.value] = ("True", "Planned", _placement_summary(placement))
    holds = {
        Phase.QUEUED: [CT.QUEUED],
        Phase.RUNNING: [CT.SCHEDULED, CT.RUNNING],
        Phase.UPLOADING: [CT.SCHEDULED, CT.RUNNING, CT.UPLOADING],
        Phase.SUCCEEDED: [CT.SCHEDULED, CT.SUCCEEDED],
        Phase.FAILED: [CT.FAILED],
        Phase.SUSPENDED: [CT.SUSPENDED],
    }.get(phase, [])
    for ctype in holds:
        if ctype == CT.SCHEDULED:
            desired[ctype.value] = ("True", "Scheduled", "")
        else:
            desired[ctype.value] = ("True", reason, message)
    return desired


# --------------------------------------------------------------------------- the derivation


@dataclass
class _Verdict:
    phase: api.Phase
    reason: str
    message: str
    scheduled: tuple[str, str, str] | None = None  # an explicit Scheduled condition
    node: str | None = None
    escalate: bool = False
    result: contract.TrainerResult | None = None
    event_type: str = "Normal"
    requeue: bool = False  # waiting on something no watch event may announce


def _pod_status_overdue(job: Obj, now: dt.datetime) -> bool:
    """Whether the Job completed so long ago that a missing pod state will not arrive."""
    done = parse_time((job.get("status") or {}).get("completionTime"))
    return done is not None and (now - done).total_seconds() > POD_STATUS_GRACE_SECONDS


def _verification_overdue(job: Obj, now: dt.datetime, timeout: float) -> bool:
    """Whether the manifest has been unverifiable for longer than the settings allow."""
    done = parse_time((job.get("status") or {}).get("completionTime"))
    return done is not None and (now - done).total_seconds() > timeout


def _job_verdict(lorajob: Obj, job: Obj | None, pods: list[Obj], attempt: int,
                 manifest: ManifestCheck | None, now: dt.datetime,
                 verify_timeout: float) -> _Verdict:
    spec = lorajob.get("spec") or {}
    run_policy = spec.get("runPolicy") or {}
    want_suspend = bool(run_policy.get("suspend"))
    backoff_limit = int(run_policy.get("backoffLimit", 2))
    queued = names.KUEUE_QUEUE_LABEL in ((lorajob.get("metadata") or {}).get("labels") or {})
    progress = (lorajob.get("status") or {}).get("progress") or {}
    current = _sorted_pods([p for p in pods if attempt_of(p) == attempt])
    latest = current[-1] if current else None
    node = ((latest or {}).get("spec") or {}).get("nodeName")

    if job is None:
        if want_suspend:
            return _Verdict(Phase.SUSPENDED, "SuspendedByUser", "runPolicy.suspend is true")
        return _Verdict(Phase.PENDING, "CreatingJob", f"creating the trainer Job (attempt {attempt})")

    if _true(job, "Complete") or _true(job, "SuccessCriteriaMet"):
        succeeded = [p for p in current if (p.get("status") or {}).get("phase") == "Succeeded"]
        pod = succeeded[-1] if succeeded else latest
        term = trainer_state(pod or {}).get("terminated") or {}
        result, raw = parse_result(term.get("message"))
        node = ((pod or {}).get("spec") or {}).get("nodeName") or node
        if result is None and not term and not _pod_status_overdue(job, now):
            # The Job's watch event can overtake the pod's: its final state is on its way.
            return _Verdict(Phase.UPLOADING, "WaitingForPodStatus",
                            "the trainer Job completed; reading the trainer pod's result",
                            node=node, requeue=True)
        if result is None:
            return _Verdict(Phase.FAILED, "NoResult",
                            "the trainer exited 0 but left no result in its termination "
                            f"message{': ' + raw if raw else ''}", node=node, event_type="Warning")
        if manifest is None or manifest.verified is None:
            why = manifest.message if manifest else "verifying the adapter's manifest in storage"
            if _verification_overdue(job, now, verify_timeout):
                return _Verdict(Phase.FAILED, "ManifestUnverified",
                                f"the adapter's manifest could not be verified within "
                                f"{verify_timeout:g} s after the trainer finished: {why}",
                                node=node, event_type="Warning")
            return _Verdict(Phase.UPLOADING, "VerifyingManifest", why, node=node, result=result)
        if not manifest.verified:
            return _Verdict(Phase.FAILED, manifest.reason, manifest.message, node=node,
                            result=result, event_type="Warning")
        msg = f"adapter at {result.adapter_uri}; {manifest.message}".strip("; ")
        return _Verdict(Phase.SUCCEEDED, "Completed", msg, node=node, result=result)

    failed_cond = _cond(job, "Failed") if _true(job, "Failed") else (
        _cond(job, "FailureTarget") if _true(job, "FailureTarget") else None)
    if failed_cond is not None:
        job_reason = failed_cond.get("reason") or "Failed"
        if job_reason == "DeadlineExceeded":
            deadline = ((job.get("spec") or {}).get("activeDeadlineSeconds"))
            return _Verdict(Phase.FAILED, "DeadlineExceeded",
                            f"runPolicy.activeDeadlineSeconds ({deadline}s) passed before the "
                            "trainer finished", node=node, event_type="Warning")
        failed = [p for p in current if (p.get("status") or {}).get("phase") == "Failed"] or current
        pod = failed[-1] if failed else None
        term = trainer_state(pod or {}).get("terminated") or {}
        code = term.get("exitCode")
        result, raw = parse_result(term.get("message"))
        detail = (result.message if result else raw) or failed_cond.get("message") or ""
        if code == contract.ExitCode.OUT_OF_MEMORY:
            if attempt <= backoff_limit:
                return _Verdict(Phase.SCHEDULING, "OutOfMemory",
                                f"attempt {attempt} ran out of GPU memory; re-planning one "
                                "VRAM class up", node=node, escalate=True, event_type="Warning")
            return _Verdict(Phase.FAILED, "OutOfMemory",
                            f"out of GPU memory on attempt {attempt}; runPolicy.backoffLimit "
                            f"({backoff_limit}) exhausted{': ' + detail if detail else ''}",
                            node=node, event_type="Warning")
        # The exit-code table is authoritative; the trainer's own reason fills in otherwise.
        reason = _exit_reason(code)
        if reason in ("Unknown", "TrainerError") and result is not None and result.reason:
            reason = result.reason
        if job_reason == "BackoffLimitExceeded":
            msg = (f"the trainer failed {backoff_limit + 1} times (runPolicy.backoffLimit "
                   f"{backoff_limit}); last exit code {code} ({reason})"
                   f"{': ' + detail if detail else ''}")
            return _Verdict(Phase.FAILED, reason if code else "BackoffLimitExceeded", msg,
                            node=node, event_type="Warning")
        msg = f"exit code {code}: {detail}" if code is not None else (detail or job_reason)
        return _Verdict(Phase.FAILED, reason, msg, node=node, event_type="Warning")

    if (job.get("spec") or {}).get("suspend"):
        if want_suspend:
            return _Verdict(Phase.SUSPENDED, "SuspendedByUser",
                            "runPolicy.suspend is true; progress and checkpoints are kept")
        if queued:
            queue = ((lorajob.get("metadata") or {}).get("labels") or {})[names.KUEUE_QUEUE_LABEL]
            return _Verdict(Phase.QUEUED, "WaitingForAdmission",
                            f"waiting for Kueue to admit the Job from queue {queue}")
        return _Verdict(Phase.PENDING, "Resuming", "resuming the suspended Job")
    if want_suspend:
        return _Verdict(Phase.SUSPENDED, "SuspendedByUser", "suspending the trainer")

    active = [p for p in current if (p.get("status") or {}).get("phase") in ("Pending", "Running")]
    lost = _lost_message(current, (lorajob.get("status") or {}).get("message") or "")
    if lost and not any((p.get("status") or {}).get("phase") == "Running" for p in active):
        return _Verdict(Phase.SCHEDULING, "PodLost", lost, event_type="Warning")
    pod = active[-1] if active else latest
    if pod is None:
        return _Verdict(Phase.SCHEDULING, "WaitingForPod", "waiting for the Job to create a pod")
    pod_phase = (pod.get("status") or {}).get("phase")
    node = (pod.get("spec") or {}).get("nodeName")
    if pod_phase == "Running":
        step, total = progress.get("step"), progress.get("totalSteps")
        if isinstance(step, int) and isinstance(total, int) and total > 0 and step >= total:
            return _Verdict(Phase.UPLOADING, "Exporting",
                            "training finished; writing the adapter and manifest", node=node)
        return _Verdict(Phase.RUNNING, "TrainerRunning", f"training on {node}", node=node)
    if pod_phase == "Succeeded":
        return _Verdict(Phase.UPLOADING, "Exporting", "trainer finished; Job completing",
                        node=node)
    if pod_phase == "Failed":
        term = trainer_state(pod).get("terminated") or {}
        code = term.get("exitCode")
        return _Verdict(Phase.SCHEDULING, "Retrying",
                        f"trainer pod failed (exit code {code}, {_exit_reason(code)}); "
                        "the Job retries it", node=node)
    sched = _cond(pod, "PodScheduled")
    if sched is not None and sched.get("status") == "False":
        reason = sched.get("reason") or "Unschedulable"
        msg = sched.get("message") or "the scheduler found no node"
        return _Verdict(Phase.SCHEDULING, reason, msg, scheduled=("False", reason, msg),
                        event_type="Warning" if reason == "Unschedulable" else "Normal")
    if node:
        return _Verdict(Phase.SCHEDULING, "ContainerCreating", f"pod bound to {node}; starting",
                        scheduled=("True", "Scheduled", f"bound to {node}"), node=node)
    return _Verdict(Phase.SCHEDULING, "Pending", "waiting for the scheduler",
                    scheduled=("False", "Pending", "waiting for the scheduler"))


LOST = " was lost ("


def _lost_message(pods: Sequence[Obj], previous: str) -> str | None:
    """A trainer pod taken away from under the Job (its node deleted and the pod-GC
    controller failing it, an eviction, a preemption: condition DisruptionTarget). The Job's
    pod failure policy ignores such failures, so the Job replaces the pod without counting
    it against backoffLimit; until the replacement runs, the status says what happened.
    Once the lost pod is gone from the API, the previous message carries it (level-triggered:
    derived from the stored status, not from memory)."""
    for pod in reversed(_sorted_pods(pods)):
        cond = _cond(pod, "DisruptionTarget")
        if cond is not None and cond.get("status") == "True":
            node = (pod.get("spec") or {}).get("nodeName") or "its node"
            why = f"{cond.get('reason') or 'Disrupted'}: {cond.get('message') or ''}".strip(": ")
            return (f"trainer pod {pod['metadata']['name']} on node {node}{LOST}{why}); the "
                    "Job replaces it (not counted against runPolicy.backoffLimit)")
    return previous if LOST in previous and previous.startswith("trainer pod ") else None


def gpu_hours(pods: Sequence[Obj]) -> float:
    """GPU-hours of every finished trainer container (all attempts): run time × GPUs."""
    total = 0.0
    for pod in pods:
        term = trainer_state(pod).get("terminated") or {}
        start, end = parse_time(term.get("startedAt")), parse_time(term.get("finishedAt"))
        if start is None or end is None or end < start:
            continue
        total += (end - start).total_seconds() / 3600 * _pod_gpus(pod)
    return total


def _pod_gpus(pod: Obj) -> int:
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == CONTAINER:
            raw = ((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE, 0)
            try:
                return int(raw)
            except (TypeError, ValueError):
                return 0
    return 0


def cost(pods: Sequence[Obj], settings: Settings) -> dict[str, Any] | None:
    """`status.cost`: GPU-hours over all attempts and, where classes have prices, USD."""
    finished = [p for p in pods if trainer_state(p).get("terminated")]
    if not finished:
        return None
    hours, usd, priced = 0.0, 0.0, True
    for pod in finished:
        h = gpu_hours([pod])
        hours += h
        cls_name = ((pod.get("metadata") or {}).get("labels") or {}).get(names.VRAM_CLASS_LABEL)
        cls = settings.vram_class(cls_name) if cls_name else None
        if cls is None or cls.price_per_gpu_hour is None:
            priced = priced and h == 0
            continue
        usd += h * cls.price_per_gpu_hour
    out: dict[str, Any] = {"gpuHours": round(hours, 6)}
    if priced:
        out["estimatedUSD"] = round(usd, 4)
    return out


def result_status(result: contract.TrainerResult) -> dict[str, Any]:
    """`status.result` from the trainer's termination-message result."""
    data = result.model_dump(exclude_none=True)
    wanted = api.Result.model_fields.keys()
    res = api.Result.model_validate({k: v for k, v in data.items() if k in wanted})
    return res.model_dump(by_alias=True, exclude_none=True, mode="json")


def derive_status(lorajob: Obj, job: Obj | None, pods: Sequence[Obj], settings: Settings,
                  *, manifest: ManifestCheck | None = None,
                  now: dt.datetime | None = None, attempt: int | None = None,
                  trust_finished: bool = True) -> Derived:
    """The status `lorajob` should have, given its current Job and trainer pods.

    `job` is the Job of the current attempt, `pods` every trainer pod of every attempt (cost
    covers them all). The attempt is the caller's (the operator counts it from the Jobs it
    made; `status.attempts` is only the default, for tests). With `trust_finished` False a
    Succeeded/Failed phase in the status is not taken as final: the trainer's token can
    write the status, so a finished phase the operator did not record is derived afresh.
    Returns the merge patch to reach it (empty when nothing changed), the Events to post,
    and whether to escalate after out-of-memory.
    """
    status = lorajob.get("status") or {}
    old_phase = status.get("phase")
    if trust_finished and old_phase in (Phase.SUCCEEDED.value, Phase.FAILED.value):
        return Derived(phase=Phase(old_phase))
    placement = status.get("placement")
    if not placement:
        return Derived(phase=Phase.PENDING)  # the handler plans first

    stamp = now_rfc3339(now)
    generation = (lorajob.get("metadata") or {}).get("generation")
    attempt = attempt or int(status.get("attempts") or 1)
    verdict = _job_verdict(lorajob, job, list(pods), attempt, manifest,
                           now or dt.datetime.now(dt.UTC),
                           settings.manifest_verify_timeout_seconds)

    desired = _phase_conditions(verdict.phase, verdict.reason, verdict.message, placement)
    if verdict.scheduled is not None:
        desired[CT.SCHEDULED.value] = verdict.scheduled
    keep: list[str] = []
    if verdict.phase in (Phase.SCHEDULING,) and verdict.scheduled is None:
        keep.append(CT.SCHEDULED.value)  # retrying or escalating: leave it as it was
    if job is not None:
        want_hash = ((job.get("metadata") or {}).get("annotations") or {}).get(
            names.SPEC_HASH_ANNOTATION)
        if want_hash and want_hash != spec_hash(dict(lorajob.get("spec") or {})):
            desired[SPEC_CHANGE_REJECTED] = (
                "True", "ImmutableFieldChanged",
                "the spec changed after the job started; the trainer keeps running the "
                "original spec (only runPolicy may change). Delete and re-create the "
                "LoRAJob to change the rest.")
    conditions = merge_conditions(status.get("conditions") or [], desired, generation, stamp,
                                  keep=keep)

    new: dict[str, Any] = {
        "phase": verdict.phase.value,
        "conditions": conditions,
        "observedGeneration": generation,
        "message": verdict.message[:MAX_MESSAGE],
        "attempts": attempt,
    }
    if verdict.node and placement.get("node") != verdict.node:
        new["placement"] = {"node": verdict.node}
    if verdict.phase in (Phase.RUNNING, Phase.UPLOADING, Phase.SUCCEEDED) and \
            not status.get("startTime"):
        new["startTime"] = stamp
    if verdict.phase.finished:
        new["completionTime"] = stamp
        if verdict.result is not None and verdict.phase == Phase.SUCCEEDED:
            new["result"] = result_status(verdict.result)
    if status.get("result") and verdict.phase != Phase.SUCCEEDED:
        new["result"] = None  # only a verified success has a result (a forged one goes)
    spent = cost(pods, settings)
    if spent is not None:
        new["cost"] = spent

    patch = {k: v for k, v in new.items() if k == "placement" or status.get(k) != v}
    if "conditions" in patch and _same_conditions(status.get("conditions") or [], conditions):
        del patch["conditions"]
    events: list[Event] = []
    if verdict.phase.value != old_phase:
        events.append(Event(verdict.event_type, verdict.reason,
                            f"{old_phase or 'New'} → {verdict.phase.value}: {verdict.message}"))
    elif verdict.scheduled and verdict.scheduled[0] == "False" and \
            "conditions" in patch and verdict.reason == "Unschedulable":
        events.append(Event("Warning", "Unschedulable", verdict.message))
    if SPEC_CHANGE_REJECTED in desired and "conditions" in patch and \
            not _true({"status": status}, SPEC_CHANGE_REJECTED):
        events.append(Event("Warning", "ImmutableFieldChanged", desired[SPEC_CHANGE_REJECTED][2]))
    return Derived(phase=verdict.phase, patch=patch, events=events, escalate=verdict.escalate,
                   result=verdict.result, requeue=verdict.requeue)


def _same_conditions(a: Sequence[Obj], b: Sequence[Obj]) -> bool:
    return [dict(x) for x in a] == [dict(x) for x in b]


# --------------------------------------------------------------------------- other patches


def planned_patch(lorajob: Obj, placement: api.Placement, now: dt.datetime | None = None,
                  attempts: int = 1, message: str | None = None) -> dict[str, Any]:
    """Status after planning (or re-planning after out-of-memory): placement, Pending, Planned."""
    status = lorajob.get("status") or {}
    generation = (lorajob.get("metadata") or {}).get("generation")
    pl = placement.model_dump(by_alias=True, exclude_none=True, mode="json")
    summary = message or f"planned: {_placement_summary(pl)}"
    desired = _phase_conditions(Phase.PENDING, "Planned", summary, pl)
    conditions = merge_conditions(status.get("conditions") or [], desired, generation,
                                  now_rfc3339(now), keep=[CT.SCHEDULED.value])
    # A merge patch merges objects: null every old key the new placement lacks, so a
    # re-plan replaces the whole placement (the old attempt's node and breakdown included).
    old = status.get("placement") or {}
    full: dict[str, Any] = {k: None for k in old}
    full.update(pl)
    old_breakdown = old.get("breakdown") or {}
    if old_breakdown:
        full["breakdown"] = {**{k: None for k in old_breakdown}, **(pl.get("breakdown") or {})}
    return {
        "phase": Phase.PENDING.value,
        "placement": full,
        "attempts": attempts,
        "conditions": conditions,
        "observedGeneration": generation,
        "message": summary[:MAX_MESSAGE],
    }


def failed_patch(lorajob: Obj, reason: str, message: str, now: dt.datetime | None = None,
                 planning: bool = False) -> dict[str, Any]:
    """Status of a job that fails before any pod exists (bad spec, fits nowhere, no shape)."""
    status = lorajob.get("status") or {}
    generation = (lorajob.get("metadata") or {}).get("generation")
    desired: dict[str, tuple[str, str, str]] = {CT.FAILED.value: ("True", reason, message)}
    if planning:
        desired[CT.PLANNED.value] = ("False", reason, message)
    stamp = now_rfc3339(now)
    return {
        "phase": Phase.FAILED.value,
        "conditions": merge_conditions(status.get("conditions") or [], desired, generation, stamp),
        "observedGeneration": generation,
        "message": message[:MAX_MESSAGE],
        "completionTime": stamp,
    }


def ttl_deadline(lorajob: Obj, completed: str | None = None) -> dt.datetime | None:
    """When a finished LoRAJob is due for deletion (runPolicy.ttlSecondsAfterFinished);
    `completed` (the operator's own record of the finish) wins over status.completionTime."""
    status = lorajob.get("status") or {}
    if status.get("phase") not in (Phase.SUCCEEDED.value, Phase.FAILED.value):
        return None
    ttl = ((lorajob.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    done = parse_time(completed or status.get("completionTime"))
    if ttl is None or done is None:
        return None
    return done + dt.timedelta(seconds=int(ttl))

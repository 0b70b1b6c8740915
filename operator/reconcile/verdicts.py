"""The verdict: which phase the current attempt is in, and why, from its Job and pods.

The Job and its pods disagree in transit (the Job's watch event can overtake its pod's, a
pod can vanish with its node, Kueue holds a Job suspended), so the order in which the
facts are asked about is the rule: a finished Job outranks its pods, a suspended Job
outranks a pod still winding down, a lost pod outranks its pending replacement. Each
branch is one small function that answers only when its facts hold; `verdict` asks them
in that order. Everything is pure (the clock is passed in), so each branch is unit-tested
with plain dicts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lora_operator import api, contract
from lora_operator.build import names
from lora_operator.reconcile.children import Obj, TrainerPod, attempt_pods, exit_reason, parse_result
from lora_operator.reconcile.conditions import condition, is_true
from lora_operator.reconcile.timestamps import parse_time

Phase = api.Phase
# How long after a Job completed its trainer pod's final state may still be on its way (the
# Job's watch event can arrive first); past it, a missing result is the trainer's fault.
POD_STATUS_GRACE_SECONDS = 60.0
LOST = " was lost ("


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


@dataclass
class Verdict:
    phase: api.Phase
    reason: str
    message: str
    scheduled: tuple[str, str, str] | None = None  # an explicit Scheduled condition
    node: str | None = None
    escalate: bool = False
    result: contract.TrainerResult | None = None
    event_type: str = "Normal"
    requeue: bool = False  # waiting on something no watch event may announce


@dataclass(frozen=True)
class Facts:
    """What a verdict is decided from: the LoRAJob's wishes, its current Job and pods."""

    job: Obj | None
    pods: list[TrainerPod]  # the current attempt's, oldest first
    attempt: int
    want_suspend: bool  # runPolicy.suspend
    backoff_limit: int  # runPolicy.backoffLimit
    queue: str | None  # the Kueue queue label, when the LoRAJob has one
    progress: Obj  # status.progress (the trainer's)
    previous_message: str  # status.message as stored
    manifest: ManifestCheck | None
    now: dt.datetime
    verify_timeout: float

    @classmethod
    def of(cls, lorajob: Obj, job: Obj | None, pods: Sequence[Obj], attempt: int,
           manifest: ManifestCheck | None, now: dt.datetime, verify_timeout: float) -> Facts:
        run_policy = (lorajob.get("spec") or {}).get("runPolicy") or {}
        labels = (lorajob.get("metadata") or {}).get("labels") or {}
        status = lorajob.get("status") or {}
        return cls(job=job, pods=attempt_pods(pods, attempt), attempt=attempt,
                   want_suspend=bool(run_policy.get("suspend")),
                   backoff_limit=int(run_policy.get("backoffLimit", 2)),
                   queue=labels.get(names.KUEUE_QUEUE_LABEL) if names.KUEUE_QUEUE_LABEL in labels
                   else None,
                   progress=status.get("progress") or {},
                   previous_message=status.get("message") or "",
                   manifest=manifest, now=now, verify_timeout=verify_timeout)

    @property
    def latest(self) -> TrainerPod | None:
        return self.pods[-1] if self.pods else None

    @property
    def node(self) -> str | None:
        """The node of the newest pod of the attempt."""
        return self.latest.node if self.latest else None


Branch = Callable[[Facts], Verdict | None]


# --------------------------------------------------------------------------- no Job


def no_job(f: Facts) -> Verdict | None:
    """Before the attempt's Job exists: it is about to be created, unless suspended."""
    if f.job is not None:
        return None
    if f.want_suspend:
        return Verdict(Phase.SUSPENDED, "SuspendedByUser", "runPolicy.suspend is true")
    return Verdict(Phase.PENDING, "CreatingJob", f"creating the trainer Job (attempt {f.attempt})")


# --------------------------------------------------------------------------- Job completed


def completed(f: Facts) -> Verdict | None:
    """The Job completed: the pod's result and the manifest in storage decide."""
    job = f.job
    if job is None or not (is_true(job, "Complete") or is_true(job, "SuccessCriteriaMet")):
        return None
    succeeded = [p for p in f.pods if p.phase == "Succeeded"]
    pod = succeeded[-1] if succeeded else f.latest
    term = pod.terminated if pod else {}
    result, raw = parse_result(term.get("message"))
    node = (pod.node if pod else None) or f.node
    if result is None and not term and not _pod_status_overdue(job, f.now):
        # The Job's watch event can overtake the pod's: its final state is on its way.
        return Verdict(Phase.UPLOADING, "WaitingForPodStatus",
                       "the trainer Job completed; reading the trainer pod's result",
                       node=node, requeue=True)
    if result is None:
        return Verdict(Phase.FAILED, "NoResult",
                       "the trainer exited 0 but left no result in its termination "
                       f"message{': ' + raw if raw else ''}", node=node, event_type="Warning")
    return _manifest_verdict(f, job, result, node)


def _manifest_verdict(f: Facts, job: Obj, result: contract.TrainerResult,
                      node: str | None) -> Verdict:
    """After a result: Succeeded only once the manifest is verified in storage."""
    manifest = f.manifest
    if manifest is None or manifest.verified is None:
        why = manifest.message if manifest else "verifying the adapter's manifest in storage"
        if _completed_over(job, f.now, f.verify_timeout):
            return Verdict(Phase.FAILED, "ManifestUnverified",
                           f"the adapter's manifest could not be verified within "
                           f"{f.verify_timeout:g} s after the trainer finished: {why}",
                           node=node, event_type="Warning")
        return Verdict(Phase.UPLOADING, "VerifyingManifest", why, node=node, result=result)
    if not manifest.verified:
        return Verdict(Phase.FAILED, manifest.reason, manifest.message, node=node,
                       result=result, event_type="Warning")
    msg = f"adapter at {result.adapter_uri}; {manifest.message}".strip("; ")
    return Verdict(Phase.SUCCEEDED, "Completed", msg, node=node, result=result)


def _completed_over(job: Obj, now: dt.datetime, seconds: float) -> bool:
    """Whether the Job completed more than `seconds` ago."""
    done = parse_time((job.get("status") or {}).get("completionTime"))
    return done is not None and (now - done).total_seconds() > seconds


def _pod_status_overdue(job: Obj, now: dt.datetime) -> bool:
    """Whether the Job completed so long ago that a missing pod state will not arrive."""
    return _completed_over(job, now, POD_STATUS_GRACE_SECONDS)


# --------------------------------------------------------------------------- Job failed


def failed(f: Facts) -> Verdict | None:
    """The Job failed (or is failing): why, from its condition and the last pod's exit."""
    cond = _failure(f.job)
    if f.job is None or cond is None:
        return None
    job_reason = cond.get("reason") or "Failed"
    if job_reason == "DeadlineExceeded":
        deadline = (f.job.get("spec") or {}).get("activeDeadlineSeconds")
        return Verdict(Phase.FAILED, "DeadlineExceeded",
                       f"runPolicy.activeDeadlineSeconds ({deadline}s) passed before the "
                       "trainer finished", node=f.node, event_type="Warning")
    pods = [p for p in f.pods if p.phase == "Failed"] or f.pods
    pod = pods[-1] if pods else None
    code = pod.exit_code if pod else None
    result, raw = pod.result() if pod else (None, "")
    detail = (result.message if result else raw) or cond.get("message") or ""
    if code == contract.ExitCode.OUT_OF_MEMORY:
        return _out_of_memory(f, detail)
    # The exit-code table is authoritative; the trainer's own reason fills in otherwise.
    reason = exit_reason(code)
    if reason in ("Unknown", "TrainerError") and result is not None and result.reason:
        reason = result.reason
    if job_reason == "BackoffLimitExceeded":
        msg = (f"the trainer failed {f.backoff_limit + 1} times (runPolicy.backoffLimit "
               f"{f.backoff_limit}); last exit code {code} ({reason})"
               f"{': ' + detail if detail else ''}")
        return Verdict(Phase.FAILED, reason if code else "BackoffLimitExceeded", msg,
                       node=f.node, event_type="Warning")
    msg = f"exit code {code}: {detail}" if code is not None else (detail or job_reason)
    return Verdict(Phase.FAILED, reason, msg, node=f.node, event_type="Warning")


def _failure(job: Obj | None) -> Obj | None:
    """The Job's Failed condition, else its FailureTarget (set before Failed), when True."""
    for ctype in ("Failed", "FailureTarget"):
        if is_true(job, ctype):
            return condition(job, ctype)
    return None


def _out_of_memory(f: Facts, detail: str) -> Verdict:
    """Out of GPU memory: re-plan one class up while the budget lasts, else fail."""
    if f.attempt <= f.backoff_limit:
        return Verdict(Phase.SCHEDULING, "OutOfMemory",
                       f"attempt {f.attempt} ran out of GPU memory; re-planning one "
                       "VRAM class up", node=f.node, escalate=True, event_type="Warning")
    return Verdict(Phase.FAILED, "OutOfMemory",
                   f"out of GPU memory on attempt {f.attempt}; runPolicy.backoffLimit "
                   f"({f.backoff_limit}) exhausted{': ' + detail if detail else ''}",
                   node=f.node, event_type="Warning")


# --------------------------------------------------------------------------- suspended


def suspended(f: Facts) -> Verdict | None:
    """A suspended Job (by the user, or held by Kueue), or a suspend not yet applied."""
    job_suspended = bool(((f.job or {}).get("spec") or {}).get("suspend"))
    if job_suspended and f.want_suspend:
        return Verdict(Phase.SUSPENDED, "SuspendedByUser",
                       "runPolicy.suspend is true; progress and checkpoints are kept")
    if job_suspended and f.queue is not None:
        return Verdict(Phase.QUEUED, "WaitingForAdmission",
                       f"waiting for Kueue to admit the Job from queue {f.queue}")
    if job_suspended:
        return Verdict(Phase.PENDING, "Resuming", "resuming the suspended Job")
    if f.want_suspend:
        return Verdict(Phase.SUSPENDED, "SuspendedByUser", "suspending the trainer")
    return None


# --------------------------------------------------------------------------- pods


def pod_lost(f: Facts) -> Verdict | None:
    """A pod taken away (see `lost_message`) and no replacement running yet."""
    lost = lost_message(f.pods, f.previous_message)
    if lost and not any(p.phase == "Running" for p in f.pods):
        return Verdict(Phase.SCHEDULING, "PodLost", lost, event_type="Warning")
    return None


def lost_message(pods: Sequence[TrainerPod], previous: str) -> str | None:
    """A trainer pod taken away from under the Job (its node deleted and the pod-GC
    controller failing it, an eviction, a preemption: condition DisruptionTarget). The Job's
    pod failure policy ignores such failures, so the Job replaces the pod without counting
    it against backoffLimit; until the replacement runs, the status says what happened.
    Once the lost pod is gone from the API, the previous message carries it (level-triggered:
    derived from the stored status, not from memory)."""
    for pod in reversed(pods):
        cond = pod.disruption
        if cond is not None:
            node = pod.node or "its node"
            why = f"{cond.get('reason') or 'Disrupted'}: {cond.get('message') or ''}".strip(": ")
            return (f"trainer pod {pod.name} on node {node}{LOST}{why}); the "
                    "Job replaces it (not counted against runPolicy.backoffLimit)")
    return previous if LOST in previous and previous.startswith("trainer pod ") else None


def pod_state(f: Facts) -> Verdict:
    """The Job is active: the newest live pod's state decides (always answers)."""
    active = [p for p in f.pods if p.phase in ("Pending", "Running")]
    pod = active[-1] if active else f.latest
    if pod is None:
        return Verdict(Phase.SCHEDULING, "WaitingForPod", "waiting for the Job to create a pod")
    if pod.phase == "Running":
        return _running(f, pod)
    if pod.phase == "Succeeded":
        result, _ = pod.result()
        if result is not None and f.job is not None:
            # The trainer is done and said where its adapter is: a verified manifest means
            # Succeeded now, not when the Job controller gets round to marking the Job
            # complete. Anything else waits for the Job, as before (its pods' logs stay).
            done = _manifest_verdict(f, f.job, result, pod.node)
            if done.phase == Phase.SUCCEEDED:
                return done
        return Verdict(Phase.UPLOADING, "Exporting", "trainer finished; Job completing",
                       node=pod.node)
    if pod.phase == "Failed":
        code = pod.exit_code
        return Verdict(Phase.SCHEDULING, "Retrying",
                       f"trainer pod failed (exit code {code}, {exit_reason(code)}); "
                       "the Job retries it", node=pod.node)
    return _scheduling(pod)


def _running(f: Facts, pod: TrainerPod) -> Verdict:
    """Training, or exporting once the trainer reported its last step."""
    step, total = f.progress.get("step"), f.progress.get("totalSteps")
    if isinstance(step, int) and isinstance(total, int) and total > 0 and step >= total:
        return Verdict(Phase.UPLOADING, "Exporting",
                       "training finished; writing the adapter and manifest", node=pod.node)
    return Verdict(Phase.RUNNING, "TrainerRunning", f"training on {pod.node}", node=pod.node)


def _scheduling(pod: TrainerPod) -> Verdict:
    """Not running yet: unschedulable (the scheduler's words), bound and starting, or waiting."""
    sched = pod.scheduled
    if sched is not None and sched.get("status") == "False":
        reason = sched.get("reason") or "Unschedulable"
        msg = sched.get("message") or "the scheduler found no node"
        return Verdict(Phase.SCHEDULING, reason, msg, scheduled=("False", reason, msg),
                       event_type="Warning" if reason == "Unschedulable" else "Normal")
    if pod.node:
        return Verdict(Phase.SCHEDULING, "ContainerCreating", f"pod bound to {pod.node}; starting",
                       scheduled=("True", "Scheduled", f"bound to {pod.node}"), node=pod.node)
    return Verdict(Phase.SCHEDULING, "Pending", "waiting for the scheduler",
                   scheduled=("False", "Pending", "waiting for the scheduler"))


# --------------------------------------------------------------------------- dispatch

# Asked in this order; the first answer wins (`pod_state` always answers).
BRANCHES: tuple[Branch, ...] = (no_job, completed, failed, suspended, pod_lost)


def verdict(lorajob: Obj, job: Obj | None, pods: Sequence[Obj], attempt: int,
            manifest: ManifestCheck | None, now: dt.datetime, verify_timeout: float) -> Verdict:
    """The current attempt's verdict (see the module docstring for the order)."""
    f = Facts.of(lorajob, job, pods, attempt, manifest, now, verify_timeout)
    for branch in BRANCHES:
        found = branch(f)
        if found is not None:
            return found
    return pod_state(f)

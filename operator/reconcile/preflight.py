"""The dataset preflight stage: between planning and the first trainer Job.

`derive_preflight` is a pure function of the LoRAJob, its preflight Job and that Job's pods
(plain dicts, unit-tested like `status.derive_status`): it says whether the preflight must
be created, is still running, passed or failed, and the status patch for it —
`status.dataset` (the report from the pod's termination message), the `DatasetValidated`
condition and, on failure, the Failed phase with the report's reason (`InvalidDataset` for
a bad dataset) before any GPU is requested.

Decisions rest on the preflight Job and its pod, never on `status.dataset` (a status may
lag its objects after a crash): the Job's Complete condition (exit 0, the Passed verdict) lets
the trainer Job be created, its Failed condition fails the LoRAJob. A pod that exits 0
without a readable report proceeds with DatasetValidated=Unknown (NoReport): the exit code
is the verdict and the trainer checks the data again before it loads the model.

`gate` is the controller's side: create the preflight's Job, apply the patch.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from lora_operator import api, contract
from lora_operator.build import names, preflight_job
from lora_operator.reconcile.conditions import MAX_MESSAGE, merge_conditions
from lora_operator.reconcile.merge_patch import status_patch
from lora_operator.reconcile.status import Event
from lora_operator.reconcile.timestamps import now_rfc3339, parse_time
from lora_operator.reconcile.verdicts import POD_STATUS_GRACE_SECONDS

if TYPE_CHECKING:
    from lora_operator.reconcile.controller import Controller, Key

Obj = Mapping[str, Any]
CT = api.ConditionType
VALIDATED = CT.DATASET_VALIDATED.value
CREATE, RUNNING, PASSED, FAILED = "create", "running", "passed", "failed"


@dataclass
class PreflightOutcome:
    """Where the preflight stands, and the status patch ({} when nothing changes)."""

    state: str  # create | running | passed | failed
    reason: str
    message: str
    patch: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    requeue: bool = False  # waiting on a pod state no watch event may announce


# --------------------------------------------------------------------------- readers


def _true(obj: Obj | None, ctype: str) -> Obj | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype and c.get("status") == "True":
            return c  # type: ignore[no-any-return]
    return None


def container_state(pod: Obj) -> Obj:
    """The preflight container's `state`, or {}."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == preflight_job.CONTAINER:
            state: Obj = cs.get("state") or {}
            return state
    return {}


def parse_report(message: str | None) -> api.DatasetReport | None:
    """The report in a termination message; None for anything else (e.g. a log tail)."""
    try:
        return api.DatasetReport.model_validate(json.loads(message or ""))
    except (ValueError, ValidationError):
        return None


def report_status(report: api.DatasetReport, now: str) -> dict[str, Any]:
    """`status.dataset`: the report as the pod wrote it, stamped with when it was read."""
    data = report.model_dump(by_alias=True, exclude_none=True, mode="json")
    data["message"] = str(data.get("message") or "")[:MAX_MESSAGE]
    data["checkedAt"] = now
    return data


def _exit_reason(code: Any) -> str:
    try:
        return contract.ExitCode(int(code)).reason
    except (TypeError, ValueError):
        return "PreflightFailed"


def _latest(pods: Sequence[Obj]) -> Obj | None:
    ordered = sorted(pods, key=lambda p: ((p.get("metadata") or {}).get("creationTimestamp") or "",
                                          (p.get("metadata") or {}).get("name") or ""))
    return ordered[-1] if ordered else None


# --------------------------------------------------------------------------- derivation


def _verdict(job: Obj | None, pods: Sequence[Obj], now: dt.datetime
             ) -> tuple[str, str, str, api.DatasetReport | None, bool]:
    """(state, reason, message, report, requeue) from the Job and its pods."""
    if job is None:
        return CREATE, "Validating", "creating the dataset preflight Job", None, False
    name = (job.get("metadata") or {}).get("name") or ""
    if _true(job, "Complete") or _true(job, "SuccessCriteriaMet"):
        done = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
        term = container_state(_latest(done) or {}).get("terminated") or {}
        report = parse_report(term.get("message"))
        if report is None and not term:
            finished = parse_time((job.get("status") or {}).get("completionTime"))
            if finished is None or (now - finished).total_seconds() <= POD_STATUS_GRACE_SECONDS:
                return (RUNNING, "Validating", f"preflight Job {name} completed; reading its "
                        "report", None, True)
        if report is None:
            return (PASSED, "NoReport", f"preflight Job {name} exited 0 without a readable "
                    "report; the trainer checks the data again", None, False)
        if report.verdict == "Failed":  # exit 0 yet Failed: the report is authoritative
            return FAILED, report.reason or "InvalidDataset", report.message, report, False
        return PASSED, "DatasetValidated", report.message, report, False
    failed = _true(job, "Failed") or _true(job, "FailureTarget")
    if failed is not None:
        if failed.get("reason") == "DeadlineExceeded":
            deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
            return (FAILED, "PreflightDeadlineExceeded", f"the dataset preflight did not "
                    f"finish within {deadline} s (preflightDeadlineSeconds)", None, False)
        term = container_state(_latest(pods) or {}).get("terminated") or {}
        report = parse_report(term.get("message"))
        if report is not None:
            return FAILED, report.reason or _exit_reason(term.get("exitCode")), report.message, \
                report, False
        detail = str(term.get("message") or failed.get("message") or "").strip()[-MAX_MESSAGE:]
        return (FAILED, _exit_reason(term.get("exitCode")) if term else "PreflightFailed",
                f"the dataset preflight failed (exit code {term.get('exitCode')})"
                f"{': ' + detail if detail else ''}", None, False)
    pod = _latest(pods)
    phase = (pod or {}).get("status", {}).get("phase") or "Pending"
    return RUNNING, "Validating", f"validating the dataset (preflight pod {phase})", None, False


def derive_preflight(lorajob: Obj, job: Obj | None, pods: Sequence[Obj],
                     now: dt.datetime | None = None) -> PreflightOutcome:
    """The preflight's state and the status patch to reach (see the module docstring).

    `job` is the LoRAJob's preflight Job (None before it exists), `pods` its pods.
    """
    now = now or dt.datetime.now(dt.UTC)
    stamp = now_rfc3339(now)
    state, reason, message, report, requeue = _verdict(job, pods, now)
    status = lorajob.get("status") or {}
    generation = (lorajob.get("metadata") or {}).get("generation")
    existing = status.get("conditions") or []
    cond_status = {PASSED: "True" if reason != "NoReport" else "Unknown",
                   FAILED: "False"}.get(state, "Unknown")
    desired = {VALIDATED: (cond_status, reason, message)}
    if state == FAILED:
        desired[CT.FAILED.value] = ("True", reason, message)
    others = [str(c.get("type")) for c in existing if c.get("type") != VALIDATED]
    conditions = merge_conditions(existing, desired, generation, stamp, keep=others)
    new: dict[str, Any] = {"conditions": conditions}
    if report is not None:
        new["dataset"] = report_status(report, stamp)
    if state in (CREATE, RUNNING):
        new.update(phase=api.Phase.PENDING.value, message=message[:MAX_MESSAGE])
    elif state == FAILED:
        new.update(phase=api.Phase.FAILED.value, completionTime=stamp,
                   message=f"dataset preflight: {message}"[:MAX_MESSAGE],
                   observedGeneration=generation)
    for key in ("conditions", "dataset"):  # a re-read report or condition is not a change
        if key in new and _same(status.get(key), new[key]):
            new[key] = status[key]
    patch = status_patch(status, {**status, **new})
    events = []
    if "conditions" in patch and state in (PASSED, FAILED):
        events.append(Event("Normal" if state == PASSED and reason != "NoReport" else "Warning",
                            reason, f"dataset preflight: {message}"))
    return PreflightOutcome(state, reason, message, patch, events, requeue)


def _same(old: Any, new: Any) -> bool:
    """Equal, ignoring timestamps (a re-read report or condition is not a change)."""
    def strip(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: strip(v) for k, v in value.items()
                    if k not in ("checkedAt", "lastTransitionTime")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return bool(strip(old) == strip(new))


# --------------------------------------------------------------------------- the controller's side


def pods_of(pods: Sequence[Obj]) -> list[Obj]:
    return [p for p in pods if preflight_job.is_preflight(p)]


async def gate(ctl: Controller, key: Key, body: Obj, spec: api.LoRAJobSpec,
               owner: names.Owner) -> bool | None:
    """Run the preflight before attempt 1's trainer Job: None when the trainer Job may be
    created now, else what `_reconcile_once` returns (True: reconcile again at once)."""
    if not spec.dataset.preflight.enabled or _trainer_jobs(ctl, key, owner.uid):
        return None
    job = ctl.view.jobs(key).get(preflight_job.preflight_job_name(owner.name))
    if job is not None and (job.get("metadata") or {}).get("ownerReferences") and \
            not any(r.get("uid") == owner.uid for r in job["metadata"]["ownerReferences"]):
        job = None  # a previous LoRAJob's of the same name, on its way out
    outcome = derive_preflight(body, job, pods_of(ctl.view.pods(key)))
    if outcome.state == CREATE:
        await _create(ctl, owner, spec)
    if outcome.patch:
        out = await ctl._patch(key, body, outcome.patch)
        if out is None:
            return await ctl._refresh(key) is not None
        ctl._emit(out, outcome.events)
        body = out
    if outcome.state == FAILED:
        ctl.schedule_ttl(key, body)
        return False
    if outcome.state == PASSED:
        return True if outcome.patch else None
    if outcome.requeue:
        ctl.requeue(key, POD_STATUS_GRACE_SECONDS / 4)
    return False


def _trainer_jobs(ctl: Controller, key: Key, uid: str) -> bool:
    """Whether a trainer Job of this LoRAJob exists (then the preflight is behind it)."""
    for obj in ctl.view.jobs(key).values():
        meta = obj.get("metadata") or {}
        if names.ATTEMPT_LABEL in (meta.get("labels") or {}) and \
                any(r.get("uid") == uid for r in meta.get("ownerReferences") or []):
            return True
    return bool(ctl._jobs_written.get(key))


async def _create(ctl: Controller, owner: names.Owner, spec: api.LoRAJobSpec) -> None:
    """The preflight's Job: its only child (its config is in its pod template)."""
    await ctl._io(ctl.kube.create, preflight_job.build_preflight_job(
        owner, spec, ctl.settings, dev_mode=ctl.settings.dev_mode))

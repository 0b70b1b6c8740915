"""Status conditions: how they carry history, and which hold in each phase.

Conditions are what `kubectl wait --for=condition=X` and users read, so they follow one
rule everywhere (LoRAJob status, the dataset preflight, sweeps): a condition that stops
holding turns False instead of vanishing, and its lastTransitionTime moves only when its
status does, so a re-derivation from the same cluster writes nothing. The phase table lives
here, apart from the verdict, so a phase's conditions are decided in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lora_operator import api

Obj = Mapping[str, Any]
Phase = api.Phase
CT = api.ConditionType
# type → (status, reason, message)
Desired = dict[str, tuple[str, str, str]]

MAX_MESSAGE = 2048  # longest message a condition or the status carries

# Set by their own stage (`reconcile.preflight`), not by the phase table: never turned False
# by a later phase's conditions.
STAGE_CONDITIONS = (CT.DATASET_VALIDATED.value,)

# The conditions that hold in each phase besides Planned (see `reconcile.status`).
_HOLDS: dict[api.Phase, tuple[api.ConditionType, ...]] = {
    Phase.QUEUED: (CT.QUEUED,),
    Phase.RUNNING: (CT.SCHEDULED, CT.RUNNING),
    Phase.UPLOADING: (CT.SCHEDULED, CT.RUNNING, CT.UPLOADING),
    Phase.SUCCEEDED: (CT.SCHEDULED, CT.SUCCEEDED),
    Phase.FAILED: (CT.FAILED,),
    Phase.SUSPENDED: (CT.SUSPENDED,),
}


def condition(obj: Obj | None, ctype: str) -> Obj | None:
    """The condition `ctype` in `obj`'s status (any object: Job, pod, LoRAJob), or None."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c  # type: ignore[no-any-return]
    return None


def is_true(obj: Obj | None, ctype: str) -> bool:
    """Whether `obj` has condition `ctype` with status True."""
    c = condition(obj, ctype)
    return bool(c and c.get("status") == "True")


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
    order = [c.get("type") for c in existing] + [t for t in desired if t not in by_type]
    out: list[dict[str, Any]] = []
    for ctype in order:
        if not isinstance(ctype, str):
            continue
        merged = _merge_one(ctype, by_type.get(ctype), desired, generation, now, keep)
        if merged is not None:
            out.append(merged)
    return out


def _merge_one(ctype: str, old: Obj | None, desired: Mapping[str, tuple[str, str, str]],
               generation: int | None, now: str, keep: Sequence[str]) -> dict[str, Any] | None:
    """One condition after a reconcile (None: it neither was nor is)."""
    if ctype in desired:
        status, reason, message = desired[ctype]
    elif old is None:
        return None
    elif ctype in keep or ctype in STAGE_CONDITIONS or old.get("status") != "True":
        return dict(old)
    else:
        status, reason, message = "False", "NotApplicable", ""
    changed = old is None or old.get("status") != status
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "lastTransitionTime": now if changed else (old or {}).get("lastTransitionTime", now),
        "observedGeneration": generation,
    }


def placement_summary(placement: Obj) -> str:
    """The Planned condition's message: method, class, GPUs, estimate, DeepSpeed."""
    est = placement.get("estimatedVramGiB")
    est_txt = f", estimated {est:.1f} GiB per GPU" if isinstance(est, int | float) else ""
    ds = placement.get("deepspeed")
    ds_txt = f", DeepSpeed {ds}" if ds and ds != "none" else ""
    return (f"{placement.get('method')} on {placement.get('vramClass') or 'any node'} × "
            f"{placement.get('gpus') or 0} GPU{est_txt}{ds_txt}")


def phase_conditions(phase: api.Phase, reason: str, message: str,
                     placement: Obj | None) -> Desired:
    """The conditions that hold in `phase` (the table in `reconcile.status`)."""
    desired: Desired = {}
    if placement:
        desired[CT.PLANNED.value] = ("True", "Planned", placement_summary(placement))
    for ctype in _HOLDS.get(phase, ()):
        if ctype == CT.SCHEDULED:
            desired[ctype.value] = ("True", "Scheduled", "")
        else:
            desired[ctype.value] = ("True", reason, message)
    return desired

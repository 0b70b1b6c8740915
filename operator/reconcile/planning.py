"""Planning glue: the estimator's decision, as the operator needs it (placement or a reason).

The estimator (`lora_operator.plan`) is pure apart from reading a base model's config.json;
this module turns its answers into a `PlanOutcome` the controller writes to status before any
pod exists, and re-plans one class up after an out-of-memory exit. An escalation is
recomputed from scratch (initial decision, then `next_class_up` once per failed attempt),
so a restarted operator arrives at the same placement without remembering anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lora_operator import api
from lora_operator.settings import Settings, VramClass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanOutcome:
    """A placement to run with, or the reason there is none (then `placement` is None)."""

    placement: api.Placement | None
    vram_class: VramClass | None = None
    reason: str = "Planned"
    message: str = ""
    retryable: bool = False  # the failure may go away by itself (e.g. estimator not loaded)


def _breakdown_text(decision: Any) -> str:
    est = getattr(decision, "estimate", None)
    if est is None:
        return ""
    parts = ", ".join(f"{k} {float(v):.1f}"
                      for k, v in (getattr(est, "breakdown", {}) or {}).items() if float(v))
    total = getattr(est, "total_gib", None)
    head = f"estimated {float(total):.1f} GiB per GPU" if total is not None else "estimate"
    return f"{head}: {parts} GiB" if parts else head


def _outcome(decision: Any, settings: Settings) -> PlanOutcome:
    error = getattr(decision, "error", None)
    if error:
        detail = _breakdown_text(decision)
        return PlanOutcome(None, reason="InsufficientGPUMemory",
                           message=f"{error}; {detail}" if detail else str(error))
    placement: api.Placement = decision.to_status()
    vram_class: VramClass | None = decision.vram_class
    if vram_class is not None and placement.vram_class is None:
        placement = placement.model_copy(update={"vram_class": vram_class.name})
    return PlanOutcome(placement, vram_class, message=_breakdown_text(decision))


def _initial_decision(spec: api.LoRAJobSpec, settings: Settings) -> tuple[Any, PlanOutcome | None]:
    try:
        from lora_operator.plan import placement as placement_mod
        from lora_operator.plan import shapes
    except ImportError as exc:  # the estimator is part of the package; only a broken install
        return None, PlanOutcome(None, reason="PlannerUnavailable", message=str(exc),
                                 retryable=True)
    try:
        shape = shapes.resolve_shape(spec.base_model, settings=settings,
                                     timeout=settings.config_read_timeout_seconds)
    except shapes.ShapeUnavailable as exc:
        return None, PlanOutcome(None, reason="ModelShapeUnavailable", message=(
            f"cannot size {spec.base_model.uri}: {exc}. Set spec.baseModel.architecture or "
            "spec.baseModel.shape to plan without reading config.json."))
    try:
        return placement_mod.place(spec, shape.shape, settings), None
    except ValueError as exc:
        return None, PlanOutcome(None, reason="InsufficientGPUMemory", message=str(exc))


def plan(spec: api.LoRAJobSpec, settings: Settings) -> PlanOutcome:
    """The first attempt's placement (blocking: may read the model's config.json)."""
    decision, failed = _initial_decision(spec, settings)
    if failed is not None:
        return failed
    return _outcome(decision, settings)


def escalate(spec: api.LoRAJobSpec, settings: Settings, failed_attempts: int) -> PlanOutcome:
    """The placement after `failed_attempts` out-of-memory exits: one class up per exit
    (or QLoRA first when the method is auto, as `next_class_up` decides)."""
    decision, failed = _initial_decision(spec, settings)
    if failed is not None:
        return failed
    from lora_operator.plan import placement as placement_mod

    for _ in range(failed_attempts):
        decision = placement_mod.next_class_up(decision, settings)
        if decision is None:
            return PlanOutcome(None, reason="OutOfMemory", message=(
                "the trainer ran out of GPU memory and no bigger VRAM class is configured"))
        if getattr(decision, "error", None):
            return PlanOutcome(None, reason="OutOfMemory", message=(
                f"the trainer ran out of GPU memory and no bigger placement fits: "
                f"{decision.error}"))
    return _outcome(decision, settings)


def vram_class_for(placement: dict[str, Any] | api.Placement | None,
                   settings: Settings) -> VramClass | None:
    """The settings' class named by a placement (status dict or model)."""
    if placement is None:
        return None
    name = placement.vram_class if isinstance(placement, api.Placement) else \
        placement.get("vramClass")
    return settings.vram_class(name) if name else None

"""Planning for the machine `lora-trainer run` is on (the operator plans for cluster pods).

One small function, so the day the shared planner in `lora_operator.plan` answers for
every case, this module shrinks to a call. Until then (and whenever it cannot size the
model, e.g. a GGUF file it cannot read) a conservative local rule applies: the method the
spec asks for, `auto` meaning LoRA; all local GPUs; DeepSpeed only when more than one.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from lora_operator import api

log = logging.getLogger(__name__)


def device_memory_gib(device: str) -> float | None:
    """Memory of the first GPU in GiB, None on CPU (the planner then only picks the method)."""
    if device != "cuda":
        return None
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory) / 2**30


def _shared_planner(spec: api.LoRAJobSpec, memory_gib: float | None) -> api.Placement | None:
    try:
        from lora_operator.plan.placement import place_on_device  # type: ignore[import-not-found,unused-ignore]
        from lora_operator.plan.shapes import resolve_shape  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    try:
        shape: Any = resolve_shape(spec.base_model, timeout=5.0).shape
        decision: Any = place_on_device(spec, shape, memory_gib)
        placement = decision.to_status()
    except Exception as exc:  # the planner is advisory locally; fall back, say why
        log.info("shared planner could not place the job locally (%s); using the local rule", exc)
        return None
    return placement if isinstance(placement, api.Placement) else None


def plan_local(spec: api.LoRAJobSpec, device: str) -> api.Placement:
    """The placement for this machine: the shared planner's when it can, else the local rule."""
    gpus = 0
    if device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
    placement = _shared_planner(spec, device_memory_gib(device))
    if placement is not None:
        if device != "cuda":
            placement = placement.model_copy(update={"gpus": None, "deepspeed": "none"})
        return placement
    method: Literal["lora", "qlora"] = "qlora" if spec.method == api.Method.QLORA else "lora"
    requested = spec.resources.deepspeed
    multi = gpus > 1
    deepspeed = ("zero2" if requested in (api.DeepSpeed.AUTO, api.DeepSpeed.NONE) else requested) \
        if multi else "none"
    return api.Placement(method=method, gpus=gpus or None, deepspeed=str(deepspeed),
                         vram_class="local-" + device)

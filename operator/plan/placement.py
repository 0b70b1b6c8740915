"""Placement: which method, VRAM class, GPU count and DeepSpeed stage a job gets.

Pure policy over `vram.estimate` and the operator's `Settings` (DESIGN §3):

1. Honour what the spec pins (method, vramClass, gpus, deepspeed); choose the rest.
2. One GPU first: LoRA on the smallest class whose usable memory (memory × (1 − safety
   margin)) holds the estimate; with `method: auto`, QLoRA on the smallest class that fits
   before asking for more GPUs than one (a bigger GPU than exists is never asked for).
3. Past one GPU: the fewest GPUs (2, 4, 8, up to the class's maxGpus) on one node, ZeRO-3.
4. Nothing fits: a decision carrying `error` with the best attempt's breakdown and the
   largest class's capacity, so the job Fails at once instead of OOMing an hour later.

`next_class_up` is the OOM escalation the operator applies when a trainer still runs out of
memory; `place_on_device` sizes a local run on whatever device the trainer found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lora_operator.api import DeepSpeed, LoRAJobSpec, Method, ModelShape, Placement, Precision
from lora_operator.plan.vram import Estimate, EstimateError, estimate
from lora_operator.settings import Settings, VramClass

MethodName = Literal["lora", "qlora"]
GPU_COUNTS = (1, 2, 4, 8)
DEFAULT_SAFETY_MARGIN = 0.10  # matches Settings' default, for device-local planning


@dataclass(frozen=True)
class Candidate:
    """One (method, class, gpus, stage) the planner tried, and whether it fitted."""

    method: MethodName
    vram_class: str | None
    gpus: int
    deepspeed: str
    estimate_gib: float
    capacity_gib: float | None
    fits: bool
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "vramClass": self.vram_class, "gpus": self.gpus,
                "deepspeed": self.deepspeed, "estimatedVramGiB": self.estimate_gib,
                "capacityGiB": self.capacity_gib, "fits": self.fits,
                **({"note": self.note} if self.note else {})}


@dataclass(frozen=True)
class PlacementDecision:
    """The planner's answer. With `error` set, the fields describe the best failed attempt."""

    method: MethodName
    vram_class: VramClass | None
    gpus: int
    deepspeed: str
    estimate: Estimate
    candidates: tuple[Candidate, ...] = ()
    error: str | None = None
    capacity_gib: float | None = None
    # What the decision was made from, so escalation can re-plan without the caller.
    spec: LoRAJobSpec | None = field(default=None, repr=False, compare=False)
    shape: ModelShape | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_status(self) -> Placement:
        """The LoRAJob `status.placement` for this decision."""
        return Placement(method=self.method,
                         vram_class=self.vram_class.name if self.vram_class else None,
                         estimated_vram_gib=self.estimate.total_gib, gpus=self.gpus,
                         deepspeed=self.deepspeed, breakdown=dict(self.estimate.breakdown))

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "vramClass": self.vram_class.name if self.vram_class else None,
            "gpus": self.gpus, "deepspeed": self.deepspeed,
            "estimatedVramGiB": self.estimate.total_gib,
            "capacityGiB": self.capacity_gib,
            "breakdown": dict(self.estimate.breakdown),
            "candidates": [c.to_json() for c in self.candidates],
            "error": self.error,
        }


def usable_gib(vram_class: VramClass, safety_margin: float) -> float:
    """Memory per GPU the planner may fill: the rest is the admin's safety margin."""
    return round(vram_class.memory_gib * (1.0 - safety_margin), 2)


def _methods(spec: LoRAJobSpec) -> list[MethodName]:
    if spec.method == Method.LORA:
        return ["lora"]
    if spec.method == Method.QLORA:
        return ["qlora"]
    return ["lora", "qlora"]


def _stage(spec: LoRAJobSpec, gpus: int) -> str:
    chosen = str(spec.resources.deepspeed)
    if chosen != DeepSpeed.AUTO.value:
        return chosen
    return "none" if gpus == 1 else "zero3"


def _gpu_counts(spec: LoRAJobSpec) -> list[int]:
    gpus = spec.resources.gpus
    if isinstance(gpus, int):
        return [gpus]
    if spec.resources.deepspeed == DeepSpeed.NONE:
        return [1]  # no data parallelism without DeepSpeed
    return list(GPU_COUNTS)


def _try(spec: LoRAJobSpec, shape: ModelShape, method: MethodName, cls: VramClass, gpus: int,
         margin: float) -> tuple[Candidate, Estimate]:
    stage = _stage(spec, gpus)
    est = estimate(shape, spec, method=method, gpus=gpus, deepspeed=stage)
    cap = usable_gib(cls, margin)
    note = ""
    fits = est.total_gib <= cap
    if gpus > cls.max_gpus:
        fits, note = False, f"class has at most {cls.max_gpus} GPUs per node"
    elif spec.training.precision == Precision.BF16 and not cls.bf16:
        fits, note = False, "GPU lacks bf16 (training.precision is bf16)"
    return Candidate(method, cls.name, gpus, stage, est.total_gib, cap, fits, note), est


def place(spec: LoRAJobSpec, shape: ModelShape, settings: Settings) -> PlacementDecision:
    """Choose method, class, GPUs and DeepSpeed stage for `spec` (see the module docstring).

    Never raises for a job that does not fit: the decision carries `error`. EstimateError
    (for example an unknown target module) becomes an error decision too.
    """
    classes = settings.classes_by_size()
    pinned = spec.resources.vram_class
    if pinned != "auto":
        match = settings.vram_class(pinned)
        if match is None:
            names = ", ".join(c.name for c in classes)
            return _refuse(spec, shape, f"spec.resources.vramClass: unknown class {pinned!r}; "
                           f"this operator offers {names}")
        classes = [match]
    tried: list[tuple[Candidate, Estimate, VramClass]] = []
    try:
        for gpus in _gpu_counts(spec):
            for method in _methods(spec):
                for cls in classes:
                    cand, est = _try(spec, shape, method, cls, gpus, settings.safety_margin)
                    tried.append((cand, est, cls))
                    if cand.fits:
                        return _decision(cand, est, cls, tried, spec, shape)
    except EstimateError as exc:
        return _refuse(spec, shape, str(exc))
    return _nothing_fits(tried, spec, shape, pinned != "auto")


def _decision(cand: Candidate, est: Estimate, cls: VramClass | None,
              tried: list[tuple[Candidate, Estimate, VramClass]], spec: LoRAJobSpec,
              shape: ModelShape, error: str | None = None) -> PlacementDecision:
    return PlacementDecision(method=cand.method, vram_class=cls, gpus=cand.gpus,
                             deepspeed=cand.deepspeed, estimate=est,
                             candidates=tuple(c for c, _, _ in tried), error=error,
                             capacity_gib=cand.capacity_gib, spec=spec, shape=shape)


def _refuse(spec: LoRAJobSpec, shape: ModelShape, message: str) -> PlacementDecision:
    method: MethodName = "qlora" if spec.method == Method.QLORA else "lora"
    return PlacementDecision(method=method, vram_class=None, gpus=1, deepspeed="none",
                             estimate=Estimate(0.0, {}), error=message, spec=spec, shape=shape)


def _nothing_fits(tried: list[tuple[Candidate, Estimate, VramClass]], spec: LoRAJobSpec,
                  shape: ModelShape, pinned: bool) -> PlacementDecision:
    """An error decision: the attempt that came closest, on the largest class tried."""
    largest = max((cls for _, _, cls in tried), key=lambda c: c.memory_mib)
    on_largest = [t for t in tried if t[2].name == largest.name] or tried
    best = min(on_largest, key=lambda t: t[0].estimate_gib)
    cand, est, cls = best
    where = f"class {cls.name}" if pinned else f"the largest class {cls.name}"
    why = f" ({cand.note})" if cand.note else ""
    message = (
        f"no placement fits{' spec.resources.vramClass ' + cls.name if pinned else ''}: "
        f"best attempt {cand.method} on {cand.gpus}× {cls.name} ({cand.deepspeed}) needs "
        f"{est.total_gib:.1f} GiB per GPU{why}; {where} offers {cand.capacity_gib:.1f} GiB usable "
        f"({cls.memory_gib:.1f} GiB less the safety margin). Breakdown (GiB): {est.describe()}. "
        "Lower training.microBatchSize or maxSeqLength, use method qlora, more gpus, "
        "or a larger vramClass.")
    return _decision(cand, est, cls, tried, spec, shape, error=message)


def next_class_up(decision: PlacementDecision, settings: Settings) -> PlacementDecision | None:
    """The placement to retry with after the trainer ran out of memory, or None.

    One class up (same method and GPUs) when the spec lets the class change; else, with
    `method: auto`, LoRA becomes QLoRA on the same class; else, with `gpus: auto`, twice the
    GPUs with ZeRO-3. The estimate is kept for status, even though it said the old one fitted.
    """
    spec, shape = decision.spec, decision.shape
    if spec is None or shape is None or decision.vram_class is None:
        return None
    current = decision.vram_class
    margin = settings.safety_margin
    if spec.resources.vram_class == "auto":
        bigger = [c for c in settings.classes_by_size()
                  if c.memory_mib > current.memory_mib and c.max_gpus >= decision.gpus]
        if bigger:
            return _retry(spec, shape, decision.method, bigger[0], decision.gpus, margin)
    if spec.method == Method.AUTO and decision.method == "lora":
        return _retry(spec, shape, "qlora", current, decision.gpus, margin)
    doubled = decision.gpus * 2
    if spec.resources.gpus == "auto" and spec.resources.deepspeed != DeepSpeed.NONE \
            and doubled <= current.max_gpus:
        return _retry(spec, shape, decision.method, current, doubled, margin)
    return None


def _retry(spec: LoRAJobSpec, shape: ModelShape, method: MethodName, cls: VramClass,
           gpus: int, margin: float) -> PlacementDecision:
    cand, est = _try(spec, shape, method, cls, gpus, margin)
    return _decision(cand, est, cls, [(cand, est, cls)], spec, shape)


def place_on_device(spec: LoRAJobSpec, shape: ModelShape, device_memory_gib: float | None, *,
                    safety_margin: float = DEFAULT_SAFETY_MARGIN) -> PlacementDecision:
    """Placement for a local run on the one device the trainer found (None = CPU).

    On CPU: LoRA unless the spec says qlora, one process, no DeepSpeed, and the estimate of
    host memory (fp32 for precision auto) for information. On a GPU: LoRA if it fits the
    device, else QLoRA when the method is auto; a decision that does not fit carries `error`
    (the trainer may still try, and say so).
    """
    if device_memory_gib is None:
        method: MethodName = "qlora" if spec.method == Method.QLORA else "lora"
        est = estimate(shape, spec, method=method, gpus=1, deepspeed="none", on_cpu=True)
        cand = Candidate(method, None, 1, "none", est.total_gib, None, True, "cpu")
        return _decision(cand, est, None, [], spec, shape)
    cap = round(device_memory_gib * (1.0 - safety_margin), 2)
    tried: list[Candidate] = []
    last: tuple[Candidate, Estimate] | None = None
    for method in _methods(spec):
        est = estimate(shape, spec, method=method, gpus=1, deepspeed="none")
        cand = Candidate(method, None, 1, "none", est.total_gib, cap, est.total_gib <= cap)
        tried.append(cand)
        last = (cand, est)
        if cand.fits:
            break
    assert last is not None  # _methods never returns an empty list
    cand, est = last
    error = None if cand.fits else (
        f"{cand.method} needs {est.total_gib:.1f} GiB but this device offers {cap:.1f} GiB "
        f"usable; breakdown (GiB): {est.describe()}")
    return PlacementDecision(method=cand.method, vram_class=None, gpus=1, deepspeed="none",
                             estimate=est, candidates=tuple(tried), error=error,
                             capacity_gib=cap, spec=spec, shape=shape)

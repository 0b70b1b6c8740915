"""Typed, read-only views of the objects the operator owns: the trainer Job's pods.

Pods arrive as plain dicts written by the kubelet, the scheduler and the trainer, any field
possibly missing. Reading them here, once, with every default spelled out, keeps the
verdicts (`reconcile.verdicts`) about decisions instead of `.get(...) or {}` chains, and
gives the controller and the cost accounting the same reading of a pod as the status.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from lora_operator import contract
from lora_operator.build import names
from lora_operator.build.job import CONTAINER, GPU_RESOURCE
from lora_operator.reconcile.conditions import MAX_MESSAGE, condition
from lora_operator.reconcile.timestamps import parse_time
from lora_operator.settings import Settings

Obj = Mapping[str, Any]


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


def exit_reason(code: int | None) -> str:
    """The reason the exit-code table gives `code` ("TrainerError" off the table)."""
    try:
        return contract.ExitCode(code).reason if code is not None else "Unknown"
    except ValueError:
        return "TrainerError" if code else "Unknown"


def pod_gpus(pod: Obj) -> int:
    """GPUs the trainer container asked for (its limit), 0 when unreadable."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        if c.get("name") == CONTAINER:
            raw = ((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE, 0)
            try:
                return int(raw)
            except (TypeError, ValueError):
                return 0
    return 0


def gpu_hours(pods: Sequence[Obj]) -> float:
    """GPU-hours of every finished trainer container (all attempts): run time × GPUs."""
    total = 0.0
    for pod in pods:
        term = trainer_state(pod).get("terminated") or {}
        start, end = parse_time(term.get("startedAt")), parse_time(term.get("finishedAt"))
        if start is None or end is None or end < start:
            continue
        total += (end - start).total_seconds() / 3600 * pod_gpus(pod)
    return total


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


@dataclass(frozen=True)
class TrainerPod:
    """One trainer pod, as the verdicts read it."""

    name: str
    created: str  # creationTimestamp ("" when unknown): pods sort by it, then by name
    attempt: int
    phase: str | None  # Pending | Running | Succeeded | Failed | Unknown
    node: str | None
    terminated: Obj  # the trainer container's terminated state, {} while it runs
    scheduled: Obj | None  # the PodScheduled condition
    disruption: Obj | None  # DisruptionTarget, when True: the pod was taken away

    @classmethod
    def of(cls, pod: Obj) -> TrainerPod:
        meta = pod.get("metadata") or {}
        disruption = condition(pod, "DisruptionTarget")
        return cls(name=meta.get("name") or "", created=meta.get("creationTimestamp") or "",
                   attempt=attempt_of(pod), phase=(pod.get("status") or {}).get("phase"),
                   node=(pod.get("spec") or {}).get("nodeName"),
                   terminated=trainer_state(pod).get("terminated") or {},
                   scheduled=condition(pod, "PodScheduled"),
                   disruption=disruption if (disruption or {}).get("status") == "True" else None)

    @property
    def exit_code(self) -> int | None:
        code: int | None = self.terminated.get("exitCode")
        return code

    def result(self) -> tuple[contract.TrainerResult | None, str]:
        """The trainer's result from the termination message, or its raw text."""
        return parse_result(self.terminated.get("message"))


def attempt_pods(pods: Sequence[Obj], attempt: int) -> list[TrainerPod]:
    """The trainer pods of one attempt, oldest first."""
    views = [TrainerPod.of(p) for p in pods]
    return sorted((p for p in views if p.attempt == attempt), key=lambda p: (p.created, p.name))

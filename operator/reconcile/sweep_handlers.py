"""kopf handlers for LoRASweeps: thin adapters from watch events to `SweepController`.

Same style as `handlers.py`: `on.event` + indexes, level-triggered, no finalizers (trial
LoRAJobs carry a controller ownerReference to their sweep, so the garbage collector removes
them with it). Trial LoRAJobs are found by the `lorajob.dev/sweep-name` label; each of their
events reconciles the sweep (a new eval loss may stop a trial, a finished one frees a slot).
Importing this module registers the handlers; `runner.run_operator` does, and installs the
controller with `install`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import kopf

from lora_operator import api, sweep_api
from lora_operator.reconcile import projection, sweep
from lora_operator.reconcile.handlers import mine, post_event
from lora_operator.reconcile.sweep_controller import Key, Obj, SweepController

TRIAL_LABELS: dict[str, Any] = {sweep.SWEEP_LABEL: kopf.PRESENT}
_controller: SweepController | None = None


class KopfSweepView:
    """The sweep controller's view over kopf's in-memory indexes."""

    def __init__(self) -> None:
        self._sweeps: Mapping[Any, Any] = {}
        self._trials: Mapping[Any, Any] = {}

    def attach(self, sweeps: Mapping[Any, Any], trials: Mapping[Any, Any]) -> None:
        self._sweeps, self._trials = sweeps, trials

    def sweep(self, key: Key) -> Obj | None:
        store = self._sweeps.get(key)
        return next(iter(store), None) if store else None

    def trials(self, key: Key) -> dict[str, Obj]:
        return {o["metadata"]["name"]: o for o in self._trials.get(key) or ()}


VIEW = KopfSweepView()


def install(controller: SweepController) -> None:
    """Make `controller` the one the sweep handlers call (before kopf starts)."""
    global _controller
    _controller = controller
    controller.view = VIEW
    controller.post_event = post_event


def _ctl(kw: Mapping[str, Any]) -> SweepController:
    if _controller is None:
        raise kopf.PermanentError("the sweep controller is not installed (start via run_operator)")
    VIEW.attach(kw["lorasweep_index"], kw["sweep_trial_index"])
    return _controller


def _copy(body: Any, drop_spec: bool) -> dict[str, Any]:
    """A private copy, trimmed as the watch trims (projection.py), and without the spec for
    trials: the sweep reads only their metadata and status."""
    kept = {k: v for k, v in body.items() if not (drop_spec and k == "spec")}
    return projection.project(copy.deepcopy(kept))


@kopf.index(api.GROUP, api.VERSION, sweep_api.PLURAL, when=mine)
def lorasweep_index(**kw: Any) -> dict[Key, Obj]:
    return {(kw["namespace"], kw["name"]): _copy(kw["body"], drop_spec=False)}


@kopf.index(api.GROUP, api.VERSION, api.PLURAL, labels=TRIAL_LABELS, when=mine)
def sweep_trial_index(**kw: Any) -> dict[Key, Obj]:
    return {(kw["namespace"], kw["labels"][sweep.SWEEP_LABEL]): _copy(kw["body"], drop_spec=True)}


@kopf.on.event(api.GROUP, api.VERSION, sweep_api.PLURAL, when=mine)
async def lorasweep_event(**kw: Any) -> None:
    ctl = _ctl(kw)
    if kw["event"].get("type") == "DELETED":
        ctl.forget((kw["namespace"], kw["name"]))
        return
    ctl.enqueue((kw["namespace"], kw["name"]))


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, labels=TRIAL_LABELS, when=mine)
async def sweep_trial_event(**kw: Any) -> None:
    _ctl(kw).enqueue((kw["namespace"], kw["labels"][sweep.SWEEP_LABEL]))

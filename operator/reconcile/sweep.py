"""LoRASweep logic as plain functions of plain dicts: trials, scheduling, early stopping, status.

The sweep controller (`sweep_controller.py`) only moves data between the cluster and these
functions, so every decision here is unit-tested without a cluster:

- `generate_trials`: the parameter values of every trial, deterministic (grid order, or a
  seeded random draw), so a restarted operator computes the same trial N again;
- `child_lorajob`: trial N's LoRAJob, `<sweep>-t<N>`, owned by the sweep;
- `observe_trials`: each trial's record from the last status and its LoRAJob (if any); a
  finished record is final, because a finished child may be gone (TTL, or early-stopped and
  deleted) and must never be re-created;
- `early_stops`: the median rule on live validation losses;
- `trials_to_create`: which Pending trials start now, within `parallelism`;
- `summarize`: phase, counts, best trial and conditions for the sweep's status.

Trials are stopped early by deleting their LoRAJob (its Job and pod follow through the
garbage collector): the GPU is freed at once, the operator needs no verb it does not already
hold, and the sweep's status keeps the trial's last step and validation loss.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_operator import api, sweep_api
from lora_operator.build import names
from lora_operator.reconcile.conditions import merge_conditions
from lora_operator.reconcile.timestamps import now_rfc3339
from lora_operator.sweep_api import (
    Algorithm,
    FloatRange,
    LoRASweepSpec,
    MethodChoice,
    ModulesChoice,
    RankRange,
    Scale,
    SweepPhase,
    TrialPhase,
)

Obj = Mapping[str, Any]
SWEEP_LABEL = f"{api.GROUP}/sweep-name"
TRIAL_LABEL = f"{api.GROUP}/sweep-trial"
PARAMS_ANNOTATION = f"{api.GROUP}/sweep-params"
# Test/dev hook, like names.KWOK_ANNOTATION_PREFIX: a template annotation
# `kwok.lorajob.dev/t<N>.<key>` becomes `kwok.lorajob.dev/<key>` on trial N only, so the kwok
# stages of the local cluster can give each trial its own outcome. No kubelet reads them.
KWOK_PREFIX = names.KWOK_ANNOTATION_PREFIX


# --------------------------------------------------------------------------- trials


def _draw(dim: FloatRange | RankRange | ModulesChoice | MethodChoice, rng: random.Random) -> Any:
    """One random value of one parameter."""
    if isinstance(dim, ModulesChoice | MethodChoice) or dim.values is not None:
        return rng.choice(list(dim.values))  # type: ignore[arg-type]
    assert dim.min is not None and dim.max is not None  # the model guarantees a range here
    if isinstance(dim, RankRange):
        return rng.randint(dim.min, dim.max)
    if dim.scale == Scale.LOG:
        value = math.exp(rng.uniform(math.log(dim.min), math.log(dim.max)))
    else:
        value = rng.uniform(dim.min, dim.max)
    return float(f"{value:.4g}")  # readable in status and names; far finer than it matters


def generate_trials(spec: LoRASweepSpec) -> list[dict[str, Any]]:
    """Every trial's parameter values by dotted path, in trial order (index 0 = t1).

    grid: the Cartesian product in the order of `sweep_api.PARAMETERS`, the last parameter
    varying fastest, cut at maxTrials. random: maxTrials draws from `random.Random(seed)`,
    parameters drawn in that same fixed order, so the same spec always gives the same trials.
    """
    dims = spec.search_space.dimensions()
    limit = spec.algorithm.max_trials or sweep_api.MAX_TRIALS
    if spec.algorithm.type == Algorithm.GRID:
        axes = [list(dim.values or []) for dim in dims.values()]
        combos = itertools.islice(itertools.product(*axes), limit)
        return [dict(zip(dims, combo, strict=True)) for combo in combos]
    rng = random.Random(spec.algorithm.seed)  # noqa: S311 (reproducible draws, not secrets)
    return [{path: _draw(dim, rng) for path, dim in dims.items()} for _ in range(limit)]


def grid_size(spec: LoRASweepSpec) -> int:
    """Combinations in the grid before maxTrials cuts it (for the too-large check)."""
    return math.prod(len(dim.values or []) for dim in spec.search_space.dimensions().values())


def trial_name(sweep: str, index: int) -> str:
    """Trial `index` (0-based) is the LoRAJob `<sweep>-t<index+1>`."""
    return f"{sweep}-t{index + 1}"


def apply_params(template: Obj, params: Mapping[str, Any], trial: str) -> dict[str, Any]:
    """The template spec with the trial's values set, and its own output location
    (`<output.uri>/<trial>/`): trials must never overwrite each other's adapters."""
    spec: dict[str, Any] = json.loads(json.dumps(template))
    for path, value in params.items():
        node = spec
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    output = spec.setdefault("output", {})
    output["uri"] = f"{str(output.get('uri', '')).rstrip('/')}/{trial}/"
    return spec


def trial_problems(spec: LoRASweepSpec, trials: Sequence[Mapping[str, Any]],
                   sweep: str) -> list[str]:
    """Why some trial's LoRAJob spec would be refused (a combination the template's rules
    forbid, such as qlora with fp16 and merge), named by trial; empty when all are valid."""
    template = spec.template.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    problems = []
    for index, params in enumerate(trials):
        name = trial_name(sweep, index)
        try:
            api.parse_spec(apply_params(template, params, name))
        except api.SpecError as exc:
            problems.append(f"{name} {json.dumps(params)}: {exc}")
    return problems


def _trial_annotations(template_annotations: Mapping[str, str], number: int) -> dict[str, str]:
    """Template annotations for trial `number` (1-based), kwok per-trial keys resolved."""
    out: dict[str, str] = {}
    own = f"{KWOK_PREFIX}t{number}."
    for key, value in template_annotations.items():
        if key.startswith(own):
            out[KWOK_PREFIX + key.removeprefix(own)] = value
        elif not (key.startswith(KWOK_PREFIX + "t") and "." in key.removeprefix(KWOK_PREFIX)):
            out[key] = value
    return out


def sweep_owner_reference(sweep: Obj) -> dict[str, Any]:
    meta = sweep.get("metadata") or {}
    return {"apiVersion": api.API_VERSION, "kind": sweep_api.KIND, "name": meta.get("name"),
            "uid": meta.get("uid"), "controller": True, "blockOwnerDeletion": True}


def child_lorajob(sweep: Obj, spec: LoRASweepSpec, index: int,
                  params: Mapping[str, Any]) -> dict[str, Any]:
    """Trial `index`'s LoRAJob: template + values, labelled with the sweep, owned by it."""
    meta = sweep.get("metadata") or {}
    name = trial_name(meta["name"], index)
    template = spec.template.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    labels = {**spec.template.metadata.labels, names.MANAGED_BY_LABEL: names.MANAGED_BY,
              SWEEP_LABEL: meta["name"], TRIAL_LABEL: str(index + 1)}
    instance = (meta.get("labels") or {}).get(names.INSTANCE_LABEL)
    if instance:
        labels[names.INSTANCE_LABEL] = instance
    annotations = {**_trial_annotations(spec.template.metadata.annotations, index + 1),
                   PARAMS_ANNOTATION: json.dumps(dict(params), sort_keys=True)}
    return {
        "apiVersion": api.API_VERSION, "kind": api.KIND,
        "metadata": {"name": name, "namespace": meta.get("namespace"), "labels": labels,
                     "annotations": annotations,
                     "ownerReferences": [sweep_owner_reference(sweep)]},
        "spec": apply_params(template, params, name),
    }


def owned_by(obj: Obj, uid: str) -> bool:
    """Whether `obj` has a controller reference to the object with `uid`."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


# --------------------------------------------------------------------------- observing


def _history(record: Obj, step: int | None, eval_loss: float | None) -> list[dict[str, Any]]:
    """The record's eval-loss history with the child's latest point added when it is new.

    The trainer reports only its latest validation loss beside the current step, so a point
    is recorded at the first step the sweep sees a new value: at most a progress interval
    (5 s) later than the evaluation itself.
    """
    points = [dict(p) for p in record.get("history") or []]
    if eval_loss is None or step is None:
        return points
    last = points[-1] if points else None
    if last is None or (last["evalLoss"] != eval_loss and step > last["step"]):
        points.append({"step": step, "evalLoss": eval_loss})
    return points[-sweep_api.MAX_HISTORY:]


def observe_trial(index: int, name: str, params: Mapping[str, Any], record: Obj | None,
                  child: Obj | None) -> dict[str, Any]:
    """One trial's status record from its last record and its LoRAJob (None: not seen)."""
    record = dict(record or {})
    base = {"name": name, "index": index + 1, "params": dict(params)}
    if TrialPhase(record.get("phase") or "Pending").finished:
        return {**record, **base}
    if child is None:
        return {**record, **base, "phase": TrialPhase.PENDING.value}
    status = child.get("status") or {}
    progress = status.get("progress") or {}
    result = status.get("result") or {}
    out = {**record, **base, "step": progress.get("step"), "evalLoss": progress.get("evalLoss"),
           "history": _history(record, progress.get("step"), progress.get("evalLoss"))}
    phase = status.get("phase")
    if phase == api.Phase.SUCCEEDED.value:
        out.update(phase=TrialPhase.SUCCEEDED.value, adapterEvalLoss=result.get("adapterEvalLoss"),
                   adapterUri=result.get("adapterUri"), message=None)
    elif phase == api.Phase.FAILED.value:
        out.update(phase=TrialPhase.FAILED.value, message=status.get("message"))
    else:
        out["phase"] = TrialPhase.RUNNING.value
    return {k: v for k, v in out.items() if v is not None and v != []}


def observe_trials(trials: Sequence[Mapping[str, Any]], sweep: str,
                   records: Sequence[Obj], children: Mapping[str, Obj]) -> list[dict[str, Any]]:
    """Every trial's record, in order (`children` by name, only those owned by the sweep)."""
    by_name = {r.get("name"): r for r in records}
    out = []
    for index, params in enumerate(trials):
        name = trial_name(sweep, index)
        out.append(observe_trial(index, name, params, by_name.get(name), children.get(name)))
    return out


# --------------------------------------------------------------------------- early stopping


def _reached(trial: Obj) -> int:
    """The furthest step a trial is known to have reached."""
    steps = [int(p["step"]) for p in trial.get("history") or []]
    return max([*steps, int(trial.get("step") or 0)])


def loss_at(trial: Obj, step: int) -> float | None:
    """A trial's validation loss at `step`: its latest evaluation at or before `step`, and
    only if the trial has reached `step` (a trial still behind says nothing about it yet)."""
    if _reached(trial) < step:
        return None
    earlier = [p for p in trial.get("history") or [] if p["step"] <= step]
    return earlier[-1]["evalLoss"] if earlier else None


@dataclass(frozen=True)
class Stop:
    name: str
    step: int
    eval_loss: float
    median: float
    compared: int

    @property
    def message(self) -> str:
        return (f"stopped early at step {self.step}: validation loss {self.eval_loss:.4g} is "
                f"worse than the median {self.median:.4g} of {self.compared} other trials at "
                f"that step (median rule)")


def early_stops(trials: Sequence[Obj], rule: sweep_api.EarlyStoppingSpec | None) -> list[Stop]:
    """Running trials the median rule stops now.

    A running trial whose latest validation loss L (at step s ≥ startStep) is worse than the
    median of the other trials' loss at step s — counting only trials that reached s, at
    least minTrials of them, finished or running — is stopped. Trials are judged against the
    records as they were before this pass, so the order of trials does not matter.
    """
    if rule is None:
        return []
    stops = []
    for trial in trials:
        points = trial.get("history") or []
        if trial.get("phase") != TrialPhase.RUNNING.value or not points:
            continue
        step, loss = points[-1]["step"], points[-1]["evalLoss"]
        if step < rule.start_step:
            continue
        others = [v for o in trials if o.get("name") != trial.get("name")
                  and (v := loss_at(o, step)) is not None]
        if len(others) < rule.min_trials:
            continue
        median = statistics.median(others)
        if loss > median:
            stops.append(Stop(str(trial["name"]), step, loss, median, len(others)))
    return stops


def apply_stops(trials: Sequence[Obj], stops: Sequence[Stop]) -> list[dict[str, Any]]:
    """The records with the stopped trials marked EarlyStopped (with their last loss)."""
    by_name = {s.name: s for s in stops}
    out = []
    for trial in trials:
        stop = by_name.get(str(trial.get("name")))
        if stop is None:
            out.append(dict(trial))
        else:
            out.append({**trial, "phase": TrialPhase.EARLY_STOPPED.value, "step": stop.step,
                        "evalLoss": stop.eval_loss, "message": stop.message})
    return out


# --------------------------------------------------------------------------- scheduling


def trials_to_create(trials: Sequence[Obj], parallelism: int) -> list[int]:
    """Indexes (0-based) of the Pending trials to start now: the lowest first, as many as
    `parallelism` leaves room for next to the running ones."""
    running = sum(1 for t in trials if t.get("phase") == TrialPhase.RUNNING.value)
    room = max(0, parallelism - running)
    pending = [i for i, t in enumerate(trials) if t.get("phase") == TrialPhase.PENDING.value]
    return pending[:room]


def children_to_delete(trials: Sequence[Obj], children: Mapping[str, Obj]) -> list[Obj]:
    """Early-stopped trials whose LoRAJob still exists and is not already being deleted."""
    out = []
    for trial in trials:
        child = children.get(str(trial.get("name")))
        if (trial.get("phase") == TrialPhase.EARLY_STOPPED.value and child is not None
                and not (child.get("metadata") or {}).get("deletionTimestamp")):
            out.append(child)
    return out


# --------------------------------------------------------------------------- status


def best_trial(trials: Sequence[Obj]) -> dict[str, Any] | None:
    """The succeeded trial with the lowest adapterEvalLoss (the lower index on a tie)."""
    done = [t for t in trials if t.get("phase") == TrialPhase.SUCCEEDED.value
            and isinstance(t.get("adapterEvalLoss"), int | float)]
    if not done:
        return None
    best = min(done, key=lambda t: (t["adapterEvalLoss"], t.get("index") or 0))
    out = {"name": best["name"], "params": best.get("params") or {},
           "adapterEvalLoss": best["adapterEvalLoss"], "adapterUri": best.get("adapterUri")}
    return {k: v for k, v in out.items() if v is not None}


@dataclass
class Counts:
    total: int = 0
    by_phase: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, phase: TrialPhase) -> int:
        return self.by_phase.get(phase.value, 0)

    @property
    def finished(self) -> int:
        return self[TrialPhase.SUCCEEDED] + self[TrialPhase.FAILED] + self[TrialPhase.EARLY_STOPPED]


def count(trials: Sequence[Obj]) -> Counts:
    out = Counts(total=len(trials))
    for t in trials:
        phase = str(t.get("phase") or TrialPhase.PENDING.value)
        out.by_phase[phase] = out.by_phase.get(phase, 0) + 1
    return out


def sweep_phase(counts: Counts) -> SweepPhase:
    """Succeeded once every trial finished and one succeeded; Failed if none did."""
    if counts.total and counts.finished == counts.total:
        return SweepPhase.SUCCEEDED if counts[TrialPhase.SUCCEEDED] else SweepPhase.FAILED
    return SweepPhase.RUNNING


def _message(counts: Counts, best: Obj | None) -> str:
    parts = [f"{counts[TrialPhase.SUCCEEDED]} succeeded", f"{counts[TrialPhase.FAILED]} failed",
             f"{counts[TrialPhase.EARLY_STOPPED]} stopped early",
             f"{counts[TrialPhase.RUNNING]} running", f"{counts[TrialPhase.PENDING]} pending"]
    text = f"{counts.finished}/{counts.total} trials finished: {', '.join(parts)}"
    if best:
        text += f"; best {best['name']} (adapterEvalLoss {best['adapterEvalLoss']:.4g})"
    elif counts.total and counts.finished == counts.total:
        text += "; no trial succeeded"
    return text


def summarize(sweep: Obj, trials: Sequence[Obj], now: str | None = None) -> dict[str, Any]:
    """The sweep's status from its trial records: phase, counts, best trial, conditions."""
    now = now or now_rfc3339()
    old = sweep.get("status") or {}
    counts = count(trials)
    phase = sweep_phase(counts)
    best = best_trial(trials)
    message = _message(counts, best)
    desired = {
        SweepPhase.RUNNING: {"Running": ("True", "TrialsRunning", message)},
        SweepPhase.SUCCEEDED: {"Succeeded": ("True", "BestTrialFound", message)},
        SweepPhase.FAILED: {"Failed": ("True", "NoTrialSucceeded", message)},
    }[phase]
    generation = (sweep.get("metadata") or {}).get("generation")
    status: dict[str, Any] = {
        "phase": phase.value,
        "observedGeneration": generation,
        "trialProgress": f"{counts.finished}/{counts.total}",
        "trialsTotal": counts.total,
        "trialsSucceeded": counts[TrialPhase.SUCCEEDED],
        "trialsFailed": counts[TrialPhase.FAILED],
        "trialsEarlyStopped": counts[TrialPhase.EARLY_STOPPED],
        "trialsRunning": counts[TrialPhase.RUNNING],
        "trials": [dict(t) for t in trials],
        "bestTrial": best,
        "conditions": merge_conditions(old.get("conditions") or [], desired, generation, now),
        "startTime": old.get("startTime") or now,
        "message": message,
    }
    if phase != SweepPhase.RUNNING:
        status["completionTime"] = old.get("completionTime") or now
    return status


def failed_status(sweep: Obj, reason: str, message: str, now: str | None = None) -> dict[str, Any]:
    """A sweep that cannot run at all (invalid spec, a trial spec its rules refuse)."""
    now = now or now_rfc3339()
    old = sweep.get("status") or {}
    generation = (sweep.get("metadata") or {}).get("generation")
    return {
        "phase": SweepPhase.FAILED.value, "observedGeneration": generation, "message": message,
        "conditions": merge_conditions(old.get("conditions") or [],
                                       {"Failed": ("True", reason, message)}, generation, now),
        "completionTime": old.get("completionTime") or now,
    }


def status_changed(old: Obj, new: Obj) -> bool:
    """Whether a patch would change anything a user sees (timestamps of unchanged
    conditions aside), so an idle sweep causes no writes."""
    keys = set(new) - {"conditions"}
    if any(old.get(k) != new.get(k) for k in keys):
        return True
    strip = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
             for c in new.get("conditions") or []]
    had = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
           for c in old.get("conditions") or []]
    return strip != had

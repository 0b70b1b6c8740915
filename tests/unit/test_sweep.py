"""LoRASweep: the API's refusals, trial generation, scheduling, the median rule and the
status summary, as pure functions of plain dicts (the cluster tests are in
tests/integration/test_sweep.py)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator import api, crd, sweep_api
from lora_operator.reconcile import sweep

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = {
    "baseModel": {"uri": "s3://models/llama/", "architecture": "llama-3.1-8b"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "method": "lora",
    "output": {"uri": "s3://adapters/sweep/"},
}


def spec(**over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "template": {"spec": copy.deepcopy(TEMPLATE)},
        "searchSpace": {"lora": {"r": {"values": [8, 16]}},
                        "training": {"learningRate": {"values": [1e-4, 3e-4]}}},
        "parallelism": 2,
    }
    out.update(over)
    return out


def sweep_body(name: str = "s", **over: Any) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": "LoRASweep",
            "metadata": {"name": name, "namespace": "ml", "uid": "sweep-uid", "generation": 1,
                         "labels": {}},
            "spec": spec(**over)}


def errors(spec_dict: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(api.SpecError) as info:
        sweep_api.parse_sweep_spec(spec_dict)
    return dict(info.value.errors)


# --------------------------------------------------------------------------- API


def test_example_parses_and_gives_three_trials() -> None:
    doc = yaml.safe_load((ROOT / "examples/sweep-smollm2.yaml").read_text())
    parsed = sweep_api.parse_sweep(doc)
    trials = sweep.generate_trials(parsed.spec)
    assert trials == [{"lora.r": 4, "training.learningRate": 5e-4},
                      {"lora.r": 4, "training.learningRate": 2e-3},
                      {"lora.r": 16, "training.learningRate": 5e-4}]
    assert sweep.trial_problems(parsed.spec, trials, "sweep-smollm2") == []


def test_unknown_parameter_is_refused_by_name() -> None:
    bad = spec(searchSpace={"lora": {"rank": {"values": [8]}}})
    assert errors(bad) == {"spec.searchSpace.lora.rank":
                           "unknown field (not part of the schema; check its spelling)"}


def test_wrong_value_type_names_the_value() -> None:
    bad = spec(searchSpace={"lora": {"r": {"values": [8, "16"]}}})
    errs = errors(bad)
    assert list(errs) == ["spec.searchSpace.lora.r.values[1]"]
    assert "'16'" in errs["spec.searchSpace.lora.r.values[1]"]


def test_method_values_are_lora_or_qlora() -> None:
    errs = errors(spec(searchSpace={"method": {"values": ["lora", "dora"]}}))
    assert list(errs) == ["spec.searchSpace.method.values[1]"]
    assert "'lora'" in errs["spec.searchSpace.method.values[1]"]


def test_target_modules_values_are_lists_of_module_names() -> None:
    errs = errors(spec(searchSpace={"lora": {"targetModules": {"values": [["q_proj"], ["bad name"]]}}}))
    assert list(errs) == ["spec.searchSpace.lora.targetModules.values[1][0]"]


def test_grid_refuses_ranges_and_names_the_parameter() -> None:
    bad = spec(searchSpace={"training": {"learningRate": {"min": 1e-5, "max": 1e-3}}})
    (message,) = errors(bad).values()
    assert "grid needs values lists" in message and "training.learningRate" in message


def test_random_needs_max_trials() -> None:
    assert errors(spec(algorithm={"type": "random"})) == {
        "spec.algorithm": "maxTrials: required when type is random"}


@pytest.mark.parametrize(("space", "path", "words"), [
    ({"lora": {"r": {"min": 16, "max": 8}}}, "spec.searchSpace.lora.r", "min must be below max"),
    ({"lora": {"r": {"min": 8}}}, "spec.searchSpace.lora.r", "set values, or both min and max"),
    ({"lora": {"r": {"values": [8], "min": 4, "max": 9}}}, "spec.searchSpace.lora.r",
     "not both"),
    ({"training": {"learningRate": {"values": [1e-4, 2.0]}}}, "spec.searchSpace.training",
     "at most 1"),
    ({}, "spec.searchSpace", "set at least one of"),
])
def test_range_refusals(space: dict[str, Any], path: str, words: str) -> None:
    errs = errors(spec(searchSpace=space, algorithm={"type": "random", "maxTrials": 3}))
    assert path in errs and words in errs[path], errs


def test_template_spec_is_validated_as_a_lorajob_spec() -> None:
    bad = spec()
    bad["template"]["spec"]["lora"] = {"r": 0}
    assert "spec.template.spec.lora.r" in errors(bad)


def test_a_trial_combination_the_lorajob_rules_refuse_is_named() -> None:
    template = {**TEMPLATE, "output": {"uri": "s3://adapters/x/", "merge": True},
                "training": {"precision": "fp16"}}
    parsed = sweep_api.parse_sweep_spec(spec(template={"spec": template},
                                             searchSpace={"method": {"values": ["lora", "qlora"]}}))
    problems = sweep.trial_problems(parsed, sweep.generate_trials(parsed), "s")
    assert len(problems) == 1 and problems[0].startswith('s-t2 {"method": "qlora"}')
    assert "training.precision must be auto or bf16" in problems[0]


# --------------------------------------------------------------------------- trials


def test_grid_order_last_parameter_fastest_and_max_trials_cuts() -> None:
    parsed = sweep_api.parse_sweep_spec(spec())
    assert sweep.generate_trials(parsed) == [
        {"lora.r": 8, "training.learningRate": 1e-4}, {"lora.r": 8, "training.learningRate": 3e-4},
        {"lora.r": 16, "training.learningRate": 1e-4}, {"lora.r": 16, "training.learningRate": 3e-4}]
    cut = sweep_api.parse_sweep_spec(spec(algorithm={"maxTrials": 3}))
    assert len(sweep.generate_trials(cut)) == 3 and sweep.grid_size(cut) == 4


def test_random_is_reproducible_from_the_seed_and_stays_in_range() -> None:
    space = {"lora": {"r": {"min": 4, "max": 64}, "targetModules": {"values": [["q_proj"], ["all-linear"]]}},
             "training": {"learningRate": {"min": 1e-5, "max": 1e-2, "scale": "log"}},
             "method": {"values": ["lora", "qlora"]}}
    one = sweep_api.parse_sweep_spec(spec(searchSpace=space,
                                          algorithm={"type": "random", "maxTrials": 40, "seed": 7}))
    again = sweep_api.parse_sweep_spec(spec(searchSpace=space,
                                            algorithm={"type": "random", "maxTrials": 40, "seed": 7}))
    other = sweep_api.parse_sweep_spec(spec(searchSpace=space,
                                            algorithm={"type": "random", "maxTrials": 40, "seed": 8}))
    trials = sweep.generate_trials(one)
    assert trials == sweep.generate_trials(again) != sweep.generate_trials(other)
    assert len(trials) == 40
    assert all(4 <= t["lora.r"] <= 64 and isinstance(t["lora.r"], int) for t in trials)
    lrs = [t["training.learningRate"] for t in trials]
    assert all(1e-5 <= lr <= 1e-2 for lr in lrs)
    # log scale: draws spread over the decades, not bunched at the top as a linear draw would
    assert sum(lr < 1e-3 for lr in lrs) >= 15
    assert {t["method"] for t in trials} == {"lora", "qlora"}
    assert {tuple(t["lora.targetModules"]) for t in trials} == {("q_proj",), ("all-linear",)}


def test_child_lorajob_is_named_labelled_owned_and_writes_its_own_output() -> None:
    body = sweep_body("demo")
    body["metadata"]["labels"] = {"lorajob.dev/operator-instance": "blue"}
    body["spec"]["template"]["metadata"] = {
        "labels": {"team": "nlp"},
        "annotations": {"note": "x", "kwok.lorajob.dev/run-seconds": "2",
                        "kwok.lorajob.dev/t2.exit-code": "1", "kwok.lorajob.dev/t1.exit-code": "0"}}
    parsed = sweep_api.parse_sweep_spec(body["spec"])
    child = sweep.child_lorajob(body, parsed, 1, {"lora.r": 8, "training.learningRate": 3e-4})
    meta = child["metadata"]
    assert meta["name"] == "demo-t2" and meta["namespace"] == "ml"
    assert meta["labels"] == {"team": "nlp", "app.kubernetes.io/managed-by": "lora-operator",
                              "lorajob.dev/sweep-name": "demo", "lorajob.dev/sweep-trial": "2",
                              "lorajob.dev/operator-instance": "blue"}
    assert meta["annotations"]["kwok.lorajob.dev/exit-code"] == "1"
    assert meta["annotations"]["kwok.lorajob.dev/run-seconds"] == "2"
    assert meta["annotations"]["note"] == "x"
    assert not any(k.startswith("kwok.lorajob.dev/t") for k in meta["annotations"])
    assert json.loads(meta["annotations"]["lorajob.dev/sweep-params"]) == {
        "lora.r": 8, "training.learningRate": 3e-4}
    (ref,) = meta["ownerReferences"]
    assert ref == {"apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRASweep", "name": "demo",
                   "uid": "sweep-uid", "controller": True, "blockOwnerDeletion": True}
    child_spec = api.parse_spec(child["spec"])
    assert child_spec.lora.r == 8 and child_spec.training.learning_rate == 3e-4
    assert child_spec.output.uri == "s3://adapters/sweep/demo-t2/"


def test_longest_sweep_name_gives_trial_names_a_lorajob_accepts() -> None:
    name = "s" * sweep_api.MAX_NAME_LENGTH
    child = sweep.trial_name(name, sweep_api.MAX_TRIALS - 1)
    assert len(child) == sweep_api.LORAJOB_MAX_NAME_LENGTH == 52
    api.parse_lorajob({"metadata": {"name": child}, "spec": TEMPLATE})


# --------------------------------------------------------------------------- observing


def child(phase: str | None = None, step: int | None = None, eval_loss: float | None = None,
          **result: Any) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if phase:
        status["phase"] = phase
    if step is not None:
        status["progress"] = {"step": step, "evalLoss": eval_loss}
    if result:
        status["result"] = result
    return {"metadata": {"name": "x", "ownerReferences": [{"uid": "sweep-uid", "controller": True}]},
            "status": status}


def test_observe_maps_child_phases_and_keeps_finished_records() -> None:
    params = {"lora.r": 8}
    pending = sweep.observe_trial(0, "s-t1", params, None, None)
    assert pending == {"name": "s-t1", "index": 1, "params": params, "phase": "Pending"}
    running = sweep.observe_trial(0, "s-t1", params, pending, child("Running", 10, 2.5))
    assert running["phase"] == "Running" and running["history"] == [{"step": 10, "evalLoss": 2.5}]
    same = sweep.observe_trial(0, "s-t1", params, running, child("Running", 14, 2.5))
    assert same["history"] == [{"step": 10, "evalLoss": 2.5}] and same["step"] == 14
    later = sweep.observe_trial(0, "s-t1", params, same, child("Running", 20, 2.1))
    assert [p["step"] for p in later["history"]] == [10, 20]
    done = sweep.observe_trial(0, "s-t1", params, later,
                               child("Succeeded", 30, 2.0, adapterEvalLoss=1.9, adapterUri="s3://a/"))
    assert (done["phase"], done["adapterEvalLoss"], done["adapterUri"]) == ("Succeeded", 1.9, "s3://a/")
    # the child is gone (TTL): the record stands, never back to Pending
    assert sweep.observe_trial(0, "s-t1", params, done, None) == done
    failed = sweep.observe_trial(1, "s-t2", params, None, {"status": {"phase": "Failed",
                                                                      "message": "OOM"}})
    assert (failed["phase"], failed["message"]) == ("Failed", "OOM")


def test_history_is_bounded() -> None:
    record: dict[str, Any] = {}
    for step in range(1, 100):
        record = sweep.observe_trial(0, "s-t1", {}, record, child("Running", step, 10.0 - step / 100))
    assert len(record["history"]) == sweep_api.MAX_HISTORY
    assert record["history"][-1]["step"] == 99


# --------------------------------------------------------------------------- scheduling


def trial(name: str, phase: str, history: list[tuple[int, float]] = (), **kw: Any) -> dict[str, Any]:  # type: ignore[assignment]
    points = [{"step": s, "evalLoss": v} for s, v in history]
    return {"name": name, "index": int(name.rsplit("t", 1)[1]), "params": {}, "phase": phase,
            "history": points, "step": points[-1]["step"] if points else None, **kw}


def test_parallelism_starts_the_lowest_pending_trials_in_free_slots() -> None:
    trials = [trial("s-t1", "Running"), trial("s-t2", "Succeeded"), trial("s-t3", "Pending"),
              trial("s-t4", "Pending"), trial("s-t5", "Pending")]
    assert sweep.trials_to_create(trials, 1) == []
    assert sweep.trials_to_create(trials, 2) == [2]
    assert sweep.trials_to_create(trials, 10) == [2, 3, 4]
    stopped = [dict(t, phase="EarlyStopped") if t["name"] == "s-t1" else t for t in trials]
    assert sweep.trials_to_create(stopped, 2) == [2, 3]


def test_median_rule_stops_a_trial_worse_than_the_median_at_its_step() -> None:
    rule = sweep_api.EarlyStoppingSpec(min_trials=2, start_step=10)
    trials = [
        trial("s-t1", "Succeeded", [(10, 2.0), (20, 1.5), (30, 1.2)], adapterEvalLoss=1.2),
        trial("s-t2", "Running", [(10, 2.2), (20, 1.7)]),
        trial("s-t3", "Running", [(10, 2.6), (20, 2.4)]),  # median of 1.5, 1.7 = 1.6 < 2.4
        trial("s-t4", "Running", [(10, 1.9)]),  # better than median(2.0, 2.2, 2.6)
    ]
    (stop,) = sweep.early_stops(trials, rule)
    assert (stop.name, stop.step, stop.eval_loss, stop.median, stop.compared) == ("s-t3", 20, 2.4, 1.6, 2)
    assert "median 1.6 of 2 other trials" in stop.message
    marked = sweep.apply_stops(trials, [stop])
    assert marked[2]["phase"] == "EarlyStopped" and marked[2]["evalLoss"] == 2.4
    assert sweep.trials_to_create([*marked, trial("s-t5", "Pending")], 3) == [4]


def test_median_rule_guards_min_trials_start_step_and_trials_behind() -> None:
    trials = [trial("s-t1", "Running", [(10, 2.0)]), trial("s-t2", "Running", [(10, 3.0)]),
              trial("s-t3", "Running", [(5, 1.0)])]  # t3 has not reached step 10
    assert sweep.early_stops(trials, sweep_api.EarlyStoppingSpec(min_trials=2)) == []
    (stop,) = sweep.early_stops(trials, sweep_api.EarlyStoppingSpec(min_trials=1))
    assert stop.name == "s-t2" and stop.median == 2.0
    assert sweep.early_stops(trials, sweep_api.EarlyStoppingSpec(min_trials=1, start_step=11)) == []
    assert sweep.early_stops(trials, None) == []
    # a trial further on is judged by its value at the step, not its latest value
    ahead = trial("s-t4", "Running", [(10, 1.0), (40, 0.2)])
    assert sweep.loss_at(ahead, 10) == 1.0 and sweep.loss_at(ahead, 25) == 1.0
    assert sweep.loss_at(trials[2], 10) is None


def test_children_to_delete_only_early_stopped_and_not_already_deleting() -> None:
    trials = [trial("s-t1", "EarlyStopped"), trial("s-t2", "Running"), trial("s-t3", "EarlyStopped")]
    kids = {"s-t1": {"metadata": {"name": "s-t1"}}, "s-t2": {"metadata": {"name": "s-t2"}},
            "s-t3": {"metadata": {"name": "s-t3", "deletionTimestamp": "2026-01-01T00:00:00Z"}}}
    assert sweep.children_to_delete(trials, kids) == [kids["s-t1"]]


# --------------------------------------------------------------------------- status


def test_summary_running_then_succeeded_with_the_best_trial() -> None:
    body = sweep_body()
    trials = [trial("s-t1", "Succeeded", adapterEvalLoss=1.4, adapterUri="s3://a/t1/"),
              trial("s-t2", "Running"), trial("s-t3", "EarlyStopped"),
              trial("s-t4", "Succeeded", adapterEvalLoss=1.1, adapterUri="s3://a/t4/")]
    status = sweep.summarize(body, trials, now="2026-01-01T00:00:00Z")
    assert status["phase"] == "Running" and status["trialProgress"] == "3/4"
    assert status["bestTrial"] == {"name": "s-t4", "params": {}, "adapterEvalLoss": 1.1,
                                   "adapterUri": "s3://a/t4/"}
    assert "completionTime" not in status
    assert [c["type"] for c in status["conditions"] if c["status"] == "True"] == ["Running"]
    body["status"] = status
    trials[1] = trial("s-t2", "Failed", message="boom")
    done = sweep.summarize(body, trials, now="2026-01-01T00:05:00Z")
    assert done["phase"] == "Succeeded" and done["trialProgress"] == "4/4"
    assert (done["trialsSucceeded"], done["trialsFailed"], done["trialsEarlyStopped"]) == (2, 1, 1)
    assert done["completionTime"] == "2026-01-01T00:05:00Z"
    assert done["startTime"] == "2026-01-01T00:00:00Z"
    conds = {c["type"]: c["status"] for c in done["conditions"]}
    assert conds == {"Running": "False", "Succeeded": "True"}
    assert "best s-t4 (adapterEvalLoss 1.1)" in done["message"]
    api_status = sweep_api.LoRASweepStatus.model_validate(done)  # the CRD's shape
    assert api_status.best_trial is not None and api_status.best_trial.name == "s-t4"


def test_summary_failed_when_every_trial_finished_and_none_succeeded() -> None:
    trials = [trial("s-t1", "Failed"), trial("s-t2", "EarlyStopped")]
    status = sweep.summarize(sweep_body(), trials)
    assert status["phase"] == "Failed" and status["bestTrial"] is None
    assert "no trial succeeded" in status["message"]


def test_best_trial_ignores_unfinished_and_breaks_ties_by_index() -> None:
    trials = [trial("s-t1", "Running", evalLoss=0.1), trial("s-t2", "Succeeded", adapterEvalLoss=1.0),
              trial("s-t3", "Succeeded", adapterEvalLoss=1.0), trial("s-t4", "Succeeded")]
    best = sweep.best_trial(trials)
    assert best is not None and best["name"] == "s-t2"


def test_status_changed_ignores_only_condition_timestamps() -> None:
    body = sweep_body()
    first = sweep.summarize(body, [trial("s-t1", "Running")], now="2026-01-01T00:00:00Z")
    body["status"] = first
    again = sweep.summarize(body, [trial("s-t1", "Running")], now="2026-01-01T00:09:00Z")
    assert not sweep.status_changed(first, again)
    moved = sweep.summarize(body, [trial("s-t1", "Running", [(5, 2.0)])])
    assert sweep.status_changed(first, moved)


# --------------------------------------------------------------------------- CRD


def test_committed_sweep_crd_is_generated() -> None:
    assert (ROOT / "crds/lorasweep.yaml").read_text() == crd.render_crd(crd.LORASWEEP), \
        "run `make crds`"


def test_sweep_crd_names_columns_and_immutable_fields() -> None:
    doc = yaml.safe_load((ROOT / "crds/lorasweep.yaml").read_text())
    names = doc["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        "LoRASweep", "lorasweeps", ["lsw"], ["ml"])
    version = doc["spec"]["versions"][0]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Trials", "Best Loss", "Best Trial", "Age", "Adapter"]
    assert columns["Adapter"]["priority"] == 1
    props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    immutable = {k for k, v in props.items()
                 if any(r["rule"] == "self == oldSelf" for r in v.get("x-kubernetes-validations", []))}
    assert immutable == {"template", "searchSpace", "algorithm", "objective"}
    # the template is a whole LoRAJob spec, CEL rules included
    lora = props["template"]["properties"]["spec"]["properties"]["lora"]
    assert lora["x-kubernetes-validations"] and lora["properties"]["r"]["maximum"] == 1024


def test_chart_ships_the_sweep_crd_from_the_one_source() -> None:
    link = ROOT / "charts/lora-operator/crds/lorasweep.yaml"
    assert link.is_symlink() and link.resolve() == (ROOT / "crds/lorasweep.yaml").resolve()


def test_log_scale_draw_is_rounded_to_four_significant_digits() -> None:
    parsed = sweep_api.parse_sweep_spec(spec(
        searchSpace={"training": {"learningRate": {"min": 1e-5, "max": 1e-3, "scale": "log"}}},
        algorithm={"type": "random", "maxTrials": 5, "seed": 1}))
    for t in sweep.generate_trials(parsed):
        lr = t["training.learningRate"]
        assert float(f"{lr:.4g}") == lr and not math.isnan(lr)


# --------------------------------------------------------------------------- the controller


class RecordingKube:
    """The sweep controller's API calls against an in-memory store (unit test: the real API
    server is in tests/integration/test_sweep.py); `calls` keeps their order."""

    def __init__(self, view: Any) -> None:
        self.view = view
        self.calls: list[tuple[str, str]] = []
        self.lorajobs: dict[str, dict[str, Any]] = {}
        self.rv = 1

    def create_lorajob(self, body: dict[str, Any]) -> dict[str, Any] | None:
        name = body["metadata"]["name"]
        self.calls.append(("create", name))
        if name in self.lorajobs:
            return None
        self.lorajobs[name] = copy.deepcopy(body)
        return body

    def read_lorajob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.lorajobs.get(name)

    def delete_lorajob(self, namespace: str, name: str, uid: str) -> None:
        self.calls.append(("delete", name))
        self.lorajobs.pop(name, None)

    def read_sweep(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.view.sweeps.get((namespace, name))

    def patch_sweep_status(self, namespace: str, name: str, status: dict[str, Any],
                           resource_version: str | None) -> dict[str, Any] | None:
        body = copy.deepcopy(self.view.sweeps[(namespace, name)])
        self.rv += 1
        body["metadata"]["resourceVersion"] = str(self.rv)
        body["status"] = {**(body.get("status") or {}), **status}
        self.view.sweeps[(namespace, name)] = body
        self.calls.append(("status", ",".join(t["phase"] for t in status.get("trials") or [])))
        return body


def _run(ctl: Any, kube: RecordingKube, key: tuple[str, str]) -> None:
    import asyncio

    kube.view.trial_map[key] = {n: dict(o) for n, o in kube.lorajobs.items()}
    asyncio.run(ctl.reconcile(*key))


def test_controller_runs_trials_within_parallelism_and_stops_the_loser() -> None:
    import concurrent.futures

    from lora_operator.reconcile.sweep_controller import DictSweepView, SweepController

    view = DictSweepView()
    body = sweep_body("s", earlyStopping={"minTrials": 1}, parallelism=2,
                      searchSpace={"lora": {"r": {"values": [4, 8, 16]}}})
    body["metadata"]["resourceVersion"] = "1"
    key = ("ml", "s")
    view.sweeps[key] = body
    kube = RecordingKube(view)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ctl = SweepController(kube, pool, view)  # type: ignore[arg-type]
        _run(ctl, kube, key)
        assert sorted(kube.lorajobs) == ["s-t1", "s-t2"]
        for name, loss in (("s-t1", 1.0), ("s-t2", 2.0)):
            kube.lorajobs[name]["status"] = {"phase": "Running",
                                             "progress": {"step": 10, "evalLoss": loss}}
        kube.calls.clear()
        _run(ctl, kube, key)
        # t2 is worse than t1 at step 10: recorded EarlyStopped *before* it is deleted,
        # and its slot goes to t3
        assert kube.calls == [("status", "Running,EarlyStopped,Pending"), ("delete", "s-t2"),
                              ("create", "s-t3")]
        kube.lorajobs["s-t1"]["status"] = {"phase": "Succeeded", "result": {
            "adapterEvalLoss": 0.8, "adapterUri": "s3://adapters/sweep/s-t1/"}}
        kube.lorajobs["s-t3"]["status"] = {"phase": "Succeeded", "result": {
            "adapterEvalLoss": 0.9, "adapterUri": "s3://adapters/sweep/s-t3/"}}
        kube.calls.clear()
        _run(ctl, kube, key)
        status = view.sweeps[key]["status"]
        assert status["phase"] == "Succeeded" and status["bestTrial"]["name"] == "s-t1"
        assert [t["phase"] for t in status["trials"]] == ["Succeeded", "EarlyStopped", "Succeeded"]
        assert ("create", "s-t2") not in kube.calls, "an early-stopped trial was re-created"


def test_controller_fails_a_trial_whose_name_belongs_to_someone_else() -> None:
    import asyncio
    import concurrent.futures

    from lora_operator.reconcile.sweep_controller import DictSweepView, SweepController

    view = DictSweepView()
    body = sweep_body("s", searchSpace={"lora": {"r": {"values": [4]}}})
    key = ("ml", "s")
    view.sweeps[key] = body
    kube = RecordingKube(view)
    kube.lorajobs["s-t1"] = {"metadata": {"name": "s-t1", "ownerReferences": []}, "spec": {}}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # the watch shows no trial: the foreign LoRAJob is not labelled as this sweep's
        asyncio.run(SweepController(kube, pool, view).reconcile(*key))  # type: ignore[arg-type]
    status = view.sweeps[key]["status"]
    assert status["phase"] == "Failed" and status["trials"][0]["phase"] == "Failed"
    assert "not controlled by this sweep" in status["trials"][0]["message"]
    assert kube.lorajobs["s-t1"]["spec"] == {}, "someone else's LoRAJob was touched"


def test_controller_fails_an_invalid_sweep_naming_the_field() -> None:
    import asyncio
    import concurrent.futures

    from lora_operator.reconcile.sweep_controller import DictSweepView, SweepController

    view = DictSweepView()
    body = sweep_body("s", parallelism=0)
    view.sweeps[("ml", "s")] = body
    kube = RecordingKube(view)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        asyncio.run(SweepController(kube, pool, view).reconcile("ml", "s"))  # type: ignore[arg-type]
    status = view.sweeps[("ml", "s")]["status"]
    assert status["phase"] == "Failed" and "spec.parallelism" in status["message"]
    assert not kube.lorajobs

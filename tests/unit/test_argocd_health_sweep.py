"""The Argo CD health check for LoRASweeps (docs/argocd-health-lorasweep.lua) against status
objects made by the sweep controller's own summary (operator/reconcile/sweep.py), so a
renamed status field breaks this test rather than leaving every sweep Progressing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lupa import LuaRuntime

from lora_operator.reconcile import sweep

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "argocd-health-lorasweep.lua"


def health(obj: dict[str, Any]) -> dict[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)
    fn = lua.eval("function(obj) " + SCRIPT.read_text() + " end")
    out = fn(lua.table_from(_lua(lua, obj)))
    return {"status": out["status"], "message": out["message"]}


def _lua(lua: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return lua.table_from({k: _lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_lua(lua, v) for v in value])
    return value


def _sweep(trials: list[dict[str, Any]], generation: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"name": "s", "namespace": "ml", "generation": generation}}
    body["status"] = sweep.summarize(body, trials, now="2026-01-01T00:00:00Z")
    return body


def _trial(n: int, phase: str, **kw: Any) -> dict[str, Any]:
    return {"name": f"s-t{n}", "index": n, "params": {"lora.r": 8}, "phase": phase, **kw}


def test_running_sweep_is_progressing_with_its_trial_count() -> None:
    got = health(_sweep([_trial(1, "Succeeded", adapterEvalLoss=1.0), _trial(2, "Running")]))
    assert got["status"] == "Progressing" and got["message"].startswith("Trials 1/2 finished")


def test_succeeded_sweep_is_healthy_and_names_the_best_adapter() -> None:
    got = health(_sweep([_trial(1, "Succeeded", adapterEvalLoss=1.25, adapterUri="s3://a/s-t1/"),
                         _trial(2, "EarlyStopped")]))
    assert got == {"status": "Healthy",
                   "message": "Best trial s-t1 (held-out loss 1.25), adapter at s3://a/s-t1/"}


def test_failed_sweep_is_degraded_with_the_reason() -> None:
    got = health(_sweep([_trial(1, "Failed"), _trial(2, "EarlyStopped")]))
    assert got["status"] == "Degraded" and "no trial succeeded" in got["message"]


def test_new_spec_generation_not_yet_observed_is_progressing() -> None:
    body = _sweep([_trial(1, "Succeeded", adapterEvalLoss=1.0)])
    body["metadata"]["generation"] = 2
    assert health(body)["status"] == "Progressing"
    assert health({"metadata": {"name": "s"}})["status"] == "Progressing"

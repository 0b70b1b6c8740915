"""The Argo CD health check (docs/argocd-health.lua) against LoRAJob status objects.

The objects are built with the typed API (operator/api.py) and dumped the way the API server
stores them (camelCase, unset fields left out), so a renamed status field breaks this test
rather than silently turning every job "Progressing" in Argo CD.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lupa import LuaRuntime

from lora_operator.api import (
    LoRAJob,
    LoRAJobStatus,
    Phase,
    Placement,
    Progress,
    Result,
    to_manifest,
)

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "argocd-health.lua"

SPEC = {
    "baseModel": {"uri": "s3://models/smollm2-135m/"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "output": {"uri": "s3://adapters/demo/"},
}


def _job(status: LoRAJobStatus | None, generation: int = 1) -> dict[str, Any]:
    job = LoRAJob.model_validate({"metadata": {"name": "demo", "namespace": "ml",
                                               "generation": generation},
                                  "spec": SPEC})
    job.status = status
    return to_manifest(job)


def health(obj: dict[str, Any]) -> dict[str, Any]:
    """Run the script as Argo CD does: the object as global `obj`, a table returned."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    out = lua.execute(SCRIPT.read_text())
    return dict(out.items())


def _status(phase: Phase, **kw: Any) -> LoRAJobStatus:
    return LoRAJobStatus(phase=phase, observed_generation=1, **kw)


@pytest.mark.parametrize(("phase", "expected"), [
    (Phase.PENDING, "Progressing"),
    (Phase.QUEUED, "Progressing"),
    (Phase.SCHEDULING, "Progressing"),
    (Phase.RUNNING, "Progressing"),
    (Phase.UPLOADING, "Progressing"),
    (Phase.SUCCEEDED, "Healthy"),
    (Phase.FAILED, "Degraded"),
    (Phase.SUSPENDED, "Suspended"),
])
def test_every_phase_maps_to_a_health(phase: Phase, expected: str) -> None:
    out = health(_job(_status(phase, message=f"job is {phase.value}")))
    assert out["status"] == expected
    assert out["message"]


def test_no_status_yet_is_progressing() -> None:
    out = health(_job(None))
    assert out["status"] == "Progressing"
    assert "operator" in out["message"]


def test_running_message_shows_progress() -> None:
    status = _status(Phase.RUNNING, message="Training",
                     placement=Placement(method="lora", vram_class="t4-16gb", gpus=1),
                     progress=Progress(step=40, total_steps=120, percent=33.3, loss=1.2345))
    out = health(_job(status))
    assert out["status"] == "Progressing"
    assert "step 40/120" in out["message"]
    assert "loss 1.234" in out["message"]


def test_succeeded_names_the_adapter() -> None:
    status = _status(Phase.SUCCEEDED, message="done",
                     result=Result(adapter_uri="s3://adapters/demo/", base_eval_loss=2.0,
                                   adapter_eval_loss=1.5))
    out = health(_job(status))
    assert out == {"status": "Healthy", "message": "Adapter at s3://adapters/demo/"}


def test_failed_carries_the_operator_message() -> None:
    out = health(_job(_status(Phase.FAILED, message="InvalidDataset: no rows")))
    assert out == {"status": "Degraded", "message": "InvalidDataset: no rows"}


def test_stale_status_is_progressing() -> None:
    """A Succeeded status from generation 1 says nothing about generation 2's spec."""
    out = health(_job(_status(Phase.SUCCEEDED), generation=2))
    assert out["status"] == "Progressing"

"""`contract.last_progress`: the operator's reading of the progress lines a trainer prints
(the trainer holds no API token, so its log is the only way its progress leaves the pod).
The log is written by the tenant's code: only a well-formed progress line counts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lora_operator import api, contract


def line(event: str = contract.PROGRESS_EVENT, **fields: Any) -> str:
    return json.dumps({"event": event, **fields})


def test_newest_valid_progress_line_wins() -> None:
    log = "\n".join([
        "Loading checkpoint shards: 100%|##########| 4/4",
        line(step=10, total_steps=100, percent=10.0, loss=2.5),
        line(step=20, total_steps=100, percent=20.0, loss=2.0, eval_loss=2.2,
             tokens_per_second=812.5, eta_seconds=480.0, updated_at="2025-01-01T00:00:00Z"),
        line("checkpoint", step=20, uri="s3://out/bot/.checkpoints/u/20/"),
    ])
    assert contract.last_progress(log) == api.Progress(
        step=20, total_steps=100, percent=20.0, loss=2.0, eval_loss=2.2, tokens_per_second=812.5,
        eta_seconds=480.0, updated_at="2025-01-01T00:00:00Z")


@pytest.mark.parametrize("newest", [
    line("checkpoint", step=99),  # another event
    line("result", exitCode=0, reason="Completed"),  # the result, after the last progress
    '{"event": "progress", "step": 99',  # cut off (the tail began mid-line, or a crash)
    "not json but mentions \"progress\"",
    '["progress", 99]',  # JSON, not an object
    line(step=99, total_steps=100, phase="Succeeded"),  # an unknown key: not a Progress
    line(step="ninety-nine", total_steps=100),  # a wrong type
    json.dumps({"step": 99, "total_steps": 100}),  # no event
    line("Progress", step=99, total_steps=100),  # not the event's name
], ids=["other-event", "result", "truncated", "not-json", "not-an-object", "unknown-key",
        "wrong-type", "no-event", "misnamed-event"])
def test_lines_that_are_not_valid_progress_are_skipped(newest: str) -> None:
    log = line(step=10, total_steps=100) + "\n" + newest + "\n"
    assert contract.last_progress(log) == api.Progress(step=10, total_steps=100)


def test_an_over_long_progress_line_is_skipped_even_if_valid() -> None:
    """A line is bounded before it is parsed: a tenant cannot make the operator parse (or
    the status hold) megabytes."""
    padded = json.dumps({"event": contract.PROGRESS_EVENT, "step": 99, "total_steps": 100},
                        indent=contract.PROGRESS_LINE_MAX_CHARS).replace("\n", " ")
    assert len(padded) > contract.PROGRESS_LINE_MAX_CHARS
    assert api.Progress.model_validate({k: v for k, v in json.loads(padded).items()
                                        if k != "event"}).step == 99
    assert contract.last_progress(line(step=10) + "\n" + padded) == api.Progress(step=10)


@pytest.mark.parametrize("log", ["", "\n\n", "starting\n" + line("plan", gpus=1),
                                 line(step="x") + "\n" + line("result", exitCode=0)],
                         ids=["empty", "blank", "no-progress-yet", "only-invalid"])
def test_no_progress_line_is_none(log: str) -> None:
    assert contract.last_progress(log) is None

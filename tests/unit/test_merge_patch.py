"""status_patch: the one diff of desired against current status, as a JSON merge patch."""

from __future__ import annotations

from typing import Any

from lora_operator.reconcile.merge_patch import status_patch
from tests.unit.test_status import merge

COND = {"type": "Running", "status": "True", "reason": "TrainerRunning", "message": "",
        "lastTransitionTime": "2025-01-01T11:00:00Z", "observedGeneration": 1}


def _applies(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    patch = status_patch(current, desired)
    merged = {**current}
    merge(merged, patch)
    assert merged == desired
    return patch


def test_changed_key_only() -> None:
    current = {"phase": "Scheduling", "attempts": 1, "progress": {"step": 3}}
    assert _applies(current, {**current, "phase": "Running"}) == {"phase": "Running"}


def test_new_key() -> None:
    assert _applies({"phase": "Running"}, {"phase": "Running", "startTime": "t"}) == \
        {"startTime": "t"}


def test_removed_key_is_null() -> None:
    current = {"phase": "Failed", "result": {"adapterUri": "s3://forged/"}}
    assert _applies(current, {"phase": "Failed"}) == {"result": None}


def test_desired_none_is_absent() -> None:
    assert status_patch({"phase": "Pending"}, {"phase": "Pending", "observedGeneration": None}) == {}
    assert status_patch({"observedGeneration": 2}, {"observedGeneration": None}) == \
        {"observedGeneration": None}


def test_nested_change_is_diffed_key_by_key() -> None:
    current = {"placement": {"method": "lora", "vramClass": "l4-24gb", "gpus": 1}}
    desired = {"placement": {**current["placement"], "node": "gpu-l4-0"}}
    assert _applies(current, desired) == {"placement": {"node": "gpu-l4-0"}}


def test_replan_nulls_old_placement_keys_nested_too() -> None:
    current = {"phase": "Running", "placement": {
        "method": "lora", "vramClass": "l4-24gb", "gpus": 1, "node": "gpu-l4-0",
        "breakdown": {"weights": 1.0, "lora": 2.0}}}
    desired = {"phase": "Pending", "placement": {
        "method": "lora", "vramClass": "a100-40gb", "gpus": 1, "breakdown": {"weights": 1.0}}}
    patch = _applies(current, desired)
    assert patch["placement"] == {"method": "lora", "vramClass": "a100-40gb", "gpus": 1,
                                  "node": None, "breakdown": {"weights": 1.0, "lora": None}}


def test_unchanged_conditions_give_no_patch() -> None:
    current = {"phase": "Running", "conditions": [dict(COND)]}
    assert status_patch(current, {"phase": "Running", "conditions": [dict(COND)]}) == {}


def test_changed_condition_replaces_the_whole_list() -> None:
    current = {"conditions": [dict(COND)]}
    turned = {**COND, "status": "False", "lastTransitionTime": "2025-01-01T12:00:00Z"}
    uploading = {**COND, "type": "Uploading"}
    assert _applies(current, {"conditions": [turned, uploading]}) == \
        {"conditions": [turned, uploading]}


def test_no_op_is_empty() -> None:
    current = {"phase": "Running", "placement": {"node": "n", "breakdown": {"a": 1.0}},
               "conditions": [dict(COND)], "cost": {"gpuHours": 0.5}}
    assert status_patch(current, {**current}) == {}
    assert status_patch(None, {}) == {}

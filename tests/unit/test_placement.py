"""Placement policy over the packaged VRAM classes (operator/config/default.yaml)."""

from __future__ import annotations

from typing import Any

import pytest

from lora_operator.api import LoRAJobSpec
from lora_operator.plan.placement import next_class_up, place, place_on_device
from lora_operator.plan.shapes import KNOWN_SHAPES
from lora_operator.settings import Settings, load_settings


@pytest.fixture(scope="module")
def cfg() -> Settings:
    return load_settings(None)


def spec(**over: Any) -> LoRAJobSpec:
    base: dict[str, Any] = {"baseModel": {"uri": "hf://org/model"},
                            "dataset": {"uri": "s3://data/train.jsonl"},
                            "output": {"uri": "s3://out/x/"},
                            "training": {"microBatchSize": 1, "maxSeqLength": 1024}}
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return LoRAJobSpec.model_validate(base)


def test_smallest_class_that_fits(cfg: Settings) -> None:
    d = place(spec(method="lora"), KNOWN_SHAPES["smollm2-135m"], cfg)
    assert d.ok and d.vram_class is not None
    assert d.vram_class.name == "t4-16gb" and d.gpus == 1 and d.deepspeed == "none"
    assert d.estimate.total_gib <= d.capacity_gib  # type: ignore[operator]


def test_7b_lora_skips_classes_too_small(cfg: Settings) -> None:
    d = place(spec(method="lora"), KNOWN_SHAPES["llama-2-7b"], cfg)
    assert d.ok and d.vram_class is not None and d.vram_class.name == "l4-24gb"
    assert [c.vram_class for c in d.candidates] == ["t4-16gb", "l4-24gb"]


def test_auto_prefers_lora_on_any_one_gpu_before_qlora(cfg: Settings) -> None:
    d = place(spec(), KNOWN_SHAPES["llama-3.1-8b"], cfg)
    assert d.ok and d.method == "lora"


def test_auto_falls_back_to_qlora_before_more_gpus(cfg: Settings) -> None:
    d = place(spec(), KNOWN_SHAPES["llama-3.1-70b"], cfg)
    assert d.ok and d.method == "qlora" and d.gpus == 1
    assert any(c.method == "lora" and not c.fits and c.vram_class == "h200-141gb"
               for c in d.candidates)


def test_70b_lora_goes_multi_gpu_zero3(cfg: Settings) -> None:
    d = place(spec(method="lora", training={"microBatchSize": 4, "maxSeqLength": 2048}),
              KNOWN_SHAPES["llama-3.1-70b"], cfg)
    assert d.ok and d.method == "lora"
    assert d.gpus > 1 and d.deepspeed == "zero3"
    status = d.to_status()
    assert status.gpus == d.gpus and status.breakdown["weights"] > 0


def test_nothing_fits_is_an_error_with_breakdown_and_capacity(cfg: Settings) -> None:
    d = place(spec(method="lora", training={"microBatchSize": 64, "maxSeqLength": 32768},
                   resources={"gpus": 1}), KNOWN_SHAPES["llama-3.1-70b"], cfg)
    assert not d.ok and d.error is not None
    assert "h200-141gb" in d.error and "weights" in d.error and "GiB usable" in d.error
    assert d.to_json()["error"] == d.error


def test_explicit_class_too_small_names_it(cfg: Settings) -> None:
    d = place(spec(method="lora", resources={"vramClass": "t4-16gb", "gpus": 1}),
              KNOWN_SHAPES["llama-3.1-8b"], cfg)
    assert not d.ok and d.error is not None and "t4-16gb" in d.error
    assert {c.vram_class for c in d.candidates} == {"t4-16gb"}


def test_unknown_class_is_an_error(cfg: Settings) -> None:
    d = place(spec(resources={"vramClass": "tpu-v5"}), KNOWN_SHAPES["llama-3.1-8b"], cfg)
    assert not d.ok and d.error is not None and "tpu-v5" in d.error and "h100-80gb" in d.error


def test_explicit_gpus_and_stage_are_honoured(cfg: Settings) -> None:
    d = place(spec(method="lora", resources={"gpus": 2, "deepspeed": "zero2"}),
              KNOWN_SHAPES["llama-3.1-8b"], cfg)
    assert d.ok and d.gpus == 2 and d.deepspeed == "zero2"


def test_bf16_precision_skips_t4(cfg: Settings) -> None:
    d = place(spec(method="lora", training={"precision": "bf16"}),
              KNOWN_SHAPES["smollm2-135m"], cfg)
    assert d.ok and d.vram_class is not None and d.vram_class.name == "l4-24gb"


def test_unknown_target_module_is_an_error_decision(cfg: Settings) -> None:
    d = place(spec(lora={"targetModules": ["c_attn"]}), KNOWN_SHAPES["llama-3.1-8b"], cfg)
    assert not d.ok and d.error is not None and "targetModules" in d.error


def test_oom_escalation_sequence(cfg: Settings) -> None:
    """One class up each time; at the largest class, auto switches lora → qlora; then more GPUs."""
    d = place(spec(), KNOWN_SHAPES["llama-2-7b"], cfg)
    seen = [(d.method, d.vram_class.name if d.vram_class else None, d.gpus)]
    current = d
    for _ in range(12):
        nxt = next_class_up(current, cfg)
        if nxt is None:
            break
        seen.append((nxt.method, nxt.vram_class.name if nxt.vram_class else None, nxt.gpus))
        current = nxt
    assert seen == [
        ("lora", "l4-24gb", 1), ("lora", "a100-40gb", 1), ("lora", "l40s-48gb", 1),
        ("lora", "h100-80gb", 1), ("lora", "h200-141gb", 1), ("qlora", "h200-141gb", 1),
        ("qlora", "h200-141gb", 2), ("qlora", "h200-141gb", 4), ("qlora", "h200-141gb", 8),
    ]
    assert current.deepspeed == "zero3"


def test_escalation_keeps_a_pinned_class_and_method(cfg: Settings) -> None:
    d = place(spec(method="lora", resources={"vramClass": "h100-80gb", "gpus": 1}),
              KNOWN_SHAPES["llama-2-7b"], cfg)
    assert d.ok
    assert next_class_up(d, cfg) is None


def test_place_on_cpu_and_on_a_small_gpu() -> None:
    cpu = place_on_device(spec(), KNOWN_SHAPES["smollm2-135m"], None)
    assert cpu.ok and cpu.method == "lora" and cpu.gpus == 1 and cpu.deepspeed == "none"
    assert cpu.estimate.breakdown["cuda_context"] == 0 and cpu.estimate.total_gib > 0
    small = place_on_device(spec(), KNOWN_SHAPES["llama-3.1-8b"], 16.0)
    assert small.ok and small.method == "qlora"
    tiny = place_on_device(spec(method="lora"), KNOWN_SHAPES["llama-3.1-8b"], 8.0)
    assert not tiny.ok and tiny.error is not None and "8" in tiny.error

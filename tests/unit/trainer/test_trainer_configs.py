"""LoRA / QLoRA / DeepSpeed configuration building, precision and step planning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lora_operator import api
from lora_trainer import deepspeed_config, train
from lora_trainer.model import ModelSource


def spec(**lora: Any) -> api.LoRAJobSpec:
    return api.parse_spec({"baseModel": {"uri": "file:///m"}, "dataset": {"uri": "file:///d.jsonl"},
                           "output": {"uri": "file:///o"}, "lora": lora})


def test_lora_config_all_linear_dora_rslora() -> None:
    config = train.lora_config(spec(r=8, alpha=16, useDora=True, useRslora=True).lora)
    assert (config.r, config.lora_alpha, config.use_dora, config.use_rslora) == (8, 16, True, True)
    assert config.target_modules == "all-linear"
    named = train.lora_config(spec(targetModules=["q_proj", "v_proj"]).lora)
    assert set(named.target_modules) == {"q_proj", "v_proj"}


def test_precision_on_cpu_is_fp32_unless_asked() -> None:
    assert train.resolve_precision("auto", "cpu").dtype == torch.float32
    assert train.resolve_precision("bf16", "cpu").bf16


def test_total_steps_from_epochs_or_max_steps() -> None:
    training = api.TrainingSpec(epochs=2, microBatchSize=4, gradientAccumulationSteps=2)
    assert train.total_steps(training, 17, 1) == 2 * 3
    assert train.total_steps(training, 17, 2) == 2 * 2
    assert train.total_steps(api.TrainingSpec(maxSteps=5), 1000, 1) == 5


@pytest.mark.parametrize("stage", ["zero2", "zero3", "zero3-offload"])
def test_deepspeed_configs(stage: str) -> None:
    config = deepspeed_config.deepspeed_config(stage, bf16=True)
    zero = config["zero_optimization"]
    assert zero["stage"] == (2 if stage == "zero2" else 3)
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    if stage != "zero2":
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert ("offload_param" in zero) == (stage == "zero3-offload")


def test_deepspeed_rules_for_qlora_and_checkpointing() -> None:
    assert deepspeed_config.qlora_zero3_kwargs("zero3", torch.bfloat16) == \
        {"quant_storage": torch.bfloat16, "device_map": None}
    assert deepspeed_config.qlora_zero3_kwargs("zero2", torch.bfloat16) == {}
    assert deepspeed_config.gradient_checkpointing_kwargs("zero3") == {"use_reentrant": True}
    assert deepspeed_config.gradient_checkpointing_kwargs(None) == {"use_reentrant": False}
    with pytest.raises(ValueError, match="unknown DeepSpeed stage"):
        deepspeed_config.deepspeed_config("zero1", bf16=True)


def test_multi_gpu_relaunch_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert deepspeed_config.needs_launch(4) and not deepspeed_config.needs_launch(1)
    command = deepspeed_config.launch_command(4, ["pod"])
    assert "--nproc_per_node=4" in command and command[-2:] == ["lora_trainer", "pod"]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not deepspeed_config.needs_launch(4)


def test_qlora_trains_for_real_on_cpu(tiny_model_dir: Path) -> None:
    """bitsandbytes 0.48 runs NF4 on CPU: the 4-bit base is frozen, the adapter learns."""
    placement = api.Placement(method="qlora", deepspeed="none")
    precision = train.resolve_precision("fp32", "cpu")
    model = train.build_model(ModelSource(tiny_model_dir), spec(r=4), placement, precision, "cpu")
    linear = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(linear).__name__ == "Linear4bit"
    assert linear.weight.quant_state.quant_type == "nf4"
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_training_arguments_carry_deepspeed_for_multi_gpu(tmp_path: Path) -> None:
    placement = api.Placement(method="lora", gpus=2, deepspeed="zero3")
    args = train.training_arguments(spec(), placement, train.resolve_precision("fp32", "cpu"),
                                    tmp_path, 10, "cpu", has_eval=False)
    assert args.deepspeed["zero_optimization"]["stage"] == 3
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": True}

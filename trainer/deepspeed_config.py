"""DeepSpeed configuration and the multi-GPU launch, as pure functions of the placement.

The known traps are encoded here once, so no run has to rediscover them:
- QLoRA + ZeRO-3: `bnb_4bit_quant_storage` must equal the model dtype and no `device_map`
  may be passed (DeepSpeed places the shards);
- ZeRO-3 saves must gather the partitioned parameters first, or the adapter is empty
  (DeepSpeed #4295): `stage3_gather_16bit_weights_on_model_save` is on, and export.py
  checks the saved tensors anyway;
- gradient checkpointing with PEFT under ZeRO-3 needs `use_reentrant=True`;
- 8-bit bitsandbytes on ZeRO-3 gives a wrong loss: only 4-bit QLoRA is allowed there.
"""

from __future__ import annotations

import os
import sys
from typing import Any

STAGES = ("zero2", "zero3", "zero3-offload")
DISTRIBUTED_ENV = "LOCAL_RANK"


def is_zero3(stage: str | None) -> bool:
    return bool(stage) and str(stage).startswith("zero3")


def deepspeed_config(stage: str, bf16: bool, fp16: bool = False) -> dict[str, Any]:
    """A ZeRO-2 / ZeRO-3 (± CPU offload) config; batch sizes stay "auto" (Trainer fills them)."""
    if stage not in STAGES:
        raise ValueError(f"unknown DeepSpeed stage {stage!r}; expected one of {', '.join(STAGES)}")
    zero: dict[str, Any] = {
        "stage": 3 if is_zero3(stage) else 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if is_zero3(stage):
        zero.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if stage == "zero3-offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": fp16 and not bf16},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }


def qlora_zero3_kwargs(stage: str | None, model_dtype: Any) -> dict[str, Any]:
    """Extra quantization/loading arguments QLoRA needs under ZeRO-3 (else none)."""
    if not is_zero3(stage):
        return {}
    return {"quant_storage": model_dtype, "device_map": None}


def gradient_checkpointing_kwargs(stage: str | None) -> dict[str, Any]:
    """Reentrant checkpointing under ZeRO-3 (PEFT + ZeRO-3 needs it); non-reentrant otherwise."""
    return {"use_reentrant": is_zero3(stage)}


def launch_command(gpus: int, argv: list[str]) -> list[str]:
    """The torchrun command line that re-executes this trainer once per GPU on one node."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={gpus}", "-m", "lora_trainer", *argv]


def needs_launch(gpus: int | None) -> bool:
    """True in the parent process of a multi-GPU job (not yet under torchrun)."""
    return (gpus or 0) > 1 and DISTRIBUTED_ENV not in os.environ


def is_main_process() -> bool:
    """Rank 0 (or no distributed run): the one process that uploads and reports."""
    return os.environ.get("RANK", "0") == "0"

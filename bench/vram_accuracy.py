"""Measure real training-step peak memory on a GPU and compare it with the VRAM estimator.

    python -m bench.vram_accuracy [--out bench/VRAM_ACCURACY.md] [--only NAME ...]
    python -m bench.vram_accuracy --dry-run      # CPU: build the smallest config, run 2 steps

Each configuration builds a random-init model from a `ModelShape` (transformers LlamaConfig /
Qwen2Config, bf16, on cuda; QLoRA through BitsAndBytesConfig NF4 + double quantization + bf16
compute and `prepare_model_for_kbit_training`, as the trainer does), wraps it with PEFT LoRA,
and runs a few AdamW steps on random token batches. Measured peak = max_memory_reserved + the
CUDA context (device used − reserved, taken after the run), i.e. what nvidia-smi shows, which
is what `Estimate.total_gib` predicts. Goal: every row within ±10 %, none under by > 5 %.
Weights are random: memory does not depend on their values, and no download is needed.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_operator.api import LoRAJobSpec, ModelShape
from lora_operator.plan.shapes import KNOWN_SHAPES
from lora_operator.plan.vram import GIB, estimate

STEPS = 3
GOAL_ABS, GOAL_UNDER = 0.10, 0.05


@dataclass(frozen=True)
class Config:
    name: str
    model: str
    method: str  # lora | qlora
    batch: int
    seq: int
    checkpointing: bool
    r: int = 16


CONFIGS = [
    Config("1b-lora-b4-s1024-ckpt", "llama-3.2-1b", "lora", 4, 1024, True),
    Config("1b-lora-b2-s2048-nockpt", "llama-3.2-1b", "lora", 2, 2048, False),
    Config("1b-qlora-b8-s512-ckpt", "llama-3.2-1b", "qlora", 8, 512, True),
    Config("qwen1.5b-lora-b4-s2048-ckpt", "qwen2.5-1.5b", "lora", 4, 2048, True),
    Config("qwen1.5b-qlora-b1-s4096-nockpt", "qwen2.5-1.5b", "qlora", 1, 4096, False),
    Config("3b-lora-b1-s4096-ckpt", "llama-3.2-3b", "lora", 1, 4096, True),
    Config("3b-qlora-b4-s1024-ckpt", "llama-3.2-3b", "qlora", 4, 1024, True),
    Config("3b-lora-b2-s512-nockpt", "llama-3.2-3b", "lora", 2, 512, False),
    Config("qwen7b-lora-b2-s2048-ckpt", "qwen2.5-7b", "lora", 2, 2048, True),
    Config("qwen7b-qlora-b4-s1024-ckpt", "qwen2.5-7b", "qlora", 4, 1024, True),
    Config("8b-lora-b1-s4096-ckpt", "llama-3.1-8b", "lora", 1, 4096, True),
    Config("8b-lora-b4-s512-nockpt", "llama-3.1-8b", "lora", 4, 512, False),
    Config("8b-qlora-b2-s2048-ckpt", "llama-3.1-8b", "qlora", 2, 2048, True),
    Config("8b-qlora-b8-s1024-ckpt", "llama-3.1-8b", "qlora", 8, 1024, True),
]
TINY = ModelShape(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def job_spec(cfg: Config) -> LoRAJobSpec:
    return LoRAJobSpec.model_validate({
        "baseModel": {"uri": "hf://bench/random"}, "dataset": {"uri": "s3://bench/none.jsonl"},
        "output": {"uri": "s3://bench/out/"}, "method": cfg.method,
        "lora": {"r": cfg.r, "alpha": 2 * cfg.r, "dropout": 0.05, "targetModules": ["all-linear"]},
        "training": {"microBatchSize": cfg.batch, "maxSeqLength": cfg.seq,
                     "gradientCheckpointing": cfg.checkpointing}})


def hf_config(shape: ModelShape, model: str) -> Any:
    """A transformers config with exactly this shape (Qwen2 for qwen*, Llama otherwise)."""
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = {
        "hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads or shape.num_attention_heads,
        "vocab_size": shape.vocab_size, "tie_word_embeddings": shape.tie_word_embeddings,
        "max_position_embeddings": 8192,
    }
    if model.startswith("qwen"):
        return Qwen2Config(**common)
    if shape.head_dim:
        common["head_dim"] = shape.head_dim
    return LlamaConfig(**common)


def build_model(shape: ModelShape, cfg: Config, device: str) -> Any:
    """Random-init model with LoRA adapters, set up the way the trainer sets it up."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    conf = hf_config(shape, cfg.model)
    conf._attn_implementation = "sdpa"
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        # Random weights straight into NF4: build in bf16 on the GPU, then quantize on load.
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        tmp = Path("/tmp") / f"vram-bench-{cfg.model}"
        if not (tmp / "config.json").exists():
            AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant,
                                                     dtype=torch.bfloat16,
                                                     device_map={"": 0})
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.checkpointing)
    else:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype).to(device)
        if cfg.checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.r, lora_alpha=2 * cfg.r, lora_dropout=0.05,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def train_steps(model: Any, cfg: Config, vocab: int, device: str, steps: int) -> float:
    """A few real optimizer steps on random tokens; returns the last loss."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        ids = torch.randint(0, vocab, (cfg.batch, cfg.seq), device=device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
    return loss_value


def measure(cfg: Config) -> tuple[float, float]:
    """(measured peak GiB incl. CUDA context, predicted GiB) for one configuration on cuda."""
    import torch

    shape = KNOWN_SHAPES[cfg.model]
    predicted = estimate(shape, job_spec(cfg), method=cfg.method,  # type: ignore[arg-type]
                         gpus=1, deepspeed="none").total_gib
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(shape, cfg, "cuda")
    train_steps(model, cfg, shape.vocab_size, "cuda", STEPS)
    torch.cuda.synchronize()
    peak_reserved = torch.cuda.max_memory_reserved()
    free, total = torch.cuda.mem_get_info()
    context = max(0, (total - free) - torch.cuda.memory_reserved())
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return (peak_reserved + context) / GIB, predicted


def table(rows: list[tuple[Config, float, float]], device: str) -> str:
    lines = [
        "## VRAM estimator accuracy", "",
        f"Measured on {device} with `python -m bench.vram_accuracy` ({time.strftime('%Y-%m-%d')}): "
        f"{STEPS} AdamW steps per row, random-init weights, sdpa attention, LoRA r 16 "
        "all-linear, dropout 0.05. Measured = `torch.cuda.max_memory_reserved()` + CUDA "
        "context; predicted = `lora_operator.plan.vram.estimate(...).total_gib`. Goal: "
        "|error| ≤ 10 %, under-prediction ≤ 5 %.", "",
        "| configuration | model | method | batch × seq | ckpt | predicted GiB | measured GiB "
        "| error % | verdict |",
        "|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for cfg, measured, predicted in rows:
        err = (predicted - measured) / measured
        ok = abs(err) <= GOAL_ABS and err >= -GOAL_UNDER
        lines.append(f"| {cfg.name} | {cfg.model} | {cfg.method} | {cfg.batch} × {cfg.seq} | "
                     f"{'on' if cfg.checkpointing else 'off'} | {predicted:.2f} | "
                     f"{measured:.2f} | {100 * err:+.1f} | {'ok' if ok else 'MISS'} |")
    return "\n".join(lines) + "\n"


def dry_run() -> int:
    """CPU: the smallest configuration through the same code path, no memory measurement."""
    cfg = Config("tiny-lora-cpu", "tiny", "lora", 2, 32, True, r=4)
    predicted = estimate(TINY, job_spec(cfg), method="lora", gpus=1, deepspeed="none",
                         on_cpu=True)
    model = build_model(TINY, cfg, "cpu")
    loss = train_steps(model, cfg, TINY.vocab_size, "cpu", 2)
    print(f"dry run ok: {cfg.name}, 2 steps, last loss {loss:.3f}; estimate (CPU, fp32) "
          f"{sum(predicted.breakdown.values()) * 1024:.0f} MiB (rounded per component)")
    print("memory not measured (no CUDA device in a dry run)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/VRAM_ACCURACY.md")
    parser.add_argument("--only", action="append", default=[], help="configuration name(s)")
    parser.add_argument("--dry-run", action="store_true", help="CPU code-path check only")
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run()
    import torch

    if not torch.cuda.is_available():
        print("vram_accuracy: no CUDA device here; this benchmark measures GPU memory. "
              "Run it on a GPU machine, or use --dry-run to check the code path on CPU.",
              file=sys.stderr)
        return 2
    chosen = [c for c in CONFIGS if not args.only or c.name in args.only]
    rows: list[tuple[Config, float, float]] = []
    for cfg in chosen:
        try:
            measured, predicted = measure(cfg)
        except torch.cuda.OutOfMemoryError:
            print(f"{cfg.name}: out of memory on this device; skipped", file=sys.stderr)
            torch.cuda.empty_cache()
            continue
        rows.append((cfg, measured, predicted))
        print(f"{cfg.name}: predicted {predicted:.2f} GiB, measured {measured:.2f} GiB",
              flush=True)
    Path(args.out).write_text(table(rows, torch.cuda.get_device_name()))
    misses = sum(1 for _, m, p in rows if abs(p - m) / m > GOAL_ABS or (p - m) / m < -GOAL_UNDER)
    print(f"wrote {args.out}: {len(rows)} rows, {misses} outside the goal")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())

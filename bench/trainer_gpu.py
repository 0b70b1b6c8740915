"""The trainer's GPU rows in one run on one GPU (H100/H200), under 8 minutes: `python -m bench --only gpu`.

    python -m bench.trainer_gpu [--out bench/TRAINER_GPU.md] [--budget 450]
    python -m bench.trainer_gpu --dry-run --out /tmp/x.md    # CPU, tiny: the same code path

1. Throughput: ours (`lora_trainer` as a job runs it: packed rows, flex/flash attention, Liger
   or the chunked loss) vs the TRL SFTTrainer + PEFT recipe, each in its own subprocess, on a
   random-init Llama-3.2-1B-shaped model with its real 128k vocabulary (bf16, LoRA r 16,
   batch 4 × accumulation 4, max length 2048, rows of a few hundred to 2,000 tokens);
   tokens/s after a warm-up step, peak = torch.cuda.max_memory_allocated.
2. VRAM accuracy: `bench.vram_accuracy`'s configurations (estimator vs measured peak) in
   the time left, written to bench/VRAM_ACCURACY.md.

No network: models are built from configs, the tokenizer is trained on the repository's
example data. The GPU machine has torch, transformers, peft and accelerate only; carry the
wheels of `trl` and `datasets` (the recipe), `liger-kernel` (our fused kernels, the `[gpu]`
extra) and `bitsandbytes` (QLoRA rows). Without trl/datasets the recipe row says "missing"
(no stand-in is measured in its place); without liger-kernel ours runs the chunked loss and
says so; without bitsandbytes the QLoRA rows are skipped with that reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import trainer_throughput as tt

RECIPE_PACKAGES = ("trl", "datasets")
BUDGET_S = 450.0  # the whole script: 7.5 minutes
RUN_TIMEOUT_S = 200.0


@dataclass
class Plan:
    """Sizes for a real GPU run or a CPU dry run of the same code."""

    steps: int
    rows: int
    seq: int
    batch: int
    accum: int
    scale: float
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    name: str
    notes: list[str] = field(default_factory=list)


GPU_PLAN = Plan(steps=4, rows=600, seq=2048, batch=4, accum=4, scale=2.5, hidden=2048,
                intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128_256,
                name="GPU, Llama-3.2-1B-shaped (128k vocab), LoRA")
DRY_PLAN = Plan(steps=2, rows=24, seq=128, batch=2, accum=1, scale=0.0, hidden=64,
                intermediate=128, layers=2, heads=4, kv_heads=2, vocab=2048,
                name="dry run: CPU, tiny Llama (2 × 64), LoRA")


def missing(packages: tuple[str, ...]) -> list[str]:
    """The packages of `packages` that cannot be imported here."""
    return [p for p in packages if importlib.util.find_spec(p) is None]


def model_config(plan: Plan) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=plan.vocab, hidden_size=plan.hidden,
                       intermediate_size=plan.intermediate, num_hidden_layers=plan.layers,
                       num_attention_heads=plan.heads, num_key_value_heads=plan.kv_heads,
                       max_position_embeddings=max(2 * plan.seq, 4096), tie_word_embeddings=True,
                       rope_theta=500_000.0)


def throughput(plan: Plan, work: Path, deadline: float) -> dict[str, Any]:
    """Ours then the recipe (one run each, fresh processes); a side that cannot run is marked."""
    import torch

    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tt.make_rows(plan.rows, scale=plan.scale)))
    model = work / "model"
    model.mkdir()
    cuda = torch.cuda.is_available()
    tt.make_model(model, model_config(plan), torch.bfloat16 if cuda else torch.float32)
    out: dict[str, Any] = {"name": plan.name}
    for side in ("ours", "baseline"):
        lacking = missing(RECIPE_PACKAGES) if side == "baseline" else []
        left = deadline - time.monotonic()
        if lacking:
            out[side] = {"missing": f"{', '.join(lacking)} not installed (carry the wheels)"}
        elif left < 30:
            out[side] = {"missing": "time budget spent"}
        else:
            try:
                out[side] = tt.spawn(side, model, data, plan.steps, plan.seq, False, plan.batch,
                                     plan.accum, timeout=min(RUN_TIMEOUT_S, left))
            except Exception as exc:  # recorded in the table; the other rows still run
                out[side] = {"missing": f"failed: {type(exc).__name__}: {str(exc)[-300:]}"}
    if "tokens" in out["ours"] and "tokens" in out["baseline"]:
        out.update(tt.summarize({"ours": [out["ours"]], "baseline": [out["baseline"]]}))
    return out


def throughput_table(r: dict[str, Any], plan: Plan) -> list[str]:
    lines = list(tt.TABLE_HEAD)
    if "ratio" in r:
        lines.append(tt.row(r["name"], r))
    else:
        def cell(side: str, key: str, fmt: str) -> str:
            return format(r[side][key], fmt) if key in r[side] else f"missing: {r[side]['missing']}"
        lines.append(f"| {r['name']} | {cell('ours', 'tok_s', '.0f')} | "
                     f"{cell('baseline', 'tok_s', '.0f')} | – | {cell('ours', 'peak_gib', '.2f')} | "
                     f"{cell('baseline', 'peak_gib', '.2f')} | – |")
    ours = r["ours"]
    lines += ["", f"Our path: {tt.path_text(ours.get('acceleration'))}"
              + (f"; notes: {'; '.join(ours['acceleration']['notes'])}"
                 if ours.get("acceleration", {}).get("notes") else "")]
    if "ratio" in r:
        met = r["ratio"] >= tt.GOAL_RATIO and r["memory_ratio"] <= tt.GOAL_MEMORY
        lines += ["", f"Goal (≥ {tt.GOAL_RATIO}× the recipe's tokens/s at ≤ {tt.GOAL_MEMORY:.0%} of "
                  f"its peak memory): **{'met' if met else 'missed'}** ({r['ratio']:.2f}×, "
                  f"{r['memory_ratio']:.0%})."]
    return lines


def vram_rows(dry: bool, deadline: float) -> tuple[list[str], str]:
    """bench.vram_accuracy's table in the time left ('' when nothing could be measured)."""
    from bench import vram_accuracy as va

    if dry:
        va.dry_run()
        return ["VRAM accuracy: dry run (CPU) went through `bench.vram_accuracy.dry_run`; memory "
                "is only measured on CUDA."], ""
    rows: list[tuple[Any, float, float]] = []
    skipped: list[str] = []
    for cfg in va.CONFIGS:
        if cfg.method == "qlora" and missing(("bitsandbytes",)):
            skipped.append(f"{cfg.name} (bitsandbytes not installed)")
            continue
        if deadline - time.monotonic() < 25:
            skipped.append(f"{cfg.name} (time budget spent)")
            continue
        try:
            measured, predicted = va.measure(cfg)
        except Exception as exc:  # out of memory or a missing kernel: say so, keep going
            skipped.append(f"{cfg.name} ({type(exc).__name__})")
            continue
        rows.append((cfg, measured, predicted))
        print(f"{cfg.name}: predicted {predicted:.2f} GiB, measured {measured:.2f} GiB", flush=True)
    import torch

    text = va.table(rows, torch.cuda.get_device_name()) if rows else ""
    if skipped and text:
        text += "\nNot measured in this run: " + ", ".join(skipped) + ".\n"
    return [f"VRAM accuracy: {len(rows)} rows measured (bench/VRAM_ACCURACY.md)"
            + (f"; not measured: {', '.join(skipped)}" if skipped else "")], text


def run(out: Path, dry: bool, budget: float, vram_out: Path) -> str:
    """Both parts; writes `out` (and `vram_out` when rows were measured); returns the text."""
    import torch

    if not dry and not torch.cuda.is_available():
        raise RuntimeError("trainer_gpu: no CUDA device here; run it on a GPU machine, or use "
                           "--dry-run (python -m bench --only gpu --quick) to check the code path on CPU")
    deadline = time.monotonic() + budget
    plan = DRY_PLAN if dry else GPU_PLAN
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        result = throughput(plan, Path(tmp), deadline)
    note, vram_text = vram_rows(dry, deadline)
    if vram_text:
        vram_out.write_text(vram_text)
    lines = ["## Trainer throughput on one GPU: ours vs TRL SFTTrainer + PEFT recipe", "",
             f"- date: {time.strftime('%Y-%m-%d')}", f"- machine: {tt.machine()}",
             f"- command: `python -m bench --only gpu`{' (dry run)' if dry else ''}; "
             f"{time.monotonic() - started:.0f} s",
             f"- workload: {plan.rows} chat rows, {plan.steps} optimizer steps (first one warm-up), "
             f"batch {plan.batch} × accumulation {plan.accum}, max length {plan.seq}, LoRA r=16 "
             "alpha=32 on q/k/v/o/gate/up/down; random-init weights; tokens/s counts non-padding "
             "tokens; peak = torch.cuda.max_memory_allocated (max RSS on CPU)", "",
             *throughput_table(result, plan), "", *note, ""]
    text = "\n".join(lines)
    out.write_text(text)
    print(json.dumps(result, indent=1, default=str))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("TRAINER_GPU.md")))
    parser.add_argument("--vram-out", default=str(Path(__file__).with_name("VRAM_ACCURACY.md")))
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: code path only")
    args = parser.parse_args(argv)
    run(Path(args.out), args.dry_run, args.budget, Path(args.vram_out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

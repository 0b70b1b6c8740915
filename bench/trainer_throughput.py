"""Tokens/s and peak memory: our trainer vs the TRL SFTTrainer + PEFT tutorial recipe.

    .venv/bin/python bench/trainer_throughput.py [--steps 6] [--rows 256] [--write bench/TRAINER.md]

Both sides train the same LoRA (r=16, alpha=32, dropout 0.05, q/k/v/o/gate/up/down) on the
same variable-length chat data for the same number of optimizer steps, batch 4 × accumulation
4. Each run is its own subprocess (fresh peak memory), in alternating order (ours, base,
base, ours) to cancel drift on a shared machine; tokens/s counts real (non-padding) tokens.
On CPU a tiny random Llama is used; with CUDA, an 8B-shaped random-init model (LoRA and
QLoRA) adds GPU rows with MFU. Writes a markdown section to bench/TRAINER.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = [
    "order", "ship", "city", "lamp", "kettle", "quantity", "customer", "deliver", "please",
    "thanks", "invoice", "address", "tomorrow", "parcel", "fragile", "express", "standard",
    "return", "refund",
]


def make_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chat rows with widely varying lengths (the case where padding wastes most)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(3.0, 0.9)) + 3))
        a = " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(2.5, 0.9)) + 2))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


def make_model(folder: Path, gpu_shape: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: operator/ must not shadow
    from tests.unit.trainer.conftest import build_tokenizer

    tok = build_tokenizer(folder)
    if gpu_shape:  # Llama-3.1-8B shape, random init, our small vocabulary
        config = LlamaConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    else:
        config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16 if gpu_shape else torch.float32).save_pretrained(str(folder))


def peak_gib(cuda: bool) -> float:
    import torch

    if cuda:
        return float(torch.cuda.max_memory_allocated()) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class CountingCollator:
    """Wraps any collator and counts the real tokens it hands out."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.tokens = 0

    def __call__(self, features: Any) -> Any:
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


def lora() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                      task_type="CAUSAL_LM")


def run_ours(model_dir: Path, data: Path, steps: int, seq: int, qlora: bool) -> dict[str, Any]:
    """Our pipeline: packed rows, position-id (block-diagonal) attention, no eval."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from lora_trainer import data as d
    from lora_trainer.model import ModelSource, bnb_config, load_model

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = d.read_rows(data)
    examples, _ = d.tokenize_rows(tok, rows, "chat", seq, True, "train")
    packed = d.pack(examples, seq)
    counter = d.TokenCounter()
    dtype = torch.bfloat16 if cuda else torch.float32
    quant = bnb_config(dtype) if qlora else None
    model = load_model(ModelSource(model_dir), dtype, quantization=quant,
                       device_map={"": 0} if qlora and cuda else None,
                       attn_implementation="sdpa")
    if qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora())
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=4, learning_rate=2e-4, lr_scheduler_type="cosine",
                             warmup_ratio=0.05, bf16=cuda, report_to=[], save_strategy="no",
                             logging_steps=1000, remove_unused_columns=False, use_cpu=not cuda,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=d.ListDataset(packed),
                      data_collator=d.Collator(int(tok.pad_token_id), packed=True, counter=counter))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"tokens": counter.tokens, "seconds": seconds, "peak_gib": peak_gib(cuda)}


def run_baseline(model_dir: Path, data: Path, steps: int, seq: int, qlora: bool) -> dict[str, Any]:
    """The tutorial recipe: TRL SFTTrainer + PEFT, padded batches, completion-only loss."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0} if cuda else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    dataset = load_dataset("json", data_files=str(data), split="train")
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=4,
                       gradient_accumulation_steps=4, learning_rate=2e-4, lr_scheduler_type="cosine",
                       warmup_ratio=0.05, bf16=cuda, report_to=[], save_strategy="no",
                       logging_steps=1000, max_length=seq, use_cpu=not cuda, disable_tqdm=True,
                       seed=0, assistant_only_loss=False, completion_only_loss=None,
                       gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                         peft_config=lora())
    counting = CountingCollator(trainer.data_collator)
    trainer.data_collator = counting
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"tokens": counting.tokens, "seconds": seconds, "peak_gib": peak_gib(cuda)}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    run = run_ours if args.child == "ours" else run_baseline
    out = run(Path(args.model), Path(args.data), args.steps, args.seq, args.qlora)
    print("RESULT " + json.dumps(out), flush=True)


def spawn(side: str, model: Path, data: Path, steps: int, seq: int, qlora: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", side, "--model", str(model), "--data", str(data),
               "--steps", str(steps), "--seq", str(seq)] + (["--qlora"] if qlora else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(line.removeprefix("RESULT ")))


def compare(model: Path, data: Path, steps: int, seq: int, qlora: bool) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
    for side in ("ours", "baseline", "baseline", "ours"):
        runs[side].append(spawn(side, model, data, steps, seq, qlora))
    out = {}
    for side, results in runs.items():
        tokens = sum(r["tokens"] for r in results)
        seconds = sum(r["seconds"] for r in results)
        out[side] = {"tok_s": tokens / seconds, "peak_gib": max(r["peak_gib"] for r in results),
                     "tokens_per_run": results[0]["tokens"]}
    out["ratio"] = out["ours"]["tok_s"] / out["baseline"]["tok_s"]
    return out


def mfu(tok_s: float, params: float, peak_flops: float = 989e12) -> float:
    """Model FLOPs utilisation: ≈ 6·N FLOPs per token (forward + backward) over H100 bf16 peak."""
    return 6 * params * tok_s / peak_flops


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def section(cpu: dict[str, Any], gpu: dict[str, dict[str, Any]] | None, command: str,
            steps: int, rows: int) -> str:
    def row(name: str, r: dict[str, Any]) -> str:
        return (f"| {name} | {r['ours']['tok_s']:.0f} | {r['baseline']['tok_s']:.0f} | "
                f"**{r['ratio']:.2f}×** | {r['ours']['peak_gib']:.2f} | {r['baseline']['peak_gib']:.2f} |")

    lines = [
        "## Trainer throughput: ours vs TRL SFTTrainer + PEFT recipe", "",
        f"- date: {dt.date.today().isoformat()}", f"- machine: {machine()}", f"- command: `{command}`",
        f"- workload: {rows} variable-length chat rows, {steps} optimizer steps, batch 4 × accumulation 4, "
        "LoRA r=16 alpha=32 on q/k/v/o/gate/up/down, max length 512; tokens/s counts non-padding tokens; "
        "runs alternate ours/base/base/ours, each in its own subprocess; peak memory is the max RSS "
        "(CPU) or torch max allocated (GPU)", "",
        "| setting | ours tok/s | baseline tok/s | ratio | ours peak GiB | baseline peak GiB |",
        "|---|---|---|---|---|---|", row("CPU, tiny Llama (4 × 128), LoRA", cpu)]
    if gpu:
        for name, r in gpu.items():
            lines.append(row(name, r) + f" MFU ours {r.get('mfu', 0):.1%}")
    else:
        lines += ["| GPU, 8B-shaped, LoRA | not measured: no GPU in this run | | | | |",
                  "| GPU, 8B-shaped, QLoRA | not measured: no GPU in this run | | | | |"]
    lines += ["", "Where the gain comes from: packing (best-fit decreasing) with position-id, "
              "block-diagonal attention instead of padding every row to the batch's longest, and "
              "no evaluation inside the timed loop.", "", goal_verdict(cpu), ""]
    return "\n".join(lines)


GOAL_RATIO = 1.5


def goal_verdict(cpu: dict[str, Any]) -> str:
    """The issue's goal (≥ 1.5× the recipe's tokens/s at no more peak memory), said plainly."""
    met = cpu["ratio"] >= GOAL_RATIO and cpu["ours"]["peak_gib"] <= cpu["baseline"]["peak_gib"]
    if met:
        return f"Goal (≥ {GOAL_RATIO}× tokens/s at no more peak memory): **met** on CPU ({cpu['ratio']:.2f}×)."
    return (f"Goal (≥ {GOAL_RATIO}× tokens/s at no more peak memory): **missed** on CPU "
            f"({cpu['ratio']:.2f}×). Why: on a 2-core CPU with a 4-layer × 128 model the step time is "
            "dominated by per-step work that packing does not remove (optimizer, Python, data "
            "collation), so the padded tokens the baseline wastes cost little; the gain packing buys "
            "is in attention/MLP FLOPs, which only a real model on a GPU exposes. Next step: the GPU "
            "rows (8B-shaped LoRA and QLoRA) on a lent GPU, then a fused/chunked loss if the ratio "
            "is still short.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--child", choices=["ours", "baseline"])
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--write", default=str(Path(__file__).with_name("TRAINER.md")))
    args = p.parse_args()
    if args.child:
        child(args)
        return
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.rows)))
    tiny = work / "tiny"
    tiny.mkdir()
    make_model(tiny, gpu_shape=False)
    cpu = compare(tiny, data, args.steps, args.seq, qlora=False)
    print(json.dumps(cpu, indent=2))
    gpu = None
    if torch.cuda.is_available():
        big = work / "big"
        big.mkdir()
        make_model(big, gpu_shape=True)
        gpu = {}
        for qlora in (False, True):
            r = compare(big, data, args.steps, args.seq, qlora)
            r["mfu"] = mfu(r["ours"]["tok_s"], 8.0e9)
            gpu["GPU, 8B-shaped, " + ("QLoRA" if qlora else "LoRA")] = r
    command = "python bench/trainer_throughput.py " + " ".join(
        f"--{k} {v}" for k, v in (("steps", args.steps), ("rows", args.rows), ("seq", args.seq)))
    Path(args.write).write_text("# Trainer benchmark\n\n" + section(cpu, gpu, command, args.steps, args.rows))
    print(f"wrote {args.write}")


if __name__ == "__main__":
    main()

"""Tokens/s and peak memory: our trainer vs the TRL SFTTrainer + PEFT tutorial recipe (CPU).

    .venv/bin/python bench/trainer_throughput.py [--steps 4] [--rows 400] [--write bench/TRAINER.md]

Both sides train the same LoRA (r=16, alpha=32, dropout 0.05, q/k/v/o/gate/up/down) on the
same variable-length chat data for the same number of optimizer steps, batch 4 × accumulation
4. Ours is the trainer's own path (`lora_trainer.train.build_model` + `make_trainer`: packed
rows, the attention kernel and loss it picks, reported per row); the recipe is TRL's
SFTTrainer with PEFT, padded batches. Each run is its own subprocess (fresh peak memory), in
alternating order (ours, base, base, ours) to cancel drift on a shared machine; tokens/s counts
real (non-padding) tokens after the first optimizer step (warm-up, compilation). A tiny
random Llama with a 32k vocabulary (real models have 32k-150k, and the logits are where a
LoRA step's memory goes). The GPU rows are `bench/trainer_gpu.py` (`python -m bench --only gpu`).
Writes a markdown section to bench/TRAINER.md.
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


def make_rows(n: int, seed: int = 0, scale: float = 0.0) -> list[dict[str, Any]]:
    """Chat rows with widely varying lengths (the case where padding wastes most); `scale`
    shifts the log-length (0: tens of tokens, 2.5: about a thousand)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(3.0 + scale, 0.9)) + 3))
        a = " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(2.5 + scale, 0.9)) + 2))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


CPU_VOCAB = 32_000
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data" / "train.jsonl"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def build_tokenizer(folder: Path) -> Any:
    """A byte-level BPE trained on the example data and the bench's words, with ChatML; needs
    only `tokenizers` and `transformers` (no pytest: the GPU machine has neither it nor a hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lora_trainer.model import CHATML_TEMPLATE

    texts = [m["content"] for line in EXAMPLES.read_text().splitlines()[:200]
             for m in json.loads(line)["messages"]] + [" ".join(WORDS), "user assistant system\n"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def make_model(folder: Path, config: Any | None = None, dtype: Any | None = None) -> None:
    """A random-init Llama saved with our tiny tokenizer; the model's vocabulary may be larger
    than the tokenizer's (unused rows cost what a real vocabulary costs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(folder)
    if config is None:
        config = LlamaConfig(vocab_size=max(len(tok), CPU_VOCAB), hidden_size=128,
                             intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype or torch.float32).save_pretrained(str(folder))


def peak_gib(cuda: bool) -> float:
    import torch

    if cuda:
        return float(torch.cuda.max_memory_allocated()) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class CountingCollator:
    """Wraps any collator and counts the real tokens it hands out (TRL pads with a mask)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.tokens = 0

    def __call__(self, features: Any) -> Any:
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


def timing_callback(tokens: Any, warmup: int) -> Any:
    """Starts the clock and the token count after `warmup` optimizer steps."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.tokens0 = 0

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if state.global_step == warmup:
                sync()
                self.start, self.tokens0 = time.perf_counter(), tokens()

        def result(self) -> tuple[int, float]:
            sync()
            return tokens() - self.tokens0, time.perf_counter() - self.start

    return Timing()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def training_args(steps: int, batch: int, accum: int, seq: int, trl: bool) -> Any:
    """The same schedule for both sides (SFTConfig for the recipe adds its max length)."""
    import torch

    cuda = torch.cuda.is_available()
    common: dict[str, Any] = dict(
        output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, learning_rate=2e-4, lr_scheduler_type="cosine",
        warmup_ratio=0.05, bf16=cuda, report_to=[], save_strategy="no", logging_steps=1000,
        use_cpu=not cuda, disable_tqdm=True, seed=0, gradient_checkpointing=False)
    if trl:
        from trl import SFTConfig

        return SFTConfig(**common, max_length=seq, assistant_only_loss=False,
                         completion_only_loss=None)
    from transformers import TrainingArguments

    return TrainingArguments(**common, remove_unused_columns=False)


def lora() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                      task_type="CAUSAL_LM")


def our_spec(seq: int, qlora: bool) -> Any:
    """The LoRAJob spec equivalent of the recipe's settings, for the trainer's own builders."""
    from lora_operator import api

    return api.parse_spec({
        "baseModel": {"uri": "file:///bench"}, "dataset": {"uri": "file:///bench.jsonl"},
        "output": {"uri": "file:///bench-out"}, "method": "qlora" if qlora else "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": TARGETS},
        "training": {"maxSeqLength": seq, "gradientCheckpointing": False, "seed": 0}})


def run_ours(model_dir: Path, data: Path, steps: int, seq: int, qlora: bool, batch: int = 4,
             accum: int = 4) -> dict[str, Any]:
    """Our trainer: packed rows, the attention kernel, Liger kernels and loss it picks."""
    import torch
    from transformers import AutoTokenizer

    from lora_operator import api
    from lora_trainer import data as d
    from lora_trainer import train
    from lora_trainer.model import ModelSource

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    examples, _ = d.tokenize_rows(tok, d.read_rows(data), "chat", seq, True, "train")
    packed = d.pack(examples, seq)
    counter = d.TokenCounter()
    spec = our_spec(seq, qlora)
    placement = api.Placement(method="qlora" if qlora else "lora", deepspeed="none", gpus=1 if cuda else 0)
    model = train.build_model(ModelSource(model_dir), spec, placement,
                              train.resolve_precision("auto", device), device)
    fast = train.acceleration_of(model)
    timing = timing_callback(lambda: counter.tokens, warmup=1)
    collator = d.Collator(int(tok.pad_token_id), packed=True, counter=counter,
                          pad_to_multiple_of=fast.pad_multiple)
    trainer = train.make_trainer(model, args=training_args(steps, batch, accum, seq, trl=False),
                                 train_dataset=d.ListDataset(packed), data_collator=collator,
                                 callbacks=[timing])
    trainer.train()
    tokens, seconds = timing.result()
    return {"tokens": tokens, "seconds": seconds, "peak_gib": peak_gib(cuda),
            "acceleration": fast.as_fields()}


def run_baseline(model_dir: Path, data: Path, steps: int, seq: int, qlora: bool, batch: int = 4,
                 accum: int = 4) -> dict[str, Any]:
    """The tutorial recipe: TRL SFTTrainer + PEFT, padded batches, the model's own loss."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTTrainer

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
    trainer = SFTTrainer(model=model, args=training_args(steps, batch, accum, seq, trl=True),
                         train_dataset=dataset, processing_class=tok, peft_config=lora())
    counting = CountingCollator(trainer.data_collator)
    trainer.data_collator = counting
    timing = timing_callback(lambda: counting.tokens, warmup=1)
    trainer.add_callback(timing)
    trainer.train()
    tokens, seconds = timing.result()
    return {"tokens": tokens, "seconds": seconds, "peak_gib": peak_gib(cuda)}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    run = run_ours if args.child == "ours" else run_baseline
    out = run(Path(args.model), Path(args.data), args.steps, args.seq, args.qlora, args.batch,
              args.accum)
    print("RESULT " + json.dumps(out), flush=True)


def spawn(side: str, model: Path, data: Path, steps: int, seq: int, qlora: bool, batch: int = 4,
          accum: int = 4, timeout: float | None = None) -> dict[str, Any]:
    """One side in a fresh interpreter (its own peak memory); its RESULT line, parsed."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--model", str(model),
               "--data", str(data), "--steps", str(steps), "--seq", str(seq), "--batch", str(batch),
               "--accum", str(accum)] + (["--qlora"] if qlora else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False,
                          timeout=timeout)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(line.removeprefix("RESULT ")))


def compare(model: Path, data: Path, steps: int, seq: int, qlora: bool) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
    for side in ("ours", "baseline", "baseline", "ours"):
        runs[side].append(spawn(side, model, data, steps, seq, qlora))
    return summarize(runs)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per side: tokens/s over all its runs, the largest peak, the path it took."""
    out: dict[str, Any] = {}
    for side, results in runs.items():
        tokens = sum(r["tokens"] for r in results)
        seconds = sum(r["seconds"] for r in results)
        out[side] = {"tok_s": tokens / seconds, "peak_gib": max(r["peak_gib"] for r in results),
                     "tokens_per_run": results[0]["tokens"]}
        if "acceleration" in results[0]:
            out[side]["acceleration"] = results[0]["acceleration"]
    out["ratio"] = out["ours"]["tok_s"] / out["baseline"]["tok_s"]
    out["memory_ratio"] = out["ours"]["peak_gib"] / out["baseline"]["peak_gib"]
    return out


def path_text(fields: dict[str, Any] | None) -> str:
    """Our row's fast paths in words: attention kernel, loss, Liger kernels."""
    if not fields:
        return "unknown"
    kernels = ", ".join(fields.get("kernels") or []) or "none"
    return f"attention {fields['attention']}, loss {fields['loss']}, Liger kernels: {kernels}"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


GOAL_RATIO, GOAL_MEMORY = 1.8, 0.5  # on GPU: ≥ 1.8× the recipe's tokens/s at ≤ 50 % of its peak


def row(name: str, r: dict[str, Any]) -> str:
    return (f"| {name} | {r['ours']['tok_s']:.0f} | {r['baseline']['tok_s']:.0f} | "
            f"**{r['ratio']:.2f}×** | {r['ours']['peak_gib']:.2f} | {r['baseline']['peak_gib']:.2f} | "
            f"{100 * r['memory_ratio']:.0f} % |")


TABLE_HEAD = ["| setting | ours tok/s | recipe tok/s | ratio | ours peak GiB | recipe peak GiB "
              "| ours / recipe peak |", "|---|---:|---:|---:|---:|---:|---:|"]


def section(cpu: dict[str, Any], command: str, steps: int, rows: int, seq: int) -> str:
    lines = [
        "## Trainer throughput: ours vs TRL SFTTrainer + PEFT recipe (CPU)", "",
        f"- date: {dt.date.today().isoformat()}", f"- machine: {machine()}", f"- command: `{command}`",
        f"- workload: {rows} variable-length chat rows, {steps} optimizer steps (the first is "
        "warm-up, not timed), batch 4 × accumulation 4, LoRA r=16 alpha=32 on "
        f"q/k/v/o/gate/up/down, max length {seq}; tiny random Llama (4 layers × 128, "
        f"vocabulary {CPU_VOCAB:,}); tokens/s counts non-padding tokens; runs alternate "
        "ours/recipe/recipe/ours, each in its own subprocess; peak memory is the process's max "
        "RSS (imports included, ≈ 1 GiB of it)",
        f"- our path: {path_text(cpu['ours'].get('acceleration'))}", "",
        *TABLE_HEAD, row("CPU, tiny Llama (4 × 128, 32k vocab), LoRA", cpu), "",
        "Where the gain comes from: packing (best-fit decreasing) with position-id attention "
        "instead of padding every row to the batch's longest, and the chunked loss (the "
        "[tokens × vocabulary] logits are never held whole: at 4 × 512 tokens × 32k that is "
        "256 MiB of fp32 logits plus their gradient that the recipe allocates per micro-batch). "
        f"The issue's goal (≥ {GOAL_RATIO}× tokens/s at ≤ {GOAL_MEMORY:.0%} of the recipe's peak) "
        "is stated for one GPU: see the GPU rows (bench/TRAINER_GPU.md, `python -m bench --only gpu`).",
        ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--child", choices=["ours", "baseline"])
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--write", default=str(Path(__file__).with_name("TRAINER.md")))
    args = p.parse_args()
    if args.child:
        child(args)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.rows)))
    tiny = work / "tiny"
    tiny.mkdir()
    make_model(tiny)
    cpu = compare(tiny, data, args.steps, args.seq, qlora=False)
    print(json.dumps(cpu, indent=2))
    command = "python bench/trainer_throughput.py " + " ".join(
        f"--{k} {v}" for k, v in (("steps", args.steps), ("rows", args.rows), ("seq", args.seq)))
    Path(args.write).write_text("# Trainer benchmark\n\n" + section(cpu, command, args.steps, args.rows,
                                                                      args.seq))
    print(f"wrote {args.write}")


if __name__ == "__main__":
    main()

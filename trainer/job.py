"""One LoRAJob run, start to finish: the pipeline the pod and `lora-trainer run` share.

Order matters and is chosen so failures cost as little as possible: refuse an output
conflict and bad data before the model is even loaded; train; measure base vs adapter;
apply the quality gate before anything is published; upload with the manifest last.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_operator import api
from lora_operator.contract import (
    DATASET_CREDENTIALS_PREFIX,
    MODEL_CREDENTIALS_PREFIX,
    ExitCode,
    TrainerConfig,
    TrainerResult,
)
from lora_trainer import data, deepspeed_config, evaluate, export, progress, storage, train
from lora_trainer.checkpoints import CheckpointStore
from lora_trainer.errors import TrainerError
from lora_trainer.model import load_tokenizer, resolve_source

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """Tokenized train / validation / test examples and their statistics."""

    fmt: str
    train: list[data.Example]
    validation: list[data.Example]
    test: list[data.Example]
    stats: dict[str, dict[str, int]] = field(default_factory=dict)


def storage_options(spec: api.LoRAJobSpec, endpoint: str | None,
                    credentials_prefix: str = "") -> storage.StorageOptions:
    region = spec.output.region or os.environ.get("AWS_REGION") or "us-east-1"
    return storage.StorageOptions(endpoint=endpoint or spec.output.endpoint, region=region,
                                  credentials_prefix=credentials_prefix)


def fetch_rows(uri: str, workdir: Path, opts: storage.StorageOptions, name: str) -> list[data.Row]:
    path = storage.download(uri, workdir / "data" / name, opts, missing=ExitCode.DATA)
    if path.is_dir():
        raise TrainerError(ExitCode.DATA, f"{uri} is a folder; name one .jsonl/.json/.parquet file")
    return data.read_rows(path)


def read_splits(spec: api.LoRAJobSpec, workdir: Path
                ) -> tuple[api.DatasetFormat, dict[str, list[data.Row]]]:
    """The format and the rows of train, validation and test, split as training splits them
    (shared with the dataset preflight, so both see the same rows)."""
    ds, t = spec.dataset, spec.training
    opts = storage_options(spec, ds.endpoint,
                           DATASET_CREDENTIALS_PREFIX if ds.credentials_secret else "")
    rows = fetch_rows(ds.uri, workdir, opts, "train")
    fmt = data.detect_format(rows) if ds.format == api.DatasetFormat.AUTO else api.DatasetFormat(ds.format)
    if ds.validation.uri:
        train_rows, val_rows = rows, fetch_rows(ds.validation.uri, workdir, opts, "validation")
    else:
        train_rows, val_rows = data.split_fraction(rows, ds.validation.fraction or 0.05, t.seed)
    test_rows = fetch_rows(ds.test.uri, workdir, opts, "test") if ds.test else []
    return fmt, {"train": train_rows, "validation": val_rows, "test": test_rows}


def prepare_data(spec: api.LoRAJobSpec, tokenizer: Any, workdir: Path) -> Splits:
    """Read, split, check and tokenize every split; DATA errors surface here, before training."""
    t = spec.training
    fmt, rows_of = read_splits(spec, workdir)
    splits = Splits(fmt=str(fmt.value), train=[], validation=[], test=[])
    for name, split_rows in rows_of.items():
        if name == "test" and not split_rows:
            continue
        examples, stats = data.tokenize_rows(tokenizer, split_rows, fmt, t.max_seq_length,
                                             t.completion_only_loss, name)
        setattr(splits, name, examples)
        splits.stats[name] = stats.as_dict()
    if t.packing:
        splits.stats["train"]["packed_rows"] = len(data.pack(splits.train, t.max_seq_length))
    progress.emit("data", format=splits.fmt, **{k: v for k, v in splits.stats.items()})
    return splits


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        import torch

        return float(torch.cuda.max_memory_allocated()) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class RunContext:
    """Per-run settings that are not part of the spec: device, workdir, overrides."""

    device: str
    workdir: Path
    base_model_uri: str | None = None
    preemption: train.Preemption = field(default_factory=train.Preemption)


def run_job(config: TrainerConfig, ctx: RunContext, result: TrainerResult) -> TrainerResult:
    """Train, evaluate, gate and export one job; fills `result` as it goes (also on failure)."""
    spec, job = config.spec, config.job
    out_opts = storage_options(spec, None)
    main = deepspeed_config.is_main_process()
    export.check_output_allowed(spec.output.uri, config.checkpoint_uri,
                                config.allowed_output_prefixes)
    export.check_output_conflict(spec.output.uri, job, spec.output.overwrite, out_opts)

    model_uri = ctx.base_model_uri or spec.base_model.uri
    model_opts = storage_options(spec, spec.base_model.endpoint,
                                 MODEL_CREDENTIALS_PREFIX if spec.base_model.credentials_secret else "")
    local = storage.download(model_uri, ctx.workdir / "model", model_opts, missing=ExitCode.MODEL,
                             revision=spec.base_model.revision)
    source = resolve_source(local, spec.base_model.gguf_file, spec.base_model.trust_remote_code)
    tokenizer = load_tokenizer(source)
    splits = prepare_data(spec, tokenizer, ctx.workdir)

    precision = train.resolve_precision(str(spec.training.precision), ctx.device)
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    rows = len(data.pack(splits.train, spec.training.max_seq_length)) if spec.training.packing \
        else len(splits.train)
    steps = train.total_steps(spec.training, rows, world)
    model = train.build_model(source, spec, config.placement, precision, ctx.device,
                              int(os.environ.get("LOCAL_RANK", "0")))

    run_dir = ctx.workdir / "run"
    checkpoints = CheckpointStore.for_attempt(config.checkpoint_uri, job, out_opts)
    resume = checkpoints.latest(ctx.workdir / "resume")
    if resume is not None:
        progress.emit("resume", checkpoint=str(resume.name))
    reporter = progress.ProgressReporter.create()
    trainer = _trainer(spec, config, ctx, precision, model, tokenizer, splits, steps, reporter,
                       checkpoints, main, run_dir)
    started = time.monotonic()
    ctx.preemption.training = True
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    ctx.preemption.training = False
    result.train_seconds = round(time.monotonic() - started, 2)
    result.steps = int(trainer.state.global_step)
    if ctx.preemption.requested:
        raise TrainerError(ExitCode.PREEMPTED, f"stopped by SIGTERM at step {result.steps}; "
                                               "the checkpoint is in storage")
    result.peak_memory_gib = round(peak_memory_gib(ctx.device), 3)

    model = trainer.model
    out = ctx.workdir / "adapter"
    trainer.save_model(str(out))  # gathers ZeRO-3 partitions (stage3_gather_16bit_...)
    metrics = _evaluate(spec, model, tokenizer, splits, result)
    if not main:
        return result
    export.verify_adapter(out)
    tokenizer.save_pretrained(str(out))
    metrics.update(job=job.model_dump(mode="json"), method=config.placement.method,
                   format=splits.fmt, data=splits.stats, steps=result.steps,
                   train_seconds=result.train_seconds, peak_memory_gib=result.peak_memory_gib)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(export.model_card(spec, job, metrics))
    evaluate.quality_gate(evaluate.Comparison(metrics["eval"]["base_eval_loss"],
                                              metrics["eval"]["adapter_eval_loss"]),
                          spec.evaluation.min_improvement)
    if spec.output.merge:
        del trainer, model
        export.merge(source, out, out / "merged")
    export.check_output_conflict(spec.output.uri, job, spec.output.overwrite, out_opts)
    done = export.upload_adapter(out, spec.output.uri, job, spec, out_opts)
    result.adapter_uri, result.manifest_uri = done.adapter_uri, done.manifest_uri
    result.manifest_sha256, result.size_bytes, result.merged_uri = \
        done.manifest_sha256, done.size_bytes, done.merged_uri
    checkpoints.cleanup()
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _trainer(spec: api.LoRAJobSpec, config: TrainerConfig, ctx: RunContext,
             precision: train.Precision, model: Any, tokenizer: Any, splits: Splits, steps: int,
             reporter: progress.ProgressReporter, checkpoints: CheckpointStore, main: bool,
             run_dir: Path) -> Any:
    from transformers import EarlyStoppingCallback, PrinterCallback

    t = spec.training
    counter = data.TokenCounter()
    train_rows = data.pack(splits.train, t.max_seq_length) if t.packing else splits.train
    eval_rows = data.pack(splits.validation, t.max_seq_length) if t.packing else splits.validation
    collator = data.Collator(int(tokenizer.pad_token_id), packed=t.packing, counter=counter,
                             pad_to_multiple_of=train.acceleration_of(model).pad_multiple)
    args = train.training_arguments(spec, config.placement, precision, run_dir, steps, ctx.device,
                                    has_eval=bool(eval_rows))
    callbacks = train.make_callbacks(reporter, counter, checkpoints, ctx.preemption, main)
    if t.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    trainer = train.make_trainer(model, args=args, train_dataset=data.ListDataset(train_rows),
                                 eval_dataset=data.ListDataset(eval_rows) if eval_rows else None,
                                 data_collator=collator, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # stdout carries our JSON lines only
    return trainer


def _evaluate(spec: api.LoRAJobSpec, model: Any, tokenizer: Any, splits: Splits,
              result: TrainerResult) -> dict[str, Any]:
    """Base vs adapter on validation (and test), plus sample answers; fills `result`."""
    pad = int(tokenizer.pad_token_id)
    batch = spec.training.micro_batch_size
    val = evaluate.compare(model, splits.validation, pad, batch)
    result.base_eval_loss, result.adapter_eval_loss = round(val.base_loss, 5), round(val.adapter_loss, 5)
    result.improvement = round(val.improvement, 5)
    scores: dict[str, Any] = {"base_eval_loss": val.base_loss, "adapter_eval_loss": val.adapter_loss,
                              "improvement": val.improvement}
    if splits.test:
        test = evaluate.compare(model, splits.test, pad, batch)
        result.base_test_loss, result.adapter_test_loss = round(test.base_loss, 5), round(test.adapter_loss, 5)
        scores.update(base_test_loss=test.base_loss, adapter_test_loss=test.adapter_loss,
                      test_improvement=test.improvement)
    progress.emit("evaluation", **scores)
    samples = evaluate.answers(model, tokenizer, spec.evaluation.prompts,
                               spec.evaluation.max_new_tokens)
    return {"eval": scores, "samples": samples}

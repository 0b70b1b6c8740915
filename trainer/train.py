"""LoRA / QLoRA training with PEFT and the transformers Trainer; only what is ours is here.

Ours: turning the spec and placement into a `LoraConfig` and `TrainingArguments`, loading
the model in the right precision or 4-bit, and three callbacks — checkpoints to storage,
progress reporting, and a clean stop on SIGTERM. Everything else (optimizer, scheduler,
gradient accumulation, RNG and data-position resume, DeepSpeed) is the Trainer's.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_operator import api
from lora_trainer import deepspeed_config, kernels, progress
from lora_trainer.checkpoints import CheckpointStore
from lora_trainer.data import TokenCounter
from lora_trainer.loss import causal_lm_loss
from lora_trainer.model import ModelSource, bnb_config, load_model

log = logging.getLogger(__name__)

SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant",
              "constant_with_warmup": "constant_with_warmup"}


@dataclass(frozen=True)
class Precision:
    """Model dtype and the Trainer's mixed-precision switches for this device."""

    dtype: Any
    bf16: bool
    fp16: bool


def resolve_precision(requested: str, device: str) -> Precision:
    """auto: bf16 on GPUs that have it (else fp16), fp32 on CPU; explicit choices are kept."""
    import torch

    cuda = device == "cuda"
    if requested == "auto":
        requested = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if requested == "bf16":
        return Precision(torch.bfloat16, bf16=True, fp16=False)
    if requested == "fp16":
        return Precision(torch.float16 if cuda else torch.float32, bf16=False, fp16=cuda)
    return Precision(torch.float32, bf16=False, fp16=False)


def lora_config(spec: api.LoraSpec) -> Any:
    """PEFT's LoraConfig from the spec: `all-linear` or named modules, DoRA, rsLoRA."""
    from peft import LoraConfig

    targets: str | list[str] = "all-linear" if spec.target_modules == ["all-linear"] \
        else list(spec.target_modules)
    config: Any = LoraConfig  # lora_alpha is typed int but any positive float works
    return config(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=targets, use_dora=spec.use_dora, use_rslora=spec.use_rslora,
                      bias="none", task_type="CAUSAL_LM")


def total_steps(training: api.TrainingSpec, train_rows: int, world_size: int) -> int:
    """Optimizer steps planned: maxSteps, or epochs × ceil(rows / global batch)."""
    if training.max_steps is not None:
        return training.max_steps
    global_batch = training.micro_batch_size * training.gradient_accumulation_steps * world_size
    return training.effective_epochs * max(1, math.ceil(train_rows / global_batch))


def build_model(source: ModelSource, spec: api.LoRAJobSpec, placement: api.Placement,
                precision: Precision, device: str, local_rank: int = 0) -> Any:
    """The base model (bf16/fp32, or NF4 for QLoRA) wrapped with a fresh LoRA adapter.

    Its fast paths (attention kernel, Liger kernels, loss) are chosen here, before PEFT wraps
    it, and recorded for `make_trainer` (see `lora_trainer.kernels`).
    """
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    set_seed(spec.training.seed)
    stage = placement.deepspeed if placement.deepspeed not in (None, "none") else None
    checkpointing = spec.training.gradient_checkpointing
    attention = kernels.attention_implementation(device)
    kernels.prepare_attention(attention)
    if placement.method == "qlora":
        extra = deepspeed_config.qlora_zero3_kwargs(stage, precision.dtype)
        device_map: dict[str, Any] | None = None if deepspeed_config.is_zero3(stage) else \
            ({"": local_rank} if device == "cuda" else {"": "cpu"})
        quant = bnb_config(precision.dtype, extra.get("quant_storage"))
        model = load_model(source, precision.dtype, quantization=quant, device_map=device_map,
                           attn_implementation=attention)
        fast = kernels.accelerate(model, device, attention, deepspeed_config.is_zero3(stage))
        prepare: Any = prepare_model_for_kbit_training
        model = prepare(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=deepspeed_config.gradient_checkpointing_kwargs(stage))
    else:
        model = load_model(source, precision.dtype, attn_implementation=attention)
        fast = kernels.accelerate(model, device, attention, deepspeed_config.is_zero3(stage))
        if checkpointing:
            model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(spec.lora))
    kernels.record(peft_model, fast)
    return peft_model


def training_arguments(spec: api.LoRAJobSpec, placement: api.Placement, precision: Precision,
                       out_dir: Path, steps: int, device: str, has_eval: bool) -> Any:
    """TrainingArguments: our schedule, local checkpoints (synced to storage by a callback)."""
    from transformers import TrainingArguments

    t = spec.training
    stage = placement.deepspeed if placement.deepspeed not in (None, "none") else None
    kwargs: dict[str, Any] = {}
    if stage:
        kwargs["deepspeed"] = deepspeed_config.deepspeed_config(stage, precision.bf16, precision.fp16)
    if has_eval:
        kwargs.update(eval_strategy="steps", eval_steps=t.eval_steps,
                      per_device_eval_batch_size=t.micro_batch_size)
    if t.early_stopping_patience is not None and has_eval:
        kwargs.update(metric_for_best_model="eval_loss", greater_is_better=False)
    return TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, learning_rate=t.learning_rate,
        lr_scheduler_type=SCHEDULERS[str(t.scheduler)], warmup_ratio=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        gradient_checkpointing=t.gradient_checkpointing and placement.method != "qlora",
        gradient_checkpointing_kwargs=deepspeed_config.gradient_checkpointing_kwargs(stage),
        bf16=precision.bf16, fp16=precision.fp16, seed=t.seed, data_seed=t.seed,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=1,
        logging_steps=max(1, steps // 100), logging_first_step=True, report_to=[],
        remove_unused_columns=False, label_names=["labels"], use_cpu=device == "cpu",
        dataloader_num_workers=0, disable_tqdm=True, save_only_model=False,
        prediction_loss_only=True,  # no metric needs logits: evaluation keeps none of them
        ddp_find_unused_parameters=False if (placement.gpus or 0) > 1 else None,
        **kwargs)


# --------------------------------------------------------------------------- the Trainer

_TRAINER_CLASS: Any = None


def trainer_class() -> Any:
    """transformers' Trainer with the loss taken from hidden states in chunks (built lazily,
    so importing this module does not import transformers)."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is not None:
        return _TRAINER_CLASS
    from transformers import Trainer

    class LoRATrainer(Trainer):
        """Trainer whose loss never materialises the [tokens × vocab] logits.

        The model is still called as a whole (so DDP and DeepSpeed hooks run as usual), but
        asked for its final hidden states and the logits of one position only
        (`logits_to_keep=1`); the loss is then `lora_trainer.loss.causal_lm_loss`, the same
        arithmetic as the model's own, chunk by chunk.
        """

        chunked_loss: bool = False

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any | None = None) -> Any:
            if not self.chunked_loss or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            features = {k: v for k, v in inputs.items() if k != "labels"}
            outputs = model(**features, output_hidden_states=True, logits_to_keep=1,
                            use_cache=False)
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            loss = causal_lm_loss(outputs.hidden_states[-1], head.weight, inputs["labels"], items)
            if self.args.average_tokens_across_devices and items is not None:  # as Trainer does
                loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1
                               else self.args.n_gpu)
            return (loss, {"loss": loss}) if return_outputs else loss

    _TRAINER_CLASS = LoRATrainer
    return _TRAINER_CLASS


def acceleration_of(model: Any) -> kernels.Acceleration:
    """What build_model chose for this model; a model built elsewhere gets the model's loss."""
    return kernels.recorded(model) or kernels.Acceleration(
        attention=str(getattr(model.config, "_attn_implementation", "unknown")),
        loss=kernels.MODEL_LOSS, notes=("model not built by lora_trainer.train.build_model",))


def make_trainer(model: Any, **kwargs: Any) -> Any:
    """The Trainer for this model, its loss path set, and that path reported."""
    fast = acceleration_of(model)
    trainer = trainer_class()(model=model, **kwargs)
    trainer.chunked_loss = fast.loss == kernels.CHUNKED_LOSS
    log.info("acceleration: %s", fast.as_fields())
    progress.emit("acceleration", **fast.as_fields())
    return trainer


# --------------------------------------------------------------------------- callbacks


def _callback_base() -> Any:
    from transformers import TrainerCallback

    return TrainerCallback


@dataclass
class Preemption:
    """Set by the SIGTERM handler; the callback turns it into "save, then stop"."""

    requested: bool = False
    training: bool = False


def make_callbacks(reporter: progress.ProgressReporter, counter: TokenCounter,
                   checkpoints: CheckpointStore, preemption: Preemption,
                   main_process: bool) -> list[Any]:
    base = _callback_base()

    class CheckpointSync(base):  # type: ignore[misc,valid-type]
        """Uploads each checkpoint under this attempt's run prefix with its sha256 manifest,
        then points `latest` at it (see lora_trainer.checkpoints)."""

        def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if not main_process:
                return
            name = f"checkpoint-{state.global_step}"
            folder = Path(args.output_dir) / name
            if not folder.is_dir():
                return
            uri = checkpoints.save(folder, name)
            progress.emit("checkpoint", step=state.global_step, uri=uri)

    @dataclass
    class Progress(base):  # type: ignore[misc,valid-type]
        """Progress snapshots at every log and evaluation."""

        started: float = field(default_factory=time.monotonic)
        loss: float | None = None
        eval_loss: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.started = time.monotonic()
            counter.tokens = 0

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            logs = logs or {}
            self.loss = logs.get("loss", self.loss)
            self.eval_loss = logs.get("eval_loss", self.eval_loss)
            if main_process:
                reporter.report(progress.snapshot(
                    state.global_step, state.max_steps, state.epoch, self.loss, self.eval_loss,
                    counter.tokens, time.monotonic() - self.started))

    class StopOnSigterm(base):  # type: ignore[misc,valid-type]
        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if preemption.requested:
                control.should_save = True
                control.should_training_stop = True

    return [CheckpointSync(), Progress(), StopOnSigterm()]

"""The trainer's fast paths, chosen per run and reported: attention kernel, fused kernels, loss.

- Attention for packed rows (position ids restart per sample, no attention mask): on CUDA a
  kernel that reads the segments from the position ids instead of a dense [T × T] block mask:
  flash-attention 2 varlen when `flash_attn` is installed, else torch's flex_attention (a
  block-sparse document mask, no extra package). On CPU, sdpa with transformers' block-diagonal
  mask (correct, and the only one of the three that runs there).
- Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) on CUDA when the optional
  `liger-kernel` package is importable and has a patch for the architecture (the `[gpu]` extra).
- Otherwise the loss is our chunked cross-entropy (`lora_trainer.loss`) for architectures whose
  logits are a plain projection of the final hidden state; the model's own loss for the rest.

`Acceleration` says which of these a run uses; the trainer prints it as an `acceleration` event.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import weakref
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

LIGER_LOSS = "liger-fused-linear-cross-entropy"
CHUNKED_LOSS = "chunked-cross-entropy"
MODEL_LOSS = "model-cross-entropy"

# Architectures whose logits are exactly lm_head(final hidden state): no soft-capping, logit
# scaling or bias, so the chunked loss equals the model's own.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3",
                                    "olmo2", "gemma"})
# Config fields that change logits after the projection: with any of them set, chunking would
# compute a different loss, so the model's own is kept.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
LIGER_KERNEL_ARGS = {"rope": "rope", "rms_norm": "rms-norm", "swiglu": "swiglu",
                     "fused_linear_cross_entropy": "fused-linear-cross-entropy"}
# Flex attention compiles one kernel per sequence width: allow one per 128-token bucket.
FLEX_PAD_MULTIPLE = 128
FLEX_RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class Acceleration:
    """What this run uses, and why a faster path was not taken (empty when all were)."""

    attention: str
    loss: str
    kernels: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def as_fields(self) -> dict[str, Any]:
        return {"attention": self.attention, "loss": self.loss, "kernels": list(self.kernels),
                "notes": list(self.notes)}

    @property
    def pad_multiple(self) -> int:
        """Collator padding multiple: flex attention compiles per width, so widths are bucketed."""
        return FLEX_PAD_MULTIPLE if self.attention == "flex_attention" else 1


_RECORDED: weakref.WeakKeyDictionary[Any, Acceleration] = weakref.WeakKeyDictionary()


def record(model: Any, acceleration: Acceleration) -> None:
    _RECORDED[model] = acceleration


def recorded(model: Any) -> Acceleration | None:
    """The choice `record` made for this model (None for a model built elsewhere)."""
    return _RECORDED.get(model)


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def attention_implementation(device: str) -> str:
    """flash_attention_2 > flex_attention on CUDA (both honour packed position ids); sdpa on CPU."""
    if device != "cuda":
        return "sdpa"
    if has_module("flash_attn"):
        return "flash_attention_2"
    if has_module("torch.nn.attention.flex_attention"):
        return "flex_attention"
    return "sdpa"


def prepare_attention(attention: str) -> None:
    """Flex attention is compiled per sequence width; let dynamo keep one kernel per bucket."""
    if attention != "flex_attention":
        return
    import torch._dynamo

    config: Any = torch._dynamo.config
    config.recompile_limit = max(int(config.recompile_limit), FLEX_RECOMPILE_LIMIT)


def liger_patch(model_type: str) -> tuple[Any | None, str]:
    """Liger's `apply_liger_kernel_to_<model_type>`, or None and why not."""
    if not has_module("liger_kernel"):
        return None, "liger-kernel is not installed (pip install 'lora-operator[gpu]')"
    try:
        module: Any = importlib.import_module("liger_kernel.transformers")
    except ImportError as exc:  # e.g. a release built for another transformers major version
        return None, f"liger-kernel is installed but cannot be imported: {exc}"
    patch = getattr(module, f"apply_liger_kernel_to_{model_type}", None)
    if patch is None:
        return None, f"liger-kernel has no kernels for model type {model_type!r}"
    return patch, ""


def apply_liger(model: Any) -> tuple[tuple[str, ...], str]:
    """Patch a loaded (not yet PEFT-wrapped) model in place; (kernels applied, why none)."""
    model_type = str(getattr(model.config, "model_type", ""))
    patch, why = liger_patch(model_type)
    if patch is None:
        return (), why
    accepted = inspect.signature(patch).parameters
    kwargs: dict[str, Any] = {arg: True for arg in LIGER_KERNEL_ARGS if arg in accepted}
    if "cross_entropy" in accepted:
        kwargs["cross_entropy"] = False  # the fused linear variant replaces it
    patch(model=model, **kwargs)
    return tuple(LIGER_KERNEL_ARGS[arg] for arg in kwargs if arg in LIGER_KERNEL_ARGS), ""


def chunked_loss_refusal(model: Any, zero3: bool) -> str:
    """Why the chunked loss cannot stand in for this model's own ('' when it can)."""
    config = model.config
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in PLAIN_HEAD_MODEL_TYPES:
        return f"model type {model_type!r} is not known to have plain lm_head logits"
    for name in LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"{name} is set: logits are not a plain projection"
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        return "the output projection has a bias or is missing"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return "the model's forward has no logits_to_keep"
    if zero3:
        return "ZeRO-3 partitions the lm_head weight outside the model's forward"
    return ""


def accelerate(model: Any, device: str, attention: str, zero3: bool) -> Acceleration:
    """Apply Liger where it can run and pick the loss; `model` is the base model, pre-PEFT."""
    notes: list[str] = []
    kernels: tuple[str, ...] = ()
    if device == "cuda":
        kernels, why = apply_liger(model)
        if why:
            notes.append(why)
    else:
        notes.append("Liger kernels need CUDA")
    if "fused-linear-cross-entropy" in kernels:
        return Acceleration(attention, LIGER_LOSS, kernels, tuple(notes))
    refusal = chunked_loss_refusal(model, zero3)
    if refusal:
        notes.append(f"chunked cross-entropy off: {refusal}")
        return Acceleration(attention, MODEL_LOSS, kernels, tuple(notes))
    return Acceleration(attention, CHUNKED_LOSS, kernels, tuple(notes))

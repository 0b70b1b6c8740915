"""Held-out verdicts: base versus adapter loss, the quality gate, and sample answers.

The base model's loss is measured on the very same packed batches with the adapter
disabled (`disable_adapter()`), so the comparison differs in nothing but the adapter.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lora_operator.contract import ExitCode
from lora_trainer.data import IGNORE_INDEX, Collator, Example
from lora_trainer.errors import TrainerError


@dataclass(frozen=True)
class Comparison:
    """Base and adapter loss on one split, and the relative improvement."""

    base_loss: float
    adapter_loss: float

    @property
    def improvement(self) -> float:
        """(base − adapter) / base: 0.2 means the adapter cut the loss by 20 %."""
        if self.base_loss <= 0 or not math.isfinite(self.base_loss):
            return 0.0
        return (self.base_loss - self.adapter_loss) / self.base_loss


def held_out_loss(model: Any, examples: Sequence[Example], pad_id: int, batch_size: int = 8) -> float:
    """Token-mean cross-entropy over every label token of `examples` (packed, no grad)."""
    import torch

    collate = Collator(pad_id, packed=True)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = [e.as_features() for e in examples[start:start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits.float()  # a cache disables packed masks
            shifted = labels[:, 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), shifted,
                ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(loss)
            count += int((shifted != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


@contextlib.contextmanager
def adapter_disabled(model: Any) -> Iterator[None]:
    """The base model behind a PEFT model (a plain model is already the base)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


def compare(model: Any, examples: Sequence[Example], pad_id: int, batch_size: int = 8) -> Comparison:
    with adapter_disabled(model):
        base = held_out_loss(model, examples, pad_id, batch_size)
    return Comparison(base, held_out_loss(model, examples, pad_id, batch_size))


def quality_gate(result: Comparison, min_improvement: float | None) -> None:
    """Fail (QUALITY_GATE) when the adapter did not cut held-out loss by min_improvement."""
    if min_improvement is None:
        return
    if not math.isfinite(result.adapter_loss) or result.improvement < min_improvement:
        raise TrainerError(
            ExitCode.QUALITY_GATE,
            f"held-out loss {result.base_loss:.4f} (base) → {result.adapter_loss:.4f} (adapter): "
            f"improvement {result.improvement:.1%} is below evaluation.minImprovement "
            f"{min_improvement:.1%}")


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer to one user prompt through the chat template."""
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, return_tensors="pt")
    device = next(model.parameters()).device
    ids = ids.to(device)
    stop = [i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
            if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop or None, use_cache=True)
    return str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)).strip()


def answers(model: Any, tokenizer: Any, prompts: Sequence[str],
            max_new_tokens: int) -> list[dict[str, str]]:
    """Base and adapter answers side by side, for metrics.json and the model card."""
    rows = []
    was_training = model.training
    model.eval()
    for prompt in prompts:
        with adapter_disabled(model):
            base = generate(model, tokenizer, prompt, max_new_tokens)
        rows.append({"prompt": prompt, "base": base,
                     "adapter": generate(model, tokenizer, prompt, max_new_tokens)})
    model.train(was_training)
    return rows

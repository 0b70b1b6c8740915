"""Causal-LM cross-entropy over hidden states, in chunks of tokens: the logits tensor
[tokens × vocab] never exists whole.

With a 128k vocabulary the logits of one 4 × 2048 micro-batch are 4 GiB in fp32 (plus the
same again for their gradient), often more than the whole LoRA step needs otherwise. Here the
loss is taken from the final hidden states and the output projection's weight, a chunk of
tokens at a time; backward recomputes each chunk's logits instead of keeping them, so the peak
is one chunk's logits, not the batch's.

The arithmetic is the model's own (`transformers.loss.loss_utils.ForCausalLMLoss`): logits in
the model's dtype upcast to fp32, labels shifted left by one, -100 ignored, the sum divided by
`num_items_in_batch` when the Trainer passes it (token mean across gradient accumulation) and
by this batch's label-token count otherwise. The tests check loss and gradients against it.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024


def _chunk_loss(hidden: Any, weight: Any, targets: Any) -> Any:
    """Summed cross-entropy of one chunk, computed exactly as the model computes its logits."""
    import torch

    logits = torch.nn.functional.linear(hidden, weight).float()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX,
                                             reduction="sum")


def _linear_ce_class() -> Any:
    """The autograd Function, built on first use so importing this module needs no torch."""
    import torch

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        """sum(CE(hidden @ weight.T, targets)) chunk by chunk; backward recomputes per chunk."""

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, targets: Any, chunk: int) -> Any:
            ctx.save_for_backward(hidden, weight, targets)
            ctx.chunk = chunk
            kind = hidden.device.type  # backward recomputes under the same autocast as forward
            ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                stop = start + chunk
                total += _chunk_loss(hidden[start:stop], weight, targets[start:stop])
            return total

        @staticmethod
        def backward(ctx: Any, grad_total: Any) -> tuple[Any, ...]:
            hidden, weight, targets = ctx.saved_tensors
            want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_hidden = torch.zeros_like(hidden) if want_hidden else None
            grad_weight = torch.zeros_like(weight) if want_weight else None
            for start in range(0, hidden.shape[0], ctx.chunk):
                stop = start + ctx.chunk
                kind, enabled, dtype = ctx.autocast
                grad_mode: Any = torch.enable_grad  # untyped in torch's stubs
                with grad_mode(), torch.autocast(kind, dtype=dtype, enabled=enabled):
                    h = hidden[start:stop].detach().requires_grad_(want_hidden)
                    w = weight.detach().requires_grad_(want_weight)
                    loss = _chunk_loss(h, w, targets[start:stop])
                    inputs = [t for t, wanted in ((h, want_hidden), (w, want_weight)) if wanted]
                    grads = list(torch.autograd.grad(loss, inputs, grad_total))
                if want_hidden:
                    grad_hidden[start:stop] = grads.pop(0)  # type: ignore[index]
                if want_weight:
                    grad_weight += grads.pop(0)  # type: ignore[operator]
            return grad_hidden, grad_weight, None, None

    return ChunkedLinearCrossEntropy


_FUNCTION: Any = None


def chunked_linear_cross_entropy_sum(hidden: Any, weight: Any, targets: Any,
                                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Any:
    """Σ CE(hidden @ weight.T, targets) over [N, H] hidden states, `chunk_tokens` rows at a time."""
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _linear_ce_class()
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be ≥ 1 (got {chunk_tokens})")
    return _FUNCTION.apply(hidden, weight, targets, chunk_tokens)


def causal_lm_loss(hidden: Any, weight: Any, labels: Any, num_items_in_batch: Any | None = None,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Any:
    """The model's causal-LM loss from final hidden states [B, T, H] and the lm_head weight.

    Token t predicts label t + 1 (the last position predicts nothing), exactly as
    `ForCausalLMLoss` shifts; the divisor is `num_items_in_batch` if given, else the number of
    label tokens here (so a batch without any is NaN, as the model's own mean would be).
    """
    import torch

    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(flat_hidden.device)
    total = chunked_linear_cross_entropy_sum(flat_hidden, weight, flat_targets, chunk_tokens)
    if num_items_in_batch is None:
        return total / (flat_targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch

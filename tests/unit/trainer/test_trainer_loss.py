"""The chunked loss, the fast-path choice and packing: same numbers as the plain path.

A tiny random Llama in fp32 (the session fixture) with a LoRA adapter: the chunked loss must
give the model's own loss and the same LoRA gradients, with completion-only labels and with
the Trainer's `num_items_in_batch`; packed rows must give every sample the loss it has alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_operator import api
from lora_trainer import data, kernels, loss, train
from lora_trainer.model import ModelSource

IGNORE = data.IGNORE_INDEX


def lora_model(model_dir: Path, seed: int = 0) -> Any:
    placement = api.Placement(method="lora", deepspeed="none")
    spec = api.parse_spec({"baseModel": {"uri": "file:///m"}, "dataset": {"uri": "file:///d.jsonl"},
                           "output": {"uri": "file:///o"}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                           "training": {"seed": seed, "gradientCheckpointing": False}})
    model = train.build_model(ModelSource(model_dir), spec, placement,
                              train.resolve_precision("fp32", "cpu"), "cpu")
    torch.manual_seed(seed)
    for name, param in model.named_parameters():  # LoRA B starts at zero: make gradients rich
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def completion_only_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Two rows: prompts masked (-100), a padded tail, labels only on the completions."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (2, 23), generator=generator)
    labels = ids.clone()
    labels[0, :9] = IGNORE
    labels[1, :4] = IGNORE
    labels[1, 17:] = IGNORE
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def lora_grads(model: Any) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("num_items", [None, 40])
def test_chunked_loss_and_lora_grads_equal_the_models_own(tiny_model_dir: Path,
                                                          num_items: int | None) -> None:
    model = lora_model(tiny_model_dir)
    batch = completion_only_batch(model.config.vocab_size)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    reference = model(**batch, **extra).loss
    reference.backward()
    expected = lora_grads(model)

    features = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**features, output_hidden_states=True, logits_to_keep=1)
    assert out.logits.shape[1] == 1  # the full [tokens × vocab] logits were never made
    head = model.get_output_embeddings().weight
    chunked = loss.causal_lm_loss(out.hidden_states[-1], head, batch["labels"],
                                  extra.get("num_items_in_batch"), chunk_tokens=7)
    chunked.backward()
    got = lora_grads(model)

    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-6)
    assert expected and expected.keys() == got.keys()
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6)


def test_chunked_loss_gives_the_output_weight_its_gradient_too() -> None:
    """A trainable lm_head (e.g. modules_to_save) gets the same gradient as from full logits."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 11, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11), generator=generator)
    labels[:, :3] = IGNORE
    full = torch.nn.functional.cross_entropy(
        (hidden @ weight.T)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    grad_h, grad_w = torch.autograd.grad(full, [hidden, weight])
    chunked = loss.causal_lm_loss(hidden, weight, labels, chunk_tokens=4)
    got_h, got_w = torch.autograd.grad(chunked, [hidden, weight])
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(got_h, grad_h)
    torch.testing.assert_close(got_w, grad_w)
    with pytest.raises(ValueError, match="chunk_tokens must be ≥ 1"):
        loss.causal_lm_loss(hidden, weight, labels, chunk_tokens=0)


def test_cpu_run_reports_sdpa_and_the_chunked_loss(tiny_model_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    model = lora_model(tiny_model_dir)
    fast = train.acceleration_of(model)
    assert (fast.attention, fast.loss, fast.kernels) == ("sdpa", kernels.CHUNKED_LOSS, ())
    assert "Liger kernels need CUDA" in fast.notes
    trainer = train.make_trainer(model, args=train.training_arguments(
        api.parse_spec({"baseModel": {"uri": "file:///m"}, "dataset": {"uri": "file:///d.jsonl"},
                        "output": {"uri": "file:///o"}}),
        api.Placement(method="lora", deepspeed="none"), train.resolve_precision("fp32", "cpu"),
        tmp_path, 1, "cpu", has_eval=False))
    assert trainer.chunked_loss
    event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert event == {"event": "acceleration", "attention": "sdpa", "loss": kernels.CHUNKED_LOSS,
                     "kernels": [], "notes": ["Liger kernels need CUDA"]}


def test_models_with_transformed_logits_keep_their_own_loss() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=8))
    fast = kernels.accelerate(gemma, "cpu", "sdpa", zero3=False)
    assert fast.loss == kernels.MODEL_LOSS
    assert any("gemma2" in note for note in fast.notes)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    assert "gpt2" in kernels.chunked_loss_refusal(gpt2, zero3=False)


def test_without_liger_the_gpu_path_says_how_to_get_it(tiny_model_dir: Path) -> None:
    """Liger is an optional [gpu] extra: absent here, the run says so instead of failing."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    applied, why = kernels.apply_liger(model)
    assert applied == () and "lora-operator[gpu]" in why
    fast = kernels.accelerate(model, "cuda", "flex_attention", zero3=True)
    assert fast.loss == kernels.MODEL_LOSS and fast.pad_multiple == kernels.FLEX_PAD_MULTIPLE
    assert any("ZeRO-3" in note for note in fast.notes)
    assert kernels.attention_implementation("cpu") == "sdpa"


# --------------------------------------------------------------------------- packing


def per_sample_losses(model: Any, rows: list[data.Example], packed: bool,
                      lengths: list[list[int]]) -> list[float]:
    """Summed token loss of every sample, in row order, from one forward of `rows`."""
    batch = data.Collator(0, packed=packed)([r.as_features() for r in rows])
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits.float()
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none")
    out = []
    for row, sizes in enumerate(lengths):
        start = 0
        for size in sizes:  # the loss at t predicts t + 1: sample [start, start+size) owns t in [start, start+size-1)
            out.append(float(token_loss[row, start:start + size - 1].sum()))
            start += size
    return out


def test_packed_rows_give_every_sample_the_loss_it_has_alone(tiny_model_dir: Path,
                                                             tiny_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa")
    model.eval()
    texts = [("What is 2 + 2?", "Four."), ("Name a colour.", "Blue, like the sea at noon."),
             ("Say hello.", "Hello!"), ("Where is Paris?", "In France, on the Seine.")]
    examples = [data.chat_example(tiny_tokenizer, (("user", q), ("assistant", a)), True)
                for q, a in texts]
    alone = [per_sample_losses(model, [e], False, [[len(e)]])[0] for e in examples]
    capacity = sum(len(e) for e in examples)
    packed_rows = data.pack(examples, capacity)
    assert len(packed_rows) == 1  # all four samples share one row
    order = sorted(range(len(examples)))
    packed = per_sample_losses(model, packed_rows, True, [[len(examples[i]) for i in order]])
    for i, value in zip(order, packed, strict=True):
        assert value == pytest.approx(alone[i], rel=1e-4, abs=1e-4)
    # The control: the same row without restarted positions lets samples see each other.
    leaky = data.Example(packed_rows[0].input_ids, packed_rows[0].labels)
    leaked = per_sample_losses(model, [leaky], False, [[len(examples[i]) for i in order]])
    assert any(abs(a - alone[i]) > 1e-3 for i, a in zip(order, leaked, strict=True))


def train_two_steps(model_dir: Path, tokenizer: Any, tmp: Path, chunked: bool) -> tuple[list[float], Any]:
    """Two optimizer steps × 2 accumulated micro-batches of packed rows; (losses, LoRA weights)."""
    from transformers import TrainingArguments

    model = lora_model(model_dir)
    pairs = [("Hi", "Hello there."), ("2+2?", "Four, of course."), ("Colour?", "Blue."),
             ("Capital of France?", "Paris."), ("Say yes.", "Yes!"), ("Count to 3.", "1, 2, 3.")]
    rows = data.pack([data.chat_example(tokenizer, (("user", q), ("assistant", a)), True)
                      for q, a in pairs], 40)
    args = TrainingArguments(output_dir=str(tmp), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, seed=0, data_seed=0)
    trainer = train.make_trainer(model, args=args, train_dataset=data.ListDataset(rows),
                                 data_collator=data.Collator(int(tokenizer.pad_token_id), packed=True))
    trainer.chunked_loss = chunked
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return losses, weights


def test_training_with_the_chunked_loss_matches_the_models_loss(tiny_model_dir: Path, tiny_tokenizer: Any,
                                                                 tmp_path: Path) -> None:
    """Gradient accumulation included (the Trainer's num_items_in_batch): same losses, same adapter."""
    ours, our_weights = train_two_steps(tiny_model_dir, tiny_tokenizer, tmp_path / "a", chunked=True)
    theirs, their_weights = train_two_steps(tiny_model_dir, tiny_tokenizer, tmp_path / "b", chunked=False)
    assert len(ours) == 2 and ours == pytest.approx(theirs, rel=1e-5)
    for name, weight in their_weights.items():
        torch.testing.assert_close(our_weights[name], weight, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_flex_attention_packed_rows_do_not_leak_across_samples(tiny_model_dir: Path, tiny_tokenizer: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path's kernel choice: transformers' flex attention builds a block-sparse document
    mask from the position ids. Inductor cannot compile flex attention for this CPU, so torch's
    eager flex_attention (same mask semantics, reference arithmetic) stands in for the compiled one."""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention
    from transformers import AutoModelForCausalLM

    def eager(*args: Any, training: bool = False, **kwargs: Any) -> Any:
        return flex_attention(*args, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="flex_attention")
    model.eval()
    examples = [data.chat_example(tiny_tokenizer, (("user", q), ("assistant", a)), True)
                for q, a in (("Say hello.", "Hello!"), ("Name a colour.", "Blue, like the sea."))]
    alone = [per_sample_losses(model, [e], False, [[len(e)]])[0] for e in examples]
    rows = data.pack(examples, sum(len(e) for e in examples))
    packed = per_sample_losses(model, rows, True, [[len(e) for e in examples]])
    assert packed == pytest.approx(alone, rel=1e-4, abs=1e-4)

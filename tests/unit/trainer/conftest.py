"""Fixtures for the trainer's tests: a tiny tokenizer and a tiny random Llama, built here.

A byte-level BPE trained on the example data (a few hundred tokens) and a 2-layer,
64-wide Llama keep every test on CPU in seconds; the real SmolLM2 test is marked slow.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_trainer.model import CHATML_TEMPLATE

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples" / "data"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _restore_environ() -> Iterator[None]:
    """Put os.environ back after every test. The libraries the trainer drives write to it
    (transformers sets ACCELERATE_USE_DEEPSPEED=true for TrainingArguments with a DeepSpeed
    config), and a leftover would steer a later test's in-process or child run into
    DeepSpeed's MPI discovery."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def build_tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in (EXAMPLES / "train.jsonl").read_text().splitlines()[:200]:
        texts += [m["content"] for m in json.loads(line)["messages"]]
    texts += ["user assistant system\n", "Hello world. The quick brown fox."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def build_model(folder: Path, vocab: int, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(folder)
    build_model(folder, len(tok))
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job_manifest(model_dir: Path, out_uri: str, *, data: Path | None = None, name: str = "tiny",
                 **overrides: Any) -> dict[str, Any]:
    """A small LoRAJob on the tiny model and (a slice of) the example data."""
    train = data or EXAMPLES / "train.jsonl"
    spec: dict[str, Any] = {
        "baseModel": {"uri": f"file://{model_dir}"},
        "dataset": {"uri": f"file://{train}", "validation": {"uri": f"file://{EXAMPLES / 'validation.jsonl'}"}},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"maxSteps": 6, "learningRate": 5e-3, "microBatchSize": 4,
                     "gradientAccumulationSteps": 1, "maxSeqLength": 128, "saveSteps": 3,
                     "evalSteps": 100, "gradientCheckpointing": False, "seed": 7},
        "output": {"uri": out_uri},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {"apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRAJob",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def write_manifest(path: Path, manifest: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(manifest))
    return path

"""Shapes from config.json, GGUF metadata, the spec and the known-architecture table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lora_operator.api import BaseModelSpec, ModelShape
from lora_operator.plan import shapes
from lora_operator.plan.shapes import (
    KNOWN_SHAPES,
    FetchError,
    ShapeUnavailable,
    config_from_gguf,
    known_name_for,
    resolve_shape,
    shape_from_config,
)

LLAMA_31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    shapes.clear_cache()


def test_llama_config_matches_the_table() -> None:
    assert shape_from_config(LLAMA_31_8B_CONFIG) == KNOWN_SHAPES["llama-3.1-8b"]


def test_gemma_head_dim_tie_and_moe_experts() -> None:
    gemma = shape_from_config({"hidden_size": 2304, "intermediate_size": 9216,
                               "num_hidden_layers": 26, "num_attention_heads": 8,
                               "num_key_value_heads": 4, "head_dim": 256,
                               "vocab_size": 256000, "tie_word_embeddings": True})
    assert gemma == KNOWN_SHAPES["gemma-2-2b"]
    moe = shape_from_config({**LLAMA_31_8B_CONFIG, "num_local_experts": 8})
    assert moe.num_experts == 8


def test_nested_text_config_is_unwrapped() -> None:
    assert shape_from_config({"text_config": LLAMA_31_8B_CONFIG}).hidden_size == 4096


def test_config_missing_keys_names_them() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        shape_from_config({"num_hidden_layers": 2})


@pytest.mark.parametrize(("name", "key"), [
    ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("meta-llama/Meta-Llama-3-8B", "llama-3.1-8b"),
    ("meta-llama/Llama-3.2-1B", "llama-3.2-1b"),
    ("meta-llama/Llama-2-7b-chat-hf", "llama-2-7b"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b"),
    ("google/gemma-2-9b-it", "gemma-2-9b"),
    ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
    ("llama-3.1-8b", "llama-3.1-8b"),
])
def test_repo_names_map_to_known_shapes(name: str, key: str) -> None:
    assert known_name_for(name) == key


def test_unknown_repo_name_is_not_guessed() -> None:
    assert known_name_for("acme/secret-model-7b") is None


def _fetch_ok(config: dict[str, Any]) -> shapes.Fetch:
    calls: list[str] = []

    def fetch(base: BaseModelSpec, timeout: float) -> dict[str, Any]:
        calls.append(base.uri)
        return config

    fetch.calls = calls  # type: ignore[attr-defined]
    return fetch


def _fetch_fail(base: BaseModelSpec, timeout: float) -> dict[str, Any]:
    raise FetchError("unreachable")


def test_config_json_wins_and_is_cached() -> None:
    fetch = _fetch_ok(LLAMA_31_8B_CONFIG)
    base = BaseModelSpec(uri="hf://acme/private", revision="v1",
                         architecture="smollm2-135m")
    first = resolve_shape(base, fetch=fetch, timeout=1)
    again = resolve_shape(base, fetch=fetch, timeout=1)
    assert first.shape == KNOWN_SHAPES["llama-3.1-8b"]
    assert "config.json" in first.source
    assert again == first
    assert fetch.calls == ["hf://acme/private"]  # type: ignore[attr-defined]


def test_fallback_order_shape_then_architecture_then_repo_name() -> None:
    tiny = ModelShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, vocab_size=100)
    with_shape = BaseModelSpec(uri="hf://Qwen/Qwen2.5-7B", shape=tiny, architecture="llama-2-7b")
    assert resolve_shape(with_shape, fetch=_fetch_fail, timeout=1).source == \
        "spec.baseModel.shape"
    with_arch = BaseModelSpec(uri="hf://Qwen/Qwen2.5-7B", architecture="llama-2-7b")
    got = resolve_shape(with_arch, fetch=_fetch_fail, timeout=1)
    assert got.shape == KNOWN_SHAPES["llama-2-7b"]
    by_name = resolve_shape(BaseModelSpec(uri="hf://Qwen/Qwen2.5-7B"), fetch=_fetch_fail,
                            timeout=1)
    assert by_name.shape == KNOWN_SHAPES["qwen2.5-7b"]
    assert "repo name" in by_name.source


def test_unknown_and_unreachable_raises_with_what_was_tried_and_the_fix() -> None:
    base = BaseModelSpec(uri="s3://models/mystery/")
    with pytest.raises(ShapeUnavailable) as err:
        resolve_shape(base, fetch=_fetch_fail, timeout=1)
    msg = str(err.value)
    assert "s3://models/mystery/" in msg and "unreachable" in msg
    assert "spec.baseModel.shape" in msg and "spec.baseModel.architecture" in msg


def test_hanging_fetch_is_cut_at_the_deadline() -> None:
    import threading

    release = threading.Event()

    def hang(base: BaseModelSpec, timeout: float) -> dict[str, Any]:
        release.wait(30)
        return LLAMA_31_8B_CONFIG

    base = BaseModelSpec(uri="hf://meta-llama/Llama-2-7b-hf")
    try:
        got = resolve_shape(base, fetch=hang, timeout=0.1)
    finally:
        release.set()
    assert got.shape == KNOWN_SHAPES["llama-2-7b"]


def test_file_uri_reads_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B_CONFIG))
    got = resolve_shape(BaseModelSpec(uri=f"file://{tmp_path}"), timeout=2)
    assert got.shape == KNOWN_SHAPES["llama-3.1-8b"]


def test_pvc_uri_reads_the_mounted_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models" / "llama").mkdir(parents=True)
    (tmp_path / "models" / "llama" / "config.json").write_text(json.dumps(LLAMA_31_8B_CONFIG))
    monkeypatch.setenv(shapes.PVC_ROOT_ENV, str(tmp_path))
    got = resolve_shape(BaseModelSpec(uri="pvc://models/llama"), timeout=2)
    assert got.shape == KNOWN_SHAPES["llama-3.1-8b"]


def test_gguf_metadata_gives_the_shape(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(176)
    writer.add_block_count(3)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_vocab_size(1000)
    writer.add_tensor("token_embd.weight", np.zeros((1000, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = config_from_gguf(path)
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 3
    assert config["tie_word_embeddings"] is True  # no output.weight tensor
    got = resolve_shape(BaseModelSpec(uri=f"file://{tmp_path}", gguf_file="tiny.gguf"),
                        timeout=2)
    assert got.shape.num_key_value_heads == 2
    assert "GGUF" in got.source


def test_remote_gguf_falls_back_to_the_table() -> None:
    base = BaseModelSpec(uri="hf://HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
                         gguf_file="model.gguf")
    got = resolve_shape(base, timeout=1)
    assert got.shape == KNOWN_SHAPES["smollm2-135m"]


def test_a_burst_on_one_model_reads_its_config_once() -> None:
    """20 workers planning jobs on one base model at once: one read, every one gets the shape."""
    import concurrent.futures
    import threading
    import time

    calls: list[str] = []
    gate = threading.Lock()

    def slow(base: BaseModelSpec, timeout: float) -> dict[str, Any]:
        with gate:
            calls.append(base.uri)
        time.sleep(0.2)
        return LLAMA_31_8B_CONFIG

    base = BaseModelSpec(uri="s3://models/llama/")
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        got = list(pool.map(lambda _: resolve_shape(base, fetch=slow, timeout=5), range(20)))
    assert calls == ["s3://models/llama/"]
    assert all(g.shape == KNOWN_SHAPES["llama-3.1-8b"] for g in got)


def test_a_failed_read_is_not_repeated_within_the_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fail(base: BaseModelSpec, timeout: float) -> dict[str, Any]:
        calls.append(base.uri)
        raise FetchError("unreachable")

    base = BaseModelSpec(uri="s3://models/gone/", architecture="llama-2-7b")
    for _ in range(3):
        got = resolve_shape(base, fetch=fail, timeout=1)
        assert got.shape == KNOWN_SHAPES["llama-2-7b"]
    assert len(calls) == 1
    clock = shapes.time.monotonic() + shapes.FAILURE_TTL_S + 1
    monkeypatch.setattr(shapes.time, "monotonic", lambda: clock)
    resolve_shape(base, fetch=fail, timeout=1)
    assert len(calls) == 2  # read again once the failure is old


def test_same_uri_on_another_endpoint_is_another_model() -> None:
    small = {**LLAMA_31_8B_CONFIG, "num_hidden_layers": 2}
    a = resolve_shape(BaseModelSpec(uri="s3://models/x/", endpoint="https://a.example.com"),
                      fetch=_fetch_ok(LLAMA_31_8B_CONFIG), timeout=1)
    b = resolve_shape(BaseModelSpec(uri="s3://models/x/", endpoint="https://b.example.com"),
                      fetch=_fetch_ok(small), timeout=1)
    assert (a.shape.num_hidden_layers, b.shape.num_hidden_layers) == (32, 2)

"""Where a base model's shape comes from: its config.json, the spec, or a table of known models.

The pure half (`shape_from_config`, `KNOWN_SHAPES`, `known_name_for`) turns data into a
`ModelShape`; the I/O half (`resolve_shape`, `default_fetch`) reads config.json from the
model's location with a short timeout. The order is: the model's own config.json (the truth),
then an explicit `spec.baseModel.shape`, then `spec.baseModel.architecture` or the hf:// repo
name in `KNOWN_SHAPES`. When none works `ShapeUnavailable` says what was tried and how to fix
it: a guessed shape presented as fact would size a job wrongly, and an OOM an hour later is
worse than a clear refusal now.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lora_operator.api import BaseModelSpec, ModelShape
from lora_operator.settings import Settings, load_settings

PVC_ROOT_ENV = "LORA_PVC_ROOT"  # where pvc://claim/path is mounted: $LORA_PVC_ROOT/claim/path
DEFAULT_PVC_ROOT = "/mnt/pvc"


class ShapeUnavailable(RuntimeError):  # noqa: N818 (the name the operator uses)
    """No trustworthy shape for the base model; the message says what was tried."""


class FetchError(RuntimeError):
    """config.json could not be read from the model's location."""


@dataclass(frozen=True)
class ShapeSource:
    """A shape and where it came from (shown in status and in `lora-operator plan`)."""

    shape: ModelShape
    source: str


def _s(**kw: Any) -> ModelShape:
    return ModelShape.model_validate(kw)


# Published config.json values of well-known models (hidden, FFN, layers, heads, KV heads, vocab).
KNOWN_SHAPES: dict[str, ModelShape] = {
    "llama-3.2-1b": _s(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       head_dim=64, tie_word_embeddings=True),
    "llama-3.2-3b": _s(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                       num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
                       head_dim=128, tie_word_embeddings=True),
    "llama-3.1-8b": _s(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama-3.1-70b": _s(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    "llama-2-7b": _s(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": _s(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "llama-2-70b": _s(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "llama-65b": _s(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                    num_attention_heads=64, num_key_value_heads=64, vocab_size=32000),
    "qwen2.5-0.5b": _s(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True),
    "qwen2.5-1.5b": _s(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True),
    "qwen2.5-3b": _s(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                     num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                     tie_word_embeddings=True),
    "qwen2.5-7b": _s(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "qwen2.5-14b": _s(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                      num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
    "qwen2.5-32b": _s(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                      num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
    "qwen2.5-72b": _s(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=152064),
    "mistral-7b": _s(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32768),
    "mixtral-8x7b": _s(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       num_experts=8),
    "gemma-2-2b": _s(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                     num_attention_heads=8, num_key_value_heads=4, vocab_size=256000,
                     head_dim=256, tie_word_embeddings=True),
    "gemma-2-9b": _s(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                     num_attention_heads=16, num_key_value_heads=8, vocab_size=256000,
                     head_dim=256, tie_word_embeddings=True),
    "phi-3-mini": _s(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32064),
    "smollm2-135m": _s(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                       tie_word_embeddings=True),
    "smollm2-360m": _s(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                       num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
                       tie_word_embeddings=True),
    "smollm2-1.7b": _s(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                       tie_word_embeddings=True),
}
# Other names for the same shapes (versions that changed weights, not shape).
KNOWN_ALIASES: dict[str, str] = {
    "llama-3-8b": "llama-3.1-8b", "llama-3-70b": "llama-3.1-70b",
    "llama-3.3-70b": "llama-3.1-70b", "llama-7b": "llama-2-7b", "llama-13b": "llama-2-13b",
    "qwen2-0.5b": "qwen2.5-0.5b", "qwen2-1.5b": "qwen2.5-1.5b", "qwen2-7b": "qwen2.5-7b",
    "qwen2-72b": "qwen2.5-72b", "phi-3-mini-4k": "phi-3-mini", "phi-3-mini-128k": "phi-3-mini",
    "phi-3.5-mini": "phi-3-mini", "mixtral-8x7b-v0.1": "mixtral-8x7b",
}
# Repo-name suffixes that do not change the shape (chat tunes, packaging, quantized copies).
_SUFFIXES = re.compile(
    r"-(instruct|it|chat|hf|base|bnb-4bit|4bit|awq|gptq|gguf|fp16|bf16|v\d+(\.\d+)*)$")


def known_name_for(name: str) -> str | None:
    """`Meta-Llama-3.1-8B-Instruct` → `llama-3.1-8b`; None when the name is not in the table."""
    key = name.rsplit("/", 1)[-1].lower().replace("_", "-")
    key = key.removeprefix("meta-")
    for _ in range(6):
        if key in KNOWN_SHAPES:
            return key
        if key in KNOWN_ALIASES:
            return KNOWN_ALIASES[key]
        stripped = _SUFFIXES.sub("", key)
        if stripped == key:
            break
        key = stripped
    return None


def _first(config: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return None


def shape_from_config(config: Mapping[str, Any]) -> ModelShape:
    """A ModelShape from a Hugging Face config.json (Llama, Mistral, Qwen2, Gemma, Phi-3, MoE).

    Multimodal and wrapper configs that nest the language model under `text_config` are
    unwrapped. Raises ValueError naming the missing keys.
    """
    if isinstance(config.get("text_config"), Mapping):
        config = {**config, **config["text_config"]}
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    data = {
        "hidden_size": hidden,
        "intermediate_size": _first(config, "intermediate_size", "ffn_hidden_size", "n_inner"),
        "num_hidden_layers": _first(config, "num_hidden_layers", "n_layer", "num_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": _first(config, "num_key_value_heads", "num_kv_heads"),
        "vocab_size": _first(config, "vocab_size"),
        "head_dim": _first(config, "head_dim"),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "num_experts": _first(config, "num_local_experts", "num_experts", "n_routed_experts"),
    }
    if data["intermediate_size"] is None and isinstance(hidden, int):
        data["intermediate_size"] = 4 * hidden  # GPT-style configs leave it implicit
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if data[k] is None]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    try:
        return ModelShape.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"config.json has an unusable shape: {exc.errors()[0]['msg']}") from None


def config_from_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json-style keys from a GGUF file's metadata (read with the `gguf` package)."""
    from gguf import GGUFReader  # a trainer extra; only local GGUF files need it

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        if field is None:
            return None
        if len(field.data) == 1:
            return field.parts[field.data[0]].tolist()[0]
        return len(field.data)  # an array: its length (the tokenizer's token list)

    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    tensors = {t.name for t in reader.tensors}
    return {
        "hidden_size": value(f"{arch}.embedding_length"),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "num_attention_heads": value(f"{arch}.attention.head_count"),
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
        "vocab_size": value(f"{arch}.vocab_size") or value("tokenizer.ggml.tokens"),
        "head_dim": value(f"{arch}.attention.key_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "num_local_experts": value(f"{arch}.expert_count"),
    }


# --------------------------------------------------------------------------- I/O


Fetch = Callable[[BaseModelSpec, float], dict[str, Any]]


def local_path(base: BaseModelSpec) -> Path | None:
    """The directory a file:// or mounted pvc:// uri names here, if it exists."""
    if base.uri.startswith("file://"):
        return Path(base.uri.removeprefix("file://"))
    if base.uri.startswith("pvc://"):
        claim_path = base.uri.removeprefix("pvc://")
        path = Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)) / claim_path
        return path if path.exists() else None
    return None


def _read_s3(base: BaseModelSpec, timeout: float, settings: Settings | None) -> dict[str, Any]:
    """config.json through `objectstore.read_object`: signed only for the operator's own
    endpoints, at most 1 MiB, within the timeout (no thread left behind)."""
    from lora_operator import objectstore

    chosen = (settings or load_settings()).model_copy(
        update={"config_read_timeout_seconds": timeout})
    bucket, _, prefix = base.uri.removeprefix("s3://").partition("/")
    key = (prefix.rstrip("/") + "/config.json").lstrip("/")
    try:
        body = objectstore.read_object(f"s3://{bucket}/{key}", endpoint=base.endpoint,
                                       region=chosen.s3_region, settings=chosen)
    except objectstore.ObjectStoreError as exc:
        raise FetchError(str(exc)) from None
    return dict(json.loads(body))


def _read_hf(base: BaseModelSpec, timeout: float) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    repo = base.uri.removeprefix("hf://")
    path = hf_hub_download(repo, "config.json", revision=base.revision, etag_timeout=timeout,
                           token=os.environ.get("HF_TOKEN"))
    return dict(json.loads(Path(path).read_text()))


def default_fetch(base: BaseModelSpec, timeout: float,
                  settings: Settings | None = None) -> dict[str, Any]:
    """config.json (or GGUF metadata) as a dict from the model's location; FetchError if not.

    `settings` decide which S3 endpoints are signed for (None: the operator's settings file).
    """
    try:
        local = local_path(base)
        if local is not None:
            if local.suffix == ".gguf":  # the uri names the GGUF file itself
                return config_from_gguf(local)
            if base.gguf_file:
                return config_from_gguf(local / base.gguf_file)
            return dict(json.loads((local / "config.json").read_text()))
        if base.gguf_file:
            raise FetchError("GGUF metadata is only read from local files")
        if base.uri.startswith("s3://"):
            return _read_s3(base, timeout, settings)
        if base.uri.startswith("hf://"):
            return _read_hf(base, timeout)
        raise FetchError("no mounted path for this pvc:// uri here")
    except FetchError:
        raise
    except Exception as exc:  # boto, hub and file errors alike: the caller falls back
        raise FetchError(f"{type(exc).__name__}: {exc}") from exc


def _with_deadline(fetch: Fetch, base: BaseModelSpec, timeout: float) -> dict[str, Any]:
    """Run `fetch` with a hard deadline: DNS lookups and retries can outlive their timeouts."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["ok"] = fetch(base, timeout)
        except Exception as exc:
            box["err"] = exc

    thread = threading.Thread(target=target, daemon=True, name="config-fetch")
    thread.start()
    thread.join(timeout + 1.0)
    if "ok" in box:
        return dict(box["ok"])
    if "err" in box:
        raise FetchError(str(box["err"]))
    raise FetchError(f"no answer within {timeout:g} s")


ShapeKey = tuple[str, str | None, str | None, str | None]
_CACHE: dict[ShapeKey, ShapeSource] = {}
# A failed read is remembered briefly so that a burst on an unreachable model does not wait
# out one fetch deadline per job behind the single-flight lock.
_FAILED: dict[ShapeKey, tuple[float, str]] = {}
FAILURE_TTL_S = 15.0
_CACHE_LOCK = threading.Lock()
_KEY_LOCKS: dict[ShapeKey, threading.Lock] = {}


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
        _FAILED.clear()
        _KEY_LOCKS.clear()


def _key_lock(key: ShapeKey) -> threading.Lock:
    with _CACHE_LOCK:
        return _KEY_LOCKS.setdefault(key, threading.Lock())


def resolve_shape(base: BaseModelSpec, *, fetch: Fetch | None = None,
                  timeout: float = 10.0, settings: Settings | None = None) -> ShapeSource:
    """The base model's shape and its source; ShapeUnavailable when nothing trustworthy.

    Successful reads of config.json are cached in-process by (uri, revision, ggufFile,
    endpoint): a model's config does not change under a fixed revision, and the operator
    re-plans often. `settings` reach the default fetch (which endpoints are signed for).
    """
    if fetch is None:
        fetch = functools.partial(default_fetch, settings=settings)
    key = (base.uri, base.revision, base.gguf_file, base.endpoint)
    with _key_lock(key):  # single flight: a burst on one base model reads its config once
        with _CACHE_LOCK:
            if key in _CACHE:
                return _CACHE[key]
        return _resolve_uncached(base, key, fetch, timeout)


def _resolve_uncached(base: BaseModelSpec, key: ShapeKey, fetch: Fetch,
                      timeout: float) -> ShapeSource:
    tried: list[str] = []
    gguf = base.gguf_file or base.uri.endswith(".gguf")
    what = "GGUF metadata" if gguf else "config.json"
    # s3:// reads carry their own deadline (objectstore); the hub client needs the thread.
    remote = base.uri.startswith("hf://")
    failed = _FAILED.get(key)
    if failed is not None and time.monotonic() - failed[0] < FAILURE_TTL_S:
        tried.append(failed[1])
    else:
        try:
            # Only network reads need the hard deadline; a local file is read (and gguf
            # imported) in this thread, however slow the first import is.
            config = _with_deadline(fetch, base, timeout) if remote else fetch(base, timeout)
            found = ShapeSource(shape_from_config(config), f"{what} at {base.uri}"
                                + (f" ({base.gguf_file})" if base.gguf_file else ""))
            with _CACHE_LOCK:
                _CACHE[key] = found
                _FAILED.pop(key, None)
            return found
        except (FetchError, ValueError, OSError) as exc:
            tried.append(f"{what} at {base.uri}: {exc}")
            _FAILED[key] = (time.monotonic(), tried[-1])
    if base.shape is not None:
        return ShapeSource(base.shape, "spec.baseModel.shape")
    tried.append("spec.baseModel.shape: not set")
    return _from_table(base, tried)


def _from_table(base: BaseModelSpec, tried: list[str]) -> ShapeSource:
    if base.architecture:
        name = known_name_for(base.architecture)
        if name:
            return ShapeSource(KNOWN_SHAPES[name], f"known architecture {name}")
        tried.append(f"spec.baseModel.architecture {base.architecture!r}: not a known name")
    else:
        tried.append("spec.baseModel.architecture: not set")
    if base.uri.startswith("hf://"):
        name = known_name_for(base.uri.removeprefix("hf://"))
        if name:
            return ShapeSource(KNOWN_SHAPES[name], f"known architecture {name} (from the repo name)")
        tried.append("the hf:// repo name: not in the known-architecture table")
    raise ShapeUnavailable(
        "cannot size the base model: " + "; ".join(tried) + ". Fix: make config.json "
        "readable at the uri, or set spec.baseModel.shape (hiddenSize, intermediateSize, "
        "numHiddenLayers, numAttentionHeads, numKeyValueHeads, vocabSize) or "
        f"spec.baseModel.architecture (one of: {', '.join(sorted(KNOWN_SHAPES))})")

"""Writing the finished adapter: files, model card, metrics, merged model, manifest last.

The manifest is uploaded only after every file it lists, so its presence means "complete",
and its job uid is how a later job knows the prefix is taken (OUTPUT_CONFLICT unless
`output.overwrite`).

Two writers never interleave at one prefix (two attempts of one job, or two jobs naming
the same output): each attempt uploads under its own staging prefix
(`<output>/.staging/<uid>-a<attempt>-<random>/`), then publishes while holding a lock object
created with a conditional PUT (`<output>/.publish.lock`, `If-None-Match: *`, a lease that
a later attempt may take over only once expired, with `If-Match`). Under the lock it reads
manifest.json with its ETag, applies the overwrite rule, copies the staged files in, and
writes manifest.json last, again conditionally: `If-None-Match: *` for a new adapter,
`If-Match: <the ETag it read>` for a replacement; so of two racing attempts at most one
manifest lands and it describes the files that are there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_operator import api
from lora_operator.contract import ExitCode, JobIdentity, uri_under
from lora_trainer import storage
from lora_trainer.errors import TrainerError, redact
from lora_trainer.model import ModelSource

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGING = ".staging"
LOCK = ".publish.lock"
LOCK_LEASE_SECONDS = 600.0
LOCK_POLL_SECONDS = 1.0
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json")


@dataclass(frozen=True)
class Exported:
    """Where the adapter went and what the manifest says about it."""

    adapter_uri: str
    manifest_uri: str
    manifest_sha256: str
    size_bytes: int
    merged_uri: str | None


def check_output_conflict(output_uri: str, job: JobIdentity, overwrite: bool,
                          opts: storage.StorageOptions) -> None:
    """Refuse to replace another job's adapter (a manifest with a different job uid).

    An early answer before training; `publish` applies the same rule again under its lock.
    """
    refuse_replacing(storage.read_text(_join(output_uri, MANIFEST), opts), output_uri, job,
                     overwrite)


def refuse_replacing(text: str | None, output_uri: str, job: JobIdentity, overwrite: bool) -> None:
    """The overwrite rule on the manifest found at the output (None: there is none).

    `overwrite` replaces only an adapter written from the job's own namespace: a tenant may
    not clobber another namespace's adapter in shared storage (issue 13, item 8).
    """
    if text is None:
        return
    try:
        recorded = json.loads(text).get("job", {})
        owner, owner_ns = recorded.get("uid"), recorded.get("namespace")
    except (json.JSONDecodeError, AttributeError):
        owner = owner_ns = None
    if owner == job.uid:
        return
    if not overwrite:
        raise TrainerError(ExitCode.OUTPUT_CONFLICT,
                           f"{output_uri} already holds the adapter of job uid {owner!r}; "
                           "choose another output.uri or set output.overwrite: true")
    if owner_ns != job.namespace:
        raise TrainerError(ExitCode.OUTPUT_CONFLICT,
                           f"{output_uri} holds an adapter written from namespace {owner_ns!r}; "
                           "output.overwrite only replaces adapters of the same namespace "
                           f"({job.namespace!r})")


def check_output_allowed(output_uri: str, checkpoint_uri: str,
                         prefixes: list[str] | None) -> None:
    """The operator's storagePrefixes for this namespace, enforced again where the writes
    happen: a config edited past the operator (or an operator bug) cannot write elsewhere."""
    if prefixes is None:
        return
    for what, uri in (("spec.output.uri", output_uri), ("checkpoint uri", checkpoint_uri)):
        if not uri_under(uri, prefixes):
            raise TrainerError(ExitCode.CONFIG,
                               f"{what} {uri} is outside the storage prefixes allowed for this "
                               f"namespace: {', '.join(prefixes) or 'none'}")


def verify_adapter(adapter_dir: Path) -> int:
    """Fail loudly on an empty adapter (the ZeRO-3 trap); returns its parameter count."""
    from safetensors import safe_open

    path = adapter_dir / ADAPTER_FILES[0]
    if not path.is_file():
        raise TrainerError(ExitCode.INTERNAL, f"no {path.name} was written")
    total = 0
    opener: Any = safe_open
    with opener(str(path), framework="pt") as fh:
        keys = list(fh.keys())
        for key in keys:
            numel = fh.get_slice(key).get_shape()
            count = 1
            for dim in numel:
                count *= int(dim)
            if count == 0:
                raise TrainerError(ExitCode.INTERNAL, f"adapter tensor {key} is empty: parameters "
                                                      "were not gathered before saving")
            total += count
    if not keys:
        raise TrainerError(ExitCode.INTERNAL, "the saved adapter has no tensors")
    return total


def model_card(spec: api.LoRAJobSpec, job: JobIdentity, metrics: dict[str, Any]) -> str:
    """README.md beside the adapter: base, data, hyperparameters and metrics (URL query
    strings redacted)."""
    lines = [
        "---", "library_name: peft", f"base_model: {spec.base_model.uri}", "tags: [lora, lora-operator]",
        "---", "", f"# {job.name}", "",
        f"LoRA adapter trained by lora-operator (job `{job.namespace}/{job.name}`, uid `{job.uid}`).",
        "", "## Base model", "", f"- uri: `{spec.base_model.uri}`",
    ]
    if spec.base_model.gguf_file:
        lines.append(f"- GGUF file: `{spec.base_model.gguf_file}` (dequantized on load)")
    lines += ["", "## Data", "", f"- train: `{spec.dataset.uri}` (format {metrics.get('format')})"]
    for split, stats in metrics.get("data", {}).items():
        lines.append(f"- {split}: {stats.get('examples')} examples, {stats.get('tokens')} tokens, "
                     f"{stats.get('truncated')} truncated")
    hyper = {"method": metrics.get("method"), "r": spec.lora.r, "alpha": spec.lora.alpha,
             "dropout": spec.lora.dropout, "target_modules": spec.lora.target_modules,
             "dora": spec.lora.use_dora, "rslora": spec.lora.use_rslora,
             **spec.training.model_dump(mode="json", exclude_none=True)}
    lines += ["", "## Hyperparameters", "", "| name | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyper.items()]
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in metrics.get("eval", {}).items()]
    for sample in metrics.get("samples", []):
        lines += ["", f"**Prompt:** {sample['prompt']}", "", f"- base: {sample['base']}",
                  f"- adapter: {sample['adapter']}"]
    lines += ["", "## Use", "", "```python", "from peft import PeftModel",
              "model = PeftModel.from_pretrained(base_model, 'path/to/this/folder')", "```", ""]
    return redact("\n".join(lines))  # a presigned dataset URL's signature is a credential


def manifest(job: JobIdentity, spec: api.LoRAJobSpec, files: dict[str, storage.FileDigest],
             staged_uri: str = "") -> dict[str, Any]:
    """manifest.json: every file's size and sha256, and who wrote it (and from which
    staging prefix: unique per attempt, so two publications never have the same bytes)."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": "AdapterManifest",
        "job": {"uid": job.uid, "name": job.name, "namespace": job.namespace,
                "attempt": job.attempt},
        "createdAt": api.now_rfc3339(),
        "publication": staged_uri.rstrip("/").rsplit("/", 1)[-1],
        "baseModel": redact(spec.base_model.uri),
        "files": {name: {"size": d.size, "sha256": d.sha256} for name, d in files.items()},
        "totalBytes": sum(d.size for d in files.values()),
    }


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def _present(folder: Path, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if (folder / n).is_file()]


def staging_uri(output_uri: str, job: JobIdentity) -> str:
    """This attempt's private prefix: no other attempt ever writes under it."""
    return _join(output_uri, f"{STAGING}/{job.uid}-a{job.attempt}-{secrets.token_hex(4)}/")


def upload_adapter(folder: Path, output_uri: str, job: JobIdentity, spec: api.LoRAJobSpec,
                   opts: storage.StorageOptions) -> Exported:
    """Upload in the documented order (adapter, tokenizer, card, metrics, merged) to this
    attempt's staging prefix, then publish it into `output_uri` with the manifest last."""
    groups = [_present(folder, ADAPTER_FILES), _present(folder, TOKENIZER_FILES),
              _present(folder, ("README.md",)), _present(folder, ("metrics.json",))]
    merged = folder / "merged"
    if merged.is_dir():
        groups.append(sorted(str(p.relative_to(folder)) for p in merged.rglob("*") if p.is_file()))
    staged = staging_uri(output_uri, job)
    files: dict[str, storage.FileDigest] = {}
    for group in groups:
        if group:
            files.update(storage.upload(folder, group, staged, opts).files)
    body = (json.dumps(manifest(job, spec, files, staged), indent=2) + "\n").encode()
    try:
        publish(staged, output_uri, list(files), body, job, spec.output.overwrite, opts)
    finally:
        storage.delete_prefix(staged, opts)  # ours alone; the published copies stay
    adapter_bytes = sum(files[n].size for n in ADAPTER_FILES if n in files)
    return Exported(adapter_uri=output_uri, manifest_uri=_join(output_uri, MANIFEST),
                    manifest_sha256=hashlib.sha256(body).hexdigest(), size_bytes=adapter_bytes,
                    merged_uri=_join(output_uri, "merged/") if merged.is_dir() else None)


@dataclass
class PublishLock:
    """The lock object this attempt holds: its URI, its version tag and its lease."""

    uri: str
    etag: str
    body: dict[str, Any]
    renewed: float


def _lock_body(job: JobIdentity, lease: float) -> dict[str, Any]:
    return {"job": {"uid": job.uid, "namespace": job.namespace, "name": job.name,
                    "attempt": job.attempt},
            "token": secrets.token_hex(8), "expiresAt": time.time() + lease}


def _expired(text: str) -> bool:
    """A lock whose holder's lease ran out (or that is not a lock we can read)."""
    try:
        return float(json.loads(text).get("expiresAt", 0)) < time.time()
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return True


def acquire_lock(output_uri: str, job: JobIdentity, opts: storage.StorageOptions,
                 lease: float = LOCK_LEASE_SECONDS, wait: float | None = None) -> PublishLock:
    """Take `<output>/.publish.lock`: create it (If-None-Match: *), or take over an expired
    one (If-Match: its ETag); while another attempt holds a live lease, wait for it.
    Exactly one of any number of racing attempts gets it."""
    uri = _join(output_uri, LOCK)
    deadline = time.monotonic() + (lease + 30.0 if wait is None else wait)
    while True:
        body = _lock_body(job, lease)
        data = json.dumps(body).encode()
        current = storage.read_versioned(uri, opts)
        etag: str | None = None
        if current is None:
            etag = storage.put_if(uri, data, opts, None)
        elif _expired(current.text):
            log.warning("taking over the expired publish lock at %s", uri)
            etag = storage.put_if(uri, data, opts, current.etag)
        if etag is not None:
            return PublishLock(uri, etag, body, time.monotonic())
        if time.monotonic() > deadline:
            raise TrainerError(ExitCode.STORAGE, f"{output_uri} is being published by another "
                                                 "attempt (its lock did not clear); retrying later")
        time.sleep(LOCK_POLL_SECONDS)


def renew_lock(lock: PublishLock, opts: storage.StorageOptions,
               lease: float = LOCK_LEASE_SECONDS) -> PublishLock:
    """Extend the lease, proving in the same conditional PUT that the lock is still ours."""
    body = {**lock.body, "expiresAt": time.time() + lease}
    etag = storage.put_if(lock.uri, json.dumps(body).encode(), opts, lock.etag)
    if etag is None:
        raise TrainerError(ExitCode.STORAGE, f"lost the publish lock {lock.uri} to another "
                                             "attempt (lease expired); nothing was published")
    return PublishLock(lock.uri, etag, body, time.monotonic())


def publish(staged_uri: str, output_uri: str, names: list[str], manifest_body: bytes,
            job: JobIdentity, overwrite: bool, opts: storage.StorageOptions) -> None:
    """Copy the staged files into `output_uri` and write manifest.json last, conditionally,
    all while holding the publish lock (see the module docstring)."""
    lock = acquire_lock(output_uri, job, opts)
    try:
        manifest_uri = _join(output_uri, MANIFEST)
        current = storage.read_versioned(manifest_uri, opts)
        refuse_replacing(current.text if current else None, output_uri, job, overwrite)
        for name in names:
            storage.copy_within(_join(staged_uri, name), _join(output_uri, name), opts)
            if time.monotonic() - lock.renewed > LOCK_LEASE_SECONDS / 3:
                lock = renew_lock(lock, opts)
        lock = renew_lock(lock, opts)
        if storage.put_if(manifest_uri, manifest_body, opts,
                          current.etag if current else None) is None:
            raise TrainerError(ExitCode.OUTPUT_CONFLICT,
                               f"another attempt published {manifest_uri} first; this "
                               "attempt's adapter was not published")
    finally:
        storage.delete_if(lock.uri, opts, lock.etag)


def merge(source: ModelSource, adapter_dir: Path, out_dir: Path) -> None:
    """A merged bf16 model: the base reloaded in bf16 (even after QLoRA) plus the adapter.

    Merging into the 4-bit weights would bake quantization error in; reloading the base in
    bf16 gives the model users expect.
    """
    import torch
    from peft import PeftModel

    from lora_trainer.model import load_model

    base = load_model(source, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(str(out_dir), safe_serialization=True)

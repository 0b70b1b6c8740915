"""Writing the finished adapter: files, model card, metrics, merged model, manifest last.

The manifest is uploaded only after every file it lists, so its presence means "complete",
and its job uid is how a later job knows the prefix is taken (OUTPUT_CONFLICT unless
`output.overwrite`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_operator import api
from lora_operator.contract import ExitCode, JobIdentity
from lora_trainer import storage
from lora_trainer.errors import TrainerError
from lora_trainer.model import ModelSource

MANIFEST = "manifest.json"
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
    """Refuse to replace another job's adapter (a manifest with a different job uid)."""
    text = storage.read_text(_join(output_uri, MANIFEST), opts)
    if text is None or overwrite:
        return
    try:
        owner = json.loads(text).get("job", {}).get("uid")
    except (json.JSONDecodeError, AttributeError):
        owner = None
    if owner != job.uid:
        raise TrainerError(ExitCode.OUTPUT_CONFLICT,
                           f"{output_uri} already holds the adapter of job uid {owner!r}; "
                           "choose another output.uri or set output.overwrite: true")


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
    """README.md beside the adapter: base, data, hyperparameters and metrics."""
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
    return "\n".join(lines)


def manifest(job: JobIdentity, spec: api.LoRAJobSpec,
             files: dict[str, storage.FileDigest]) -> dict[str, Any]:
    """manifest.json: every file's size and sha256, and who wrote it."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": "AdapterManifest",
        "job": {"uid": job.uid, "name": job.name, "namespace": job.namespace,
                "attempt": job.attempt},
        "createdAt": api.now_rfc3339(),
        "baseModel": spec.base_model.uri,
        "files": {name: {"size": d.size, "sha256": d.sha256} for name, d in files.items()},
        "totalBytes": sum(d.size for d in files.values()),
    }


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def _present(folder: Path, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if (folder / n).is_file()]


def upload_adapter(folder: Path, output_uri: str, job: JobIdentity, spec: api.LoRAJobSpec,
                   opts: storage.StorageOptions) -> Exported:
    """Upload in the documented order (adapter, tokenizer, card, metrics, merged), manifest last."""
    groups = [_present(folder, ADAPTER_FILES), _present(folder, TOKENIZER_FILES),
              _present(folder, ("README.md",)), _present(folder, ("metrics.json",))]
    merged = folder / "merged"
    if merged.is_dir():
        groups.append(sorted(str(p.relative_to(folder)) for p in merged.rglob("*") if p.is_file()))
    files: dict[str, storage.FileDigest] = {}
    for group in groups:
        if group:
            files.update(storage.upload(folder, group, output_uri, opts).files)
    (folder / MANIFEST).write_text(json.dumps(manifest(job, spec, files), indent=2) + "\n")
    sent = storage.upload(folder, [MANIFEST], output_uri, opts).files[MANIFEST]
    adapter_bytes = sum(files[n].size for n in ADAPTER_FILES if n in files)
    return Exported(adapter_uri=output_uri, manifest_uri=_join(output_uri, MANIFEST),
                    manifest_sha256=sent.sha256, size_bytes=adapter_bytes,
                    merged_uri=_join(output_uri, "merged/") if merged.is_dir() else None)


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

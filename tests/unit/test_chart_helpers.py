"""Helpers (no tests) for the chart and Dockerfile tests: find helm, render the chart, read Dockerfiles.

helm is the binary hack/cluster/build.sh builds (cached in ~/.cache/lora-operator), or
$LORA_HELM, or one on PATH. Rendering needs no cluster (`helm template`).
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lora-operator"
KUBE_VERSION = "1.34.0"


@functools.cache
def helm_binary() -> str:
    """The helm that hack/cluster/build.sh builds; built (and cached outside the repo) when
    missing, so these tests never skip on a fresh machine."""
    candidates = [os.environ.get("LORA_HELM", ""),
                  str(Path(os.environ.get("LORA_OPERATOR_CACHE",
                                          Path.home() / ".cache" / "lora-operator"))
                      / "current" / "bin" / "helm"),
                  shutil.which("helm") or ""]
    found = next((c for c in candidates if c and Path(c).is_file()), None)
    if found:
        return found
    sys.path.insert(0, str(REPO / "hack" / "cluster"))
    import localcluster  # dev/test infrastructure

    return str(localcluster.build(quiet=True) / "helm")


def render(helm: str, *set_args: str, values: dict[str, Any] | None = None,
           namespace: str = "lora-system", release: str = "lora") -> list[dict[str, Any]]:
    """`helm template` → the list of manifests (CRDs excluded)."""
    cmd = [helm, "template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION]
    for s in set_args:
        cmd += ["--set", s]
    if values is not None:
        cmd += ["-f", "-"]
    out = subprocess.run(cmd, input=yaml.safe_dump(values) if values is not None else None,
                         capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def dockerfile_final_stage(path: Path) -> list[tuple[str, str]]:
    instrs = dockerfile_instructions(path)
    last_from = max(i for i, (k, _) in enumerate(instrs) if k == "FROM")
    return instrs[last_from:]


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for k, args in stage:
        if k == "ENV":
            for tok in shlex.split(args):
                name, _, value = tok.partition("=")
                env[name] = value
    return env


def dockerfile_json(stage: list[tuple[str, str]], instr: str) -> list[str] | None:
    for k, args in reversed(stage):
        if k == instr:
            value = yaml.safe_load(args)
            assert isinstance(value, list), f"{instr} must use the exec (JSON) form"
            return [str(v) for v in value]
    return None


def dockerfile_user(stage: list[tuple[str, str]]) -> tuple[int, int]:
    users = [args for k, args in stage if k == "USER"]
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    return int(uid), int(gid or uid)

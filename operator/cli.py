"""`lora-operator`: plan a LoRAJob without a cluster, or run the operator.

    lora-operator plan job.yaml [-o text|json] [--config settings.yaml]
    lora-operator plan sweep.yaml   (a LoRASweep: every trial it would create is planned)
    lora-operator run [--config settings.yaml] [--namespace NS ...] [--standalone] ...

`plan` exits 0 when every job in the file has a placement, 1 when one does not fit or its
model cannot be sized, and 2 when the file or a manifest is invalid (the message names the
field), so scripts and CI can tell a bad manifest from a job too big for the cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lora_operator import api, localrun, sweep_api
from lora_operator.plan.placement import PlacementDecision, place
from lora_operator.plan.shapes import ShapeSource, ShapeUnavailable, resolve_shape
from lora_operator.settings import Settings, SettingsError, load_settings

EXIT_OK, EXIT_NO_FIT, EXIT_INVALID = 0, 1, 2
DEFAULT_SHAPE_TIMEOUT = 5.0


class _InvalidInputError(Exception):
    """The input file or a manifest in it is unusable (exit 2)."""


def _load_jobs(path: str) -> list[api.LoRAJob]:
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except OSError as exc:
        raise _InvalidInputError(f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise _InvalidInputError(f"{path}: not valid YAML: {exc}") from None
    jobs: list[api.LoRAJob] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise _InvalidInputError(f"{path}: document {i + 1} is not a mapping")
        kind = doc.get("kind", api.KIND)
        if kind not in (api.KIND, sweep_api.KIND):
            continue  # Secrets, ConfigMaps... shipped beside the job
        localrun.resolve_local_uris(doc, Path(path).resolve().parent)
        try:
            jobs += [api.parse_lorajob(doc)] if kind == api.KIND else _sweep_trials(doc)
        except api.SpecError as exc:
            lines = "\n".join(f"  {p or '(root)'}: {m}" for p, m in exc.errors)
            raise _InvalidInputError(f"{path}: document {i + 1} is not a valid {kind}:\n{lines}") from None
    if not jobs:
        raise _InvalidInputError(f"{path}: no LoRAJob or LoRASweep in the file")
    return jobs


def _sweep_trials(doc: dict[str, Any]) -> list[api.LoRAJob]:
    """The LoRAJobs a LoRASweep would create: a sweep fits only if its largest trial does,
    and rank or method can move a trial across a VRAM class, so each is planned."""
    from lora_operator.reconcile import sweep  # pure; kept out of the LoRAJob-only path

    spec = sweep_api.parse_sweep(doc).spec
    meta = {**(doc.get("metadata") or {}), "uid": "plan"}
    trials = sweep.generate_trials(spec)
    return [api.parse_lorajob(sweep.child_lorajob({"metadata": meta}, spec, i, params))
            for i, params in enumerate(trials)]


def _plan_one(job: api.LoRAJob, settings: Settings, timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {"name": job.metadata.name, "namespace": job.metadata.namespace}
    try:
        source: ShapeSource = resolve_shape(job.spec.base_model, timeout=timeout,
                                              settings=settings)
    except ShapeUnavailable as exc:
        return {**out, "shapeSource": None, "error": str(exc)}
    decision: PlacementDecision = place(job.spec, source.shape, settings)
    return {**out, **decision.to_json(), "shapeSource": source.source}


def _text(result: dict[str, Any]) -> str:
    title = f"LoRAJob {result.get('namespace') or 'default'}/{result.get('name') or '(unnamed)'}"
    lines = [title]
    if result.get("shapeSource"):
        lines.append(f"  shape from      {result['shapeSource']}")
    if result.get("estimatedVramGiB") is not None and result.get("breakdown"):
        cls = result.get("vramClass") or "-"
        lines += [
            f"  method          {result['method']}",
            f"  vram class      {cls} × {result['gpus']} GPU(s), deepspeed {result['deepspeed']}",
            f"  estimated peak  {result['estimatedVramGiB']:.2f} GiB per GPU"
            + (f" (usable {result['capacityGiB']:.2f} GiB)" if result.get("capacityGiB") else ""),
            "  breakdown (GiB):",
        ]
        lines += [f"    {k:<18}{v:8.2f}" for k, v in result["breakdown"].items() if v > 0.0005]
    if result.get("error"):
        lines.append(f"  ERROR: {result['error']}")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    # The hub client logs every retry of an unreachable host; the plan reports the outcome.
    logging.getLogger("huggingface_hub").setLevel(logging.CRITICAL)
    try:
        settings = load_settings(args.config)
    except (OSError, SettingsError) as exc:
        print(f"error: settings: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        jobs = _load_jobs(args.file)
    except _InvalidInputError as exc:
        if args.output == "json":
            print(json.dumps({"error": str(exc)}, indent=2))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    results = [_plan_one(job, settings, args.shape_timeout) for job in jobs]
    if args.output == "json":
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    else:
        print("\n\n".join(_text(r) for r in results))
    return EXIT_NO_FIT if any(r.get("error") for r in results) else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    # Imported here: `plan` must work where kopf and the reconcile code are not installed.
    from lora_operator.reconcile import runner  # type: ignore[attr-defined,unused-ignore]

    code = runner.run_operator(args)
    return int(code) if isinstance(code, int) else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-operator", description=(
        "Kubernetes operator for LoRA/QLoRA fine-tuning jobs (LoRAJob)."))
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="estimate VRAM and choose a placement for a manifest",
                          description="Plan LoRAJob manifests without a cluster.")
    plan.add_argument("file", help="YAML file with LoRAJob or LoRASweep documents")
    plan.add_argument("-o", "--output", choices=["text", "json"], default="text")
    plan.add_argument("--config", help="operator settings YAML (default: packaged settings, "
                                       "or $LORA_OPERATOR_CONFIG)")
    plan.add_argument("--shape-timeout", type=float, default=DEFAULT_SHAPE_TIMEOUT,
                      help="seconds to wait for the model's config.json (default 5)")
    plan.set_defaults(func=cmd_plan)
    run = sub.add_parser("run", help="run the operator", description="Run the operator.")
    run.add_argument("--config", help="operator settings YAML")
    run.add_argument("--namespace", "-n", action="append", default=[],
                     help="namespace to watch (repeatable)")
    run.add_argument("--all-namespaces", "-A", action="store_true",
                     help="watch every namespace (the default when none is given)")
    run.add_argument("--peering", metavar="NAME", help="kopf peering object name")
    run.add_argument("--standalone", action="store_true", help="no peering (single replica)")
    run.add_argument("--metrics-port", type=int, default=8080,
                     help="Prometheus metrics port (default 8080)")
    run.add_argument("--liveness", metavar="URL",
                     help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""`lora-trainer`: the pod entry point and the local `run` command.

    lora-trainer [pod]                       # in a pod: reads $LORA_TRAINER_CONFIG
    lora-trainer run --job job.yaml [--output URI] [--base-model URI] [--device cpu|cuda]

Whatever happens, the process ends with an exit code from `contract.ExitCode` and (where
writable) a ≤ 4 KiB `TrainerResult` at the termination-message path, so the operator knows
the verdict even when every progress patch was lost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from pydantic import ValidationError

from lora_operator import api, localrun
from lora_operator.contract import (
    CONFIG_DIR,
    CONFIG_ENV,
    CONFIG_KEY,
    RESULT_MAX_BYTES,
    TERMINATION_MESSAGE_ENV,
    TERMINATION_MESSAGE_PATH,
    ExitCode,
    JobIdentity,
    TrainerConfig,
    TrainerResult,
    checkpoint_uri_for,
)
from lora_trainer import deepspeed_config, launch, progress
from lora_trainer.errors import TrainerError, classify

log = logging.getLogger("lora_trainer")


# --------------------------------------------------------------------------- config


def load_pod_config(path: Path) -> TrainerConfig:
    """The TrainerConfig the operator rendered; CONFIG error when unreadable or invalid."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TrainerError(ExitCode.CONFIG, f"cannot read trainer config {path}: {exc}") from None
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as exc:
        errors = api.SpecError(api.errors_of(exc))
        raise TrainerError(ExitCode.CONFIG, f"invalid trainer config {path}: {errors}") from None


def local_identity(job: api.LoRAJob, manifest_text: str) -> JobIdentity:
    """A made-up identity for a local run: stable per manifest, so a rerun resumes."""
    name = job.metadata.name or "local"
    digest = hashlib.sha256(f"{name}\n{manifest_text}".encode()).hexdigest()
    return JobIdentity(name=name, namespace=job.metadata.namespace or "default",
                       uid=job.metadata.uid or f"local-{digest[:16]}")


def read_manifest(job_file: Path, output: str | None = None) -> tuple[api.LoRAJob, str]:
    """A LoRAJob manifest from disk (local shorthands resolved) and its text."""
    try:
        text = job_file.read_text()
        raw = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        raise TrainerError(ExitCode.CONFIG, f"cannot read {job_file}: {exc}") from None
    if isinstance(raw, dict):
        localrun.resolve_local_uris(raw, job_file.resolve().parent)
        if output:
            raw.setdefault("spec", {}).setdefault("output", {})["uri"] = output
    try:
        return api.parse_lorajob(raw if isinstance(raw, dict) else {}), text
    except api.SpecError as exc:
        raise TrainerError(ExitCode.CONFIG, f"{job_file}: {exc}") from None


def local_config(job_file: Path, output: str | None, device: str) -> TrainerConfig:
    """A TrainerConfig for `lora-trainer run`: the manifest, planned for this machine."""
    from lora_trainer.plan_local import plan_local

    job, text = read_manifest(job_file, output)
    identity = local_identity(job, text + (output or ""))
    return TrainerConfig(job=identity, spec=job.spec, placement=plan_local(job.spec, device),
                         checkpoint_uri=checkpoint_uri_for(job.spec.output.uri, identity.uid))


# --------------------------------------------------------------------------- result


def termination_path() -> Path:
    return Path(os.environ.get(TERMINATION_MESSAGE_ENV, TERMINATION_MESSAGE_PATH))


def encode_result(result: TrainerResult) -> str:
    """The result as compact JSON, its message trimmed until the whole fits 4 KiB."""
    text = result.model_dump_json(by_alias=True, exclude_none=True)
    while len(text.encode()) > RESULT_MAX_BYTES and result.message:
        result = result.model_copy(update={"message": result.message[: len(result.message) // 2]})
        text = result.model_dump_json(by_alias=True, exclude_none=True)
    return text


def write_result(result: TrainerResult, path: Path | None = None) -> None:
    """Write the termination message; locally an unwritable /dev/termination-log is skipped."""
    target = path or termination_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(encode_result(result))
    except OSError:
        log.debug("termination message path %s not writable; skipped", target)


# --------------------------------------------------------------------------- running


def _install_sigterm(ctx: Any) -> None:
    """SIGTERM: while training, save a checkpoint and stop; before that, stop at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        ctx.preemption.requested = True
        if not ctx.preemption.training:
            raise TrainerError(ExitCode.PREEMPTED, "stopped by SIGTERM before training started")

    signal.signal(signal.SIGTERM, handler)


def execute(config: TrainerConfig, device: str, base_model_uri: str | None = None,
            workdir: Path | None = None) -> tuple[ExitCode, TrainerResult]:
    """Run the job and classify the outcome; never raises (the exit code says it all)."""
    from lora_trainer.job import RunContext, run_job

    result = TrainerResult(exit_code=0, reason=ExitCode.OK.reason)
    tmp = Path(tempfile.mkdtemp(prefix="lora-trainer-", dir=workdir))
    ctx = RunContext(device=device, workdir=tmp, base_model_uri=base_model_uri)
    _install_sigterm(ctx)
    code, message = ExitCode.OK, "adapter written"
    try:
        run_job(config, ctx, result)
    except TrainerError as exc:
        code, message = exc.code, exc.message
    except Exception as exc:  # MemoryError and RecursionError included: see classify
        code, message = classify(exc)
        if code == ExitCode.INTERNAL and not isinstance(exc, MemoryError | RecursionError):
            traceback.print_exc()
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    result.exit_code, result.reason, result.message = int(code), code.reason, message
    return code, result


def finish(code: ExitCode, result: TrainerResult) -> int:
    write_result(result)
    progress.emit("result", **json.loads(encode_result(result)))
    if code != ExitCode.OK:
        log.error("%s (exit %d): %s", code.reason, int(code), result.message)
    return int(code)


def detect_device(requested: str | None) -> str:
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_pod(args: argparse.Namespace) -> int:
    path = Path(os.environ.get(CONFIG_ENV, f"{CONFIG_DIR}/{CONFIG_KEY}"))
    try:
        config = load_pod_config(path)
    except TrainerError as exc:
        return finish(exc.code, TrainerResult(exit_code=int(exc.code), reason=exc.code.reason,
                                              message=exc.message))
    if deepspeed_config.needs_launch(config.placement.gpus):
        return launch_ranks(int(config.placement.gpus or 1))
    code, result = execute(config, detect_device(args.device))
    launch.record(code, result)
    return finish(code, result) if deepspeed_config.is_main_process() else int(code)


def launch_ranks(gpus: int) -> int:
    """Multi-GPU: torchrun as a child; exit with the ranks' recorded verdict (launch.py)."""
    command = deepspeed_config.launch_command(gpus, ["pod"])
    log.info("running torchrun on %s GPUs", gpus)
    code, result = launch.run_distributed(command)
    if result is not None:
        write_result(result)
    if code != ExitCode.OK:
        log.error("trainer ranks failed: exit %d", code)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    try:
        device = detect_device(args.device)
        config = local_config(Path(args.job), args.output, device)
    except TrainerError as exc:
        return finish(exc.code, TrainerResult(exit_code=int(exc.code), reason=exc.code.reason,
                                              message=exc.message))
    progress.emit("plan", job=config.job.model_dump(mode="json"),
                  placement=config.placement.model_dump(by_alias=True, exclude_none=True, mode="json"),
                  output=config.spec.output.uri, device=device)
    base_model = localrun.resolve_local_uri(args.base_model, Path.cwd()) if args.base_model else None
    code, result = execute(config, device, base_model_uri=base_model)
    if result.base_eval_loss is not None:
        print(f"held-out loss: base {result.base_eval_loss:.4f} → adapter "
              f"{result.adapter_eval_loss:.4f} ({(result.improvement or 0):.1%} better)",
              file=sys.stderr)
    return finish(code, result)


def cmd_preflight(args: argparse.Namespace) -> int:
    """The dataset preflight: locally on a manifest (--job), or in the operator's CPU-only
    preflight pod on the rendered config; the report is the termination message there."""
    import shutil

    from lora_trainer import preflight

    tmp = Path(tempfile.mkdtemp(prefix="lora-preflight-"))
    try:
        if args.job:
            spec = read_manifest(Path(args.job))[0].spec
        else:
            spec = load_pod_config(Path(os.environ.get(CONFIG_ENV,
                                                       f"{CONFIG_DIR}/{CONFIG_KEY}"))).spec
        model = localrun.resolve_local_uri(args.base_model, Path.cwd()) if args.base_model else None
        report = preflight.run_preflight(spec, tmp, model)
    except TrainerError as exc:
        report = preflight.failed_report(exc.code, exc.message)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = preflight.encode(report)
    code = preflight.exit_code(report)
    if not args.job:
        try:
            termination_path().write_text(text)
        except OSError:
            log.debug("termination message path not writable; skipped")
        progress.emit("preflight", **json.loads(text))
    elif args.format == "json":
        print(report.model_dump_json(by_alias=True, exclude_none=True, indent=2))
    else:
        print(preflight.render(report))
    return int(code)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    pod = sub.add_parser("pod", help="run the job rendered by the operator ($LORA_TRAINER_CONFIG)")
    pod.add_argument("--device", choices=["cpu", "cuda"], default=None)
    run = sub.add_parser("run", help="run a LoRAJob manifest on this machine")
    run.add_argument("--job", required=True, help="LoRAJob manifest (YAML)")
    run.add_argument("--output", help="override spec.output.uri (s3://, file://, pvc://)")
    run.add_argument("--base-model", help="override spec.baseModel.uri, e.g. a local GGUF file: "
                                          "file:///path/model.gguf (see `lora-trainer smollm2-path`)")
    run.add_argument("--device", choices=["cpu", "cuda"], default=None)
    pre = sub.add_parser("preflight", help="check the dataset before training (CPU only): rows, "
                         "format, token lengths, truncation, duplicates, overlap, refused rows")
    pre.add_argument("--job", help="LoRAJob manifest (YAML); without it, the pod's rendered config")
    pre.add_argument("--base-model", help="override spec.baseModel.uri for the tokenizer")
    pre.add_argument("-o", "--format", dest="format", choices=["text", "json"], default="text",
                     help="report format with --job (the pod always writes JSON)")
    sub.add_parser("smollm2-path", help="print the pip-installed SmolLM2-135M GGUF file's path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LORA_TRAINER_LOG", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(list(argv) if argv is not None else None)
    if args.command == "smollm2-path":
        from lora_trainer.model import smollm2_gguf_path

        print(smollm2_gguf_path())
        return 0
    if args.command == "run":
        return cmd_run(args)
    if args.command == "preflight":
        return cmd_preflight(args)
    if args.command is None:
        args.device = None
    return cmd_pod(args)

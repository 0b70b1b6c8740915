"""End to end on the tiny model: adapter + manifest, merge, exit codes, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lora_operator import localrun
from lora_operator.contract import ExitCode
from lora_trainer import cli

from .conftest import job_manifest, write_manifest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "LORA_TRAINER_LOG": "WARNING"}


def run_cli(manifest: Path, tmp: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    os.environ["LORA_TERMINATION_MESSAGE_PATH"] = str(tmp / "termination-log")
    code = cli.main(["run", "--job", str(manifest), "--device", "cpu"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    result = next(e for e in events if e["event"] == "result")
    return code, result


def test_full_run_writes_a_loadable_adapter_merged_model_and_manifest(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    test_file = Path(__file__).resolve().parents[3] / "examples/data/test.jsonl"
    manifest = write_manifest(tmp_path / "job.yaml", job_manifest(
        tiny_model_dir, f"file://{out}", output={"uri": f"file://{out}", "merge": True},
        dataset={"test": {"uri": f"file://{test_file}"}},
        evaluation={"prompts": ["Extract the order from this message.\nBob wants 2 mugs in Oslo."],
                    "maxNewTokens": 8}))
    code, result = run_cli(manifest, tmp_path, capsys)
    assert code == 0, result
    assert result["adapterEvalLoss"] < result["baseEvalLoss"]
    assert result["adapterTestLoss"] < result["baseTestLoss"]
    written = json.loads((tmp_path / "termination-log").read_text())
    assert written["exitCode"] == 0 and len(json.dumps(written)) <= 4096

    files = json.loads((out / "manifest.json").read_text())["files"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md",
                 "metrics.json", "merged/model.safetensors"):
        assert files[name]["size"] == (out / name).stat().st_size
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"][0]["adapter"] is not None
    assert all(t.numel() > 0 for t in load_file(str(out / "adapter_model.safetensors")).values())
    assert not (out / ".checkpoints").exists() or not any((out / ".checkpoints").rglob("*.safetensors"))

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        a, m = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(a, m, atol=0.05, rtol=0.02)  # merged is stored in bf16


def test_bad_data_fails_with_exit_data(tiny_model_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
                   '{"messages": "oops"}\n')
    manifest = write_manifest(tmp_path / "job.yaml", job_manifest(tiny_model_dir, f"file://{tmp_path}/o",
                                                                  data=bad))
    code, result = run_cli(manifest, tmp_path, capsys)
    assert code == ExitCode.DATA and "bad.jsonl:2" in result["message"]


def test_missing_model_fails_with_exit_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path / "job.yaml", job_manifest(tmp_path / "nowhere", f"file://{tmp_path}/o"))
    code, result = run_cli(manifest, tmp_path, capsys)
    assert code == ExitCode.MODEL and result["reason"] == "InvalidModel"


def test_another_jobs_adapter_is_not_overwritten(tiny_model_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"job": {"uid": "someone-else"}}))
    manifest = write_manifest(tmp_path / "job.yaml", job_manifest(tiny_model_dir, f"file://{out}"))
    code, result = run_cli(manifest, tmp_path, capsys)
    assert code == ExitCode.OUTPUT_CONFLICT and "someone-else" in result["message"]


def test_quality_gate_fails_with_its_exit_code(tiny_model_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    manifest = write_manifest(tmp_path / "job.yaml", job_manifest(
        tiny_model_dir, f"file://{out}", training={"maxSteps": 1, "learningRate": 1e-6},
        evaluation={"minImprovement": 0.9}))
    code, result = run_cli(manifest, tmp_path, capsys)
    assert code == ExitCode.QUALITY_GATE and "minImprovement" in result["message"]
    assert result["baseEvalLoss"] > 0 and not (out / "manifest.json").exists()


def _spawn(manifest: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lora_trainer", "run", "--job", str(manifest),
                             "--device", "cpu"], stdout=subprocess.PIPE, text=True, env=ENV)


def _adapter(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_resume_after_sigkill_gives_the_same_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    training = {"maxSteps": 12, "saveSteps": 4, "learningRate": 3e-3}
    lora = {"r": 4, "alpha": 8, "dropout": 0.1}  # dropout: the RNG state must resume too
    straight = write_manifest(tmp_path / "a.yaml", job_manifest(
        tiny_model_dir, f"file://{tmp_path}/a", training=training, lora=lora))
    assert _spawn(straight).wait(timeout=600) == 0

    killed = write_manifest(tmp_path / "b.yaml", job_manifest(
        tiny_model_dir, f"file://{tmp_path}/b", training=training, lora=lora))
    proc = _spawn(killed)
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"event": "checkpoint"' in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "b" / "manifest.json").exists()
    resumed = _spawn(killed)
    assert resumed.stdout is not None
    events = [json.loads(line) for line in resumed.stdout if line.startswith("{")]
    assert resumed.wait(timeout=600) == 0
    assert any(e["event"] == "resume" for e in events)

    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_local_uris_resolve_against_the_manifest(tmp_path: Path) -> None:
    assert localrun.resolve_local_uri("file:data/x.jsonl", tmp_path) == f"file://{tmp_path}/data/x.jsonl"
    assert localrun.resolve_local_uri("s3://b/k", tmp_path) == "s3://b/k"
    assert localrun.resolve_local_uri("file:@smollm2", tmp_path).endswith(".gguf")


def test_result_is_trimmed_to_4kib() -> None:
    from lora_operator.contract import TrainerResult

    text = cli.encode_result(TrainerResult(exit_code=1, reason="TrainerError", message="x" * 10000))
    assert len(text.encode()) <= 4096


def test_sigterm_saves_a_checkpoint_and_exits_preempted(tiny_model_dir: Path, tmp_path: Path) -> None:
    """What a node drain or suspend does: the trainer saves where it is and says Preempted, and
    the next run resumes from that step rather than from the last periodic checkpoint."""
    out = tmp_path / "o"
    termination = tmp_path / "termination-log"
    manifest = write_manifest(tmp_path / "job.yaml", job_manifest(
        tiny_model_dir, f"file://{out}", training={"maxSteps": 400, "saveSteps": 1000}))
    proc = subprocess.Popen([sys.executable, "-m", "lora_trainer", "run", "--job", str(manifest),
                             "--device", "cpu"], stdout=subprocess.PIPE, text=True,
                            env={**ENV, "LORA_TERMINATION_MESSAGE_PATH": str(termination)})
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"event": "progress"' in line and json.loads(line)["step"] >= 2:
            proc.send_signal(signal.SIGTERM)
            break
    rest = [json.loads(line) for line in proc.stdout if line.startswith("{")]
    assert proc.wait(timeout=300) == ExitCode.PREEMPTED
    result = json.loads(termination.read_text())
    assert result["reason"] == "Preempted" and "SIGTERM" in result["message"]
    saved = [e for e in rest if e["event"] == "checkpoint"]
    assert saved, "no checkpoint saved on SIGTERM"
    assert not (out / "manifest.json").exists()

    resumed = subprocess.Popen([sys.executable, "-m", "lora_trainer", "run", "--job", str(manifest),
                                "--device", "cpu"], stdout=subprocess.PIPE, text=True, env=ENV)
    assert resumed.stdout is not None
    for line in resumed.stdout:
        if '"event": "resume"' in line:
            assert json.loads(line)["checkpoint"] == f"checkpoint-{saved[-1]['step']}"
            break
    else:
        raise AssertionError("the second run did not resume")
    resumed.kill()
    resumed.wait(timeout=60)

"""`lora-operator plan`: every example plans, JSON keys, bad manifests exit 2 with field paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_operator.cli import EXIT_INVALID, EXIT_NO_FIT, EXIT_OK, main
from lora_operator.plan import shapes

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
FAST = ["--shape-timeout", "0.2"]  # no network here: fall back quickly

JOB = """\
apiVersion: lorajob.dev/v1alpha1
kind: LoRAJob
metadata: {{name: {name}, namespace: ml}}
spec:
  baseModel: {{uri: {uri}{extra}}}
  dataset: {{uri: s3://data/train.jsonl}}
  method: {method}
  training: {{microBatchSize: {batch}, maxSeqLength: {seq}}}
  output: {{uri: s3://adapters/{name}/}}
"""
OWN = {
    "gpu-7b-lora": JOB.format(name="gpu-7b-lora", uri="hf://meta-llama/Llama-2-7b-hf",
                              extra="", method="lora", batch=4, seq=2048),
    "qlora-8b": JOB.format(name="qlora-8b", uri="s3://models/llama-3.1-8b/",
                           extra=", architecture: llama-3.1-8b", method="qlora", batch=2,
                           seq=2048),
    "cpu-smollm2": JOB.format(name="cpu-smollm2",
                              uri="hf://HuggingFaceTB/SmolLM2-135M-Instruct", extra="",
                              method="auto", batch=2, seq=512),
}


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    shapes.clear_cache()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_plans(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(path), "-o", "json", *FAST]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    for result in out if isinstance(out, list) else [out]:
        assert result["error"] is None and result["estimatedVramGiB"] > 0


def test_a_sweep_plans_every_trial(capsys: pytest.CaptureFixture[str]) -> None:
    """The example sweep's grid (r 4/16 x two learning rates, maxTrials 3): each trial it
    would create is planned under its own name, the larger rank needing no less memory."""
    assert main(["plan", str(ROOT / "examples" / "sweep-smollm2.yaml"), "-o", "json", *FAST]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out] == ["sweep-smollm2-t1", "sweep-smollm2-t2", "sweep-smollm2-t3"]
    lora = [r["breakdown"]["lora_params"] for r in out]
    assert lora[0] == lora[1] < lora[2]


def test_an_invalid_sweep_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text((ROOT / "examples" / "sweep-smollm2.yaml").read_text()
                    .replace("parallelism: 2", "parallelism: 0"))
    assert main(["plan", str(path), *FAST]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "not a valid LoRASweep" in err and "spec.parallelism" in err


@pytest.mark.parametrize("name", sorted(OWN))
def test_own_manifests_plan_in_text_and_json(name: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(OWN[name])
    assert main(["plan", str(path), *FAST]) == EXIT_OK
    text = capsys.readouterr().out
    assert f"ml/{name}" in text and "breakdown" in text and "weights" in text
    assert main(["plan", str(path), "-o", "json", *FAST]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    for key in ("estimatedVramGiB", "breakdown", "method", "vramClass", "gpus", "deepspeed",
                "shapeSource"):
        assert key in out, key
    assert out["shapeSource"].startswith(("known architecture", "config.json"))


def test_several_documents_give_a_list_and_other_kinds_are_skipped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: s3-creds}\n"
    path = tmp_path / "many.yaml"
    path.write_text("---\n".join([OWN["gpu-7b-lora"], secret, OWN["qlora-8b"]]))
    assert main(["plan", str(path), "-o", "json", *FAST]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert [o["name"] for o in out] == ["gpu-7b-lora", "qlora-8b"]
    assert out[1]["method"] == "qlora"


def test_bad_manifest_names_the_field_and_exits_2(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(OWN["gpu-7b-lora"].replace("microBatchSize: 4", "microBatchSize: 0")
                    .replace("method: lora", "method: full"))
    assert main(["plan", str(path)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "spec.training.microBatchSize" in err and "spec.method" in err


def test_missing_file_and_bad_yaml_exit_2(tmp_path: Path) -> None:
    assert main(["plan", str(tmp_path / "nope.yaml")]) == EXIT_INVALID
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    assert main(["plan", str(bad)]) == EXIT_INVALID


def test_nothing_fits_is_json_error_and_exit_1(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(JOB.format(name="huge", uri="hf://meta-llama/Llama-3.1-70B", extra="",
                               method="lora", batch=64, seq=32768)
                    .replace("  output:", "  resources: {gpus: 1}\n  output:"))
    assert main(["plan", str(path), "-o", "json", *FAST]) == EXIT_NO_FIT
    out = json.loads(capsys.readouterr().out)
    assert "no placement fits" in out["error"] and out["breakdown"]["weights"] > 0


def test_unknown_model_is_an_error_saying_how_to_fix(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mystery.yaml"
    path.write_text(JOB.format(name="mystery", uri="s3://models/mystery/", extra="",
                               method="lora", batch=1, seq=512))
    assert main(["plan", str(path), "-o", "json", *FAST]) == EXIT_NO_FIT
    out = json.loads(capsys.readouterr().out)
    assert "spec.baseModel.shape" in out["error"]


def test_settings_file_changes_the_classes(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "settings.yaml"
    cfg.write_text("vramClasses:\n  - {name: big-gpu, memoryMiB: 200000}\n")
    path = tmp_path / "job.yaml"
    path.write_text(OWN["gpu-7b-lora"])
    assert main(["plan", str(path), "-o", "json", "--config", str(cfg), *FAST]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["vramClass"] == "big-gpu"


def test_run_is_wired_with_its_options() -> None:
    from lora_operator.cli import build_parser

    args = build_parser().parse_args(["run", "--namespace", "a", "-n", "b", "--standalone",
                                      "--peering", "p", "--liveness", "http://0.0.0.0:8081/h"])
    assert args.namespace == ["a", "b"] and args.standalone and args.metrics_port == 8080
    assert args.func.__name__ == "cmd_run"

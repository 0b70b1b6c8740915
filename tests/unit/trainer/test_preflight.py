"""The dataset preflight: formats, token lengths, truncation, duplicates, overlap, refused
rows and the fatal verdicts, on real files with the tiny tokenizer; the CLI locally and in
its pod form (rendered config in, termination message out)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lora_operator import api
from lora_operator.contract import ExitCode, JobIdentity, Placement, TrainerConfig
from lora_trainer import cli, data, preflight

from .conftest import EXAMPLES, job_manifest, write_jsonl, write_manifest


def chat(user: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def rows_of(n: int, prefix: str = "order") -> list[dict[str, Any]]:
    return [chat(f"{prefix} {i}: send {i} mugs to Oslo", f"ORDER item=mug; qty={i}") for i in range(n)]


def spec_for(model_dir: Path, train: Path, validation: Path | None = None,
             test: Path | None = None, **extra: Any) -> api.LoRAJobSpec:
    dataset: dict[str, Any] = {"uri": f"file://{train}",
                               "validation": {"uri": f"file://{validation}"} if validation
                               else {"fraction": 0.1}}
    if test:
        dataset["test"] = {"uri": f"file://{test}"}
    dataset.update(extra.pop("dataset", {}))
    manifest = job_manifest(model_dir, "file:///tmp/unused/", dataset=dataset, **extra)
    return api.parse_lorajob(manifest).spec


def run(model_dir: Path, tmp_path: Path, train: list[dict[str, Any]],
        validation: list[dict[str, Any]] | None = None, test: list[dict[str, Any]] | None = None,
        **extra: Any) -> api.DatasetReport:
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", rows) for name, rows in
             (("train", train), ("validation", validation), ("test", test)) if rows is not None}
    spec = spec_for(model_dir, files["train"], files.get("validation"), files.get("test"), **extra)
    return preflight.run_preflight(spec, tmp_path / "work")


@pytest.mark.parametrize(("row", "fmt"), [
    (chat("Say hi", "hi there"), "chat"),
    ({"instruction": "Add", "input": "2 and 3", "output": "5"}, "alpaca"),
    ({"prompt": "2+3=", "completion": "5"}, "completion"),
    ({"text": "The quick brown fox."}, "text"),
])
def test_each_format_is_detected_and_counted(tiny_model_dir: Path, tmp_path: Path,
                                             row: dict[str, Any], fmt: str) -> None:
    variants = [{k: (f"{v} {i}" if isinstance(v, str) else v) for k, v in row.items()}
                if fmt != "chat" else chat(f"Say hi {i}", f"hi there {i}") for i in range(6)]
    report = run(tiny_model_dir, tmp_path, variants)  # validation: 10 % held out of train
    assert report.verdict == "Passed", report.message
    assert report.format == fmt
    assert report.splits is not None and report.splits.train is not None
    assert report.splits.train.rows + report.splits.validation.rows == 6  # type: ignore[union-attr]


def test_token_lengths_match_the_tokenizer_and_truncation_is_counted(
        tiny_model_dir: Path, tiny_tokenizer: Any, tmp_path: Path) -> None:
    short = rows_of(6)
    long = [chat("word " * 200 + str(i), "answer " + str(i)) for i in range(2)]
    lengths = sorted(len(data.tokenize_sample(tiny_tokenizer, data.to_sample(
        data.Row(r, "t", 1), "chat"), True)) for r in short + long)
    report = run(tiny_model_dir, tmp_path, short + long, rows_of(3, "check"),
                 training={"maxSeqLength": 128})
    train = report.splits.train  # type: ignore[union-attr]
    assert train is not None and train.token_length is not None
    assert train.token_length.max == lengths[-1] > 128
    assert train.token_length.p50 == lengths[3]
    assert train.truncated_percent == 25.0  # 2 of 8 rows longer than 128 tokens
    assert report.verdict == "Passed"


def test_every_row_truncated_fails(tiny_model_dir: Path, tmp_path: Path) -> None:
    long = [chat("word " * 40 + str(i), "answer " + str(i)) for i in range(4)]
    report = run(tiny_model_dir, tmp_path, long, rows_of(2), training={"maxSeqLength": 16})
    assert report.verdict == "Failed" and report.reason == "InvalidDataset"
    assert "every train row is longer than training.maxSeqLength 16" in report.message
    assert preflight.exit_code(report) == ExitCode.DATA


def test_truncation_above_max_truncated_fraction_fails(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = rows_of(6) + [chat("word " * 200 + str(i), "answer") for i in range(2)]
    strict = run(tiny_model_dir, tmp_path, rows, rows_of(2, "v"), training={"maxSeqLength": 128},
                 dataset={"preflight": {"maxTruncatedFraction": 0.1}})
    assert strict.verdict == "Failed"
    assert "25.0% of train rows are longer" in strict.message
    assert "maxTruncatedFraction 0.1" in strict.message


def test_duplicates_ignore_case_and_whitespace(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [*rows_of(5), chat("ORDER 1:   send 1 mugs to oslo", "order item=mug;  qty=1"),
            chat("order 2: send 2 mugs to Oslo", "ORDER item=mug; qty=2")]
    report = run(tiny_model_dir, tmp_path, rows, rows_of(2, "v"))
    assert report.splits.train.duplicates == 2  # type: ignore[union-attr]
    assert report.verdict == "Passed"  # duplicates are reported, not fatal


def test_overlap_between_splits_fails_above_the_threshold(tiny_model_dir: Path, tmp_path: Path) -> None:
    train, held = rows_of(10), rows_of(10)[:2] + rows_of(2, "new")  # half the validation leaks
    test = rows_of(10)[:1] + rows_of(3, "fresh")
    report = run(tiny_model_dir, tmp_path, train, held, test)
    over = report.overlap
    assert over is not None
    assert (over.train_validation, over.train_test, over.validation_test) == (2, 1, 1)
    assert over.max_fraction == 0.5
    assert report.verdict == "Failed"
    assert "held-out rows also in another split: 50.0%" in report.message


def test_overlap_within_the_threshold_passes(tiny_model_dir: Path, tmp_path: Path) -> None:
    report = run(tiny_model_dir, tmp_path, rows_of(10), rows_of(10)[:1] + rows_of(3, "new"),
                 dataset={"preflight": {"maxOverlapFraction": 0.3}})
    assert report.overlap is not None and report.overlap.max_fraction == 0.25
    assert report.verdict == "Passed", report.message


def test_refused_rows_are_listed_with_file_and_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = rows_of(4)
    rows.insert(1, {"messages": [{"role": "user", "content": "no answer here"}]})
    rows.insert(3, {"messages": [{"role": "robot", "content": "beep"},
                                 {"role": "assistant", "content": "ok"}]})
    report = run(tiny_model_dir, tmp_path, rows, rows_of(2, "v"))
    assert report.verdict == "Failed"
    assert [(r.file, r.line) for r in report.refused] == [("train.jsonl", 2), ("train.jsonl", 4)]
    assert "no assistant turn" in report.refused[0].reason
    assert "role must be one of" in report.refused[1].reason
    assert report.splits.train.refused == 2  # type: ignore[union-attr]
    assert "2 row(s) refused" in report.message and "train.jsonl:2" in report.message


def test_unreadable_line_fails_with_file_and_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", rows_of(3))
    train.write_text(train.read_text() + "{not json\n")
    report = preflight.run_preflight(spec_for(tiny_model_dir, train), tmp_path / "work")
    assert report.verdict == "Failed" and report.reason == "InvalidDataset"
    assert [(r.file, r.line) for r in report.refused] == [("train.jsonl", 4)]
    assert "invalid JSON" in report.refused[0].reason


def test_a_split_without_valid_rows_fails(tiny_model_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "validation.jsonl"
    empty.write_text("\n")
    train = write_jsonl(tmp_path / "train.jsonl", rows_of(4))
    report = preflight.run_preflight(spec_for(tiny_model_dir, train, empty), tmp_path / "work")
    assert report.verdict == "Failed"
    assert "validation split has no valid rows" in report.message


def test_a_missing_tokenizer_is_a_model_error_not_a_dataset_verdict(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", rows_of(4))
    spec = spec_for(tmp_path / "no-model", train)
    with pytest.raises(preflight.TrainerError) as err:
        preflight.run_preflight(spec, tmp_path / "work")
    assert err.value.code == ExitCode.MODEL


def test_only_tokenizer_files_are_fetched() -> None:
    wanted = preflight.tokenizer_files(None)
    names = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "vocab.json", "merges.txt", "model.safetensors", "model-00001-of-00004.safetensors",
             "pytorch_model.bin", "model.safetensors.index.json", "generation_config.json"]
    fetched = [n for n in names if preflight.storage.matches(n, wanted)]
    assert fetched == names[:6]
    assert preflight.tokenizer_files("smollm2.Q8_0.gguf") == ("smollm2.Q8_0.gguf",)


def test_report_json_fits_the_termination_message() -> None:
    refused = [api.RefusedRow(file="train.jsonl", line=i, reason="x" * 200) for i in range(40)]
    report = preflight.failed_report(ExitCode.DATA, "m" * 6000, refused)
    text = preflight.encode(report)
    assert len(text.encode()) <= 4096
    back = preflight.decode(text)
    assert back is not None and back.verdict == "Failed" and back.refused
    assert back.refused[0].line == 0


def test_example_data_passes(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = spec_for(tiny_model_dir, EXAMPLES / "train.jsonl", EXAMPLES / "validation.jsonl",
                    EXAMPLES / "test.jsonl")
    report = preflight.run_preflight(spec, tmp_path / "work")
    assert report.verdict == "Passed", report.message
    assert report.splits is not None and report.splits.test is not None
    assert (report.splits.train.rows, report.splits.validation.rows,  # type: ignore[union-attr]
            report.splits.test.rows) == (320, 48, 48)


# --------------------------------------------------------------------------- the CLI


def test_cli_prints_the_report_for_a_manifest(tiny_model_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path / "job.yaml", job_manifest(tiny_model_dir, "file:///tmp/x/"))
    assert cli.main(["preflight", "--job", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dataset preflight: Passed")
    assert "train" in out and "validation" in out and "tokens p50/p95/max" in out
    assert cli.main(["preflight", "--job", str(manifest), "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["validation"]["rows"] == 48 and report["format"] == "chat"


def test_cli_exits_data_on_a_bad_dataset(tiny_model_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat("a", "b"), {"messages": []}, chat("c", "d")])
    manifest = write_manifest(tmp_path / "job.yaml",
                              job_manifest(tiny_model_dir, "file:///tmp/x/", data=bad))
    assert cli.main(["preflight", "--job", str(manifest)]) == ExitCode.DATA
    out = capsys.readouterr().out
    assert "dataset preflight: Failed (InvalidDataset)" in out
    assert "refused: bad.jsonl:2: field 'messages' must be a non-empty list" in out


def test_pod_form_reads_the_rendered_config_and_writes_the_termination_message(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}", f"a{i}") for i in range(4)])
    spec = api.parse_lorajob(job_manifest(tiny_model_dir, "file:///tmp/x/", data=train)).spec
    config = TrainerConfig(job=JobIdentity(name="j", uid="u"), spec=spec,
                           placement=Placement(method="lora", gpus=1), checkpoint_uri="file:///tmp/c/")
    (tmp_path / "trainer.yaml").write_text(config.model_dump_json(by_alias=True, exclude_none=True))
    monkeypatch.setenv("LORA_TRAINER_CONFIG", str(tmp_path / "trainer.yaml"))
    monkeypatch.setenv("LORA_TERMINATION_MESSAGE_PATH", str(tmp_path / "termination-log"))
    assert cli.main(["preflight"]) == 0
    report = preflight.decode((tmp_path / "termination-log").read_text())
    assert report is not None and report.verdict == "Passed"
    assert report.splits is not None and report.splits.train is not None
    assert report.splits.train.rows == 4
    assert '"event": "preflight"' in capsys.readouterr().out


@pytest.mark.slow
def test_smollm2_example_with_the_tokenizer_from_its_gguf(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's example: examples/local-smollm2.yaml, the tokenizer read from the GGUF."""
    manifest = EXAMPLES.parent / "local-smollm2.yaml"
    assert cli.main(["preflight", "--job", str(manifest), "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "Passed" and report["format"] == "chat"
    assert report["splits"]["train"] == {"rows": 320, "refused": 0, "duplicates": 0,
                                         "tokenLength": {"p50": 67, "p95": 71, "max": 75},
                                         "truncatedPercent": 0.0}

"""Storage (URI safety, local transfers, error mapping) and progress (lines, bar)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from lora_operator import contract
from lora_operator.contract import ExitCode
from lora_trainer import progress, storage
from lora_trainer.errors import TrainerError

OPTS = storage.StorageOptions(attempts=2, backoff_seconds=0.01)


@pytest.mark.parametrize("uri", ["s3://bucket/a/../../etc", "file:///data/../etc/passwd",
                                 "pvc://claim/x/../../y", "https://169.254.169.254/latest/meta-data",
                                 "https://[fd00:ec2::254]/x", "ftp://host/x"])
def test_unsafe_uris_are_refused(uri: str) -> None:
    with pytest.raises(TrainerError) as err:
        storage.parse_uri(uri)
    assert err.value.code == ExitCode.CONFIG


@pytest.mark.parametrize("endpoint", ["http://169.254.169.254", "http://[fd00:ec2::254]:80",
                                      "http://[::ffff:169.254.1.1]/"])
def test_metadata_endpoints_are_refused(endpoint: str) -> None:
    with pytest.raises(TrainerError, match="link-local"):
        storage.StorageOptions(endpoint=endpoint).resolved_endpoint()


def test_listing_names_cannot_escape() -> None:
    with pytest.raises(TrainerError):
        storage.safe_relative("a/../../b")
    assert storage.safe_relative("./a//b") == "a/b"


def test_local_upload_list_download_with_digests(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"x" * 1000)
    (src / "sub" / "b.txt").write_text("hello")
    done = storage.upload(src, ["a.bin", "sub/b.txt"], f"file://{tmp_path}/dst", OPTS)
    assert done.files["sub/b.txt"].sha256 == \
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert storage.list_files(f"file://{tmp_path}/dst", OPTS) == ["a.bin", "sub/b.txt"]
    assert storage.read_text(f"file://{tmp_path}/dst/sub/b.txt", OPTS) == "hello"
    assert storage.read_text(f"file://{tmp_path}/dst/none", OPTS) is None


def test_pvc_paths_are_mounted_volumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.PVC_ROOT_ENV, str(tmp_path))
    (tmp_path / "claim" / "data").mkdir(parents=True)
    assert storage.download("pvc://claim/data", tmp_path / "x", OPTS, ExitCode.DATA) == \
        tmp_path / "claim" / "data"
    with pytest.raises(TrainerError) as err:
        storage.download("pvc://claim/missing", tmp_path / "x", OPTS, ExitCode.MODEL)
    assert err.value.code == ExitCode.MODEL


def test_s3_errors_map_to_exit_codes() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")

    assert storage.s3_error(client_error("InvalidAccessKeyId", 403), "x", ExitCode.DATA).code == ExitCode.AUTH
    assert storage.s3_error(client_error("NoSuchKey", 404), "x", ExitCode.DATA).code == ExitCode.DATA
    assert storage.s3_error(client_error("NoSuchBucket", 404), "x", ExitCode.MODEL).code == ExitCode.MODEL
    assert storage.s3_error(client_error("InternalError", 500), "x", ExitCode.DATA).code == ExitCode.STORAGE
    assert storage.s3_error(NoCredentialsError(), "x", ExitCode.DATA).code == ExitCode.AUTH
    unreachable = EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert storage.s3_error(unreachable, "x", ExitCode.DATA).code == ExitCode.STORAGE


def test_unreachable_s3_is_retried_then_storage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    opts = storage.StorageOptions(endpoint="http://127.0.0.1:9", attempts=2, backoff_seconds=0.01)
    with pytest.raises(TrainerError) as err:
        storage.download("s3://bucket/model/", tmp_path, opts, ExitCode.MODEL)
    assert err.value.code == ExitCode.STORAGE and "s" not in err.value.message.split(":")[-1].strip()[:0]


def test_hf_without_network_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TrainerError) as err:
        storage.download("hf://org/model", tmp_path, OPTS, ExitCode.MODEL)
    assert err.value.code in (ExitCode.STORAGE, ExitCode.MODEL)


def test_snapshot_rates_and_eta() -> None:
    snap = progress.snapshot(step=25, total=100, epoch=0.5, loss=1.5, eval_loss=None, tokens=5000,
                             elapsed=10.0)
    assert (snap.percent, snap.tokens_per_second, snap.eta_seconds) == (25.0, 500.0, 30.0)
    assert (snap.step, snap.total_steps, snap.epoch, snap.loss) == (25, 100, 0.5, 1.5)
    assert snap.updated_at is not None
    start = progress.snapshot(step=0, total=0, epoch=None, loss=None, eval_loss=None, tokens=0,
                              elapsed=0.0)
    assert (start.percent, start.tokens_per_second, start.eta_seconds) == (None, None, None)


def test_reporter_writes_lines_the_operator_reads() -> None:
    """The trainer holds no API token: its progress reaches the LoRAJob only as the JSON
    lines on stdout, of which the operator takes the newest (`contract.last_progress`),
    other events in between."""
    out = io.StringIO()
    reporter = progress.ProgressReporter(stream=out)
    snaps = [progress.snapshot(step, 3, step / 3, 2.0 / step, None, 10 * step, 1.0 * step)
             for step in range(1, 4)]
    for snap in snaps:
        reporter.report(snap)
        progress.write_event(out, "checkpoint", {"step": snap.step, "uri": "s3://b/ckpt/"})
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["progress", "checkpoint"] * 3
    assert lines[-2]["step"] == 3 and lines[-2]["total_steps"] == 3
    assert all(len(line) <= contract.PROGRESS_LINE_MAX_CHARS
               for line in out.getvalue().splitlines())
    assert reporter.latest == snaps[-1]
    assert contract.last_progress(out.getvalue()) == snaps[-1]


def test_bar_goes_to_its_own_stream_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    out, bar = io.StringIO(), io.StringIO()
    reporter = progress.ProgressReporter(stream=out, bar=bar)
    reporter.report(progress.snapshot(1, 2, None, 1.0, None, 10, 1.0))
    reporter.report(progress.snapshot(2, 2, None, 0.5, None, 20, 2.0), final=True)
    assert "2/2" in bar.getvalue() and bar.getvalue().endswith("\n")
    assert [json.loads(line)["step"] for line in out.getvalue().splitlines()] == [1, 2]

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    assert progress.ProgressReporter.create().bar is sys.stderr
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress.ProgressReporter.create().bar is None

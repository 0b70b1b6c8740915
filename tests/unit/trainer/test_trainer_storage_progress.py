"""Storage (URI safety, local transfers, error mapping) and progress (lines, status patch)."""

from __future__ import annotations

import http.server
import io
import json
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

from lora_operator import api
from lora_operator.contract import ExitCode, JobIdentity
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


def test_snapshot_and_patch_body() -> None:
    snap = progress.snapshot(step=25, total=100, epoch=0.5, loss=1.5, eval_loss=None, tokens=5000,
                             elapsed=10.0)
    assert (snap.percent, snap.tokens_per_second, snap.eta_seconds) == (25.0, 500.0, 30.0)
    job = JobIdentity(name="j", namespace="ns", uid="u")
    body = progress.status_patch(job, snap)
    assert body["apiVersion"] == api.API_VERSION and body["metadata"] == {"name": "j", "namespace": "ns"}
    assert body["status"]["progress"]["totalSteps"] == 100
    assert body["status"]["progress"]["tokensPerSecond"] == 500.0
    assert progress.status_path(job) == ("/apis/lorajob.dev/v1alpha1/namespaces/ns/lorajobs/j/status"
                                         "?fieldManager=lora-trainer&force=true")


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_PATCH(self) -> None:
        length = int(self.headers["Content-Length"])
        _Recorder.seen.append({"path": self.path, "type": self.headers["Content-Type"],
                               "auth": self.headers["Authorization"],
                               "body": json.loads(self.rfile.read(length))})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def test_reporter_writes_lines_and_throttles_status_patches(caplog: pytest.LogCaptureFixture) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    job = JobIdentity(name="j", namespace="ns", uid="u")
    patcher = progress.StatusPatcher(job, progress.InCluster(f"http://127.0.0.1:{server.server_port}",
                                                             "tok", None))
    out = io.StringIO()
    reporter = progress.ProgressReporter(patcher, interval=3600, stream=out)
    for step in range(1, 4):
        reporter.report(progress.snapshot(step, 3, None, 1.0, None, 10, 1.0))
    reporter.finish()
    server.shutdown()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["progress"] * 3 and lines[-1]["step"] == 3
    assert len(_Recorder.seen) == 2  # the first one, then the final one (throttled between)
    assert _Recorder.seen[0]["type"] == "application/apply-patch+yaml"
    assert _Recorder.seen[0]["auth"] == "Bearer tok"
    assert _Recorder.seen[-1]["body"]["status"]["progress"]["step"] == 3

    dead = progress.StatusPatcher(job, progress.InCluster("http://127.0.0.1:9", "tok", None), timeout=1)
    assert not dead.apply(progress.snapshot(1, 3, None, 1.0, None, 10, 1.0))
    assert not dead.apply(progress.snapshot(2, 3, None, 1.0, None, 10, 1.0))
    assert sum("cannot patch" in r.message for r in caplog.records) == 1


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers `codes` in turn (an API server restarting), then 200."""

    codes: ClassVar[list[int]] = []
    seen: ClassVar[int] = 0

    def do_PATCH(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        _Flaky.seen += 1
        code = _Flaky.codes.pop(0) if _Flaky.codes else 200
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("codes", "applied", "calls"), [
    ([503, 503], True, 3),   # the final patch outlives an API server restart
    ([403], False, 1),       # refused: asking again cannot help
])
def test_final_patch_is_retried_only_while_the_server_is_away(
        codes: list[int], applied: bool, calls: int) -> None:
    _Flaky.codes, _Flaky.seen = list(codes), 0
    server = http.server.HTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    job = JobIdentity(name="j", namespace="ns", uid="u")
    patcher = progress.StatusPatcher(job, progress.InCluster(f"http://127.0.0.1:{server.server_port}",
                                                             "tok", None))
    try:
        got = patcher.apply(progress.snapshot(3, 3, None, 1.0, None, 10, 1.0),
                            attempts=4, backoff=0.01)
    finally:
        server.shutdown()
    assert (got, _Flaky.seen) == (applied, calls)

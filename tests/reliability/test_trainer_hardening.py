"""Issue 13, the trainer side: two writers to one prefix, tampered checkpoints, SSRF through
redirects, presigned URLs in messages, exit codes under torchrun and deeply nested data.
Real SeaweedFS S3 and the real kube-apiserver of the local cluster; the https server a
dataset is fetched from is a local one with its own CA."""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import json
import os
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from tests.reliability.conftest import DATA, TRAINER, keys_under, s3_env, tiny_cli_job

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


# --------------------------------------------------------------------------- item 7


def _opts(ci: Any) -> Any:
    from lora_trainer import storage

    return storage.StorageOptions(endpoint=ci.s3_endpoint, region=ci.s3_region)


@pytest.fixture
def output_creds(local_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The output's keys in the environment, as the trainer pod gets them from its Secret."""
    for k, v in s3_env(local_cluster).items():
        monkeypatch.setenv(k, v)


def _publish_race(ci: Any, tmp_path: Path, uids: list[str], overwrite: bool,
                  out: str) -> dict[str, Any]:
    """`len(uids)` attempts publish different adapters to `out` at the same instant."""
    from lora_operator import api
    from lora_operator.contract import JobIdentity
    from lora_trainer import export
    from lora_trainer.errors import TrainerError

    spec = api.parse_spec({"baseModel": {"uri": "hf://org/base"}, "dataset": {"uri": "s3://data/t.jsonl"},
                           "output": {"uri": out, "overwrite": overwrite}})
    barrier = threading.Barrier(len(uids))
    results: dict[str, Any] = {}

    def one(index: int, uid: str) -> None:
        folder = tmp_path / f"{uid}-{index}"
        folder.mkdir()
        for name, size in (("adapter_model.safetensors", 300_000), ("adapter_config.json", 200),
                           ("README.md", 5_000)):
            (folder / name).write_bytes(f"{uid}/{index}/{name}".encode() * (size // 40))
        barrier.wait()
        try:
            results[f"{uid}-{index}"] = export.upload_adapter(
                folder, out, JobIdentity(name=uid, uid=uid, attempt=index + 1), spec, _opts(ci))
        except TrainerError as exc:
            results[f"{uid}-{index}"] = exc

    threads = [threading.Thread(target=one, args=(i, u)) for i, u in enumerate(uids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _assert_consistent(s3: Any, bucket: str, prefix: str) -> dict[str, Any]:
    """manifest.json is there and every file at the prefix is the one it describes."""
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    for name, entry in manifest["files"].items():
        body = s3.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"], f"{name} is another writer's"
    keys = keys_under(s3, bucket, prefix)
    assert ".publish.lock" not in keys and not [k for k in keys if k.startswith(".staging/")], keys
    return dict(manifest)


@pytest.mark.usefixtures("output_creds")
def test_racing_publishers_leave_one_consistent_adapter(local_cluster: Any, s3k: Any,
                                                        tmp_path: Path) -> None:
    """Three jobs publish to one new prefix at once: exactly one manifest (If-None-Match on
    SeaweedFS), the others OutputConflict, and the files are the winner's."""
    from lora_operator.contract import ExitCode
    from lora_trainer.errors import TrainerError

    ci = local_cluster
    prefix = f"reliability/race/{uuid.uuid4().hex[:8]}/"
    results = _publish_race(ci, tmp_path, ["job-a", "job-b", "job-c"], False,
                            f"s3://{ci.s3_bucket}/{prefix}")
    won = [k for k, r in results.items() if not isinstance(r, TrainerError)]
    lost = [r for r in results.values() if isinstance(r, TrainerError)]
    assert len(won) == 1, results
    assert [r.code for r in lost] == [ExitCode.OUTPUT_CONFLICT] * 2, lost
    manifest = _assert_consistent(s3k, ci.s3_bucket, prefix)
    assert manifest["job"]["uid"] == won[0].rsplit("-", 1)[0]


@pytest.mark.usefixtures("output_creds")
def test_two_attempts_of_one_job_publish_one_after_the_other(local_cluster: Any, s3k: Any,
                                                             tmp_path: Path) -> None:
    """Two live attempts of the same job (overwrite of its own adapter is allowed): the lock
    serialises them; the manifest that stays matches the files that stay. An expired lock
    left by a dead attempt does not wedge the output."""
    ci = local_cluster
    prefix = f"reliability/race-same/{uuid.uuid4().hex[:8]}/"
    s3k.put_object(Bucket=ci.s3_bucket, Key=prefix + ".publish.lock",
                   Body=json.dumps({"job": {"uid": "dead"}, "expiresAt": 1.0}).encode())
    results = _publish_race(ci, tmp_path, ["job-x", "job-x"], True, f"s3://{ci.s3_bucket}/{prefix}")
    assert all(not isinstance(r, Exception) for r in results.values()), results
    manifest = _assert_consistent(s3k, ci.s3_bucket, prefix)
    assert manifest["job"]["uid"] == "job-x"


def test_tampered_checkpoint_is_refused_not_loaded(local_cluster: Any, tiny_model: Any, s3k: Any,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """A first run leaves checkpoints (its quality gate fails after training); one file of
    its newest checkpoint is replaced in S3; the next run of the same job refuses it (no
    `resume`, a `checkpoint_refused` event) and trains from step 0."""
    from lora_trainer import cli

    ci = local_cluster
    prefix = f"reliability/ckpt-tamper/{uuid.uuid4().hex[:6]}/"
    job = tiny_cli_job("ckpt-tamper", f"file://{tiny_model.local}", f"s3://{ci.s3_bucket}/{prefix}",
                       max_steps=4, save_steps=2)
    job["spec"]["evaluation"]["minImprovement"] = 0.99  # keeps the checkpoints for a retry
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    for k, v in {**s3_env(ci), "LORA_TERMINATION_MESSAGE_PATH": str(tmp_path / "result"),
                 "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)

    assert cli.main(["run", "--job", str(manifest), "--device", "cpu"]) == 6
    capfd.readouterr()
    keys = keys_under(s3k, ci.s3_bucket, prefix + ".checkpoints/")
    target = next(k for k in keys if k.endswith("checkpoint-4/trainer_state.json"))
    s3k.put_object(Bucket=ci.s3_bucket, Key=prefix + ".checkpoints/" + target,
                   Body=b'{"global_step": 4, "tampered": true}')

    assert cli.main(["run", "--job", str(manifest), "--device", "cpu"]) == 6
    events = [json.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith('{"event"')]
    kinds = [e["event"] for e in events]
    assert "checkpoint_refused" in kinds and "resume" not in kinds, kinds
    refused = next(e for e in events if e["event"] == "checkpoint_refused")
    assert "trainer_state.json" in refused["reason"]
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps and min(steps) <= 1, steps  # trained from the start, not from step 4


# --------------------------------------------------------------------------- items 10, 12


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA), for a local https server."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class _Datasets(http.server.BaseHTTPRequestHandler):
    """/train.jsonl serves the example data; /to-metadata and /to-http redirect; else 404."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Datasets.seen.append(self.path)
        path = self.path.split("?", 1)[0]
        if path == "/to-metadata/train.jsonl":
            self.send_response(302)
            self.send_header("Location", "https://169.254.169.254/latest/meta-data/train.jsonl")
            self.end_headers()
        elif path == "/to-http/train.jsonl":
            self.send_response(301)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/train.jsonl")
            self.end_headers()
        elif path == "/train.jsonl":
            body = (DATA / "train.jsonl").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def https_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    cert, key = _self_signed(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Datasets)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the trainer trusts this server's CA
    _Datasets.seen = []
    yield f"https://127.0.0.1:{server.server_port}"
    server.shutdown()


SIGNATURE = f"sig{uuid.uuid4().hex}"


@pytest.mark.parametrize(("path", "code", "words"), [
    ("/to-metadata/train.jsonl", 2, ("refusing", "169.254.169.254", "link-local")),
    ("/to-http/train.jsonl", 2, ("refusing the redirect", "only https://")),
    (f"/missing/train.jsonl?X-Amz-Credential=AKIAX&X-Amz-Signature={SIGNATURE}", 3,
     ("HTTP 404", "?<redacted>")),
])
def test_https_dataset_redirects_and_presigned_urls(
        path: str, code: int, words: tuple[str, ...], https_server: str, local_cluster: Any,
        tiny_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """A redirect to the metadata service or to plain http is refused (exit 2, no request
    to the target); a presigned URL's query string is in no message, log or result."""
    from lora_trainer import cli

    ci = local_cluster
    job = tiny_cli_job("https-data", f"file://{tiny_model.local}",
                       f"s3://{ci.s3_bucket}/reliability/https/{uuid.uuid4().hex[:6]}/")
    job["spec"]["dataset"]["uri"] = https_server + path
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    for k, v in {**s3_env(ci), "LORA_TERMINATION_MESSAGE_PATH": str(tmp_path / "result"),
                 "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)

    got = cli.main(["run", "--job", str(manifest), "--device", "cpu"])

    out, err = capfd.readouterr()
    result = json.loads((tmp_path / "result").read_text())
    assert got == code, result
    for word in words:
        assert word in result["message"], result["message"]
    assert SIGNATURE not in "\n".join([out, err, caplog.text, json.dumps(result)])
    assert all(not p.startswith("/train.jsonl") for p in _Datasets.seen), _Datasets.seen


def test_presigned_dataset_url_stays_out_of_the_model_card(
        https_server: str, local_cluster: Any, tiny_model: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """A job trained on a presigned https dataset URL: README.md, metrics.json and
    manifest.json name the dataset without its signature."""
    from lora_trainer import cli

    out_dir = tmp_path / "adapter"
    job = tiny_cli_job("presigned", f"file://{tiny_model.local}", f"file://{out_dir}", max_steps=2)
    job["spec"]["dataset"]["uri"] = (f"{https_server}/train.jsonl?X-Amz-Credential=AKIAX"
                                     f"&X-Amz-Signature={SIGNATURE}")
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    monkeypatch.setenv("LORA_TERMINATION_MESSAGE_PATH", str(tmp_path / "result"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert cli.main(["run", "--job", str(manifest), "--device", "cpu"]) == 0
    out, err = capfd.readouterr()
    card = (out_dir / "README.md").read_text()
    assert "train.jsonl?<redacted>" in card
    written = "\n".join(p.read_text() for p in out_dir.glob("*.json")) + card + out + err
    assert SIGNATURE not in written and "AKIAX" not in written


# --------------------------------------------------------------------------- item 11


def test_torchrun_ranks_exit_code_reaches_the_pod(local_cluster: Any, tiny_model: Any,
                                                  tmp_path: Path) -> None:
    """A 2-process torchrun (CPU) whose ranks fail with InvalidDataset: the pod's process
    exits 3, not torchrun's 1, and the termination message says InvalidDataset."""
    from lora_operator import api
    from lora_operator.contract import JobIdentity, TrainerConfig

    bad = tmp_path / "train.jsonl"
    bad.write_text('{"messages": [oops\n')
    job = tiny_cli_job("ranks", f"file://{tiny_model.local}", f"file://{tmp_path / 'out'}")
    job["spec"]["dataset"] = {"uri": f"file://{bad}", "format": "chat"}
    spec = api.parse_lorajob(job).spec
    config = TrainerConfig(job=JobIdentity(name="ranks", uid=f"u-{uuid.uuid4().hex[:8]}"),
                           spec=spec, placement=api.Placement(method="lora", gpus=2,
                                                              deepspeed="none"),
                           checkpoint_uri=f"file://{tmp_path / 'out' / '.checkpoints'}/")
    config_file = tmp_path / "trainer.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))
    term = tmp_path / "termination-log"
    env = {**os.environ, "LORA_TRAINER_CONFIG": str(config_file),
           "LORA_TERMINATION_MESSAGE_PATH": str(term), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(key, None)
    proc = subprocess.run([TRAINER, "pod"], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output[-4000:]
    assert "torchrun" in output
    result = json.loads(term.read_text())
    assert result["exitCode"] == 3 and result["reason"] == "InvalidDataset", result
    assert "invalid JSON" in result["message"]


# --------------------------------------------------------------------------- item 12



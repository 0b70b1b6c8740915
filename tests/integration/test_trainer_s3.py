"""The trainer against the real local S3 (SeaweedFS from hack/cluster): transfers, errors, a job."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from lora_operator.contract import MODEL_CREDENTIALS_PREFIX, ExitCode
from lora_trainer import cli, storage
from lora_trainer.errors import TrainerError
from tests.unit.trainer.conftest import build_model, build_tokenizer, job_manifest, write_manifest

pytestmark = pytest.mark.cluster


@pytest.fixture
def s3(local_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[storage.StorageOptions, str]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", local_cluster.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", local_cluster.s3_secret_key)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    opts = storage.StorageOptions(endpoint=local_cluster.s3_endpoint, region=local_cluster.s3_region,
                                  attempts=2, backoff_seconds=0.1)
    return opts, f"s3://{local_cluster.s3_bucket}/trainer-tests/{uuid.uuid4().hex[:8]}"


def test_upload_list_download_roundtrip_with_sha256(s3: tuple[storage.StorageOptions, str],
                                                    tmp_path: Path) -> None:
    opts, prefix = s3
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "big.bin").write_bytes(bytes(range(256)) * 80_000)  # 20 MB: multi-part
    (src / "nested" / "small.txt").write_text("hi")
    sent = storage.upload(src, ["big.bin", "nested/small.txt"], prefix, opts)
    assert storage.list_files(prefix, opts) == ["big.bin", "nested/small.txt"]
    got = storage.download(prefix + "/", tmp_path / "dst", opts, ExitCode.MODEL)
    for name, digest in sent.files.items():
        assert storage.sha256_file(got / name) == digest.sha256
    assert storage.read_text(prefix + "/nested/small.txt", opts) == "hi"
    assert storage.read_text(prefix + "/absent.txt", opts) is None
    storage.delete_prefix(prefix, opts)
    assert storage.list_files(prefix, opts) == []


def test_a_location_with_its_own_secret_uses_its_own_keys(
        s3: tuple[storage.StorageOptions, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's keys (LORA_MODEL_AWS_*) reach S3 even when the output's are wrong, and a
    wrong model key is refused even when the output's keys are right."""
    opts, prefix = s3
    (tmp_path / "config.json").write_text("{}")
    storage.upload(tmp_path, ["config.json"], prefix, opts)
    model_opts = dataclasses.replace(opts, credentials_prefix=MODEL_CREDENTIALS_PREFIX)
    good_id, good_secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv(MODEL_CREDENTIALS_PREFIX + "AWS_ACCESS_KEY_ID", good_id)
    monkeypatch.setenv(MODEL_CREDENTIALS_PREFIX + "AWS_SECRET_ACCESS_KEY", good_secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "output-secret-is-wrong")
    assert storage.list_files(prefix, model_opts) == ["config.json"]
    with pytest.raises(TrainerError) as out_denied:
        storage.list_files(prefix, opts)
    assert out_denied.value.code == ExitCode.AUTH
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", good_secret)
    monkeypatch.setenv(MODEL_CREDENTIALS_PREFIX + "AWS_SECRET_ACCESS_KEY", "model-secret-is-wrong")
    with pytest.raises(TrainerError) as model_denied:
        storage.download(prefix + "/", tmp_path / "dst", model_opts, ExitCode.MODEL)
    assert model_denied.value.code == ExitCode.AUTH


def test_missing_object_and_wrong_keys_map_to_exit_codes(
        s3: tuple[storage.StorageOptions, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opts, prefix = s3
    with pytest.raises(TrainerError) as missing:
        storage.download(prefix + "/train.jsonl", tmp_path, opts, ExitCode.DATA)
    assert missing.value.code == ExitCode.DATA
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(TrainerError) as denied:
        storage.list_files(prefix, opts)
    assert denied.value.code == ExitCode.AUTH
    assert "wrong-secret" not in denied.value.message


def test_job_writes_adapter_and_manifest_to_s3(s3: tuple[storage.StorageOptions, str], tmp_path: Path,
                                                local_cluster: Any, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    opts, prefix = s3
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    build_model(model_dir, len(build_tokenizer(model_dir)))
    manifest = job_manifest(model_dir, prefix + "/adapter/",
                            output={"uri": prefix + "/adapter/", "endpoint": local_cluster.s3_endpoint})
    monkeypatch.setenv("LORA_TERMINATION_MESSAGE_PATH", str(tmp_path / "termination-log"))
    code = cli.main(["run", "--job", str(write_manifest(tmp_path / "job.yaml", manifest)),
                     "--device", "cpu"])
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert code == 0, events[-1]
    assert any(e["event"] == "checkpoint" and e["uri"].startswith("s3://") for e in events)
    written = json.loads(storage.read_text(prefix + "/adapter/manifest.json", opts) or "{}")
    assert written["job"]["name"] == "tiny"
    local = storage.download(prefix + "/adapter/", tmp_path / "fetched", opts, ExitCode.MODEL)
    for name, entry in written["files"].items():
        assert storage.sha256_file(local / name) == entry["sha256"]
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    assert PeftModel.from_pretrained(base, str(local)) is not None
    assert storage.list_files(prefix + "/adapter/.checkpoints/", opts) == []

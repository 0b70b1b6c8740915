"""Issue 13, the trainer's pure logic: redaction, failure classification, the ranks'
verdict under torchrun, checkpoint verification, the pinned connection and the
conditional publish on a local output (the S3 race runs against SeaweedFS in
tests/reliability/test_trainer_hardening.py)."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from lora_operator import api
from lora_operator.contract import ExitCode, JobIdentity, TrainerResult
from lora_trainer import checkpoints, data, export, launch, storage
from lora_trainer.errors import TrainerError, classify, redact

PRESIGNED = ("https://bucket.s3.amazonaws.com/train.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=0123456789abcdef")


def test_presigned_query_strings_are_redacted() -> None:
    text = f"download {PRESIGNED} failed; see '{PRESIGNED}'"
    out = redact(text)
    assert "X-Amz-Signature" not in out and "AKIAEXAMPLE" not in out
    assert out.count("https://bucket.s3.amazonaws.com/train.jsonl?<redacted>") == 2
    assert redact("s3://b/k and https://h/p") == "s3://b/k and https://h/p"
    assert "0123456789abcdef" not in TrainerError(ExitCode.DATA, f"{PRESIGNED}: HTTP 404").message


def _spec(dataset_uri: str) -> api.LoRAJobSpec:
    return api.parse_spec({"baseModel": {"uri": "hf://org/base"},
                           "dataset": {"uri": dataset_uri}, "output": {"uri": "s3://bucket/o/"}})


def test_model_card_and_manifest_carry_no_signature() -> None:
    spec = _spec(PRESIGNED)
    job = JobIdentity(name="j", uid="u")
    card = export.model_card(spec, job, {"format": "chat", "data": {}, "eval": {}})
    assert "train.jsonl?<redacted>" in card
    assert "0123456789abcdef" not in card and "AKIAEXAMPLE" not in card


def test_only_gpu_memory_is_out_of_memory() -> None:
    import torch

    assert classify(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))[0] \
        == ExitCode.OUT_OF_MEMORY
    assert classify(RuntimeError("CUDA out of memory. Tried to allocate"))[0] == ExitCode.OUT_OF_MEMORY
    code, message = classify(MemoryError())
    assert code == ExitCode.INTERNAL and "host memory" in message and "not GPU" in message
    assert classify(RuntimeError("DefaultCPUAllocator: can't allocate memory"))[0] == ExitCode.INTERNAL
    assert classify(TrainerError(ExitCode.DATA, "bad"))[0] == ExitCode.DATA


def test_deeply_nested_json_is_bad_data(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    for name, text in (("d.jsonl", '{"text": "ok"}\n{"messages": ' + deep + "}\n"),
                       ("d.json", "[" + deep + "]")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(TrainerError) as err:
            data.read_rows(path)
        assert err.value.code == ExitCode.DATA and "nested too deeply" in err.value.message


def _record(rank: int, code: int) -> launch.RankRecord:
    return launch.RankRecord(rank, code, TrainerResult(exit_code=code, reason=ExitCode(code).reason))


@pytest.mark.parametrize(("records", "launcher", "want"), [
    ([(0, 3), (1, 3)], 1, 3),        # rank 0's own verdict, not torchrun's 1
    ([(0, 143), (1, 42)], 1, 42),    # rank 1 ran out of GPU memory; rank 0 was only stopped
    ([(0, 0), (1, 143)], 1, 0),      # rank 0 finished and published: done
    ([(1, 42)], 1, 42),              # rank 0 killed before recording
    ([(0, 143), (1, 143)], 143, 143),  # a real preemption of every rank
    ([], 1, 1), ([], -9, 1),         # nobody recorded: the launcher's status, never 0
])
def test_torchrun_verdict(records: list[tuple[int, int]], launcher: int, want: int) -> None:
    code, _ = launch.verdict([_record(r, c) for r, c in records], launcher)
    assert code == want


def test_rank_records_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(launch.RESULT_DIR_ENV, str(tmp_path))
    for rank, code in ((1, 42), (0, 143)):
        monkeypatch.setenv("RANK", str(rank))
        launch.record(code, TrainerResult(exit_code=code, reason=ExitCode(code).reason,
                                          message=f"rank {rank}"))
    code, result = launch.verdict(launch.read_records(tmp_path), 1)
    assert code == 42 and result is not None and result.message == "rank 1"


def _store(tmp_path: Path, attempt: int = 1) -> checkpoints.CheckpointStore:
    return checkpoints.CheckpointStore.for_attempt(
        f"file://{tmp_path / 'out' / '.checkpoints' / 'uid'}", JobIdentity(name="j", uid="uid",
                                                                           attempt=attempt),
        storage.StorageOptions())


def _checkpoint(tmp_path: Path, step: int) -> tuple[Path, str]:
    folder = tmp_path / "run" / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(b"optimizer state %d" % step)
    (folder / "sub" / "rng_state.pth").write_bytes(b"rng")
    return folder, folder.name


def test_checkpoint_round_trip_and_tamper_refused(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    store = _store(tmp_path)
    store.save(*_checkpoint(tmp_path, 4))
    got = store.latest(tmp_path / "resume-1")
    assert got is not None and (got / "optimizer.pt").read_bytes() == b"optimizer state 4"

    stored = tmp_path / "out" / ".checkpoints" / "uid" / store.run / "checkpoint-4"
    (stored / "optimizer.pt").write_bytes(b"cos pickle: os.system('evil')")
    assert store.latest(tmp_path / "resume-2") is None
    (stored / "optimizer.pt").write_bytes(b"optimizer state 4")
    (stored / "extra.pkl").write_bytes(b"unlisted")
    assert store.latest(tmp_path / "resume-3") is None
    refused = [json.loads(x) for x in capsys.readouterr().out.splitlines()
               if '"checkpoint_refused"' in x]
    assert len(refused) == 2 and "sha256" in refused[0]["reason"]
    assert "unlisted" in refused[1]["reason"]


def test_cleanup_keeps_another_attempts_checkpoints(tmp_path: Path) -> None:
    first, second = _store(tmp_path, 1), _store(tmp_path, 2)
    first.save(*_checkpoint(tmp_path, 2))
    second.save(*_checkpoint(tmp_path / "b", 6))  # `latest` now points into the second run
    first.cleanup()
    root = tmp_path / "out" / ".checkpoints" / "uid"
    assert not (root / first.run).exists()
    assert (root / second.run / "checkpoint-6" / "optimizer.pt").is_file()
    assert second.latest(tmp_path / "resume") is not None
    second.cleanup()
    assert not any(root.rglob("*"))


def test_connection_goes_to_the_checked_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name resolves to a public address when the URI is parsed and to
    the metadata service when the request is made; the connection re-checks and refuses."""
    answers = iter([["203.0.113.7"], ["169.254.169.254"]])
    connected: list[Any] = []

    def fake_getaddrinfo(host: str, port: Any, *args: Any, **kw: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 0)) for a in next(answers)]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: connected.append(a))
    storage.parse_uri("https://rebind.example/train.jsonl")
    with pytest.raises(TrainerError) as err:
        storage._PinnedHTTPSConnection("rebind.example", 443).connect()
    assert err.value.code == ExitCode.CONFIG and "link-local" in err.value.message
    assert connected == []


def test_local_publish_race_has_one_winner(tmp_path: Path) -> None:
    """Two jobs publish to one file:// output at once: one manifest, matching its files."""
    out = f"file://{tmp_path / 'adapter'}"
    spec = _spec("s3://bucket/train.jsonl")
    results: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def publish(uid: str) -> None:
        folder = tmp_path / uid
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(uid.encode() * 1000)
        job = JobIdentity(name=uid, uid=uid)
        barrier.wait()
        try:
            results[uid] = export.upload_adapter(folder, out, job, spec, storage.StorageOptions())
        except TrainerError as exc:
            results[uid] = exc

    threads = [threading.Thread(target=publish, args=(u,)) for u in ("uid-a", "uid-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [u for u, r in results.items() if isinstance(r, export.Exported)]
    losers = [r for r in results.values() if isinstance(r, TrainerError)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert losers[0].code == ExitCode.OUTPUT_CONFLICT
    written = json.loads((tmp_path / "adapter" / "manifest.json").read_text())
    assert written["job"]["uid"] == winners[0]
    body = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    assert body == winners[0].encode() * 1000
    assert storage.sha256_file(tmp_path / "adapter" / "adapter_model.safetensors") == \
        written["files"]["adapter_model.safetensors"]["sha256"]
    assert not (tmp_path / "adapter" / export.LOCK).exists()
    assert not any((tmp_path / "adapter" / export.STAGING).rglob("*.safetensors"))

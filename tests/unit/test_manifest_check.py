"""The operator's check of the trainer's reported manifest (issue 13, items 2 and 6), and
the per-key backoff of re-checks and errors: pure logic, storage replaced by a reader."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

import pytest

from lora_operator import api, contract, objectstore
from lora_operator.reconcile import manifest
from lora_operator.reconcile.backoff import Backoff
from lora_operator.reconcile.status import ManifestCheck, derive_status
from lora_operator.settings import load_settings

SETTINGS = load_settings().model_copy(update={"s3_endpoint": "http://s3.local:8333"})
SPEC = api.parse_spec({"baseModel": {"uri": "hf://org/model"},
                       "dataset": {"uri": "s3://data/train.jsonl"},
                       "output": {"uri": "s3://out/bot/"}})
UID = "uid-1"
BODY = json.dumps({"job": {"uid": UID}, "files": {}}).encode()


def result(uri: str = "s3://out/bot/manifest.json", body: bytes = BODY) -> contract.TrainerResult:
    return contract.TrainerResult(exit_code=0, reason="Completed", manifest_uri=uri,
                                  manifest_sha256=hashlib.sha256(body).hexdigest())


def reader(data: bytes | Exception) -> Any:
    def read(uri: str, **kw: Any) -> bytes:
        if isinstance(data, Exception):
            raise data
        return data
    return read


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOPERATOR")


@pytest.fixture
def no_creds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in manifest.CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)


def test_verified_when_storage_matches_the_report(creds: None) -> None:
    got = manifest.check(SPEC, result(), UID, SETTINGS, read=reader(BODY))
    assert got.verified is True and "verified in storage" in got.message


@pytest.mark.parametrize("uri", ["s3://out/other/manifest.json", "s3://out/bot/../x/manifest.json",
                                 "s3://out/botx/manifest.json", "s3://elsewhere/manifest.json"])
def test_manifest_outside_the_output_is_refused(creds: None, uri: str) -> None:
    got = manifest.check(SPEC, result(uri), UID, SETTINGS, read=reader(BODY))
    assert (got.verified, got.reason) == (False, "ManifestMismatch")
    assert "spec.output.uri" in got.message


def test_wrong_sha_or_job_uid_is_refused(creds: None) -> None:
    other = json.dumps({"job": {"uid": "someone-else"}}).encode()
    wrong_sha = manifest.check(SPEC, result(body=b"x"), UID, SETTINGS, read=reader(BODY))
    wrong_uid = manifest.check(SPEC, result(body=other), UID, SETTINGS, read=reader(other))
    assert (wrong_sha.verified, wrong_sha.reason) == (False, "ManifestMismatch")
    assert "sha256" in wrong_sha.message
    assert (wrong_uid.verified, wrong_uid.reason) == (False, "ManifestMismatch")
    assert "someone-else" in wrong_uid.message


def test_missing_and_unavailable(creds: None) -> None:
    gone = manifest.check(SPEC, result(), UID, SETTINGS, read=reader(objectstore.NotFound("x")))
    down = manifest.check(SPEC, result(), UID, SETTINGS,
                          read=reader(objectstore.Unavailable("timed out")))
    assert (gone.verified, gone.reason) == (False, "ManifestMissing")
    assert down.verified is None and "timed out" in down.message


def test_without_operator_credentials_the_trainer_report_is_the_evidence(no_creds: None) -> None:
    """The chart's default values (no operatorS3CredentialsSecret): values.yaml's documented
    fallback, where the old code stayed Uploading forever."""
    def never(uri: str, **kw: Any) -> bytes:
        raise AssertionError("no signed read without credentials")
    got = manifest.check(SPEC, result(), UID, SETTINGS, read=never)
    assert got.verified is True and "checksum report" in got.message
    refused = manifest.check(SPEC, result("s3://out/x/manifest.json"), UID, SETTINGS, read=never)
    assert refused.verified is False  # the URI rule holds even then


def test_storage_refusing_the_operator_falls_back(creds: None) -> None:
    got = manifest.check(SPEC, result(), UID, SETTINGS,
                         read=reader(objectstore.NotAllowed("403")))
    assert got.verified is True and "checksum report" in got.message


def _completed_lorajob(done: dt.datetime) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    res = json.dumps({"exitCode": 0, "reason": "Completed", "manifestUri": "s3://out/bot/m"})
    lj = {"metadata": {"name": "bot", "uid": UID, "generation": 1},
          "spec": {"output": {"uri": "s3://out/bot/"}},
          "status": {"phase": "Uploading", "attempts": 1, "placement": {"method": "lora"}}}
    job = {"metadata": {"name": "bot-a1"},
           "status": {"completionTime": done.strftime("%Y-%m-%dT%H:%M:%SZ"),
                      "conditions": [{"type": "Complete", "status": "True"}]}}
    pod = {"metadata": {"name": "p", "labels": {"lorajob.dev/attempt": "1"}},
           "status": {"phase": "Succeeded", "containerStatuses": [
               {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": res}}}]}}
    return lj, job, [pod]


def test_unverifiable_manifest_fails_after_the_deadline() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    timeout = SETTINGS.manifest_verify_timeout_seconds
    pending = ManifestCheck(None, "could not check: timed out")
    lj, job, pods = _completed_lorajob(now - dt.timedelta(seconds=timeout - 5))
    early = derive_status(lj, job, pods, SETTINGS, manifest=pending, now=now)
    assert early.phase == api.Phase.UPLOADING
    lj, job, pods = _completed_lorajob(now - dt.timedelta(seconds=timeout + 5))
    late = derive_status(lj, job, pods, SETTINGS, manifest=pending, now=now)
    assert late.phase == api.Phase.FAILED
    assert late.patch["conditions"][-1]["reason"] == "ManifestUnverified"
    assert "timed out" in late.patch["message"]


def test_a_refused_manifest_fails_with_its_reason() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    lj, job, pods = _completed_lorajob(now)
    got = derive_status(lj, job, pods, SETTINGS, now=now,
                        manifest=ManifestCheck(False, "not under", reason="ManifestMismatch"))
    assert got.phase == api.Phase.FAILED
    assert got.patch["conditions"][-1]["reason"] == "ManifestMismatch"


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    b = Backoff(base=2.0, cap=30.0)
    assert [b.next("k") for _ in range(6)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert b.next("other") == 2.0  # per key
    b.reset("k")
    assert b.next("k") == 2.0

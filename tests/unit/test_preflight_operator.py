"""The operator's side of the dataset preflight: the CPU-only Job it builds and the status it
derives from that Job and its pod (plain dicts, no cluster)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import yaml

from lora_operator import api, contract
from lora_operator.build import job, names, preflight_job
from lora_operator.reconcile import preflight, status
from lora_operator.settings import load_settings

from .test_build_job import restricted_violations

SETTINGS = load_settings()
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
OWNER = names.Owner(name="bot", namespace="ml", uid="u-1", annotations={
    "kwok.lorajob.dev/exit-code": "42",
    "kwok.lorajob.dev/preflight.exit-code": "3",
    "kwok.lorajob.dev/preflight.termination-message": "{}",
})


def make_spec(**over: Any) -> api.LoRAJobSpec:
    spec: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/qwen/", "credentialsSecret": "model-creds"},
        "dataset": {"uri": "s3://data/train.jsonl", "credentialsSecret": "data-creds"},
        "output": {"uri": "s3://adapters/bot/", "credentialsSecret": "s3-creds"},
        "resources": {"nodeSelector": {"pool": "ml"},
                      "tolerations": [{"key": "team", "operator": "Exists"}]},
    }
    spec.update(over)
    return api.parse_spec(spec)


def build(dev_mode: bool = True) -> dict[str, Any]:
    return preflight_job.build_preflight_job(OWNER, make_spec(), SETTINGS, dev_mode=dev_mode)


# --------------------------------------------------------------------------- the Job


def test_preflight_job_asks_for_no_gpu_and_runs_the_preflight_subcommand() -> None:
    j = build()
    pod = j["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == [*SETTINGS.trainer_command, "preflight"]
    assert c["image"] == SETTINGS.trainer_image
    assert job.GPU_RESOURCE not in c["resources"].get("limits", {})
    assert c["resources"]["requests"] == {"cpu": SETTINGS.preflight_cpu,
                                          "memory": SETTINGS.preflight_memory}
    assert "affinity" not in pod
    assert all(t.get("key") != job.GPU_RESOURCE for t in pod["tolerations"])
    assert {"key": "team", "operator": "Exists"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"pool": "ml"}  # the spec's own; no VRAM class selector
    assert j["spec"]["activeDeadlineSeconds"] == SETTINGS.preflight_deadline_seconds


def test_preflight_job_is_restricted_and_holds_no_api_token() -> None:
    pod = build()["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod  # the namespace's default, its token unmounted


def test_preflight_job_gets_config_and_credentials_by_reference_only() -> None:
    j = build()
    trainer = job.build_job(OWNER, make_spec(), job.JobInputs(
        attempt=1, placement=api.Placement(method="lora", gpus=1), vram_class=None), SETTINGS)
    c = j["spec"]["template"]["spec"]["containers"][0]
    assert c["env"] == trainer["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"]
            if "secretKeyRef" in (e.get("valueFrom") or {})}
    assert refs == {"model-creds", "data-creds", "s3-creds"}
    assert all("value" not in e for e in c["env"] if e["name"].endswith("SECRET_ACCESS_KEY"))
    vols = {v["name"]: v for v in j["spec"]["template"]["spec"]["volumes"]}
    trainer_vols = {v["name"]: v for v in trainer["spec"]["template"]["spec"]["volumes"]}
    assert vols["config"] == trainer_vols["config"]
    assert "downwardAPI" in vols["config"]  # the pod's own annotation, not a ConfigMap


def test_preflight_config_is_its_pods_annotation_without_a_placement() -> None:
    """The config rides in the preflight pod's own annotation (no ConfigMap); no placement
    is planned yet when the dataset is checked."""
    ann = build(dev_mode=False)["spec"]["template"]["metadata"]["annotations"]
    cfg = contract.TrainerConfig.model_validate(yaml.safe_load(ann[names.CONFIG_ANNOTATION]))
    assert cfg.job == contract.JobIdentity(name="bot", namespace="ml", uid="u-1", attempt=1)
    assert cfg.placement == api.Placement()
    assert cfg.spec.dataset.uri == "s3://data/train.jsonl"


def test_preflight_job_is_owned_watched_and_not_an_attempt() -> None:
    j = build()
    meta, pod_labels = j["metadata"], j["spec"]["template"]["metadata"]["labels"]
    assert meta["name"] == "bot-preflight"
    assert meta["ownerReferences"][0]["uid"] == "u-1"
    for labels in (meta["labels"], pod_labels):
        assert labels[names.JOB_NAME_LABEL] == "bot"
        assert labels[names.MANAGED_BY_LABEL] == names.MANAGED_BY
        assert names.ATTEMPT_LABEL not in labels
        assert labels[preflight_job.COMPONENT_LABEL] == "preflight"


def test_permanent_exit_codes_fail_the_preflight_job_at_once() -> None:
    rules = build()["spec"]["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")["onExitCodes"]
    assert fail["containerName"] == preflight_job.CONTAINER
    assert int(contract.ExitCode.DATA) in fail["values"]
    assert int(contract.ExitCode.STORAGE) not in fail["values"]


def test_only_preflight_kwok_annotations_reach_the_preflight_pod_in_dev_mode() -> None:
    ann = build()["spec"]["template"]["metadata"]["annotations"]
    assert ann["kwok.lorajob.dev/exit-code"] == "3"
    assert ann["kwok.lorajob.dev/termination-message"] == "{}"
    assert not build(dev_mode=False)["spec"]["template"]["metadata"]["annotations"].get(
        "kwok.lorajob.dev/exit-code")


# --------------------------------------------------------------------------- the derivation


def lorajob(**status_over: Any) -> dict[str, Any]:
    st = {"phase": "Pending", "placement": {"method": "lora", "vramClass": "l4-24gb", "gpus": 1},
          "conditions": [{"type": "Planned", "status": "True", "reason": "Planned",
                          "message": "planned", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    st.update(status_over)
    return {"metadata": {"name": "bot", "namespace": "ml", "uid": "u-1", "generation": 1},
            "spec": {}, "status": st}


def pf_job(*conds: tuple[str, str], completed: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"metadata": {"name": "bot-preflight"},
                           "spec": {"activeDeadlineSeconds": 1800},
                           "status": {"conditions": [{"type": t, "status": "True", "reason": r}
                                                     for t, r in conds]}}
    if completed:
        out["status"]["completionTime"] = completed
    return out


def pf_pod(phase: str, code: int | None = None, message: str | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}} if code is None else {
        "terminated": {"exitCode": code, **({"message": message} if message else {})}}
    return {"metadata": {"name": "bot-preflight-x", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": phase,
                       "containerStatuses": [{"name": "preflight", "state": state}]}}


PASSED = {"verdict": "Passed", "reason": "DatasetValidated", "message": "chat rows: train 9",
          "format": "chat", "maxSeqLength": 2048,
          "splits": {"train": {"rows": 9, "tokenLength": {"p50": 60, "p95": 70, "max": 75},
                               "truncatedPercent": 0.0}},
          "overlap": {"maxFraction": 0.0}}
FAILED = {"verdict": "Failed", "reason": "InvalidDataset",
          "message": "1 row(s) refused: train.jsonl:2: messages has no assistant turn",
          "refused": [{"file": "train.jsonl", "line": 2, "reason": "messages has no assistant turn"}]}


def cond(patch: dict[str, Any], ctype: str = "DatasetValidated") -> dict[str, Any]:
    out: dict[str, Any] = next(c for c in patch["conditions"] if c["type"] == ctype)
    return out


def test_no_preflight_job_yet_means_create_it_and_say_so() -> None:
    out = preflight.derive_preflight(lorajob(), None, [], NOW)
    assert out.state == preflight.CREATE
    assert out.patch["message"] == "creating the dataset preflight Job"
    assert "phase" not in out.patch  # Pending already: a patch carries changes only
    assert cond(out.patch)["status"] == "Unknown"
    assert cond(out.patch, "Planned")["status"] == "True"  # planning's condition untouched


def test_running_preflight_keeps_the_job_pending() -> None:
    out = preflight.derive_preflight(lorajob(), pf_job(), [pf_pod("Running")], NOW)
    assert out.state == preflight.RUNNING
    assert out.patch["message"] == "validating the dataset (preflight pod Running)"


def test_passed_report_lands_in_status_dataset_and_lets_the_trainer_start() -> None:
    out = preflight.derive_preflight(lorajob(), pf_job(("Complete", "")),
                                     [pf_pod("Succeeded", 0, json.dumps(PASSED))], NOW)
    assert out.state == preflight.PASSED
    ds = out.patch["dataset"]
    assert ds["verdict"] == "Passed" and ds["splits"]["train"]["tokenLength"]["p95"] == 70
    assert ds["checkedAt"] == "2026-01-02T03:04:05Z"
    assert cond(out.patch)["status"] == "True"
    assert "phase" not in out.patch  # the trainer Job's derivation owns the phase from here
    assert [e.reason for e in out.events] == ["DatasetValidated"]


def test_a_passed_preflight_read_again_changes_nothing() -> None:
    first = preflight.derive_preflight(lorajob(), pf_job(("Complete", "")),
                                       [pf_pod("Succeeded", 0, json.dumps(PASSED))], NOW)
    body = lorajob()
    body["status"].update(first.patch)
    again = preflight.derive_preflight(body, pf_job(("Complete", "")),
                                       [pf_pod("Succeeded", 0, json.dumps(PASSED))],
                                       NOW + dt.timedelta(seconds=30))
    assert again.state == preflight.PASSED and again.patch == {} and again.events == []


def test_a_stale_report_key_is_nulled_not_merged_into_the_new_report() -> None:
    """One diff of desired vs current status: a key the old report had and the new one
    lacks is sent as null (a merge patch of the whole object would have kept it)."""
    first = preflight.derive_preflight(lorajob(), pf_job(("Complete", "")),
                                       [pf_pod("Succeeded", 0, json.dumps(PASSED))], NOW)
    body = lorajob()
    body["status"].update(first.patch)
    body["status"]["dataset"] = {**body["status"]["dataset"], "staleKey": "from an older report"}
    again = preflight.derive_preflight(body, pf_job(("Complete", "")),
                                       [pf_pod("Succeeded", 0, json.dumps(PASSED))], NOW)
    assert again.patch["dataset"]["staleKey"] is None
    assert again.patch["dataset"]["verdict"] == "Passed"  # spelled out whole: a replacement


def test_bad_dataset_fails_the_lorajob_with_the_reports_reason_and_rows() -> None:
    out = preflight.derive_preflight(
        lorajob(), pf_job(("Failed", "PodFailurePolicy")),
        [pf_pod("Failed", int(contract.ExitCode.DATA), json.dumps(FAILED))], NOW)
    assert out.state == preflight.FAILED
    assert out.patch["phase"] == "Failed"
    assert cond(out.patch, "Failed")["reason"] == "InvalidDataset"
    assert cond(out.patch)["status"] == "False"
    assert "train.jsonl:2" in out.patch["message"]
    assert out.patch["dataset"]["refused"][0] == {"file": "train.jsonl", "line": 2,
                                                  "reason": "messages has no assistant turn"}
    assert out.patch["completionTime"] == "2026-01-02T03:04:05Z"
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "InvalidDataset")]


def test_a_preflight_that_cannot_read_the_model_fails_with_the_exit_codes_reason() -> None:
    out = preflight.derive_preflight(lorajob(), pf_job(("Failed", "PodFailurePolicy")),
                                     [pf_pod("Failed", int(contract.ExitCode.AUTH), "boom")], NOW)
    assert out.state == preflight.FAILED
    assert cond(out.patch, "Failed")["reason"] == "Unauthorized"
    assert out.patch["message"].endswith("(exit code 5): boom")
    assert "dataset" not in out.patch


def test_preflight_deadline() -> None:
    out = preflight.derive_preflight(lorajob(), pf_job(("Failed", "DeadlineExceeded")), [], NOW)
    assert out.state == preflight.FAILED
    assert cond(out.patch, "Failed")["reason"] == "PreflightDeadlineExceeded"


def test_job_complete_before_the_pod_state_arrives_waits() -> None:
    out = preflight.derive_preflight(lorajob(), pf_job(("Complete", ""), completed="2026-01-02T03:04:00Z"),
                                     [pf_pod("Running")], NOW)
    assert out.state == preflight.RUNNING and out.requeue


@pytest.mark.parametrize("completed", ["2026-01-02T03:04:00Z", "2026-01-02T02:00:00Z"])
def test_exit_zero_without_a_report_proceeds_unvalidated(completed: str) -> None:
    out = preflight.derive_preflight(lorajob(), pf_job(("Complete", ""), completed=completed),
                                     [pf_pod("Succeeded", 0)], NOW)
    assert out.state == preflight.PASSED
    assert cond(out.patch)["status"] == "Unknown" and cond(out.patch)["reason"] == "NoReport"
    assert [e.type for e in out.events] == ["Warning"]


def test_later_phases_keep_dataset_validated() -> None:
    """derive_status's phase table does not turn the preflight's condition False."""
    first = preflight.derive_preflight(lorajob(), pf_job(("Complete", "")),
                                       [pf_pod("Succeeded", 0, json.dumps(PASSED))], NOW)
    body = lorajob()
    body["status"].update(first.patch)
    derived = status.derive_status(body, None, [], SETTINGS, now=NOW)
    assert cond(derived.patch)["status"] == "True"
    failed = status.failed_patch(body, "OutOfMemory", "x", now=NOW)
    assert cond(failed)["status"] == "True"

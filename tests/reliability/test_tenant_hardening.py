"""Multi-tenant hardening (issue 13, items 2-6), on the real control plane with kwok pods:
what a LoRAJob's author or code running in its trainer pod can make the operator do.

- item 2: with the chart's default values (no operator S3 credentials) a job reaches
  Succeeded on the trainer's checksum report; a manifest that cannot be verified ends in
  Failed ManifestUnverified after the verification deadline instead of Uploading forever;
- item 3: an object that merely has a child's name is never adopted (NameConflict), and
  names too long for unhashed child names are refused by the CRD;
- item 4: a LoRAJob that turns Failed has its running Job deleted;
- item 5: a child the API server refuses for good (quota) fails the job with the server's
  message; label syntax in nodeSelector / tolerations is checked by the CRD;
- item 6: the trainer pod's identity cannot write the status at all (it holds no token, and
  the ServiceAccount it runs as may do nothing), status forged by someone who may write it
  does not move the job, and a reported manifest outside spec.output.uri or with the
  wrong sha256 is refused.

Every LoRAJob here skips the dataset preflight stage (tested on its own), so each test
exercises exactly the trainer Job path it names.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.operator_harness import Kube, OperatorProcess
from tests.reliability.kwokjobs import (
    condition,
    jobs_of,
    lorajob,
    start_operator,
    success,
    tracebacks,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]
INSTANCE = f"ten-{uuid.uuid4().hex[:6]}"
NO_PREFLIGHT = {"uri": "s3://lora-test/data/train.jsonl", "preflight": {"enabled": False}}
RUNNING = {"kwok.lorajob.dev/keep-running": "true"}


@pytest.fixture
def ns(kube: Kube) -> Iterator[str]:
    name = kube.create_namespace("ten")
    yield name
    kube.delete_namespace(name)


def job_of(name: str, ns: str, annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    return lorajob(name, ns, INSTANCE, annotations=annotations,
                   **{"dataset": NO_PREFLIGHT, **spec})


def result_annotations(result: dict[str, Any]) -> dict[str, str]:
    """A trainer pod that exits 0 with `result` as its termination message."""
    return {"kwok.lorajob.dev/termination-message": json.dumps(result),
            "kwok.lorajob.dev/exit-code": "0", "kwok.lorajob.dev/run-seconds": "1"}


def chart_default_operator(ci: Any, ns: str, log_dir: Path) -> OperatorProcess:
    """The operator as the chart deploys it with default values: its rendered config file
    and its container environment, nothing else (no S3 credentials of its own). Only
    devMode is added, so the kwok annotations reach the simulated pods."""
    rendered = subprocess.run(
        [str(ci.helm), "template", "rel", str(REPO / "charts" / "lora-operator"),
         "--namespace", ns, "--set", f"watchNamespaces[0]={ns}"],
        capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"])
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
           if "value" in e and e["name"] != "LORA_OPERATOR_CONFIG"}
    config["devMode"] = True
    cfg = log_dir / "chart-config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    op = OperatorProcess(str(ci.kubeconfig), env, cfg, [ns], log_dir=log_dir, instance=INSTANCE)
    for key in [k for k in op.env if k.startswith("AWS_") and k not in env]:
        del op.env[key]  # the test runner's own S3 credentials are not the chart's
    return op.start()


# ------------------------------------------------------------------------------ item 2


def test_chart_default_values_job_reaches_succeeded(local_cluster: Any, kube: Kube, s3k: Any,
                                                    ns: str, tmp_path: Path) -> None:
    """Item 2 and the issue's closing requirement: chart defaults, a job without
    output.credentialsSecret → Succeeded, verified by the trainer's checksum report (the
    fallback values.yaml documents). The old operator tried a signed HEAD without
    credentials and stayed Uploading forever."""
    op = chart_default_operator(local_cluster, ns, tmp_path)
    try:
        kube.apply(job_of("defaults", ns, success(ns, "defaults", s3k)))
        st = kube.wait_phase(ns, "defaults", "Succeeded", "Failed", timeout=120)
        assert st["phase"] == "Succeeded", st
        assert "checksum report" in condition(st, "Succeeded")["message"]
        assert st["result"]["manifestUri"].endswith(f"/{ns}/defaults/manifest.json")
        assert not tracebacks(op.logs()), tracebacks(op.logs())[0]
    finally:
        op.stop()


def test_unverifiable_manifest_fails_after_the_deadline(local_cluster: Any, kube: Kube, s3k: Any,
                                                        ns: str, tmp_path: Path) -> None:
    """Item 2: storage that never answers the operator (a closed port) → Uploading while it
    re-checks with backoff, then Failed ManifestUnverified with the last error."""
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE, manifestVerifyTimeoutSeconds=15)
    try:
        out = {"uri": f"s3://lora-test/reliability/adapters/{ns}/dark/",
               "endpoint": "http://127.0.0.1:9"}
        kube.apply(job_of("dark", ns, success(ns, "dark", s3k), output=out))
        uploading = kube.wait_phase(ns, "dark", "Uploading", "Succeeded", "Failed", timeout=120)
        assert uploading["phase"] == "Uploading", uploading
        st = kube.wait_phase(ns, "dark", "Succeeded", "Failed", timeout=120)
        assert st["phase"] == "Failed", st
        failed = condition(st, "Failed")
        assert failed["reason"] == "ManifestUnverified", failed
        assert "within 15 s" in failed["message"] and "could not check" in failed["message"]
        assert not tracebacks(op.logs()), tracebacks(op.logs())[0]
    finally:
        op.stop()


# ------------------------------------------------------------------------------ item 3


def test_foreign_object_with_a_child_name_is_not_adopted(local_cluster: Any, kube: Kube,
                                                          s3k: Any, ns: str,
                                                          tmp_path: Path) -> None:
    """Item 3: a Job `<name>-a1` someone else made → Failed NameConflict naming it, that Job
    untouched and not run as ours. Names too long for unhashed children are refused by the
    API server (the old names shortened them with a hash, and a 55- and a 67-character
    LoRAJob shared their child objects)."""
    kube.apply({"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": "squat-a1", "namespace": ns,
                             "annotations": {"owner": "someone else"}},
                "spec": {"suspend": True, "template": {"spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "busybox"}]}}}})
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        kube.apply(job_of("squat", ns, success(ns, "squat", s3k)))
        st = kube.wait_phase(ns, "squat", "Succeeded", "Failed", timeout=90)
        assert st["phase"] == "Failed", st
        failed = condition(st, "Failed")
        assert failed["reason"] == "NameConflict"
        assert f"Job {ns}/squat-a1" in failed["message"]
        squatter = kube.get("job", "squat-a1", ns) or {}
        assert squatter["metadata"]["annotations"]["owner"] == "someone else"
        assert not squatter["metadata"].get("ownerReferences")
        assert squatter["spec"]["suspend"] is True  # neither adopted nor stopped: not ours
        assert jobs_of(kube, ns, "squat") == []
        assert not tracebacks(op.logs()), tracebacks(op.logs())[0]
    finally:
        op.stop()
    for long_name in ("x" * 47 + "-support", "x" * 47 + "-support-" + "y" * 11):  # 55, 67
        with pytest.raises(RuntimeError, match=r"metadata\.name must be at most 52 characters"):
            kube.apply(job_of(long_name, ns, {}))


# ------------------------------------------------------------------------------ item 4


def test_failed_lorajob_deletes_its_running_job(local_cluster: Any, kube: Kube, ns: str,
                                                 tmp_path: Path) -> None:
    """Item 4: a running job turns Failed (the operator restarted with settings that no
    longer allow its file:// dataset) → its Job and trainer pod are deleted; the old
    operator left them running (a GPU burning for a job already reported Failed)."""
    local = {"uri": "file:///data/train.jsonl", "preflight": {"enabled": False}}
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE, allowLocalUris=True)
    try:
        kube.apply(lorajob("burner", ns, INSTANCE, annotations=RUNNING, dataset=local))
        kube.wait_phase(ns, "burner", "Running", timeout=90)
        assert [j["metadata"]["name"] for j in jobs_of(kube, ns, "burner")] == ["burner-a1"]
    finally:
        op.stop()
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE, allowLocalUris=False)
    try:
        st = kube.wait_phase(ns, "burner", "Failed", timeout=90)
        assert condition(st, "Failed")["reason"] == "LocalURIRefused"
        kube.wait_for("the Job deleted", lambda: not [
            j for j in jobs_of(kube, ns, "burner") if not j["metadata"].get("deletionTimestamp")],
            timeout=60)
        kube.wait_for("the trainer pod gone or terminating", lambda: all(
            p["metadata"].get("deletionTimestamp")
            for p in kube.list("pods", ns, "lorajob.dev/job-name=burner")), timeout=60)
        assert not tracebacks(op.logs()), tracebacks(op.logs())[0]
    finally:
        op.stop()


# ------------------------------------------------------------------------------ item 5


def test_refused_child_fails_with_the_servers_message(local_cluster: Any, kube: Kube, s3k: Any,
                                                      ns: str, tmp_path: Path) -> None:
    """Item 5: a ResourceQuota that allows no Jobs → Failed ChildRejected carrying the API
    server's "exceeded quota" (the old operator retried every 15 s forever, Pending)."""
    kube.apply({"apiVersion": "v1", "kind": "ResourceQuota",
                "metadata": {"name": "no-jobs", "namespace": ns},
                "spec": {"hard": {"count/jobs.batch": "0"}}})
    kube.wait_for("the quota counted", lambda: (kube.get("resourcequota", "no-jobs", ns) or {})
                  .get("status", {}).get("hard"))
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        kube.apply(job_of("quota", ns, success(ns, "quota", s3k)))
        st = kube.wait_phase(ns, "quota", "Succeeded", "Failed", timeout=90)
        assert st["phase"] == "Failed", st
        failed = condition(st, "Failed")
        assert failed["reason"] == "ChildRejected"
        assert "exceeded quota" in failed["message"] and "quota-a1" in failed["message"]
        assert not tracebacks(op.logs()), tracebacks(op.logs())[0]
    finally:
        op.stop()


@pytest.mark.parametrize(("resources", "expected"), [
    ({"nodeSelector": {"bad key!": "x"}}, "nodeSelector keys must be label keys"),
    ({"nodeSelector": {"pool": "not a label value"}}, "spec.resources.nodeSelector.pool"),
    ({"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]},
     "value must be empty when operator is Exists"),
    ({"tolerations": [{"operator": "Equal", "value": "x"}]}, "operator must be Exists when key"),
    ({"tolerations": [{"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 5}]},
     "tolerationSeconds needs effect NoExecute"),
])
def test_label_syntax_is_checked_by_the_crd(local_cluster: Any, kube: Kube, ns: str,
                                            resources: dict[str, Any], expected: str) -> None:
    """Item 5: what Kubernetes would refuse on the pod is refused on the LoRAJob, with the
    field named (the old CRD accepted it, and the Job create failed for ever after)."""
    with pytest.raises(RuntimeError, match=expected):
        kube.apply(job_of("labels", ns, {}, resources=resources))


# ------------------------------------------------------------------------------ item 6


def test_status_written_with_the_trainer_token_decides_nothing(local_cluster: Any, kube: Kube,
                                                               ns: str, tmp_path: Path) -> None:
    """Item 6: the identity the trainer pod runs as (it mounts no token) cannot forge phase
    Succeeded, a result, attempts 3 and an 8-GPU h200 placement: the API server refuses
    it. The same forgery of attempts and placement by someone who may write status is
    undone: the operator derives the status again (Running, attempt 1) and makes no other
    Job; the old operator took a forged Succeeded as final."""
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        kube.apply(job_of("forged", ns, RUNNING))
        before = kube.wait_phase(ns, "forged", "Running", timeout=90)
        pod = kube.list("pods", ns, "lorajob.dev/job-name=forged")[0]
        assert pod["spec"]["automountServiceAccountToken"] is False
        identity = f"system:serviceaccount:{ns}:{pod['spec'].get('serviceAccountName', 'default')}"
        forged = {"status": {"phase": "Succeeded", "attempts": 3,
                             "result": {"adapterUri": "s3://lora-test/elsewhere/"},
                             "placement": {"vramClass": "h200-141gb", "gpus": 8}}}
        with pytest.raises(RuntimeError, match=r"(?i)forbidden"):
            kube.run("patch", "lorajob", "forged", "-n", ns, "--subresource=status",
                     "--type=merge", "-p", json.dumps(forged), f"--as={identity}")
        assert kube.status(ns, "forged")["phase"] == "Running"
        del forged["status"]["phase"], forged["status"]["result"]
        kube.run("patch", "lorajob", "forged", "-n", ns, "--subresource=status", "--type=merge",
                 "-p", json.dumps(forged))

        def restored() -> dict[str, Any] | None:
            st = kube.status(ns, "forged")
            return st if st.get("phase") == "Running" and st.get("attempts") == 1 else None
        kube.wait_for("the operator to restore the status", restored, timeout=60)
        jobs = jobs_of(kube, ns, "forged")
        assert [j["metadata"]["name"] for j in jobs] == ["forged-a1"]
        assert jobs[0]["metadata"]["labels"]["lorajob.dev/vram-class"] == \
            before["placement"]["vramClass"]
        assert not tracebacks(op.logs()), tracebacks(op.logs())[0]
    finally:
        op.stop()


def test_reported_manifest_must_be_this_jobs(local_cluster: Any, kube: Kube, s3k: Any, ns: str,
                                             tmp_path: Path) -> None:
    """Item 6: a trainer that reports another job's manifest (outside its spec.output.uri),
    or its own with a sha256 that is not what storage holds, fails ManifestMismatch; the
    old operator only HEADed the reported URI and said Succeeded for both."""
    victim_key = f"reliability/adapters/{ns}/victim/manifest.json"
    body = json.dumps({"job": {"uid": "victim-uid"}, "files": {}}).encode()
    s3k.put_object(Bucket="lora-test", Key=victim_key, Body=body)
    own_key = f"reliability/adapters/{ns}/liar/manifest.json"
    s3k.put_object(Bucket="lora-test", Key=own_key, Body=b'{"files": {}}')
    thief = {"exitCode": 0, "reason": "Completed", "manifestUri": f"s3://lora-test/{victim_key}",
             "manifestSha256": hashlib.sha256(body).hexdigest(),
             "adapterUri": f"s3://lora-test/reliability/adapters/{ns}/victim/"}
    liar = {"exitCode": 0, "reason": "Completed", "manifestUri": f"s3://lora-test/{own_key}",
            "manifestSha256": "0" * 64,
            "adapterUri": f"s3://lora-test/reliability/adapters/{ns}/liar/"}
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        kube.apply(job_of("thief", ns, result_annotations(thief)))
        kube.apply(job_of("liar", ns, result_annotations(liar)))
        for name, needle in (("thief", "not under spec.output.uri"), ("liar", "sha256")):
            st = kube.wait_phase(ns, name, "Succeeded", "Failed", timeout=90)
            assert st["phase"] == "Failed", (name, st)
            failed = condition(st, "Failed")
            assert failed["reason"] == "ManifestMismatch", (name, failed)
            assert needle in failed["message"], (name, failed)
            assert "result" not in st
        assert not tracebacks(op.logs()), tracebacks(op.logs())[0]
    finally:
        op.stop()

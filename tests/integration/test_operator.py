"""The operator against the real local cluster: kwok-simulated GPU pods, SeaweedFS S3.

No mocks: the operator runs as a subprocess (`lora-operator run`), LoRAJobs go in with
kubectl, outcomes are steered by `kwok.lorajob.dev/*` annotations on the LoRAJob (the
operator copies them to the trainer pod; hack/cluster/kwok-stages.yaml reads them).

Most lifecycles run at once, each in its own LoRAJob, under one shared operator; the
tests that kill or duplicate the operator start their own.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.integration.operator_harness import (
    PEERING_CRDS,
    Kube,
    OperatorProcess,
    running_operator,
    write_settings,
)

pytestmark = pytest.mark.cluster

LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
MODEL_URI = "s3://lora-test/models/llama-3.1-8b/"   # config.json uploaded by the fixture
MISSING_MODEL_URI = "s3://lora-test/models/not-there/"
# Every LoRAJob here carries this instance label, and only our operators handle it: other
# operators running against the shared dev cluster leave these jobs alone.
INSTANCE = f"it-{uuid.uuid4().hex[:6]}"
INSTANCE_LABEL = "lorajob.dev/operator-instance"


# --------------------------------------------------------------------------- fixtures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def kube(local_cluster: Any) -> Kube:
    return Kube(str(local_cluster.kubectl), str(local_cluster.kubeconfig))


@pytest.fixture(scope="module")
def s3(local_cluster: Any) -> Any:
    client = boto3.client("s3", endpoint_url=local_cluster.s3_endpoint,
                          aws_access_key_id=local_cluster.s3_access_key,
                          aws_secret_access_key=local_cluster.s3_secret_key,
                          region_name=local_cluster.s3_region)
    client.put_object(Bucket=local_cluster.s3_bucket, Key="models/llama-3.1-8b/config.json",
                      Body=json.dumps(LLAMA_8B).encode())
    return client


@pytest.fixture(scope="module")
def settings_file(local_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_settings(tmp_path_factory.mktemp("settings") / "settings.yaml",
                          local_cluster.s3_endpoint)


class Shared:
    """One operator for the module, watching one namespace per test."""

    def __init__(self, op: OperatorProcess, namespaces: dict[str, str], metrics_port: int):
        self.op, self.namespaces, self.metrics_port = op, namespaces, metrics_port


TEST_NAMESPACES = ["life", "susp", "kueue", "del"]


@pytest.fixture(scope="module")
def shared(local_cluster: Any, kube: Kube, s3: Any, settings_file: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    namespaces = {key: kube.create_namespace(f"lo-{key}") for key in TEST_NAMESPACES}
    port = _free_port()
    op = OperatorProcess(str(local_cluster.kubeconfig), local_cluster.env, settings_file,
                         list(namespaces.values()), metrics_port=port, instance=INSTANCE,
                         log_dir=tmp_path_factory.mktemp("operator-logs")).start()
    try:
        yield Shared(op, namespaces, port)
    finally:
        op.stop()
        for ns in namespaces.values():
            kube.delete_namespace(ns)


@pytest.fixture
def own_namespace(kube: Kube) -> Iterator[str]:
    ns = kube.create_namespace("lo-own")
    yield ns
    kube.delete_namespace(ns)


# --------------------------------------------------------------------------- helpers


def lorajob(name: str, ns: str, *, annotations: dict[str, str] | None = None,
            labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "baseModel": {"uri": MODEL_URI},
        # kwok plays the trainer pod and nothing reads this file: the dataset preflight is
        # off here (tests/integration/test_preflight.py covers it, with kwok and for real).
        "dataset": {"uri": "s3://lora-test/data/train.jsonl", "preflight": {"enabled": False}},
        "method": "lora",
        "output": {"uri": f"s3://lora-test/adapters/{ns}/{name}/"},
    }
    body.update(spec)
    return {"apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRAJob",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations or {},
                         "labels": {INSTANCE_LABEL: INSTANCE, **(labels or {})}},
            "spec": body}


def success(ns: str, name: str, s3: Any | None = None, *, upload: bool = True,
            run_seconds: int = 1, prefix: str = "") -> dict[str, str]:
    """kwok annotations for a trainer that succeeds with a TrainerResult; uploads the
    manifest where the result says it is (as the trainer would) unless told not to."""
    key = f"adapters/{ns}/{name}/manifest.json"
    manifest = json.dumps({"files": []}).encode()  # the operator checks its sha256
    result = {"exitCode": 0, "reason": "Completed", "adapterUri": f"s3://lora-test/adapters/{ns}/{name}/",
              "manifestUri": f"s3://lora-test/{key}",
              "manifestSha256": hashlib.sha256(manifest).hexdigest(),
              "sizeBytes": 4096, "baseEvalLoss": 2.0, "adapterEvalLoss": 1.2, "improvement": 0.4}
    if upload and s3 is not None:
        s3.put_object(Bucket="lora-test", Key=key, Body=manifest)
    return {f"kwok.lorajob.dev/{prefix}termination-message": json.dumps(result),
            f"kwok.lorajob.dev/{prefix}exit-code": "0",
            f"kwok.lorajob.dev/{prefix}run-seconds": str(run_seconds)}


def failure(code: int, reason: str, message: str, prefix: str = "") -> dict[str, str]:
    result = {"exitCode": code, "reason": reason, "message": message}
    return {f"kwok.lorajob.dev/{prefix}exit-code": str(code),
            f"kwok.lorajob.dev/{prefix}termination-message": json.dumps(result)}


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    out: dict[str, Any] = next((c for c in status.get("conditions") or []
                                if c["type"] == ctype), {})
    return out


def jobs_of(kube: Kube, ns: str, name: str) -> list[dict[str, Any]]:
    return kube.list("jobs", ns, f"lorajob.dev/job-name={name}")


# --------------------------------------------------------------------------- lifecycles


def test_lifecycles(kube: Kube, s3: Any, shared: Shared) -> None:
    """Success, permanent failure, OOM escalation, unschedulable, nothing fits, unknown
    shape, missing manifest, deadline and TTL: all at once, each checked to its end."""
    ns = shared.namespaces["life"]
    jobs = [
        lorajob("ok", ns, annotations=success(ns, "ok", s3, run_seconds=2)),
        lorajob("bad-data", ns, annotations=failure(3, "InvalidDataset",
                                                    "column 'text' missing in train.jsonl")),
        lorajob("oom", ns, annotations={**failure(42, "OutOfMemory", "CUDA out of memory"),
                                        **success(ns, "oom", s3, prefix="attempt-2.")}),
        lorajob("unsched", ns, resources={"nodeSelector": {"lorajob.dev/pool": "nowhere"}}),
        lorajob("too-big", ns, baseModel={"uri": MISSING_MODEL_URI,
                                          "architecture": "llama-3.1-70b"},
                resources={"gpus": 1, "vramClass": "auto", "deepspeed": "none"}),
        lorajob("no-shape", ns, baseModel={"uri": MISSING_MODEL_URI}),
        lorajob("no-manifest", ns, annotations=success(ns, "no-manifest", s3, upload=False)),
        lorajob("deadline", ns, annotations={"kwok.lorajob.dev/keep-running": "true"},
                runPolicy={"activeDeadlineSeconds": 60}),
        lorajob("ttl", ns, annotations=success(ns, "ttl", s3),
                runPolicy={"ttlSecondsAfterFinished": 3}),
    ]
    kube.apply("\n---\n".join(yaml.safe_dump(j) for j in jobs))

    # Fails at once, before any pod, with the breakdown / the reason.
    st = kube.wait_phase(ns, "too-big", "Failed", timeout=30)
    assert condition(st, "Failed")["reason"] == "InsufficientGPUMemory"
    assert condition(st, "Planned")["status"] == "False"
    assert "weights" in st["message"]
    st = kube.wait_phase(ns, "no-shape", "Failed", timeout=30)
    assert condition(st, "Failed")["reason"] == "ModelShapeUnavailable"
    assert "spec.baseModel.architecture" in st["message"]
    for name in ("too-big", "no-shape"):
        assert jobs_of(kube, ns, name) == []

    # Success: result, manifest verified, cost, kubectl wait on the condition.
    kube.run("wait", "--for=condition=Succeeded", "lorajob/ok", "-n", ns, "--timeout=60s")
    st = kube.status(ns, "ok")
    assert st["phase"] == "Succeeded"
    assert st["result"]["adapterUri"] == f"s3://lora-test/adapters/{ns}/ok/"
    assert st["result"]["adapterEvalLoss"] == 1.2
    assert "verified in storage" in condition(st, "Succeeded")["message"]
    assert st["placement"]["vramClass"] == "l40s-48gb" and st["placement"]["node"]
    assert st["placement"]["breakdown"]["weights"] > 10
    assert st["cost"]["gpuHours"] > 0 and st["cost"]["estimatedUSD"] > 0
    assert st["startTime"] and st["completionTime"] and st["attempts"] == 1
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert (conds["Planned"], conds["Scheduled"], conds["Succeeded"]) == ("True",) * 3
    assert "True" not in (conds.get("Running"), conds.get("Uploading"), conds.get("Failed"))
    # The normal way to Succeeded is told by the conditions (with their transition times);
    # Events are only for what needs attention, so this job has none.
    assert not [e["reason"] for e in kube.list("events", ns) if e["involvedObject"]["name"] == "ok"]
    assert all(c["lastTransitionTime"] for c in st["conditions"])

    # Permanent failure: the trainer's reason and message, no retry.
    st = kube.wait_phase(ns, "bad-data", "Failed", timeout=60)
    failed = condition(st, "Failed")
    assert failed["reason"] == "InvalidDataset"
    assert "column 'text' missing" in failed["message"]
    assert len(kube.list("pods", ns, "lorajob.dev/job-name=bad-data")) == 1

    # Out of memory: attempt 2 on the next class up, which succeeds.
    st = kube.wait_phase(ns, "oom", "Succeeded", timeout=90)
    assert st["attempts"] == 2
    by_attempt = {j["metadata"]["labels"]["lorajob.dev/attempt"]: j for j in jobs_of(kube, ns, "oom")}
    assert set(by_attempt) == {"1", "2"}
    first = by_attempt["1"]["metadata"]["labels"]["lorajob.dev/vram-class"]
    second = by_attempt["2"]["metadata"]["labels"]["lorajob.dev/vram-class"]
    assert (first, second) == ("l40s-48gb", "h100-80gb")
    assert st["placement"]["vramClass"] == "h100-80gb"
    oom_events = [e for e in kube.list("events", ns)
                  if e["involvedObject"]["name"] == "oom" and e["reason"] == "OutOfMemory"]
    assert oom_events and oom_events[0]["type"] == "Warning"

    # Unschedulable: Scheduling, with the scheduler's own message.
    def unschedulable() -> dict[str, Any] | None:
        s = kube.status(ns, "unsched")
        return s if condition(s, "Scheduled").get("reason") == "Unschedulable" else None
    st = kube.wait_for("unsched Unschedulable", unschedulable, timeout=60)
    assert st["phase"] == "Scheduling"
    assert condition(st, "Scheduled")["status"] == "False"
    assert "node" in condition(st, "Scheduled")["message"]

    # Manifest reported but not in storage.
    st = kube.wait_phase(ns, "no-manifest", "Failed", timeout=60)
    assert condition(st, "Failed")["reason"] == "ManifestMissing"

    # TTL: the finished LoRAJob is deleted, its children with it.
    kube.wait_for("ttl deleted", lambda: kube.get("lorajob", "ttl", ns) is None, timeout=60)

    # Printer columns a user sees.
    table = kube.run("get", "lorajobs", "-n", ns)
    header = table.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "MODEL", "METHOD", "VRAM", "PROGRESS", "LOSS", "AGE"]
    row = next(line.split() for line in table.splitlines() if line.startswith("ok "))
    assert row[1:5] == ["Succeeded", MODEL_URI, "lora", "l40s-48gb"]
    wide = kube.run("get", "lorajobs", "ok", "-n", ns, "-o", "wide").splitlines()
    assert "ADAPTER" in wide[0] and "NODE" in wide[0]

    # Metrics from the operator.
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{shared.metrics_port}/metrics", timeout=5).read().decode()
    assert 'lora_operator_lorajobs{phase="Succeeded"}' in text
    assert "lora_operator_reconcile_duration_seconds_bucket" in text
    escalations = re.search(r"^lora_operator_oom_escalations_total (\S+)$", text, re.M)
    assert escalations and float(escalations.group(1)) >= 1, text[-3000:]

    # Deadline (60 s is the API's minimum): Failed/DeadlineExceeded.
    st = kube.wait_phase(ns, "deadline", "Failed", timeout=120)
    assert condition(st, "Failed")["reason"] == "DeadlineExceeded"


def test_children_are_owned_and_restricted(kube: Kube, s3: Any, shared: Shared) -> None:
    """The Job is the only child, owned by the LoRAJob; its pod holds no API token and reads
    its config from its own annotation; deleting the LoRAJob removes Job and pod."""
    ns = shared.namespaces["del"]
    kube.apply(lorajob("gc", ns, annotations={"kwok.lorajob.dev/keep-running": "true"}))
    kube.wait_phase(ns, "gc", "Running", timeout=60)
    uid = kube.get("lorajob", "gc", ns)["metadata"]["uid"]  # type: ignore[index]
    kinds = ["job/gc-a1"]
    job_obj = kube.get("job", "gc-a1", ns)
    assert job_obj is not None
    owner = job_obj["metadata"]["ownerReferences"][0]
    assert (owner["uid"], owner["controller"], owner["blockOwnerDeletion"]) == (uid, True, True)
    for kind in ("configmaps", "serviceaccounts", "roles", "rolebindings"):
        assert not kube.list(kind, ns, "lorajob.dev/job-name=gc"), kind
    pod = kube.list("pods", ns, "lorajob.dev/job-name=gc")[0]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # No API identity: the token is not mounted, and the pod runs as the namespace default.
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"].get("serviceAccountName", "default") == "default"
    assert not [m for c in pod["spec"]["containers"] for m in c.get("volumeMounts") or []
                if "serviceaccount" in m["mountPath"]]
    config = yaml.safe_load(pod["metadata"]["annotations"]["lorajob.dev/trainer-config"])
    assert (config["job"]["uid"], config["placement"]["vramClass"]) == \
        (uid, kube.status(ns, "gc")["placement"]["vramClass"])
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    assert volume["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['lorajob.dev/trainer-config']"

    kube.run("delete", "lorajob", "gc", "-n", ns, "--wait=true", "--timeout=30s")

    def all_gone() -> bool:
        return all(kube.get(*ref.split("/"), ns) is None for ref in kinds) and \
            not kube.list("pods", ns, "lorajob.dev/job-name=gc")
    kube.wait_for("children garbage-collected", all_gone, timeout=60)


def test_suspend_and_resume(kube: Kube, s3: Any, shared: Shared) -> None:
    ns = shared.namespaces["susp"]
    kube.apply(lorajob("pause", ns, annotations={"kwok.lorajob.dev/keep-running": "true"}))
    kube.wait_phase(ns, "pause", "Running", timeout=60)
    # Progress as the operator writes it from the trainer's log (a kwok pod has none).
    progress = {"apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRAJob",
                "metadata": {"name": "pause", "namespace": ns},
                "status": {"progress": {"step": 40, "totalSteps": 100, "percent": 40.0,
                                        "loss": 1.5}}}
    kube.run("apply", "--server-side", "--field-manager=lora-trainer", "--subresource=status",
             "-f", "-", stdin=yaml.safe_dump(progress))

    kube.run("patch", "lorajob", "pause", "-n", ns, "--type=merge",
             "-p", '{"spec": {"runPolicy": {"suspend": true}}}')
    st = kube.wait_phase(ns, "pause", "Suspended", timeout=30)
    assert condition(st, "Suspended")["status"] == "True"
    assert condition(st, "Running")["status"] == "False"
    kube.wait_for("Job suspended, pod gone",
                  lambda: kube.get("job", "pause-a1", ns)["spec"]["suspend"] is True  # type: ignore[index]
                  and not [p for p in kube.list("pods", ns, "lorajob.dev/job-name=pause")
                           if not p["metadata"].get("deletionTimestamp")], timeout=30)
    assert kube.status(ns, "pause")["progress"]["step"] == 40  # progress kept
    table = kube.run("get", "lorajobs", "pause", "-n", ns)
    assert "Suspended" in table and "40" in table and "1.5" in table

    kube.run("patch", "lorajob", "pause", "-n", ns, "--type=merge",
             "-p", '{"spec": {"runPolicy": {"suspend": false}}}')
    st = kube.wait_phase(ns, "pause", "Running", timeout=30)
    assert condition(st, "Suspended")["status"] == "False"
    assert condition(st, "Running")["status"] == "True"
    assert len(jobs_of(kube, ns, "pause")) == 1  # the same Job resumed, not a new attempt
    assert st["progress"]["step"] == 40


def test_kueue_job_waits_for_admission(kube: Kube, s3: Any, shared: Shared) -> None:
    ns = shared.namespaces["kueue"]
    kube.apply(lorajob("queued", ns, labels={"kueue.x-k8s.io/queue-name": "team-a"},
                       annotations=success(ns, "queued", s3)))
    st = kube.wait_phase(ns, "queued", "Queued", timeout=30)
    assert condition(st, "Queued")["status"] == "True"
    job = kube.wait_for("the Job", lambda: kube.get("job", "queued-a1", ns), timeout=10)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    time.sleep(3)  # the operator must not admit it by itself
    assert kube.get("job", "queued-a1", ns)["spec"]["suspend"] is True  # type: ignore[index]
    assert kube.status(ns, "queued")["phase"] == "Queued"
    assert not kube.list("pods", ns, "lorajob.dev/job-name=queued")

    # Acting as Kueue: admit the workload by unsuspending the Job.
    kube.run("patch", "job", "queued-a1", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    st = kube.wait_phase(ns, "queued", "Succeeded", timeout=60)
    assert condition(st, "Queued")["status"] == "False"


# --------------------------------------------------------------------------- robustness


def test_operator_killed_and_restarted(local_cluster: Any, kube: Kube, s3: Any,
                                       settings_file: Path, own_namespace: str,
                                       tmp_path: Path) -> None:
    """SIGKILL mid-run, changes while it is down, restart: one Job per attempt, right status."""
    ns = own_namespace
    op = OperatorProcess(str(local_cluster.kubeconfig), local_cluster.env, settings_file, [ns],
                         log_dir=tmp_path, instance=INSTANCE)
    op.start()
    try:
        kube.apply(lorajob("survivor", ns, annotations=success(ns, "survivor", s3, run_seconds=5)))
        kube.wait_phase(ns, "survivor", "Running", timeout=60)
        op.kill()
        # While it is down: the pod finishes, and a new LoRAJob arrives.
        kube.apply(lorajob("newcomer", ns, annotations=success(ns, "newcomer", s3)))
        kube.wait_for("survivor's Job complete", lambda: any(
            c["type"] == "Complete" and c["status"] == "True"
            for c in (kube.get("job", "survivor-a1", ns) or {}).get("status", {})
            .get("conditions", [])), timeout=60)
        assert kube.status(ns, "survivor")["phase"] in ("Running", "Uploading")
        op.start()
        for name in ("survivor", "newcomer"):
            st = kube.wait_phase(ns, name, "Succeeded", timeout=60)
            assert st["attempts"] == 1
            assert len(jobs_of(kube, ns, name)) == 1
        # A second restart right away finds nothing to do and changes nothing.
        before = kube.get("lorajob", "survivor", ns)["metadata"]["resourceVersion"]  # type: ignore[index]
        op.stop()
        op.start()
        time.sleep(4)
        assert kube.get("lorajob", "survivor", ns)["metadata"]["resourceVersion"] == before  # type: ignore[index]
    finally:
        op.stop()


def test_two_replicas_only_one_acts(local_cluster: Any, kube: Kube, s3: Any,
                                    settings_file: Path, own_namespace: str,
                                    tmp_path: Path) -> None:
    ns = own_namespace
    kube.apply(PEERING_CRDS)
    kube.wait_for("peering CRD established", lambda: "True" in kube.run(
        "get", "crd", "kopfpeerings.kopf.dev", "-o",
        "jsonpath={.status.conditions[?(@.type=='Established')].status}"), timeout=30)
    peering = f"lora-{uuid.uuid4().hex[:6]}"
    kube.apply({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                "metadata": {"name": peering, "namespace": ns}})
    args = (str(local_cluster.kubeconfig), local_cluster.env, settings_file, [ns])
    with running_operator(*args, peering=peering, priority=200, log_dir=tmp_path,
                          name="high", instance=INSTANCE) as high, \
            running_operator(*args, peering=peering, priority=100, log_dir=tmp_path,
                             name="low", instance=INSTANCE) as low:
        def both_registered() -> bool:
            peers = (kube.get("kopfpeering", peering, ns) or {}).get("status") or {}
            return sorted(p.get("priority") for p in peers.values()) == [100, 200]
        kube.wait_for("both replicas in the peering object", both_registered, timeout=60)
        time.sleep(1)  # the low one reacts to seeing the high one
        names = [f"ha-{i}" for i in range(3)]
        kube.apply("\n---\n".join(yaml.safe_dump(lorajob(n, ns, annotations=success(ns, n, s3)))
                                  for n in names))
        for n in names:
            kube.wait_phase(ns, n, "Succeeded", timeout=60)
            assert len(jobs_of(kube, ns, n)) == 1
        assert high.alive and low.alive
        assert "created Job" in high.logs()
        assert "created Job" not in low.logs()

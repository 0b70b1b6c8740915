"""Faults around the operator, on the real control plane with kwok-simulated GPU nodes:
SIGKILL mid-burst, a node deleted under a running trainer pod, a restarted kube-apiserver,
and a trainer whose storage never comes back. In every case: no lost and no duplicated Job,
and the status converges to the truth.

(The operator killed *mid-job* alone, with changes made while it is down, is
tests/integration/test_operator.py::test_operator_killed_and_restarted.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.operator_harness import Kube
from tests.reliability.kwokjobs import (
    condition,
    failure,
    jobs_of,
    lorajob,
    start_operator,
    success,
    tracebacks,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
INSTANCE = f"rel-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def ns(kube: Kube) -> Iterator[str]:
    name = kube.create_namespace("rel")
    yield name
    kube.delete_namespace(name)


def test_operator_sigkilled_mid_burst(local_cluster: Any, kube: Kube, s3k: Any, ns: str,
                                      tmp_path: Path) -> None:
    """30 LoRAJobs at once; SIGKILL while their Jobs are being created (some already running,
    some not yet created); restart: every job Succeeds with exactly one Job, attempt 1."""
    n = 30
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE, maxWorkers=4)
    try:
        names = [f"burst-{i:02d}" for i in range(n)]
        docs = [lorajob(x, ns, INSTANCE, annotations=success(ns, x, s3k, run_seconds=3))
                for x in names]
        kube.run("apply", "-f", "-", stdin="\n---\n".join(yaml.safe_dump(d) for d in docs))
        created = kube.wait_for("the first Jobs", lambda: (
            len(kube.list("jobs", ns)) >= 2 and len(kube.list("jobs", ns))), timeout=120,
            interval=0.05)
        op.kill()
        at_kill = len(kube.list("jobs", ns))
        assert created < n and at_kill < n, "the burst was over before the kill: no fault"
        time.sleep(2)
        op.start()
        for x in names:
            st = kube.wait_phase(ns, x, "Succeeded", "Failed", timeout=240)
            assert st["phase"] == "Succeeded", (x, st)
            assert st["attempts"] == 1
        jobs = kube.list("jobs", ns)
        per_owner: dict[str, list[str]] = {}
        for j in jobs:
            per_owner.setdefault(j["metadata"]["labels"]["lorajob.dev/job-name"], []).append(
                j["metadata"]["name"])
        assert sorted(per_owner) == names, "a Job was lost"
        assert all(v == [f"{k}-a1"] for k, v in per_owner.items()), per_owner
        assert op.alive
        assert not tracebacks(op.logs()), tracebacks(op.logs())[0]
        FIGURES["burst"] = {"jobs": n, "jobs_at_kill": at_kill}
    finally:
        op.stop()


def _kwok_node(name: str) -> dict[str, Any]:
    labels = {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
              "kubernetes.io/arch": "amd64", "nvidia.com/gpu.present": "true",
              "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.memory": "81559",
              "nvidia.com/gpu.count": "1", "lorajob.dev/reliability-node": name}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels,
                         "annotations": {"kwok.x-k8s.io/node": "fake",
                                         "node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present",
                                 "effect": "NoSchedule"},
                                {"key": "lorajob.dev/reliability", "value": name,
                                 "effect": "NoSchedule"}]}}


def _add_node(kube: Kube, name: str) -> None:
    kube.apply(_kwok_node(name))
    res = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "1",
           "ephemeral-storage": "10Ti"}
    kube.run("patch", "node", name, "--subresource=status", "--type=merge", "-p",
             json.dumps({"status": {"capacity": res, "allocatable": res}}))
    kube.wait_for(f"node {name} Ready", lambda: "True" in kube.run(
        "get", "node", name, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        check=False), timeout=60)


def _delete_node(kube: Kube, name: str) -> None:
    """The node goes away as a terminated cloud VM's does: its Node object and its lease."""
    kube.run("delete", "node", name, "--wait=false")
    kube.run("-n", "kube-node-lease", "delete", "lease", name, "--ignore-not-found")


def test_node_deleted_under_running_pod(local_cluster: Any, kube: Kube, s3k: Any, ns: str,
                                        tmp_path: Path) -> None:
    """The trainer's node disappears (Node and Lease deleted) under a running pod: the pod-GC
    controller fails and removes the orphaned pod, the LoRAJob says the pod was lost on that
    node and is being replaced (not Failed), a new pod runs once a node is back, and the job
    Succeeds within backoffLimit on the same Job.

    The first pod is told to run until deleted (`keep-running`), so only the node loss can end
    it. Its replacement is created while no node matches (Pending); the test then sets its kwok
    outcome (exit 0 after 2 s) before the node comes back."""
    node = f"rel-node-{uuid.uuid4().hex[:5]}"
    _add_node(kube, node)
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        name = "orphan"
        ann = {**success(ns, name, s3k), "kwok.lorajob.dev/keep-running": "true"}
        body = lorajob(name, ns, INSTANCE, annotations=ann,
                       resources={"nodeSelector": {"lorajob.dev/reliability-node": node},
                                  "tolerations": [{"key": "lorajob.dev/reliability",
                                                   "operator": "Exists", "effect": "NoSchedule"}]},
                       runPolicy={"backoffLimit": 2})
        kube.apply(body)
        st = kube.wait_phase(ns, name, "Running", timeout=300)  # a busy Job controller is slow
        assert st["placement"].get("node") == node, st
        first = kube.list("pods", ns, f"lorajob.dev/job-name={name}")[0]["metadata"]["name"]
        t0 = time.monotonic()
        _delete_node(kube, node)
        seen: list[tuple[str, str]] = []
        reasons: set[str] = set()

        def replacement() -> dict[str, Any] | None:
            st = kube.status(ns, name)
            seen.append((st.get("phase", ""), st.get("message", "")))
            reasons.update(c.get("reason", "") for c in st.get("conditions") or [])
            pods = kube.list("pods", ns, f"lorajob.dev/job-name={name}")
            gone = all(p["metadata"]["name"] != first for p in pods)
            new = [p for p in pods if p["metadata"]["name"] != first]
            return new[0] if gone and new else None
        # pod-GC waits ~40 s (its quarantine) before it touches pods of a vanished node.
        pod = kube.wait_for("the orphaned pod replaced", replacement, timeout=300, interval=1)
        lost_after = time.monotonic() - t0
        assert pod["status"].get("phase") == "Pending" and not pod["spec"].get("nodeName"), pod
        time.sleep(3)
        st = kube.status(ns, name)
        seen.append((st.get("phase", ""), st.get("message", "")))
        assert st["phase"] not in ("Failed", "Succeeded"), st
        # The status named the loss (pod and node) while it happened; an Event keeps it.
        lost = [m for _, m in seen if first in m and node in m]
        assert lost, seen
        events = [e for e in kube.list("events", ns)
                  if e["involvedObject"].get("name") == name and first in e.get("message", "")]
        assert events and events[-1]["type"] == "Warning", events

        kube.run("-n", ns, "annotate", "pod", pod["metadata"]["name"], "--overwrite",
                 "kwok.lorajob.dev/keep-running=false", "kwok.lorajob.dev/run-seconds=2")
        _add_node(kube, node)
        st = kube.wait_phase(ns, name, "Succeeded", "Failed", timeout=300)
        assert st["phase"] == "Succeeded", st
        assert st["attempts"] == 1
        (job,) = jobs_of(kube, ns, name)
        failed = int(job["status"].get("failed") or 0)
        assert failed <= 2, job["status"]  # within backoffLimit (pod-GC losses are not counted)
        assert not tracebacks(op.logs())
        FIGURES["node"] = {"pod_lost_after_s": round(lost_after, 1),
                           "phases_seen": sorted({p for p, _ in seen}),
                           "messages": lost[:1], "job_failed": failed,
                           "reasons": sorted(reasons)}
    finally:
        op.stop()
        kube.run("delete", "node", node, "--ignore-not-found", check=False)


def test_permanent_storage_failure_fails_with_reason(local_cluster: Any, kube: Kube, s3k: Any,
                                                     ns: str, tmp_path: Path) -> None:
    """Exit 75 (StorageUnavailable) on every attempt: retried within backoffLimit, then
    Failed with the trainer's reason and message; never Succeeded, no adapter in status."""
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        name = "s3-dead"
        msg = "upload s3://lora-test/x/adapter_model.safetensors: cannot reach S3 (EndpointConnectionError)"
        kube.apply(lorajob(name, ns, INSTANCE, annotations=failure(75, "StorageUnavailable", msg),
                           runPolicy={"backoffLimit": 1}))
        st = kube.wait_phase(ns, name, "Failed", "Succeeded", timeout=120)
        assert st["phase"] == "Failed", st
        assert "cannot reach S3" in st["message"] or "StorageUnavailable" in str(st["conditions"]), st
        assert not (st.get("result") or {}).get("adapterUri")
        (job,) = jobs_of(kube, ns, name)
        assert int(job["status"].get("failed") or 0) == 2  # first run + 1 retry
        FIGURES["storage"] = {"message": st["message"][:200],
                              "failed": condition(st, "Failed").get("reason")}
    finally:
        op.stop()


def _restart_apiserver(ci: Any) -> float:
    """SIGTERM kube-apiserver and start it again with the same arguments; seconds down."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack" / "cluster"))
    import localcluster

    p = localcluster.Paths(Path(ci.state_dir))
    pid, _ = localcluster.read_pids(p)["kube-apiserver"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    t0 = time.monotonic()
    os.killpg(pid, signal.SIGTERM)
    for _ in range(300):
        if not Path(f"/proc/{pid}").exists() or \
                Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    time.sleep(2)  # clients see a dead endpoint for a while
    localcluster.start_process(p, "kube-apiserver", [a.decode() for a in argv])
    kubectl = [str(ci.kubectl), "--kubeconfig", str(ci.kubeconfig)]
    for _ in range(240):
        if subprocess.run([*kubectl, "get", "--raw", "/readyz"], capture_output=True).returncode == 0:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError("kube-apiserver did not come back")


@pytest.mark.slow
def test_apiserver_restart_operator_reconnects(local_cluster: Any, kube: Kube, s3k: Any, ns: str,
                                               tmp_path: Path) -> None:
    """kube-apiserver restarts while jobs run: the operator's watches reconnect, it does not
    crash, every job Succeeds with one Job, and a job created afterwards is handled."""
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        names = [f"apisrv-{i}" for i in range(4)]
        for x in names:
            kube.apply(lorajob(x, ns, INSTANCE, annotations=success(ns, x, s3k, run_seconds=12)))
        for x in names:
            kube.wait_phase(ns, x, "Running", timeout=90)
        down = _restart_apiserver(local_cluster)
        for x in names:
            st = kube.wait_phase(ns, x, "Succeeded", "Failed", timeout=180)
            assert st["phase"] == "Succeeded", (x, st)
            assert len(jobs_of(kube, ns, x)) == 1
        kube.apply(lorajob("after", ns, INSTANCE, annotations=success(ns, "after", s3k)))
        assert kube.wait_phase(ns, "after", "Succeeded", timeout=120)["attempts"] == 1
        assert op.alive
        FIGURES["apiserver"] = {"seconds_unavailable": round(down, 1)}
    finally:
        op.stop()


FIGURES: dict[str, Any] = {}


def test_zz_print_figures() -> None:
    print("\nRELIABILITY FIGURES", FIGURES, file=sys.stderr)

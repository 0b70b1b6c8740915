"""kube-apiserver restarted while an e2e trainer runs through the dev node agent: the
operator's progress reads (the trainer's log, through the API server and the node's kubelet
API) and status writes resume after the API server comes back (progress.step grows past
what it was before the restart), the trainer, which holds no API credentials, never
notices, and the job Succeeds. Uses the reliability suite's restart helper (SIGTERM, same
arguments).

The tiny model trains at anywhere from 0.1 to 2 s a step on the shared machine, so the test
makes the outage straddle training for sure: the trainer runs on while the API server is
down, then its process group is SIGSTOPped until the API server is ready again and
SIGCONTed, so the rest of training (and every progress write that must land) happens
after the restart."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    TinyModel,
    kubectl,
    kubectl_json,
    tiny_job,
    trainer_pid,
    trainer_pods,
    wait_for_step,
    write_job,
)
from tests.e2e.test_lifecycle import wait_phase
from tests.reliability.test_operator_faults import _restart_apiserver

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]


def _step(ci: Any, ns: str, name: str) -> tuple[str, int]:
    status = (kubectl_json(ci, "-n", ns, "get", "lorajob", name) or {}).get("status") or {}
    return status.get("phase", ""), int((status.get("progress") or {}).get("step") or 0)


def test_trainer_progress_survives_apiserver_restart(cluster: Any, operator: Any,
                                                     namespace: str, tiny_model: TinyModel,
                                                     dataset: dict[str, str],
                                                     tmp_path: Path) -> None:
    name = "apisrv"
    job = tiny_job(name, namespace, tiny_model, dataset, cluster.s3_bucket,
                   max_steps=150, save_steps=75)
    manifest = write_job(job, tmp_path)
    kubectl(cluster, "apply", "-f", str(manifest))
    before = wait_for_step(cluster, namespace, name, 3, "training never started")
    (pod,) = trainer_pods(cluster, namespace, name)
    pid = trainer_pid(cluster, pod)
    downtime: list[float] = []
    restart = threading.Thread(target=lambda: downtime.append(_restart_apiserver(cluster)))
    restart.start()
    readyz = [str(cluster.kubectl), "--kubeconfig", str(cluster.kubeconfig), "get", "--raw",
              "/readyz", "--request-timeout=2s"]
    while subprocess.run(readyz, capture_output=True).returncode == 0:
        time.sleep(0.2)
    time.sleep(4)  # the trainer trains on while the server is down
    os.killpg(pid, signal.SIGSTOP)
    try:
        restart.join(300)
    finally:
        os.killpg(pid, signal.SIGCONT)
    assert downtime, "kube-apiserver did not come back"
    down = downtime[0]
    phase, at_return = _step(cluster, namespace, name)
    assert phase not in ("Failed", "Succeeded"), phase
    # Progress written after the restart: the step must grow past what the server had on return.
    deadline = time.monotonic() + 600
    after = at_return
    while time.monotonic() < deadline and after <= at_return:
        phase, after = _step(cluster, namespace, name)
        if phase in ("Failed", "Succeeded"):
            break
        time.sleep(1)
    assert after > at_return, (at_return, after, phase)
    obj = wait_phase(cluster, namespace, name, {"Succeeded", "Failed"}, 900)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert obj["status"]["progress"]["step"] == 150, obj["status"]["progress"]
    pods = trainer_pods(cluster, namespace, name)
    assert len(pods) == 1, "the trainer pod was replaced: the restart was not ridden out"
    print(f"\nAPISERVER-RESTART down {down:.1f}s; step {before} before, {at_return} on return, "
          f"{after} after; Succeeded")

"""An idle operator with 1,000 finished LoRAJobs stays idle (no re-queue storm).

Kubeflow's training-operator re-queued every finished job every 30 s (issue #965); here a
finished job costs one timer for its TTL and nothing else. The test creates 1,000 LoRAJobs
already Succeeded (status written directly, as if an operator had finished them long ago),
starts the operator, lets it list them, and measures its CPU use while idle.
"""

from __future__ import annotations

import concurrent.futures
import socket
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
from kubernetes import client, config

from lora_operator.api import now_rfc3339
from tests.integration.operator_harness import Kube, OperatorProcess, write_settings

pytestmark = pytest.mark.cluster

JOBS = 1000
IDLE_SECONDS = 15
MAX_CPU_PERCENT = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _finished(ns: str, name: str, instance: str) -> tuple[dict[str, Any], dict[str, Any]]:
    body = {"apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRAJob",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"lorajob.dev/operator-instance": instance}},
            "spec": {"baseModel": {"uri": "s3://lora-test/models/x/"},
                     "dataset": {"uri": "s3://lora-test/data/train.jsonl"},
                     "output": {"uri": f"s3://lora-test/adapters/{name}/"}}}
    status = {"status": {"phase": "Succeeded", "attempts": 1,
                         "completionTime": now_rfc3339(),
                         "placement": {"method": "lora", "vramClass": "l4-24gb", "gpus": 1},
                         "conditions": [{"type": "Succeeded", "status": "True",
                                         "reason": "Completed", "message": "",
                                         "lastTransitionTime": now_rfc3339()}]}}
    return body, status


def test_idle_with_1000_finished_jobs(local_cluster: Any, tmp_path: Path) -> None:
    kube = Kube(str(local_cluster.kubectl), str(local_cluster.kubeconfig))
    ns = kube.create_namespace("lo-idle")
    instance = f"idle-{uuid.uuid4().hex[:6]}"
    api_client = config.new_client_from_config(str(local_cluster.kubeconfig))
    custom = client.CustomObjectsApi(api_client)

    def make(i: int) -> None:
        body, status = _finished(ns, f"done-{i:04d}", instance)
        custom.create_namespaced_custom_object("lorajob.dev", "v1alpha1", ns, "lorajobs", body)
        custom.patch_namespaced_custom_object_status("lorajob.dev", "v1alpha1", ns, "lorajobs",
                                                     body["metadata"]["name"], status)

    settings = write_settings(tmp_path / "settings.yaml", local_cluster.s3_endpoint)
    port = _free_port()
    op = OperatorProcess(str(local_cluster.kubeconfig), local_cluster.env, settings, [ns],
                         instance=instance, log_dir=tmp_path, metrics_port=port)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(make, range(JOBS)))
        op.start()
        assert op.proc is not None
        proc = psutil.Process(op.proc.pid)
        # Let it start and list everything (the listing itself is a one-off cost).
        def listed() -> bool:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                              timeout=2).read().decode()
            except OSError:
                return False
            seen = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("lora_operator_lorajobs{"))
            return seen == JOBS
        kube.wait_for("the operator to list every LoRAJob", listed, timeout=60)
        time.sleep(2)
        assert op.alive, op.logs()[-2000:]
        before = proc.cpu_times()
        t0 = time.monotonic()
        time.sleep(IDLE_SECONDS)
        after = proc.cpu_times()
        used = (after.user - before.user) + (after.system - before.system)
        percent = 100.0 * used / (time.monotonic() - t0)
        print(f"idle CPU with {JOBS} finished LoRAJobs: {percent:.2f} %")
        assert percent < MAX_CPU_PERCENT, op.logs()[-2000:]
        # kopf wrote no bookkeeping into the jobs.
        sample = custom.get_namespaced_custom_object("lorajob.dev", "v1alpha1", ns, "lorajobs",
                                                     "done-0007")
        assert not [k for k in (sample["metadata"].get("annotations") or {})
                    if k.startswith(("lorajob.dev/", "kopf.zalando.org/"))]
    finally:
        op.stop()
        kube.delete_namespace(ns)

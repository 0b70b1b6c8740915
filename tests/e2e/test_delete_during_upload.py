"""A LoRAJob deleted while its trainer is uploading the adapter: every child object goes
(its Job and pod; no ConfigMap, ServiceAccount or Role is made any more), the trainer process stops, and the
partial upload is never reported as an adapter: no manifest.json at the output (the trainer
writes it last) and nothing in the LoRAJob's status ever claimed a result.

The upload is made slow for real: the job's output endpoint is the reliability suite's S3
fault proxy (tests/reliability/faults.py), which stalls (holds every byte, keeps the
connections open) from the first PUT of the final adapter_model.safetensors on.
"""

from __future__ import annotations

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
    write_job,
)
from tests.e2e.test_lifecycle import PhaseRecorder
from tests.reliability.faults import S3Outage, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]
CHILD_KINDS = ("jobs", "pods", "configmaps", "serviceaccounts", "roles", "rolebindings")


def _children(ci: Any, ns: str, name: str, uid: str) -> list[str]:
    left = []
    for kind in CHILD_KINDS:
        items = (kubectl_json(ci, "-n", ns, "get", kind) or {}).get("items", [])
        left += [f"{kind}/{i['metadata']['name']}" for i in items
                 if any(o.get("uid") == uid for o in i["metadata"].get("ownerReferences", []))
                 or i["metadata"].get("labels", {}).get("lorajob.dev/job-name") == name]
    return left


def test_lorajob_deleted_during_upload(cluster: Any, operator: Any, namespace: str, s3: Any,
                                      tiny_model: TinyModel, dataset: dict[str, str],
                                      tmp_path: Path) -> None:
    name = "deleted-uploading"
    host, _, port = cluster.s3_endpoint.removeprefix("http://").partition(":")
    proxy = S3Outage(host, int(port))
    trig = proxy.on("PUT", "/adapter_model.safetensors", None, unless="/.checkpoints/",
                    stall=True)
    job = tiny_job(name, namespace, tiny_model, dataset, cluster.s3_bucket,
                   max_steps=4, save_steps=4)
    job["spec"]["output"]["endpoint"] = proxy.endpoint
    prefix = f"e2e/adapters/{namespace}/{name}/"
    for o in s3.list_objects_v2(Bucket=cluster.s3_bucket, Prefix=prefix).get("Contents", []):
        s3.delete_object(Bucket=cluster.s3_bucket, Key=o["Key"])
    manifest = write_job(job, tmp_path)
    rec = PhaseRecorder(cluster, namespace, name)
    results_seen: list[Any] = []
    try:
        kubectl(cluster, "apply", "-f", str(manifest))
        wait_until("the final upload to start (and stall)", lambda: trig.fired_at, 600, 1)
        # The trainer is now stuck inside the adapter upload: the pod runs, training is done.
        time.sleep(3)
        live = kubectl_json(cluster, "-n", namespace, "get", "lorajob", name)
        status = live["status"]
        results_seen.append(status.get("result"))
        assert status["phase"] in ("Running", "Uploading"), status
        (pod,) = trainer_pods(cluster, namespace, name)
        assert pod["status"]["phase"] == "Running", pod["status"]
        pid = trainer_pid(cluster, pod)
        uid = live["metadata"]["uid"]

        t0 = time.monotonic()
        kubectl(cluster, "-n", namespace, "delete", "lorajob", name, "--wait=true",
                "--timeout=60s")
        # The pod gets SIGTERM and, at worst, SIGKILL after its grace period (120 s: time to
        # write a last checkpoint); every child must be gone by then.
        grace = int(pod["spec"].get("terminationGracePeriodSeconds") or 30)
        wait_until("every child object removed",
                   lambda: not _children(cluster, namespace, name, uid), grace + 90, 1)
        gone_after = time.monotonic() - t0
        wait_until("the trainer process gone", lambda: not Path(f"/proc/{pid}").exists(), 30)
    finally:
        proxy.stop()  # resets the held connections: nothing stalled reaches S3 afterwards
        time.sleep(1)
        rec.stop()

    # A partial upload is not an adapter: no manifest, and the status never claimed one.
    keys = {o["Key"][len(prefix):] for o in s3.list_objects_v2(
        Bucket=cluster.s3_bucket, Prefix=prefix).get("Contents", [])}
    assert "manifest.json" not in keys, sorted(keys)
    assert not [k for k in keys if k == "adapter_model.safetensors"], sorted(keys)
    assert not any(results_seen), results_seen
    assert "Succeeded" not in rec.phases, rec.phases
    assert kubectl_json(cluster, "-n", namespace, "get", "lorajob", name) is None
    print(f"\nDELETE-DURING-UPLOAD children gone {gone_after:.1f}s after delete; "
          f"phases {rec.phases}; keys left {sorted(keys)}")

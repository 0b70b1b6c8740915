"""A LoRAJob end to end: apply → Scheduling → Running → Uploading → Succeeded on the dev node,
the adapter in S3 (manifest checksums, loads with PEFT), GitOps behaviour, Argo CD health on
the live object, and cleanup of every child object when the LoRAJob is deleted.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import TinyModel, kubectl, kubectl_json, tiny_job, write_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[2]


class PhaseRecorder:
    """Watches one LoRAJob (kubectl get -w -o json) and records phases and progress steps."""

    def __init__(self, ci: Any, namespace: str, name: str):
        import subprocess

        self.phases: list[str] = []
        self.steps: list[int] = []
        self.proc = subprocess.Popen(
            # A field selector, not a name: the watch starts before the object exists.
            [str(ci.kubectl), "--kubeconfig", str(ci.kubeconfig), "-n", namespace, "get",
             "lorajobs", f"--field-selector=metadata.name={name}", "-w",
             "--output-watch-events", "-o", "json"],
            stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = ""
        for line in self.proc.stdout:  # one event per line; accumulate if a line is partial
            buf += line
            try:
                ev = json.loads(buf)
            except ValueError:
                continue
            buf = ""
            status = ev.get("object", {}).get("status") or {}
            phase = status.get("phase")
            if phase and (not self.phases or self.phases[-1] != phase):
                self.phases.append(phase)
            step = (status.get("progress") or {}).get("step")
            if phase == "Running" and step is not None:
                self.steps.append(int(step))

    def stop(self) -> None:
        self.proc.terminate()


def wait_phase(ci: Any, ns: str, name: str, phases: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = kubectl_json(ci, "-n", ns, "get", "lorajob", name) or {}
        if (obj.get("status") or {}).get("phase") in phases:
            return obj
        time.sleep(1)
    raise AssertionError(f"{ns}/{name} not in {phases} after {timeout}s: {obj.get('status')}")


def _s3_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def test_lorajob_end_to_end(cluster: Any, operator: Any, namespace: str, s3: Any,
                            tiny_model: TinyModel, dataset: dict[str, str],
                            tmp_path: Path) -> None:
    name = "tiny"
    job = tiny_job(name, namespace, tiny_model, dataset, cluster.s3_bucket,
                   max_steps=8, save_steps=4)
    manifest = write_job(job, tmp_path)
    rec = PhaseRecorder(cluster, namespace, name)
    kubectl(cluster, "apply", "-f", str(manifest))
    try:
        obj = wait_phase(cluster, namespace, name, {"Succeeded", "Failed"}, 900)
    finally:
        time.sleep(1)
        rec.stop()
    status = obj["status"]
    assert status["phase"] == "Succeeded", status

    # Phases seen by the watch, in order. Scheduling can be shorter than one watch event when
    # the dev node is free (the pod is bound within milliseconds); its condition must hold.
    seen = [p for p in rec.phases if p in ("Scheduling", "Running", "Uploading", "Succeeded")]
    order = ["Running", "Uploading", "Succeeded"]
    assert [p for p in seen if p in order] == order, rec.phases
    if "Scheduling" in seen:
        assert seen.index("Scheduling") < seen.index("Running"), rec.phases
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions.get("Scheduled") == "True", status["conditions"]
    assert conditions.get("Succeeded") == "True", status["conditions"]
    assert rec.steps and max(rec.steps) > 0, f"status.progress never moved: {rec.steps}"
    assert status["placement"]["node"] == "lora-dev-gpu-0"

    # The adapter, the manifest and its checksums are in S3; the adapter loads with PEFT.
    result = status["result"]
    bucket, prefix = _s3_key(result["adapterUri"])
    got = tmp_path / "adapter"
    got.mkdir()
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    keys = {o["Key"].rsplit("/", 1)[-1]: o["Key"] for o in listing.get("Contents", [])
            if "/.checkpoints/" not in o["Key"]}
    for required in ("adapter_model.safetensors", "adapter_config.json", "manifest.json",
                     "metrics.json", "README.md"):
        assert required in keys, sorted(keys)
    for fname, key in keys.items():
        s3.download_file(bucket, key, str(got / fname))
    man = json.loads((got / "manifest.json").read_text())
    files = man["files"]
    entries = files.items() if isinstance(files, dict) else [(f["path"], f) for f in files]
    for fname, entry in entries:
        data = (got / Path(fname).name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], fname
        assert len(data) == entry.get("size", entry.get("sizeBytes", len(data)))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model.local))
    model = PeftModel.from_pretrained(base, str(got))
    assert any("lora_" in n for n, _ in model.named_parameters())
    metrics = json.loads((got / "metrics.json").read_text())
    assert metrics["samples"][0]["prompt"].startswith("Extract the order")

    # GitOps: applying the same manifest again changes nothing, and the diff is empty.
    again = kubectl(cluster, "apply", "-f", str(manifest))
    assert "unchanged" in again.stdout, again.stdout
    diff = kubectl(cluster, "diff", "-f", str(manifest), check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    # Argo CD's health check on the live object.
    from tests.unit.test_argocd_health import health

    live = kubectl_json(cluster, "-n", namespace, "get", "lorajob", name)
    assert health(live)["status"] == "Healthy"

    # Deleting the LoRAJob removes everything it made.
    uid = live["metadata"]["uid"]
    kubectl(cluster, "-n", namespace, "delete", "lorajob", name, "--wait=true", "--timeout=60s")
    deadline = time.monotonic() + 90
    left: list[str] = []
    while time.monotonic() < deadline:
        left = []
        for kind in ("jobs", "pods", "configmaps", "serviceaccounts", "roles", "rolebindings"):
            items = (kubectl_json(cluster, "-n", namespace, "get", kind) or {}).get("items", [])
            left += [f"{kind}/{i['metadata']['name']}" for i in items
                     if any(o.get("uid") == uid for o in i["metadata"].get("ownerReferences", []))
                     or i["metadata"].get("labels", {}).get("lorajob.dev/job-name") == name]
        if not left:
            break
        time.sleep(2)
    assert not left, f"left behind after deleting the LoRAJob: {left}"

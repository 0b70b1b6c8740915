"""The trainer process is SIGKILLed mid-run: the Job retries, and the new pod resumes from the
checkpoint in S3 (its log says so, and training does not start again from step 0)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import TinyModel, kubectl, kubectl_json, tiny_job
from tests.e2e.test_lifecycle import wait_phase

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]


def _trainer_pods(ci: Any, ns: str, name: str) -> list[dict[str, Any]]:
    pods = kubectl_json(ci, "-n", ns, "get", "pods", "-l", f"lorajob.dev/job-name={name}")
    return sorted((pods or {}).get("items", []), key=lambda p: p["metadata"]["creationTimestamp"])


def test_killed_trainer_resumes_from_its_checkpoint(cluster: Any, operator: Any, namespace: str,
                                                    tiny_model: TinyModel,
                                                    dataset: dict[str, str],
                                                    tmp_path: Path) -> None:
    name = "resume"
    job = tiny_job(name, namespace, tiny_model, dataset, cluster.s3_bucket,
                   max_steps=40, save_steps=4, backoff_limit=3)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    kubectl(cluster, "apply", "-f", str(manifest))

    # Wait until a checkpoint exists (progress past the first saveSteps), then kill.
    deadline = time.monotonic() + 600
    step = 0
    while time.monotonic() < deadline:
        obj = kubectl_json(cluster, "-n", namespace, "get", "lorajob", name) or {}
        status = obj.get("status") or {}
        assert status.get("phase") not in ("Failed", "Succeeded"), status
        step = int((status.get("progress") or {}).get("step") or 0)
        if step >= 6:
            break
        time.sleep(0.5)
    assert step >= 6, "training never got past the first checkpoint"
    (pod,) = _trainer_pods(cluster, namespace, name)
    pid_file = (Path(cluster.state_dir) / "nodeagent" / "pods" / pod["metadata"]["uid"] /
                "containers" / "trainer" / "pid")
    os.killpg(int(pid_file.read_text()), signal.SIGKILL)

    obj = wait_phase(cluster, namespace, name, {"Succeeded", "Failed"}, 900)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    pods = _trainer_pods(cluster, namespace, name)
    assert len(pods) >= 2, "the Job did not retry"
    first = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert first["exitCode"] == 137
    log_dir = Path(cluster.state_dir) / "logs" / "pods"
    second_log = (log_dir / f"{namespace}_{pods[-1]['metadata']['name']}_trainer.log").read_text()
    assert '"event": "resume"' in second_log, second_log[-3000:]
    # Progress continues from the checkpoint, not from step 0, and the resumed run retraces
    # the same losses (optimizer, scheduler, RNG and data position restored).
    first_log = (log_dir / f"{namespace}_{pods[0]['metadata']['name']}_trainer.log").read_text()
    resumed = _events(second_log, "resume")[0]
    ckpt_step = int(resumed["checkpoint"].rsplit("-", 1)[-1])
    assert ckpt_step > 0, resumed
    steps = [e["step"] for e in _events(second_log, "progress")]
    assert steps and steps[0] > ckpt_step and steps[-1] == 40, steps
    before = {e["step"]: e["loss"] for e in _events(first_log, "progress")}
    after = {e["step"]: e["loss"] for e in _events(second_log, "progress")}
    common = sorted(set(before) & set(after))
    assert all(abs(before[k] - after[k]) < 1e-3 for k in common), (before, after)
    assert obj["status"]["progress"]["step"] == 40


def _events(log: str, kind: str) -> list[dict[str, Any]]:
    out = []
    for line in log.splitlines():
        if line.startswith(f'{{"event": "{kind}"'):
            out.append(json.loads(line))
    return out

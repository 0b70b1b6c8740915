"""The trainer process is SIGKILLed mid-run: the Job retries, and the new pod resumes from the
checkpoint in S3 (its log says so, and training does not start again from step 0)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    TinyModel,
    kubectl,
    tiny_job,
    trainer_pid,
    trainer_pods,
    wait_for_step,
    write_job,
)
from tests.e2e.test_lifecycle import wait_phase

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]


def test_killed_trainer_resumes_from_its_checkpoint(cluster: Any, operator: Any, namespace: str,
                                                    tiny_model: TinyModel,
                                                    dataset: dict[str, str],
                                                    tmp_path: Path) -> None:
    name = "resume"
    job = tiny_job(name, namespace, tiny_model, dataset, cluster.s3_bucket,
                   max_steps=40, save_steps=4, backoff_limit=3)
    manifest = write_job(job, tmp_path)
    kubectl(cluster, "apply", "-f", str(manifest))

    # Wait until a checkpoint exists (progress past the first saveSteps), then kill.
    wait_for_step(cluster, namespace, name, 6, "training never got past the first checkpoint")
    (pod,) = trainer_pods(cluster, namespace, name)
    os.killpg(trainer_pid(cluster, pod), signal.SIGKILL)

    obj = wait_phase(cluster, namespace, name, {"Succeeded", "Failed"}, 900)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    pods = trainer_pods(cluster, namespace, name)
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

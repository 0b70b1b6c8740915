"""LoRASweep on the real local cluster with kwok-simulated GPU nodes: the operator creates the
trials as LoRAJobs (owned, labelled, at most `parallelism` at a time), follows them to the end
and names the best; the median rule stops a losing trial from its live validation loss.

Each trial's trainer pod outcome comes from `kwok.lorajob.dev/*` annotations: the sweep's
template annotations reach every trial's LoRAJob, and `kwok.lorajob.dev/t<N>.<key>` only
trial N's (operator/reconcile/sweep.py), from where the LoRAJob controller copies them onto
the pod (hack/cluster/kwok-stages.yaml). In the early-stopping test the test plays the
trainer: it patches each trial's status.progress as a real trainer would.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.integration.operator_harness import Kube
from tests.reliability.kwokjobs import MODEL_URI, SHAPE_8B, put_model_config, start_operator, tracebacks

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
INSTANCE = f"sweep-{uuid.uuid4().hex[:6]}"
INSTANCE_LABEL = "lorajob.dev/operator-instance"
BUCKET = "lora-test"


@pytest.fixture(scope="module")
def kube(local_cluster: Any) -> Kube:
    return Kube(str(local_cluster.kubectl), str(local_cluster.kubeconfig))


@pytest.fixture(scope="module")
def s3k(local_cluster: Any) -> Any:
    client = boto3.client("s3", endpoint_url=local_cluster.s3_endpoint,
                          aws_access_key_id=local_cluster.s3_access_key,
                          aws_secret_access_key=local_cluster.s3_secret_key,
                          region_name=local_cluster.s3_region)
    put_model_config(client)
    return client


@pytest.fixture
def ns(kube: Kube) -> Iterator[str]:
    name = kube.create_namespace("sweep")
    yield name
    kube.delete_namespace(name)


def _template(ns: str, sweep: str) -> dict[str, Any]:
    return {
        "baseModel": {"uri": MODEL_URI, "shape": SHAPE_8B},
        "dataset": {"uri": f"s3://{BUCKET}/data/train.jsonl"},
        "method": "lora",
        "output": {"uri": f"s3://{BUCKET}/sweeps/{ns}/{sweep}/"},
    }


def _sweep(name: str, ns: str, annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRASweep",
            "metadata": {"name": name, "namespace": ns, "labels": {INSTANCE_LABEL: INSTANCE}},
            "spec": {"template": {"metadata": {"annotations": annotations,
                                               "labels": {"team": "sweep-test"}},
                                  "spec": _template(ns, name)},
                     **spec}}


def _trial_success(s3k: Any, ns: str, sweep: str, number: int, loss: float) -> dict[str, str]:
    """Trial N's pod exits 0 with a result carrying `loss`; its manifest is in storage where
    the result says (the operator verifies it before calling the trial Succeeded)."""
    trial = f"{sweep}-t{number}"
    prefix = f"sweeps/{ns}/{sweep}/{trial}/"
    s3k.put_object(Bucket=BUCKET, Key=prefix + "manifest.json", Body=b'{"files": {}}')
    result = {"exitCode": 0, "reason": "Completed", "adapterUri": f"s3://{BUCKET}/{prefix}",
              "manifestUri": f"s3://{BUCKET}/{prefix}manifest.json",
              "manifestSha256": hashlib.sha256(b'{"files": {}}').hexdigest(),  # checked
              "sizeBytes": 4096, "baseEvalLoss": 2.0, "adapterEvalLoss": loss,
              "improvement": round(1 - loss / 2.0, 4)}
    return {f"kwok.lorajob.dev/t{number}.termination-message": json.dumps(result),
            f"kwok.lorajob.dev/t{number}.exit-code": "0",
            f"kwok.lorajob.dev/t{number}.run-seconds": "3"}


def _trials(kube: Kube, ns: str, sweep: str) -> list[dict[str, Any]]:
    return kube.list("lorajobs", ns, f"lorajob.dev/sweep-name={sweep}")


def _sweep_status(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = (kube.get("lorasweep", name, ns) or {}).get("status") or {}
    return out


def test_sweep_of_four_trials_two_at_a_time_succeeds_with_the_best(
        local_cluster: Any, kube: Kube, s3k: Any, ns: str, tmp_path: Path) -> None:
    """A grid of 4 (r × learningRate), parallelism 2: never more than 2 trials unfinished at
    once, every trial Succeeded, the sweep Succeeded naming t3 (lowest adapterEvalLoss) and
    its adapter in status and in `kubectl get -o wide`; the trials are owned by the sweep."""
    losses = {1: 1.5, 2: 1.2, 3: 0.9, 4: 1.3}
    annotations: dict[str, str] = {}
    for number, loss in losses.items():
        annotations.update(_trial_success(s3k, ns, "grid", number, loss))
    doc = _sweep("grid", ns, annotations, parallelism=2,
                 searchSpace={"lora": {"r": {"values": [8, 16]}},
                              "training": {"learningRate": {"values": [1e-4, 2e-4]}}})
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        kube.apply(doc)
        most_at_once = 0

        def done() -> dict[str, Any] | None:
            nonlocal most_at_once
            unfinished = [j for j in _trials(kube, ns, "grid")
                          if (j.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
            most_at_once = max(most_at_once, len(unfinished))
            st = _sweep_status(kube, ns, "grid")
            return st if st.get("phase") in ("Succeeded", "Failed") else None

        st = kube.wait_for("the sweep to finish", done, timeout=300, interval=0.3)
        assert st["phase"] == "Succeeded", st
        assert most_at_once == 2, most_at_once  # parallelism used, and never exceeded
        assert st["trialProgress"] == "4/4" and st["trialsSucceeded"] == 4
        assert [t["name"] for t in st["trials"]] == [f"grid-t{i}" for i in range(1, 5)]
        assert [t["params"] for t in st["trials"]] == [
            {"lora.r": 8, "training.learningRate": 1e-4}, {"lora.r": 8, "training.learningRate": 2e-4},
            {"lora.r": 16, "training.learningRate": 1e-4}, {"lora.r": 16, "training.learningRate": 2e-4}]
        assert [t["adapterEvalLoss"] for t in st["trials"]] == [1.5, 1.2, 0.9, 1.3]
        best = st["bestTrial"]
        assert best == {"name": "grid-t3", "params": {"lora.r": 16, "training.learningRate": 1e-4},
                        "adapterEvalLoss": 0.9,
                        "adapterUri": f"s3://{BUCKET}/sweeps/{ns}/grid/grid-t3/"}
        assert {c["type"]: c["status"] for c in st["conditions"]}["Succeeded"] == "True"

        sweep_uid = kube.get("lorasweep", "grid", ns)["metadata"]["uid"]  # type: ignore[index]
        for trial in _trials(kube, ns, "grid"):
            meta, spec = trial["metadata"], trial["spec"]
            (ref,) = meta["ownerReferences"]
            assert (ref["kind"], ref["uid"], ref["controller"]) == ("LoRASweep", sweep_uid, True)
            assert meta["labels"]["team"] == "sweep-test"
            assert spec["output"]["uri"] == f"s3://{BUCKET}/sweeps/{ns}/grid/{meta['name']}/"
            params = json.loads(meta["annotations"]["lorajob.dev/sweep-params"])
            assert spec["lora"]["r"] == params["lora.r"]
            assert spec["training"]["learningRate"] == params["training.learningRate"]

        table = kube.run("get", "lsw", "grid", "-n", ns, "-o", "wide")
        header, row = table.strip().splitlines()
        assert header.split()[:6] == ["NAME", "PHASE", "TRIALS", "BEST", "LOSS", "BEST"]
        assert row.split()[:5] == ["grid", "Succeeded", "4/4", "0.9", "grid-t3"]
        assert row.split()[-1] == f"s3://{BUCKET}/sweeps/{ns}/grid/grid-t3/"
        kube.run("wait", "--for=condition=Succeeded", "lorasweep/grid", "-n", ns, "--timeout=5s")

        # Deleting the sweep deletes its trials (garbage collector, ownerReferences).
        kube.run("delete", "lorasweep", "grid", "-n", ns, "--wait=false")
        kube.wait_for("the trials to be garbage-collected",
                      lambda: not _trials(kube, ns, "grid"), timeout=120)
        assert not tracebacks(op.logs()), tracebacks(op.logs())[0]
    finally:
        op.stop()


def _progress(kube: Kube, ns: str, name: str, step: int, eval_loss: float) -> None:
    """What the trainer does every few seconds: patch status.progress of its LoRAJob."""
    kube.run("patch", "lorajob", name, "-n", ns, "--subresource=status", "--type=merge", "-p",
             json.dumps({"status": {"progress": {"step": step, "totalSteps": 100,
                                                 "evalLoss": eval_loss}}}))


def test_median_rule_stops_the_losing_trial_and_frees_its_slot(
        local_cluster: Any, kube: Kube, s3k: Any, ns: str, tmp_path: Path) -> None:
    """Three trials, two at a time (the cluster's two kwok GPU nodes), pods that keep running.
    t1 reports validation loss 1.0 at step 10, then t2 3.0 at step 10: worse than the median
    of the other trial at that step (minTrials 1), so the sweep records t2 EarlyStopped with
    its step and loss, deletes its LoRAJob (its pod goes with it), and starts t3 in the slot."""
    doc = _sweep("med", ns, {"kwok.lorajob.dev/keep-running": "true"}, parallelism=2,
                 searchSpace={"training": {"learningRate": {"values": [1e-4, 2e-4, 5e-4]}}},
                 earlyStopping={"rule": "median", "minTrials": 1, "startStep": 5})
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        kube.apply(doc)

        def running(*names: str) -> bool:
            phases = {j["metadata"]["name"]: (j.get("status") or {}).get("phase")
                      for j in _trials(kube, ns, "med")}
            return all(phases.get(n) == "Running" for n in names)

        kube.wait_for("t1 and t2 running", lambda: running("med-t1", "med-t2"), timeout=180)
        assert kube.get("lorajob", "med-t3", ns) is None, "parallelism 2 exceeded"
        _progress(kube, ns, "med-t1", 10, 1.0)
        kube.wait_for("the sweep to record t1 at step 10", lambda: (
            _sweep_status(kube, ns, "med").get("trials") or [{}])[0].get("history"), timeout=60)
        _progress(kube, ns, "med-t2", 10, 3.0)

        def stopped() -> dict[str, Any] | None:
            trials = _sweep_status(kube, ns, "med").get("trials") or []
            return next((t for t in trials if t.get("phase") == "EarlyStopped"), None)

        t2 = kube.wait_for("a trial stopped early", stopped, timeout=60)
        assert (t2["name"], t2["step"], t2["evalLoss"]) == ("med-t2", 10, 3.0)
        assert "median 1 of 1 other trials" in t2["message"], t2["message"]
        kube.wait_for("med-t2's LoRAJob and pods to be gone", lambda: (
            kube.get("lorajob", "med-t2", ns) is None
            and not kube.list("pods", ns, "lorajob.dev/job-name=med-t2")), timeout=120)
        kube.wait_for("t3 running in the freed slot", lambda: running("med-t1", "med-t3"),
                      timeout=180)
        st = _sweep_status(kube, ns, "med")
        assert st["phase"] == "Running" and st["trialsEarlyStopped"] == 1
        assert [t["phase"] for t in st["trials"]] == ["Running", "EarlyStopped", "Running"]
        assert sorted(j["metadata"]["name"] for j in _trials(kube, ns, "med")) == ["med-t1", "med-t3"]
        events = kube.run("get", "events", "-n", ns, "--field-selector",
                          "involvedObject.kind=LoRASweep,reason=TrialEarlyStopped", "-o", "name")
        assert events.strip(), "no TrialEarlyStopped event on the sweep"
        assert not tracebacks(op.logs()), tracebacks(op.logs())[0]
    finally:
        op.stop()


def test_invalid_sweep_is_refused_by_the_api_server_naming_the_field(kube: Kube, ns: str) -> None:
    """The CRD's schema and CEL rules refuse what the model refuses, before any controller."""
    bad_param = _sweep("bad1", ns, {}, searchSpace={"lora": {"rank": {"values": [8]}}})
    assert 'unknown field "spec.searchSpace.lora.rank"' in _create_error(kube, bad_param)
    bad_type = _sweep("bad0", ns, {}, searchSpace={"lora": {"r": {"values": ["8"]}}})
    assert "spec.searchSpace.lora.r.values[0]" in _create_error(kube, bad_type)
    grid_range = _sweep("bad2", ns, {}, searchSpace={
        "training": {"learningRate": {"min": 1e-5, "max": 1e-3}}})
    proc_err = _create_error(kube, grid_range)
    assert "grid needs values lists" in proc_err and "spec.searchSpace" in proc_err
    random_no_max = _sweep("bad3", ns, {}, algorithm={"type": "random"},
                           searchSpace={"lora": {"r": {"min": 4, "max": 32}}})
    assert "maxTrials is required when type is random" in _create_error(kube, random_no_max)
    long_name = _sweep("s" * 48, ns, {}, searchSpace={"lora": {"r": {"values": [8]}}})
    assert "at most 47 characters" in _create_error(kube, long_name)


def _create_error(kube: Kube, doc: dict[str, Any]) -> str:
    proc = subprocess.run([kube.kubectl, "create", "-f", "-"], input=yaml.safe_dump(doc),
                          capture_output=True, text=True, env=kube.env, timeout=60)
    assert proc.returncode != 0, f"accepted: {doc['metadata']['name']}"
    return proc.stderr

"""Multi-tenant hardening (issue 13, items 1, 8, 9, the NetworkPolicy part of 10 and the
operator side of 12), against the real local cluster, the real operator and the real
SeaweedFS S3; the hostile storage endpoint is a real HTTP server on loopback
(hostile_s3.py), never a mock.

Each test is an attack a LoRAJob's author could make and what they must get instead:
the operator's keys never reach an endpoint the job chose, reads are capped and end at
their deadline, a namespace cannot write (or overwrite) outside its storage, a job cannot
name what the operator's settings do not allow, and dev-only hooks stay off.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_operator import api, contract, objectstore
from lora_operator.build import names, trainer_config
from lora_operator.settings import load_settings
from tests.integration.operator_harness import Kube
from tests.reliability.conftest import TRAINER, keys_under, s3_env
from tests.reliability.hostile_s3 import HostileS3
from tests.reliability.kwokjobs import (
    LLAMA_8B,
    MODEL_URI,
    SHAPE_8B,
    condition,
    failure,
    jobs_of,
    lorajob,
    start_operator,
    success,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
INSTANCE = f"mt-{uuid.uuid4().hex[:6]}"
CAP = 1 << 20
SETTLED = ("Failed", "Scheduling", "Running", "Succeeded", "Queued", "Pending", "Uploading")


@pytest.fixture
def ns(kube: Kube) -> Iterator[str]:
    name = kube.create_namespace("mt")
    yield name
    kube.delete_namespace(name)


def _failed(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    """The job's status once it settled; it must be Failed at planning, without a Job."""
    st = kube.wait_phase(ns, name, *SETTLED, timeout=90)
    assert st["phase"] == "Failed", st
    assert not jobs_of(kube, ns, name), f"{name}: a Job was created for a refused spec"
    return st


def _reason(st: dict[str, Any]) -> str:
    return str(condition(st, "Failed").get("reason"))


# --------------------------------------------------------------------------- item 1


def test_operator_reads_sign_only_own_endpoint_cap_and_end_at_deadline(
        local_cluster: Any, s3k: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """objectstore.read_object, the path of every operator-side S3 read: the allow-listed
    SeaweedFS gets signed requests (and the real object); a hostile endpoint gets no
    signature, a 300 MB flood is cut just past 1 MiB, a trickle is abandoned at the
    deadline, and no thread of the read outlives the call."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", local_cluster.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", local_cluster.s3_secret_key)
    settings = load_settings().model_copy(update={"s3_endpoint": local_cluster.s3_endpoint,
                                                  "config_read_timeout_seconds": 3})
    region = local_cluster.s3_region
    got = objectstore.read_object(MODEL_URI + "config.json", endpoint=None, region=region,
                                  settings=settings)
    assert json.loads(got) == LLAMA_8B
    big = f"reliability/big-{uuid.uuid4().hex[:6]}.json"
    s3k.put_object(Bucket="lora-test", Key=big, Body=b" " * (2 * CAP))
    with pytest.raises(objectstore.TooLarge):
        objectstore.read_object(f"s3://lora-test/{big}", endpoint=None, region=region,
                                settings=settings)

    flood, trickle = HostileS3("flood"), HostileS3("trickle", trickle_s=0.5)
    before = {t.ident for t in threading.enumerate()}
    try:
        with pytest.raises(objectstore.TooLarge):
            objectstore.read_object("s3://models/x/config.json", endpoint=flood.endpoint,
                                    region=region, settings=settings)
        with pytest.raises(objectstore.Unavailable):
            objectstore.read_object("s3://models/x/config.json", endpoint=trickle.endpoint,
                                    region=region, settings=settings)
        left = [t.name for t in threading.enumerate()
                if t.ident not in before and not t.name.startswith("hostile-s3")]
        assert not left, f"threads of the read still running: {left}"
        for server in (flood, trickle):
            (served,) = server.served
            assert served.done.wait(30), "the reader never closed the connection"
            assert served.closed_by_peer
            assert served.authorization == "", served.authorization
            assert local_cluster.s3_access_key not in served.request_line
        assert flood.served[0].sent < 8 * CAP, flood.served[0].sent  # not the 300 MB
        assert trickle.served[0].sent < 100  # abandoned, not waited out
    finally:
        flood.stop()
        trickle.stop()


def test_operator_sends_no_credentials_to_a_jobs_endpoint(
        local_cluster: Any, kube: Kube, s3k: Any, ns: str, tmp_path: Path) -> None:
    """A LoRAJob whose baseModel.endpoint is the author's own server: the operator's
    config.json read arrives unsigned and is cut off at the cap; the job is planned from
    spec.baseModel.shape and the operator stays up."""
    flood = HostileS3("flood")
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        body = lorajob("byo-endpoint", ns, INSTANCE)
        body["spec"]["baseModel"] = {"uri": "s3://models/llama/", "endpoint": flood.endpoint,
                                     "shape": SHAPE_8B}
        kube.apply(body)
        kube.wait_for("the operator's read", lambda: flood.served, timeout=90)
        st = kube.wait_for("a placement", lambda: kube.status(ns, "byo-endpoint").get(
            "placement"), timeout=90)
        assert st["vramClass"]
        for served in flood.served:
            assert served.done.wait(30)
            assert served.authorization == "", "the operator signed for a job's endpoint"
            assert served.sent < 8 * CAP, served.sent
        assert op.alive
    finally:
        op.stop()
        flood.stop()


# --------------------------------------------------------------------------- item 8


def test_storage_prefixes_refuse_other_namespaces_storage_at_plan(
        local_cluster: Any, kube: Kube, s3k: Any, ns: str, tmp_path: Path) -> None:
    """storagePrefixes {"*": [s3://lora-test/reliability/tenants/{namespace}/]}: an output
    under another namespace's prefix is Failed (StorageNotAllowed, naming spec.output.uri
    and the allowed prefix), no Job; an output under the own prefix runs, and the trainer's
    rendered config carries the same allowed prefixes."""
    template = "s3://lora-test/reliability/tenants/{namespace}/"
    mine = template.replace("{namespace}", ns)
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE,
                        storagePrefixes={"*": [template]})
    try:
        kube.apply(lorajob("outside", ns, INSTANCE, output={
            "uri": "s3://lora-test/reliability/tenants/victim/bot/", "overwrite": True}))
        kube.apply(lorajob("inside", ns, INSTANCE, output={"uri": mine + "bot/"},
                           annotations={"kwok.lorajob.dev/keep-running": "true"}))
        st = _failed(kube, ns, "outside")
        assert _reason(st) == "StorageNotAllowed"
        assert "spec.output.uri" in st["message"] and mine in st["message"], st["message"]
        (job,) = kube.wait_for("the inside job's Job", lambda: jobs_of(kube, ns, "inside"),
                               timeout=90)
        rendered = _rendered_config(job)
        assert rendered["allowedOutputPrefixes"] == [mine]
    finally:
        op.stop()


def _rendered_config(job: dict[str, Any]) -> dict[str, Any]:
    """The trainer config a Job's pod reads (its pod template's annotation)."""
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    return dict(yaml.safe_load(annotations[names.CONFIG_ANNOTATION]))


def _run_pod_trainer(local_cluster: Any, tmp_path: Path, cfg: contract.TrainerConfig,
                     ) -> tuple[int, dict[str, Any]]:
    """`lora-trainer pod` on the config the operator renders, as the pod runs it."""
    path = tmp_path / f"trainer-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(trainer_config.render(cfg))
    term = path.with_suffix(".result")
    env = {**os.environ, **s3_env(local_cluster), "LORA_TRAINER_CONFIG": str(path),
           "LORA_TERMINATION_MESSAGE_PATH": str(term), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([TRAINER, "pod", "--device", "cpu"], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    result = json.loads(term.read_text()) if term.exists() else {}
    return proc.returncode, result


def _trainer_config(namespace: str, output: dict[str, Any], **settings: Any,
                    ) -> contract.TrainerConfig:
    spec = api.parse_spec({"baseModel": {"uri": MODEL_URI, "shape": SHAPE_8B},
                           "dataset": {"uri": "s3://lora-test/data/train.jsonl"},
                           "method": "lora", "output": output})
    owner = names.Owner(name="tenant-job", namespace=namespace, uid=str(uuid.uuid4()))
    return trainer_config.trainer_config(owner, spec, api.Placement(method="lora", gpus=0), 1,
                                     load_settings().model_copy(update=settings))


def test_trainer_refuses_writes_outside_its_prefixes(local_cluster: Any, s3k: Any,
                                                     tmp_path: Path) -> None:
    """The trainer enforces the prefixes it is given, before it fetches anything: exit 2
    (InvalidConfig) and nothing written under the other tenant's prefix."""
    victim = f"reliability/tenants/victim-{uuid.uuid4().hex[:6]}/"
    cfg = _trainer_config("team-b", {"uri": f"s3://lora-test/{victim}bot/"},
                          storage_prefixes={"*": ["s3://lora-test/reliability/tenants/{namespace}/"]})
    code, result = _run_pod_trainer(local_cluster, tmp_path, cfg)
    assert code == contract.ExitCode.CONFIG, result
    assert result["reason"] == "InvalidConfig"
    assert "s3://lora-test/reliability/tenants/team-b/" in result["message"]
    assert keys_under(s3k, "lora-test", victim) == {}


def test_overwrite_cannot_replace_another_namespaces_adapter(local_cluster: Any, s3k: Any,
                                                             tmp_path: Path) -> None:
    """output.overwrite true, but the adapter at the output was written from another
    namespace: exit 7 (OutputConflict) naming that namespace; the adapter stays."""
    prefix = f"reliability/shared-{uuid.uuid4().hex[:6]}/bot/"
    theirs = json.dumps({"job": {"uid": "their-uid", "name": "bot", "namespace": "team-a"},
                         "files": {}}).encode()
    s3k.put_object(Bucket="lora-test", Key=prefix + "manifest.json", Body=theirs)
    cfg = _trainer_config("team-b", {"uri": f"s3://lora-test/{prefix}", "overwrite": True})
    code, result = _run_pod_trainer(local_cluster, tmp_path, cfg)
    assert code == contract.ExitCode.OUTPUT_CONFLICT, result
    assert "team-a" in result["message"] and "same namespace" in result["message"]
    kept = s3k.get_object(Bucket="lora-test", Key=prefix + "manifest.json")["Body"].read()
    assert kept == theirs


# --------------------------------------------------------------------------- item 9


def test_settings_allow_lists_refuse_at_plan(local_cluster: Any, kube: Kube, s3k: Any,
                                             ns: str, tmp_path: Path) -> None:
    """trustRemoteCode (not allowed by default), a toleration of every taint, a system
    priority class and a Secret outside allowedSecrets: each Failed at planning with a
    message naming the field and what is allowed; no Job for any of them."""
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE, allowedSecrets=["lora-*"])
    model = {"uri": MODEL_URI, "shape": SHAPE_8B}
    cases = {
        "remote-code": ({"baseModel": {**model, "trustRemoteCode": True}},
                        "spec.baseModel.trustRemoteCode"),
        "tolerate-all": ({"resources": {"tolerations": [{"operator": "Exists"}]}},
                         "spec.resources.tolerations[0].key"),
        "node-critical": ({"resources": {"priorityClassName": "system-node-critical"}},
                          "spec.resources.priorityClassName"),
        "other-secret": ({"dataset": {"uri": "s3://lora-test/data/train.jsonl",
                                      "credentialsSecret": "db-admin"}},
                         "spec.dataset.credentialsSecret"),
    }
    try:
        for name, (part, _) in cases.items():
            kube.apply(lorajob(name, ns, INSTANCE, **part))
        for name, (_, field) in cases.items():
            st = _failed(kube, ns, name)
            assert _reason(st) == "PolicyViolation", st
            assert st["message"].startswith(field) and "allowed:" in st["message"], st["message"]
        assert "lora-*" in kube.status(ns, "other-secret")["message"]
    finally:
        op.stop()


# --------------------------------------------------------------------------- item 10


def test_egress_policies_are_accepted_and_select_the_trainer_pod(
        local_cluster: Any, kube: Kube, s3k: Any, ns: str, tmp_path: Path) -> None:
    """The chart's default-deny egress NetworkPolicies, created on the real API server in a
    job namespace, select the trainer pod the operator really creates (and not others)."""
    out = subprocess.run([str(local_cluster.helm), "template", "lora", "charts/lora-operator",
                          "-n", ns, "--set", f"networkPolicy.trainerNamespaces={{{ns}}}"],
                         capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    policies = [d for d in yaml.safe_load_all(out.stdout)
                if d and d["kind"] == "NetworkPolicy" and d["metadata"]["namespace"] == ns]
    assert {p["metadata"]["name"] for p in policies} == \
        {"lora-lora-operator-operator-egress", "lora-lora-operator-trainer-egress"}
    for policy in policies:
        kube.apply(policy)
    trainer = kube.get("networkpolicy", "lora-lora-operator-trainer-egress", ns) or {}
    assert trainer["spec"]["policyTypes"] == ["Egress"]
    sel = trainer["spec"]["podSelector"]
    selector = ",".join([f"{k}={v}" for k, v in sel["matchLabels"].items()]
                        + [e["key"] for e in sel["matchExpressions"]])
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        kube.apply(lorajob("fenced", ns, INSTANCE,
                           annotations={"kwok.lorajob.dev/keep-running": "true"}))
        pods = kube.wait_for("the trainer pod", lambda: kube.list("pods", ns, selector),
                             timeout=90)
        assert [p["metadata"]["labels"][names.JOB_NAME_LABEL] for p in pods] == ["fenced"]
    finally:
        op.stop()


# --------------------------------------------------------------------------- item 12


def test_dev_hooks_off_region_used_and_pvc_refused(local_cluster: Any, kube: Kube, s3k: Any,
                                                   ns: str, tmp_path: Path) -> None:
    """Without devMode a job's kwok.lorajob.dev/* annotations (which would script the
    simulated pod's verdict) never reach the pod; a job without output.region gets the
    operator's s3Region (it used to be shadowed by an API default); pvc:// is refused at
    plan with the reason, since the Job mounts no claim."""
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE, devMode=False,
                        s3Region="eu-central-1")
    try:
        kube.apply(lorajob("scripted", ns, INSTANCE, annotations=success(ns, "scripted", s3k)))
        kube.apply(lorajob("on-pvc", ns, INSTANCE, baseModel={"uri": "pvc://models/llama",
                                                             "shape": SHAPE_8B}))
        (job,) = kube.wait_for("the Job", lambda: jobs_of(kube, ns, "scripted"), timeout=90)
        template = job["spec"]["template"]
        annotations = template["metadata"].get("annotations") or {}
        assert not [k for k in annotations if k.startswith("kwok.lorajob.dev/")], annotations
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert env["AWS_REGION"] == "eu-central-1"
        rendered = _rendered_config(job)
        assert rendered["spec"]["output"]["region"] == "eu-central-1"
        st = _failed(kube, ns, "on-pvc")
        assert _reason(st) == "PVCNotSupported" and "spec.baseModel.uri" in st["message"]
    finally:
        op.stop()


def test_presigned_url_secrets_never_reach_status_or_events(
        local_cluster: Any, kube: Kube, s3k: Any, ns: str, tmp_path: Path) -> None:
    """A trainer failure whose message carries a presigned URL (its signature and access
    key are credentials): status and Events show the URL with those values redacted."""
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    url = ("https://data.example.com/train.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256"
           "&X-Amz-Credential=AKIAPLANTEDKEY%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
           "&X-Amz-Signature=0123deadbeefplantedsignature")
    try:
        kube.apply(lorajob("leaky", ns, INSTANCE, annotations=failure(
            3, "InvalidDataset", f"could not parse {url}: line 1 is not JSON")))
        st = kube.wait_phase(ns, "leaky", "Failed", timeout=120)
        assert "X-Amz-Signature=<redacted>" in st["message"], st["message"]
        events = kube.run("get", "events", "-n", ns, "-o", "json")
        for text in (json.dumps(kube.status(ns, "leaky")), events):
            assert "plantedsignature" not in text and "AKIAPLANTEDKEY" not in text
    finally:
        op.stop()

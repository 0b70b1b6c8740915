"""A barrage of hostile LoRAJob specs through the real API server and the real operator.

Hypothesis (derandomized: the same 1,000+ specs every run) mutates one field of a valid spec
to a hostile value: wrong types, out-of-range numbers, huge or odd strings, nulls, unknown
fields, nested junk. Each is sent with `dryRun=All` and strict field validation: the CRD
schema (with its CEL rules) either rejects it with a message that names the field, or
accepts it. A sample of the accepted ones (plus hand-picked semantic traps: unknown
architecture, unknown VRAM class, a model nothing fits) is then created for real and
reconciled by an operator, which must end each one Failed with a reason naming the
problem, or planned. Afterwards the operator is alive, has logged no unhandled traceback,
and a valid job still reconciles promptly.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.integration.operator_harness import Kube
from tests.reliability.kwokjobs import lorajob, put_model_config, start_operator, success, tracebacks

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]
INSTANCE = f"hs-{uuid.uuid4().hex[:6]}"
EXAMPLES = 1000
REAL_SAMPLE = 30

# Every spec field (README's API reference), and the parents where junk keys can go.
PATHS = [
    "baseModel", "baseModel.uri", "baseModel.revision", "baseModel.ggufFile",
    "baseModel.credentialsSecret", "baseModel.endpoint", "baseModel.trustRemoteCode",
    "baseModel.architecture", "baseModel.shape", "baseModel.shape.hiddenSize",
    "baseModel.shape.intermediateSize", "baseModel.shape.numHiddenLayers",
    "baseModel.shape.numAttentionHeads", "baseModel.shape.numKeyValueHeads",
    "baseModel.shape.vocabSize", "baseModel.shape.headDim", "baseModel.shape.numExperts",
    "dataset", "dataset.uri", "dataset.format", "dataset.validation", "dataset.validation.fraction",
    "dataset.validation.uri", "dataset.test", "dataset.test.uri", "dataset.credentialsSecret",
    "dataset.endpoint", "method", "lora", "lora.r", "lora.alpha", "lora.dropout",
    "lora.targetModules", "lora.useDora", "lora.useRslora", "training", "training.epochs",
    "training.maxSteps", "training.learningRate", "training.scheduler", "training.warmupRatio",
    "training.weightDecay", "training.maxGradNorm", "training.microBatchSize",
    "training.gradientAccumulationSteps", "training.maxSeqLength", "training.packing",
    "training.precision", "training.seed", "training.evalSteps", "training.saveSteps",
    "training.earlyStoppingPatience", "resources", "resources.gpus", "resources.vramClass",
    "resources.deepspeed", "resources.tolerations", "resources.nodeSelector",
    "resources.priorityClassName", "output", "output.uri", "output.endpoint", "output.region",
    "output.credentialsSecret", "output.merge", "output.overwrite", "evaluation",
    "evaluation.minImprovement", "evaluation.prompts", "evaluation.maxNewTokens", "runPolicy",
    "runPolicy.backoffLimit", "runPolicy.activeDeadlineSeconds",
    "runPolicy.ttlSecondsAfterFinished", "runPolicy.suspend",
]
ODD_STRINGS = ["", " ", "../../etc/passwd", "file:///etc/shadow", "s3://", "hf://a",
               "http://169.254.169.254/latest/meta-data/", "s3://bucket/../../x",
               "\u0000", "\u202e\u0644\u0627", "'; DROP TABLE lorajobs; --", "${HOME}",
               "{{ .Values }}", "a" * 5000, "🦙" * 100, "all-linear", "auto", "lora", "qlora",
               "h100-80gb", "no-such-class", "zero3", "-1", "1e309", "NaN", "true"]
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), finite,
                    st.sampled_from(ODD_STRINGS), st.text(max_size=64))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=8)
mutations = st.tuples(st.sampled_from(PATHS), values, st.booleans())


def mutate(spec: dict[str, Any], path: str, value: Any, add_junk: bool) -> str:
    """Set spec.<path> = value (or add an unknown key beside it); returns the named field."""
    keys = path.split(".")
    node = spec
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    if add_junk:
        target = node.get(keys[-1]) if isinstance(node.get(keys[-1]), dict) else node
        target["xJunkField"] = value
        return "xJunkField"
    node[keys[-1]] = value
    return keys[-1]


class Outcomes:
    def __init__(self) -> None:
        self.rejected = 0
        self.accepted: list[tuple[str, dict[str, Any]]] = []
        self.unnamed: list[tuple[str, str]] = []
        self.server_errors: list[str] = []


@pytest.fixture(scope="module")
def api(local_cluster: Any) -> client.CustomObjectsApi:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(local_cluster.kubeconfig), client_configuration=cfg)
    return client.CustomObjectsApi(client.ApiClient(cfg))


@pytest.fixture(scope="module")
def ns(kube: Kube) -> Iterator[str]:
    name = kube.create_namespace("hostile")
    yield name
    kube.delete_namespace(name)


def test_hostile_specs(local_cluster: Any, api: client.CustomObjectsApi, kube: Kube, ns: str,
                       tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=local_cluster.s3_endpoint,
                      aws_access_key_id=local_cluster.s3_access_key,
                      aws_secret_access_key=local_cluster.s3_secret_key,
                      region_name=local_cluster.s3_region)
    put_model_config(s3)
    base = lorajob("x", ns, INSTANCE)
    out = Outcomes()
    counter = iter(range(10**6))

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutations)
    def barrage(m: tuple[str, Any, bool]) -> None:
        path, value, junk = m
        body = copy.deepcopy(base)
        field = mutate(body["spec"], path, value, junk)
        body["metadata"]["name"] = f"h-{next(counter)}"
        try:
            api.create_namespaced_custom_object("lorajob.dev", "v1alpha1", ns, "lorajobs", body,
                                                dry_run="All", field_validation="Strict")
        except ApiException as exc:
            if exc.status >= 500:
                out.server_errors.append(f"{path}={value!r:.80}: {exc.status} {exc.body!r:.300}")
                return
            assert exc.status in (400, 422), exc.status  # noqa: PT017
            message = json.loads(exc.body).get("message", "") if exc.body else ""
            out.rejected += 1
            if field.lower() not in message.lower() and path.split(".")[0] not in message:
                out.unnamed.append((f"{path}={value!r:.60}", message[:300]))
            return
        out.accepted.append((path, body))

    started = time.monotonic()
    barrage()
    barrage_seconds = time.monotonic() - started
    total = out.rejected + len(out.accepted) + len(out.server_errors)
    assert total >= EXAMPLES, total
    assert not out.server_errors, out.server_errors[:5]
    assert not out.unnamed, out.unnamed[:5]

    # Real creation: a spread of the accepted specs, and semantic traps the schema cannot see.
    seen_paths: set[str] = set()
    real: list[tuple[str, dict[str, Any]]] = []
    for path, body in out.accepted:
        if path not in seen_paths and len(real) < REAL_SAMPLE:
            seen_paths.add(path)
            real.append((path, body))
    traps = {
        "unknown-architecture": {"baseModel": {"uri": "s3://lora-test/reliability/models/nothing/",
                                               "architecture": "no-such-model-9000b"}},
        "unknown-class": {"resources": {"vramClass": "no-such-class"}},
        "nothing-fits": {"baseModel": {"uri": "s3://lora-test/reliability/models/nothing/",
                                       "shape": {"hiddenSize": 65536, "intermediateSize": 1048576,
                                                 "numHiddenLayers": 1024, "numAttentionHeads": 512,
                                                 "vocabSize": 4194304}},
                         "method": "lora", "training": {"maxSeqLength": 1048576}},
        "too-many-gpus-for-class": {"resources": {"gpus": 8, "vramClass": "t4-16gb"}},
    }
    for trap, patch in traps.items():
        body = copy.deepcopy(base)
        body["spec"].update(patch)
        real.append((trap, body))
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        names = []
        for i, (path, body) in enumerate(real):
            body["metadata"]["name"] = f"real-{i}"
            body["metadata"]["annotations"] = {"kwok.lorajob.dev/run-seconds": "1"}
            try:
                api.create_namespaced_custom_object("lorajob.dev", "v1alpha1", ns, "lorajobs", body,
                                                    field_validation="Strict")
                names.append((path, body["metadata"]["name"]))
            except ApiException as exc:  # a trap the schema already refuses is fine too
                assert exc.status == 422, exc.body  # noqa: PT017
        verdicts: dict[str, list[str]] = {}
        for path, name in names:
            st_ = kube.wait_for(f"{name} ({path}) settled", lambda n=name: _settled(kube, ns, n),
                                timeout=90)
            if st_["phase"] == "Failed":
                reason = next(c["reason"] for c in st_["conditions"]
                              if c["type"] == "Failed" and c["status"] == "True")
                assert st_.get("message"), st_
                verdicts.setdefault(f"Failed/{reason}", []).append(path)
            else:
                assert st_.get("placement"), st_
                verdicts.setdefault("planned", []).append(path)
        for trap in ("unknown-architecture", "unknown-class", "nothing-fits"):
            assert any(trap in v for k, v in verdicts.items() if k.startswith("Failed")), verdicts
        # After the barrage: alive, no unhandled tracebacks, a valid job still goes through fast.
        ok = lorajob("still-fine", ns, INSTANCE, annotations=success(ns, "still-fine", s3))
        t0 = time.monotonic()
        kube.apply(ok)
        try:
            kube.wait_phase(ns, "still-fine", "Succeeded", timeout=90)
        except AssertionError:
            print("STILL-FINE", kube.status(ns, "still-fine"), op.logs()[-5000:], file=sys.stderr)
            raise
        latency = time.monotonic() - t0
        assert op.alive
        assert not tracebacks(op.logs()), tracebacks(op.logs())[0]
        FIGURES.update(examples=total, rejected=out.rejected, accepted=len(out.accepted),
                       barrage_seconds=round(barrage_seconds, 1), created=len(names),
                       verdicts={k: len(v) for k, v in verdicts.items()},
                       valid_job_seconds=round(latency, 1))
        print("\nHOSTILE SPEC FIGURES", FIGURES, verdicts, file=sys.stderr)
    finally:
        op.stop()


def _settled(kube: Kube, ns: str, name: str) -> dict[str, Any] | None:
    st_ = kube.status(ns, name)
    if st_.get("phase") == "Failed" or st_.get("placement"):
        return st_
    return None


FIGURES: dict[str, Any] = {}

"""Least privilege and secrets, checked against the real API server's authorizer and
admission (no mocks): what the chart's operator ServiceAccount may do and that a trainer pod
holds no API identity at all (`kubectl auth can-i --list`), Pod Security "restricted" enforced on
the job's namespace, local URIs and metadata endpoints refused in cluster mode, and a
planted secret that must not surface in logs, status, events or rendered objects.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.operator_harness import Kube
from tests.reliability.kwokjobs import lorajob, start_operator, success, tracebacks

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]
INSTANCE = f"sec-{uuid.uuid4().hex[:6]}"
# Every authenticated identity may ask who it is and what it may do; not part of a role.
BASELINE = {"selfsubjectreviews.authentication.k8s.io", "selfsubjectaccessreviews.authorization.k8s.io",
            "selfsubjectrulesreviews.authorization.k8s.io"}

# What the chart grants the operator in a watched namespace (watchNamespaces mode), as
# `can-i --list` reports it: resource -> (resourceNames, verbs). This is the minimum: every
# verb is one operator/reconcile/kube.py calls or kopf needs (list/watch for its indexes and
# event handlers, create for the Events it posts); see the chart's _helpers.tpl.
OPERATOR_EXPECTED = {
    # create: a LoRASweep's trials; delete: TTL, and a sweep's early-stopped trials
    "lorajobs.lorajob.dev": ("", {"get", "list", "watch", "create", "delete"}),
    "lorasweeps.lorajob.dev": ("", {"get", "list", "watch"}),
    "lorasweeps.lorajob.dev/status": ("", {"patch"}),
    "lorajobs.lorajob.dev/status": ("", {"patch"}),
    # get: on 409, adopt only a Job this LoRAJob controls (issue 13); patch: suspend;
    # delete: a Failed LoRAJob's running Job
    "jobs.batch": ("", {"get", "list", "watch", "create", "patch", "delete"}),
    "pods": ("", {"list", "watch"}),
    "pods/log": ("", {"get"}),  # the trainer's progress lines
    "events": ("", {"create"}),
    # cluster-wide reads for kopf's discovery
    "customresourcedefinitions.apiextensions.k8s.io": ("", {"get", "list", "watch"}),
    "namespaces": ("", {"get", "list", "watch"}),
}
# Verbs the chart granted that the operator's code never used, removed from the chart
# (RELIABILITY.md, "Least privilege"); none may come back.
OPERATOR_REMOVED = {
    "lorasweeps.lorajob.dev": {"create", "patch", "update", "delete"},
    "lorasweeps.lorajob.dev/status": {"update"},
    "lorajobs.lorajob.dev": {"patch", "update"},
    "lorajobs.lorajob.dev/status": {"get", "update"},
    "jobs.batch": {"update", "deletecollection"},
    # The per-job trainer identity and ConfigMap are gone (the trainer holds no token).
    "configmaps": {"get", "create", "patch", "list", "watch", "update", "delete"},
    "serviceaccounts": {"get", "create", "list", "watch", "patch", "update", "delete"},
    "roles.rbac.authorization.k8s.io": {"get", "create", "list", "watch", "patch", "update", "delete"},
    "rolebindings.rbac.authorization.k8s.io": {"get", "create", "list", "watch", "patch", "update",
                                               "delete"},
    "pods": {"get"},
    "events": {"patch"},
    "events.events.k8s.io": {"create", "patch"},
}


@pytest.fixture
def ns(kube: Kube) -> Iterator[str]:
    name = kube.create_namespace("sec")
    yield name
    kube.delete_namespace(name)


ROW = re.compile(r"^(\S+)\s+\[(.*?)\]\s+\[(.*?)\]\s+\[(.*?)\]\s*$")


def can_i_list(kube: Kube, sa: str, ns: str) -> dict[str, tuple[str, set[str]]]:
    """`kubectl auth can-i --list` for a ServiceAccount, minus the authenticated baseline:
    resource -> (resourceNames, verbs)."""
    text = kube.run("auth", "can-i", "--list", "-n", ns, f"--as={sa}")
    got: dict[str, tuple[str, set[str]]] = {}
    for line in text.splitlines()[1:]:
        m = ROW.match(line)
        if not m or m.group(1) in BASELINE:
            continue  # non-resource URL rows start with "[" and are the same for everyone
        res, names, verbs = m.group(1), m.group(3), set(m.group(4).split())
        got[res] = (names, got.get(res, ("", set()))[1] | verbs)
    return got


def test_chart_operator_rbac_is_the_expected_minimum(local_cluster: Any, kube: Kube, ns: str) -> None:
    """Render the chart (helm template), apply its ServiceAccount and RBAC, and ask the API
    server what that identity may do in a watched namespace and in one it does not watch."""
    release = f"rel{uuid.uuid4().hex[:6]}"
    other = kube.create_namespace("sec-other")
    try:
        rendered = subprocess.run(
            [str(local_cluster.helm), "template", release, str(REPO / "charts" / "lora-operator"),
             "--namespace", ns, "--set", f"watchNamespaces[0]={ns}"],
            capture_output=True, text=True, check=True).stdout
        docs = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in (
            "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
        assert {d["kind"] for d in docs} >= {"ServiceAccount", "Role", "RoleBinding",
                                             "ClusterRole", "ClusterRoleBinding"}
        kube.apply("\n---\n".join(yaml.safe_dump(d) for d in docs))
        sa_name = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
        sa = f"system:serviceaccount:{ns}:{sa_name}"
        got = can_i_list(kube, sa, ns)
        assert {k: v[1] for k, v in got.items()} == {k: v[1] for k, v in OPERATOR_EXPECTED.items()}
        for res, verbs in OPERATOR_REMOVED.items():
            assert not verbs & got.get(res, ("", set()))[1], (res, verbs)
        # Never: secrets, pods/exec, nodes, wildcards, RBAC escalation verbs.
        for verb, what in [("get", "secrets"), ("list", "secrets"), ("create", "pods/exec"),
                           ("create", "pods"), ("delete", "nodes"), ("escalate", "roles"),
                           ("bind", "clusterroles"), ("impersonate", "serviceaccounts"),
                           ("create", "tokenrequests"), ("*", "*")]:
            ans = kube.run("auth", "can-i", verb, what, "-n", ns, f"--as={sa}", check=False).strip()
            assert ans == "no", (verb, what)
        # In a namespace it does not watch it may only read cluster-scoped discovery objects.
        outside = can_i_list(kube, sa, other)
        assert set(outside) == {"customresourcedefinitions.apiextensions.k8s.io", "namespaces"}
        FIGURES["operator_rbac"] = {k: sorted(v[1]) for k, v in got.items()}
    finally:
        kube.delete_namespace(other)
        for d in docs if "docs" in locals() else []:
            if d["kind"].startswith("Cluster"):
                kube.run("delete", d["kind"].lower(), d["metadata"]["name"], "--ignore-not-found",
                         check=False)


def test_trainer_identity_restricted_namespace_and_no_secret_leak(
        local_cluster: Any, kube: Kube, s3k: Any, ns: str, tmp_path: Path) -> None:
    """In a namespace that enforces Pod Security "restricted", with a unique planted secret in
    the S3 credentials Secret: the trainer pod is admitted; it mounts no token, and the
    identity it runs as (the namespace's default ServiceAccount) may do nothing, so it can
    touch no job's status; the secret appears in no log, status, event or rendered object."""
    planted = f"planted-{uuid.uuid4().hex}"
    kube.run("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted",
             "pod-security.kubernetes.io/enforce-version=latest",
             "pod-security.kubernetes.io/warn=restricted")
    kube.run("-n", ns, "create", "secret", "generic", "s3-creds",
             f"--from-literal=AWS_ACCESS_KEY_ID=AKIA{uuid.uuid4().hex[:12].upper()}",
             f"--from-literal=AWS_SECRET_ACCESS_KEY={planted}")
    # The PSA check is real: a root pod is refused here.
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root", "namespace": ns},
           "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    with pytest.raises(RuntimeError, match="violates PodSecurity"):
        kube.apply(bad)

    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        kube.apply(lorajob("guarded", ns, INSTANCE,
                           annotations={"kwok.lorajob.dev/keep-running": "true"},
                           output={"uri": f"s3://lora-test/reliability/adapters/{ns}/guarded/",
                                   "credentialsSecret": "s3-creds"}))
        kube.apply(lorajob("neighbour", ns, INSTANCE, annotations=success(ns, "neighbour", s3k)))
        st = kube.wait_phase(ns, "guarded", "Running", timeout=90)
        pods = kube.list("pods", ns, "lorajob.dev/job-name=guarded")
        assert pods and pods[0]["status"]["phase"] == "Running"  # admitted under "restricted"
        job = kube.get("job", "guarded-a1", ns)
        assert not [e for e in kube.list("events", ns) if e["reason"] == "FailedCreate"]

        pod_spec = pods[0]["spec"]
        assert pod_spec["automountServiceAccountToken"] is False
        assert not [v for v in pod_spec["volumes"] if "projected" in v or "serviceAccountToken" in str(v)]
        sa = f"system:serviceaccount:{ns}:{pod_spec.get('serviceAccountName', 'default')}"
        got = can_i_list(kube, sa, ns)
        assert got == {}, got

        def can(*args: str) -> str:
            return kube.run("auth", "can-i", *args, "-n", ns, f"--as={sa}", check=False).strip()
        assert can("patch", "lorajobs.lorajob.dev/guarded", "--subresource=status") == "no"
        assert can("patch", "lorajobs.lorajob.dev/neighbour", "--subresource=status") == "no"
        assert can("patch", "lorajobs.lorajob.dev/guarded") == "no"  # spec: no
        assert can("get", "secrets") == "no"
        assert can("get", "secret/s3-creds") == "no"
        assert can("create", "pods") == "no"
        assert can("list", "lorajobs.lorajob.dev") == "no"
        kube.wait_phase(ns, "neighbour", "Succeeded", timeout=90)

        # The planted secret: only inside the Secret itself.
        haystacks = {
            "operator log": op.logs(),
            "lorajobs": kube.run("get", "lorajobs", "-n", ns, "-o", "yaml"),
            "events": kube.run("get", "events", "-n", ns, "-o", "yaml"),
            "configmaps": kube.run("get", "configmaps", "-n", ns, "-o", "yaml"),
            "jobs": kube.run("get", "jobs", "-n", ns, "-o", "yaml"),
            "pods": kube.run("get", "pods", "-n", ns, "-o", "yaml"),
        }
        for where, text in haystacks.items():
            assert planted not in text, f"planted secret in {where}"
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]  # type: ignore[index]
        refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in env}
        assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
        assert not tracebacks(op.logs())
        assert st["phase"] == "Running"
        FIGURES["trainer_rbac"] = {k: sorted(v[1]) for k, v in got.items()}
    finally:
        op.stop()


@pytest.mark.parametrize(("field", "value"), [
    ("dataset", {"uri": "file:///etc/shadow.jsonl"}),
    ("baseModel", {"uri": "file:///var/lib/models/llama/"}),
    ("output", {"uri": "file:///tmp/steal/"}),
    ("dataset.validation", {"uri": "file:///etc/passwd.jsonl"}),
    ("dataset.test", {"uri": "file:///root/.ssh/id_rsa.jsonl"}),
])
def test_local_uris_refused_in_cluster_mode(local_cluster: Any, kube: Kube, s3k: Any, ns: str,
                                            tmp_path: Path, field: str, value: dict[str, Any],
                                            ) -> None:
    """Settings.allowLocalUris is false by default: a file:// URI anywhere in the spec Fails
    at planning, naming the field; no Job, no pod."""
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        spec_part: dict[str, Any] = {}
        if field == "dataset":
            spec_part = {"dataset": value}
        elif field == "baseModel":
            spec_part = {"baseModel": {**value, "shape": lorajob("x", ns, INSTANCE)["spec"]["baseModel"]["shape"]}}
        elif field == "output":
            spec_part = {"output": value}
        else:
            key = field.split(".")[1]
            spec_part = {"dataset": {"uri": "s3://lora-test/data/train.jsonl", key: value}}
        kube.apply(lorajob("local", ns, INSTANCE, **spec_part))
        st = kube.wait_phase(ns, "local", "Failed", "Running", "Scheduling", "Succeeded", timeout=60)
        assert st["phase"] == "Failed", st
        assert f"spec.{field}.uri" in st["message"], st["message"]
        assert not kube.list("jobs", ns)
    finally:
        op.stop()


@pytest.mark.parametrize("field", ["baseModel", "output", "dataset"])
def test_metadata_endpoints_refused_by_the_operator(local_cluster: Any, kube: Kube, s3k: Any,
                                                    ns: str, tmp_path: Path, field: str) -> None:
    """An endpoint on a link-local / cloud-metadata address is refused before the operator
    (which reads config.json and HEADs manifests with its own credentials) calls it."""
    op = start_operator(local_cluster, [ns], tmp_path, INSTANCE)
    try:
        body = lorajob("imds", ns, INSTANCE)
        body["spec"][field]["endpoint"] = "http://169.254.169.254/latest/meta-data"
        kube.apply(body)
        st = kube.wait_phase(ns, "imds", "Failed", "Running", "Scheduling", timeout=60)
        assert st["phase"] == "Failed", st
        assert f"spec.{field}.endpoint" in st["message"], st["message"]
        assert "169.254.169.254" not in op.logs().replace(st["message"], "") or \
            "refus" in op.logs()
        assert not kube.list("jobs", ns)
    finally:
        op.stop()


FIGURES: dict[str, Any] = {}


def test_zz_print_figures() -> None:
    import sys

    print("\nSECURITY FIGURES", FIGURES, file=sys.stderr)

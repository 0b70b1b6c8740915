"""The Helm chart (charts/lora-operator): lint, schema, rendering, RBAC, and agreement with the
operator's own code (settings model, CLI flags, the API calls it makes).

Needs the helm binary that hack/cluster/build.sh builds; no cluster. Server-side validation
of the rendered manifests against a real API server is in tests/e2e/test_chart_server.py.
"""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench import report
from lora_operator.cli import build_parser
from lora_operator.settings import default_settings_text, parse_settings
from tests.unit.test_chart_helpers import CHART, KUBE_VERSION, REPO, by_kind, helm_binary, one, render

HELM = helm_binary()

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "ha-namespaced": {"replicaCount": 3, "watchNamespaces": ["ml", "research"]},
    "quickstart-like": {
        "image": {"repository": "local/lora-operator", "tag": "dev"},
        "config": {"s3Endpoint": "http://127.0.0.1:36307", "s3CredentialsSecret": "s3-creds",
                   "allowLocalUris": True, "trainerCpu": "1", "trainerMemory": "4Gi",
                   "vramClasses": [{"name": "t4-16gb", "memoryMiB": 15360, "bf16": False}],
                   "trainerImage": {"repository": "local/lora-trainer", "tag": "dev"}},
        "operatorS3CredentialsSecret": "s3-creds",
        "metrics": {"enabled": False},
        "nodeSelector": {"lorajob.dev/dev-node": "true"},
        "tolerations": [{"key": "lorajob.dev/dev-node", "operator": "Exists"}],
    },
}


def _helm() -> str:
    assert HELM is not None
    return HELM


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    return render(_helm(), values=values)


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    dep = one(docs, "Deployment")
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _settings_of(docs: list[dict[str, Any]]) -> Any:
    cm = one(docs, "ConfigMap")
    return parse_settings(yaml.safe_load(cm["data"]["config.yaml"]), "chart ConfigMap")


# ------------------------------------------------------------------------- the chart itself


def test_helm_lint_is_clean() -> None:
    out = subprocess.run([_helm(), "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout


def test_crd_is_the_generated_one_not_a_copy() -> None:
    """One source: the chart's crds/lorajob.yaml is a symlink to crds/lorajob.yaml."""
    link = CHART / "crds" / "lorajob.yaml"
    assert link.is_symlink()
    assert link.resolve() == (REPO / "crds" / "lorajob.yaml").resolve()


def test_packaged_chart_carries_the_crd_contents(tmp_path: Path) -> None:
    """`helm package` follows the symlink: the archive holds the real CRD, byte for byte."""
    subprocess.run([_helm(), "package", str(CHART), "-d", str(tmp_path)], check=True,
                   capture_output=True)
    (tgz,) = tmp_path.glob("lora-operator-*.tgz")
    with tarfile.open(tgz) as tar:
        member = tar.extractfile("lora-operator/crds/lorajob.yaml")
        assert member is not None
        packaged = member.read()
        assert "lora-operator/crds/kopf-peering.yaml" in tar.getnames()
    original = (REPO / "crds" / "lorajob.yaml").read_bytes()
    assert hashlib.sha256(packaged).digest() == hashlib.sha256(original).digest()


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_value_sets_render(name: str) -> None:
    docs = _render(VALUE_SETS[name])
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "ConfigMap"} <= kinds
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lora-operator"


@pytest.mark.parametrize("bad", [
    {"replicaCount": -1},
    {"config": {"vramClasses": [{"name": "Big_GPU", "memoryMiB": 81920}]}},
    {"config": {"vramClasses": []}},
    {"config": {"maxWorkers": 0}},
    {"config": {"s3Endpoint": "minio:9000"}},
    {"watchNamespaces": ["Not A Namespace"]},
    {"metrics": {"port": 70000}},
    {"unknownKey": True},
])
def test_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(subprocess.CalledProcessError) as err:
        _render(bad)
    assert "schema" in err.value.stderr


# ------------------------------------------------------------------------- configuration


def test_default_config_is_the_packaged_default() -> None:
    """values.yaml's VRAM classes and limits are operator/config/default.yaml's."""
    chart = _settings_of(_render({}))
    packaged = parse_settings(yaml.safe_load(default_settings_text()))
    assert chart.vram_classes == packaged.vram_classes
    assert chart.safety_margin == packaged.safety_margin
    assert chart.max_workers == packaged.max_workers
    assert chart.trainer_image == packaged.trainer_image
    assert chart.allow_local_uris is False


def test_config_values_reach_the_settings() -> None:
    s = _settings_of(_render(VALUE_SETS["quickstart-like"]))
    assert s.s3_endpoint == "http://127.0.0.1:36307"
    assert s.s3_credentials_secret == "s3-creds"
    assert s.trainer_image == "local/lora-trainer:dev"
    assert (s.trainer_cpu, s.trainer_memory) == ("1", "4Gi")
    assert s.allow_local_uris is True
    assert [c.name for c in s.vram_classes] == ["t4-16gb"]
    s2 = _settings_of(_render(VALUE_SETS["ha-namespaced"]))
    assert s2.namespaces == ["ml", "research"]


def test_config_change_rolls_the_pods() -> None:
    a = one(_render({}), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    b = one(_render({"config": {"maxWorkers": 5}}), "Deployment")["spec"]["template"][
        "metadata"]["annotations"]
    assert a["checksum/config"] != b["checksum/config"]


# ------------------------------------------------------------------------- the Deployment


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_operator_cli_accepts_the_deployment_args(name: str) -> None:
    c = _container(_render(VALUE_SETS[name]))
    assert c["command"] == ["lora-operator"]
    args = build_parser().parse_args(c["args"])
    assert args.command == "run"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert Path(args.config).parent.as_posix() in mounts
    assert mounts[Path(args.config).parent.as_posix()]["readOnly"] is True


def test_single_replica_is_standalone_and_recreated() -> None:
    docs = _render({})
    dep = one(docs, "Deployment")
    args = build_parser().parse_args(_container(docs)["args"])
    assert args.standalone and not args.peering
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    assert not by_kind(docs, "ClusterKopfPeering")


def test_replicas_use_kopf_peering() -> None:
    docs = _render({"replicaCount": 2})
    args = build_parser().parse_args(_container(docs)["args"])
    assert args.peering and not args.standalone
    peering = one(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == args.peering
    cluster_rules = [r for d in by_kind(docs, "ClusterRole") for r in d["rules"]]
    assert any("clusterkopfpeerings" in r["resources"] and "patch" in r["verbs"]
               for r in cluster_rules)
    namespaced = _render({"replicaCount": 2, "watchNamespaces": ["ml"]})
    assert one(namespaced, "KopfPeering")["metadata"]["namespace"] == "ml"


def test_restricted_security_context_and_probe() -> None:
    docs = _render({})
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = _container(docs)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    # A read-only root filesystem needs a writable /tmp.
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    probe = c["livenessProbe"]["httpGet"]
    args = build_parser().parse_args(c["args"])
    assert args.liveness.endswith(probe["path"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert args.liveness == f"http://0.0.0.0:{ports[probe['port']]}/healthz"


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_operator_memory_is_sized_from_the_measured_bursts() -> None:
    """The request holds the N = 1,000 burst's peak RSS, the limit every burst's peak with
    25 % headroom (figures from BENCHMARKS.md's data, as `make bench` wrote them)."""
    runs = report._runs(report.previous())
    assert runs, "BENCHMARKS.md has no burst figures"
    peak_1000 = max(r["operator_peak_rss_mb"] for r in runs if r["n"] <= 1000) * 1e6
    peak_any = max(r["operator_peak_rss_mb"] for r in runs) * 1e6
    resources = _container(_render({}))["resources"]
    assert _bytes(resources["requests"]["memory"]) >= peak_1000
    assert _bytes(resources["limits"]["memory"]) >= 1.25 * peak_any


def test_metrics_service_targets_the_metrics_port() -> None:
    docs = _render({})
    svc = one(docs, "Service")
    c = _container(docs)
    args = build_parser().parse_args(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert ports["metrics"] == args.metrics_port
    assert svc["spec"]["selector"].items() <= one(docs, "Deployment")["spec"]["template"][
        "metadata"]["labels"].items()
    assert not by_kind(_render({"metrics": {"enabled": False}}), "Service")


# ------------------------------------------------------------------------- RBAC


def _rules(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for d in by_kind(docs, kind) for r in d["rules"]]


def _allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
               for r in rules)


NEEDED = [  # what operator/reconcile/kube.py calls plus kopf's list/watch and Event posts
    ("lorajob.dev", "lorajobs", ["get", "list", "watch", "delete"]),
    ("lorajob.dev", "lorajobs/status", ["patch"]),
    # operator/reconcile/sweep_controller.py: trials are LoRAJobs the sweep creates
    ("lorajob.dev", "lorajobs", ["create"]),
    ("lorajob.dev", "lorasweeps", ["get", "list", "watch"]),
    ("lorajob.dev", "lorasweeps/status", ["patch"]),
    ("batch", "jobs", ["create", "get", "list", "watch", "patch"]),
    ("", "pods", ["list", "watch"]),
    ("", "pods/log", ["get"]),  # a running trainer's progress (it holds no API token)
    ("", "events", ["create"]),
]


@pytest.mark.parametrize(("values", "kind"), [({}, "ClusterRole"),
                                              ({"watchNamespaces": ["ml"]}, "Role")])
def test_rbac_grants_what_the_operator_does(values: dict[str, Any], kind: str) -> None:
    rules = _rules(_render(values), kind)
    for group, resource, verbs in NEEDED:
        for verb in verbs:
            assert _allows(rules, group, resource, verb), f"{verb} {group}/{resource}"


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["ml"]}, {"replicaCount": 2}])
def test_rbac_is_least_privilege(values: dict[str, Any]) -> None:
    docs = _render(values)
    rules = _rules(docs, "ClusterRole") + _rules(docs, "Role")
    for r in rules:
        assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"]
        assert "secrets" not in r["resources"], "the operator must never read Secrets"
        assert not {"escalate", "bind", "impersonate"} & set(r["verbs"])
    if values.get("watchNamespaces"):
        cluster = _rules(docs, "ClusterRole")
        assert not any(_allows(cluster, g, res, v) for g, res, vs in NEEDED for v in vs), \
            "namespaced objects must not be granted cluster-wide when namespaces are listed"


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["ml"]}])
def test_operator_holds_no_rights_to_make_identities_or_config(values: dict[str, Any]) -> None:
    """The Job is a LoRAJob's only child: the trainer pod has no API identity (no
    ServiceAccount, Role or RoleBinding per job) and reads its config from its own pod,
    so the operator holds none of those rights, nor any to grant (RBAC escalation), and
    of pods it may only list, watch and read the logs."""
    docs = _render(values)
    rules = _rules(docs, "ClusterRole") + _rules(docs, "Role")
    for group, resource in (("", "configmaps"), ("", "serviceaccounts"),
                            ("rbac.authorization.k8s.io", "roles"),
                            ("rbac.authorization.k8s.io", "rolebindings"),
                            ("rbac.authorization.k8s.io", "clusterroles"),
                            ("rbac.authorization.k8s.io", "clusterrolebindings")):
        for verb in ("create", "patch", "update", "get"):
            assert not _allows(rules, group, resource, verb), f"{verb} {group}/{resource}"
    assert not _allows(rules, "lorajob.dev", "lorajobs/status", "get")
    pod_rights = {(res, verb) for r in rules if "" in r["apiGroups"]
                  for res in r["resources"] if res.startswith("pods") for verb in r["verbs"]}
    assert pod_rights == {("pods", "list"), ("pods", "watch"), ("pods/log", "get")}

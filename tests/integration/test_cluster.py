"""The local cluster itself (hack/cluster): real control plane, kwok GPU fleet, S3.

These run against the real cluster from the `local_cluster` fixture; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from kubernetes import client, config
from localcluster import ClusterInfo

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
BIG_GPU_MEMORY_MIB = {"46068", "81559", "143771"}  # L40S, H100, H200
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

T = TypeVar("T")


def wait_until(fn: Callable[[], T | None], timeout: float = 60, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = fn()
        if out:
            return out
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pins() -> dict[str, str]:
    lines = (REPO / "hack/cluster/versions.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


@pytest.fixture(scope="module")
def api(local_cluster: ClusterInfo) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(local_cluster.kubeconfig))


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    core = client.CoreV1Api(api)
    name = f"t-cluster-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_until(lambda: _has_default_sa(core, name), 30, "default ServiceAccount")
    yield name
    core.delete_namespace(name)


def _has_default_sa(core: client.CoreV1Api, ns: str) -> bool:
    return any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(ns).items)


def gpu_pod(
    name: str, gpus: int, min_memory_mib: int | None = None, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {"name": "main", "image": "trainer:dev", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
        ],
        "tolerations": [GPU_TOLERATION],
    }
    if min_memory_mib is not None:
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": [str(min_memory_mib)]}
                            ]
                        }
                    ]
                }
            }
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": spec,
    }


def test_versions_are_the_pinned_ones(local_cluster: ClusterInfo) -> None:
    out = json.loads(local_cluster.kubectl_run("version", "-o", "json").stdout)
    want = pins()["KUBERNETES_VERSION"]
    assert out["clientVersion"]["gitVersion"] == want
    assert out["serverVersion"]["gitVersion"] == want
    helm = os.popen(f"{local_cluster.helm} version --short").read()
    assert helm.startswith(pins()["HELM_VERSION"])


def test_fleet_has_gpu_classes_and_cpu_nodes(api: client.ApiClient) -> None:
    nodes = client.CoreV1Api(api).list_node(label_selector="type=kwok").items
    memories = {n.metadata.labels.get("nvidia.com/gpu.memory") for n in nodes}
    assert {"15360", "23034", "46068", "81559", "143771"} <= memories
    eight = [n for n in nodes if n.status.allocatable.get("nvidia.com/gpu") == "8"]
    assert eight, "some nodes have 8 GPUs"
    cpu_only = [n for n in nodes if "nvidia.com/gpu" not in n.status.allocatable]
    assert len(cpu_only) >= 2
    for n in nodes:
        ready = {c.type: c.status for c in n.status.conditions}["Ready"]
        assert ready == "True", n.metadata.name
        if "nvidia.com/gpu" in n.status.allocatable:
            assert n.metadata.labels["nvidia.com/gpu.count"] == n.status.allocatable["nvidia.com/gpu"]
            assert {(t.key, t.value, t.effect) for t in n.spec.taints} >= {("nvidia.com/gpu", "present", "NoSchedule")}


def test_gpu_memory_affinity_places_only_on_big_gpus(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    names = [f"big-{i}" for i in range(6)]
    for name in names:
        core.create_namespaced_pod(namespace, gpu_pod(name, 1, min_memory_mib=40000))

    def placed() -> list[str] | None:
        pods = [core.read_namespaced_pod(n, namespace) for n in names]
        nodes = [p.spec.node_name for p in pods]
        return nodes if all(nodes) else None

    nodes = wait_until(placed, 60, "all pods scheduled")
    for node_name in nodes:
        labels = core.read_node(node_name).metadata.labels
        assert labels["nvidia.com/gpu.memory"] in BIG_GPU_MEMORY_MIB, (node_name, labels)
        assert int(labels["nvidia.com/gpu.memory"]) > 40000


def test_more_gpus_than_any_node_stays_pending(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, gpu_pod("nine", 9))

    def unschedulable() -> Any:
        pod = core.read_namespaced_pod("nine", namespace)
        for c in pod.status.conditions or []:
            if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
                return pod, c
        return None

    pod, cond = wait_until(unschedulable, 60, "PodScheduled=False/Unschedulable")
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None
    assert "nvidia.com/gpu" in cond.message, cond.message


def job(name: str, annotations: dict[str, str] | None = None, backoff_limit: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "trainer:dev"}]},
            },
        },
    }


def job_condition(batch: client.BatchV1Api, ns: str, name: str, cond_type: str) -> bool:
    j = batch.read_namespaced_job(name, ns)
    return any(c.type == cond_type and c.status == "True" for c in j.status.conditions or [])


def test_job_completes_and_pods_are_garbage_collected(api: client.ApiClient, namespace: str) -> None:
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, job("ok"))
    wait_until(lambda: job_condition(batch, namespace, "ok", "Complete"), 60, "Job Complete")
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=ok").items
    assert len(pods) == 1 and pods[0].status.phase == "Succeeded"
    term = pods[0].status.container_statuses[0].state.terminated
    assert term.exit_code == 0 and term.reason == "Completed"

    batch.delete_namespaced_job("ok", namespace, propagation_policy="Background")
    wait_until(
        lambda: not core.list_namespaced_pod(namespace, label_selector="job-name=ok").items or None,
        60,
        "Job pods garbage-collected",
    )


def test_pod_outcome_follows_kwok_annotations(api: client.ApiClient, namespace: str) -> None:
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    message = json.dumps({"reason": "OOM", "step": 12})
    batch.create_namespaced_job(
        namespace,
        job(
            "oom",
            {
                "kwok.lorajob.dev/exit-code": "137",
                "kwok.lorajob.dev/reason": "OOMKilled",
                "kwok.lorajob.dev/termination-message": message,
                "kwok.lorajob.dev/run-seconds": "3",
            },
        ),
    )
    wait_until(lambda: job_condition(batch, namespace, "oom", "Failed"), 60, "Job Failed")
    pod = core.list_namespaced_pod(namespace, label_selector="job-name=oom").items[0]
    assert pod.status.phase == "Failed"
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason, term.message) == (137, "OOMKilled", message)
    assert (term.finished_at - pod.status.start_time).total_seconds() >= 2


def test_kwok_leaves_nodes_without_its_annotation_alone(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    name = f"real-{uuid.uuid4().hex[:6]}"
    core.create_node({"metadata": {"name": name, "labels": {"type": "dev-agent"}}})
    try:
        time.sleep(3)
        node = core.read_node(name)
        assert not node.status.conditions, "kwok must not manage unannotated nodes"
    finally:
        core.delete_node(name)


def test_crds_are_applied_and_established(local_cluster: ClusterInfo) -> None:
    files = sorted((REPO / "crds").glob("*.y*ml"))
    assert files, "crds/ has no CRD file to apply"
    assert local_cluster.crd_error is None, local_cluster.crd_error
    out = local_cluster.kubectl_run("get", "crd", "lorajobs.lorajob.dev", "-o", "json")
    conds = {c["type"]: c["status"] for c in json.loads(out.stdout)["status"]["conditions"]}
    assert conds.get("Established") == "True"


def test_s3_multipart_put_list_get(local_cluster: ClusterInfo) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=local_cluster.s3_endpoint,
        region_name=local_cluster.s3_region,
        aws_access_key_id=local_cluster.s3_access_key,
        aws_secret_access_key=local_cluster.s3_secret_key,
    )
    data = os.urandom(20 * 1024 * 1024 + 123)
    key = f"tests/{uuid.uuid4().hex}/blob.bin"
    mib = 1024 * 1024
    cfg = TransferConfig(multipart_threshold=8 * mib, multipart_chunksize=8 * mib)
    bucket = local_cluster.s3_bucket
    s3.upload_fileobj(io.BytesIO(data), bucket, key, Config=cfg)
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["ContentLength"] == len(data)
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # three parts
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=key.rsplit("/", 1)[0])
        assert [o["Key"] for o in listed["Contents"]] == [key]
        got = io.BytesIO()
        s3.download_fileobj(bucket, key, got, Config=cfg)
        assert hashlib.sha256(got.getvalue()).digest() == hashlib.sha256(data).digest()
    finally:
        s3.delete_object(Bucket=bucket, Key=key)


def test_env_file_matches_fixture(local_cluster: ClusterInfo) -> None:
    text = (local_cluster.state_dir / "env").read_text()
    for k, v in local_cluster.env.items():
        assert f"export {k}={json.dumps(v)}" in text


def test_serviceaccount_tokens_and_root_ca(local_cluster: ClusterInfo, namespace: str) -> None:
    token = local_cluster.kubectl_run("create", "token", "default", "-n", namespace).stdout.strip()
    assert token.count(".") == 2  # a signed JWT from the TokenRequest API
    out = subprocess.run(
        [str(local_cluster.kubectl), "--kubeconfig=/dev/null", "--server", local_cluster.api_server,
         "--certificate-authority", str(local_cluster.state_dir / "pki" / "ca.crt"), "--token", token,
         "auth", "whoami", "-o", "json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert json.loads(out)["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:default"
    ca = local_cluster.kubectl_run("get", "configmap", "kube-root-ca.crt", "-n", namespace, "-o", "json")
    assert "BEGIN CERTIFICATE" in json.loads(ca.stdout)["data"]["ca.crt"]


def test_pod_security_admission_enforces(local_cluster: ClusterInfo, namespace: str) -> None:
    local_cluster.kubectl_run("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged"},
        "spec": {"containers": [{"name": "c", "image": "x", "securityContext": {"privileged": True}}]},
    }
    r = local_cluster.kubectl_run("create", "-n", namespace, "-f", "-", input=json.dumps(pod), check=False)
    assert r.returncode != 0
    assert "violates PodSecurity" in r.stderr, r.stderr

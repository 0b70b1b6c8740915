"""The dev node agent's control loop: nodes, heartbeats, pod watch (DEV/TEST ONLY).

Threads and why:

- **heartbeat**: renews each node's Lease in ``kube-node-lease`` every 10 s and re-posts the
  Ready condition every 30 s, so the node lifecycle controller never taints the nodes
  unreachable while a long training step blocks nothing else;
- **watch** (one per node, ``fieldSelector=spec.nodeName=<node>``): feeds pod events into a
  queue;
- **main loop**: the only thread that spawns processes (``PR_SET_PDEATHSIG`` ties a child to
  the thread that forked it) and the only one that writes pod status, so pod state needs no
  locks. A full relist every 10 s repairs anything a dropped watch missed.
- **kubelet API** (kubeletapi.py): serves ``/containerLogs`` so ``kubectl logs`` works.
"""

from __future__ import annotations

import os
import platform
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hack.nodeagent.kube import ApiError, Kube
from hack.nodeagent.pods import Environment, PodRun, now

DEV_NODE_LABEL = "lorajob.dev/dev-node"
DEV_TAINT = {"key": DEV_NODE_LABEL, "value": "true", "effect": "NoSchedule"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10.0
STATUS_SECONDS = 30.0
RELIST_SECONDS = 10.0
TICK_SECONDS = 0.5
FIELD_MANAGER = "lora-dev-node-agent"


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [nodeagent] {msg}", flush=True)


@dataclass
class NodeSpec:
    """One Node this agent presents. gpus > 0 makes it a GPU node of the given class."""

    name: str
    gpus: int = 0
    product: str = "Tesla-T4"
    memory_mib: int = 15360
    cpu: str = "16"
    memory: str = "64Gi"
    taint_dev: bool = True
    labels: dict[str, str] = field(default_factory=dict)

    def resources(self) -> dict[str, str]:
        out = {"cpu": self.cpu, "memory": self.memory, "pods": "110",
               "ephemeral-storage": "10Ti"}
        if self.gpus:
            out["nvidia.com/gpu"] = str(self.gpus)
        return out

    def object(self, kubelet_port: int) -> dict[str, Any]:
        labels = {
            "kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": "dev-node-agent",
            DEV_NODE_LABEL: "true", **self.labels,
        }
        taints: list[dict[str, str]] = [dict(DEV_TAINT)] if self.taint_dev else []
        if self.gpus:
            labels.update({
                "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": self.product,
                "nvidia.com/gpu.memory": str(self.memory_mib),
                "nvidia.com/gpu.count": str(self.gpus),
            })
            taints.append(dict(GPU_TAINT))
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "labels": labels,
                         "annotations": {"lorajob.dev/dev-node-agent":
                                         "DEV/TEST ONLY: pods run as local processes "
                                         "(hack/nodeagent)",
                                         "node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {"taints": taints},
        }


class NodeAgent:
    def __init__(self, kube: Kube, nodes: list[NodeSpec], env: Environment,
                 kubelet_port: int):
        self.kube = kube
        self.nodes = nodes
        self.env = env
        self.kubelet_port = kubelet_port
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.pods: dict[str, PodRun] = {}
        self.stopping = threading.Event()
        self.boot_id = str(uuid.uuid4())
        self.first_sync = True

    # ------------------------------------------------------------------ nodes

    def _node_status(self, spec: NodeSpec) -> dict[str, Any]:
        ts = now()
        conds = [
            ("Ready", "True", "KubeletReady", "dev node agent is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", ""),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", ""),
            ("PIDPressure", "False", "KubeletHasSufficientPID", ""),
        ]
        res = spec.resources()
        return {
            "capacity": res, "allocatable": res,
            "conditions": [{"type": t, "status": s, "reason": r, "message": m,
                            "lastHeartbeatTime": ts, "lastTransitionTime": ts}
                           for t, s, r, m in conds],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": uuid.uuid5(uuid.NAMESPACE_DNS, spec.name).hex,
                "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, spec.name)),
                "bootID": self.boot_id, "kernelVersion": platform.release(),
                "osImage": "dev node agent (local processes)",
                "containerRuntimeVersion": "nodeagent://0.1.0",
                "kubeletVersion": self._server_version(), "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": "amd64",
            },
        }

    def _server_version(self) -> str:
        if not hasattr(self, "_version"):
            try:
                self._version = str(self.kube.get("/version")["gitVersion"])
            except (ApiError, KeyError, TypeError):
                self._version = "v0.0.0-nodeagent"
        return self._version

    def register(self) -> None:
        """Create (or take over) each Node, then post its status as Ready."""
        for spec in self.nodes:
            obj = spec.object(self.kubelet_port)
            self.kube.request(
                "PATCH", f"/api/v1/nodes/{spec.name}", obj,
                query={"fieldManager": FIELD_MANAGER, "force": "true"},
                content_type="application/apply-patch+yaml")
            self._post_status(spec)
            self._renew_lease(spec)
            kind = f"{spec.gpus} GPU {spec.product}" if spec.gpus else "CPU"
            log(f"node {spec.name} registered ({kind})")

    def _post_status(self, spec: NodeSpec) -> None:
        self.kube.merge_patch(f"/api/v1/nodes/{spec.name}/status",
                              {"status": self._node_status(spec)})

    def _renew_lease(self, spec: NodeSpec) -> None:
        ns = "kube-node-lease"
        path = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{spec.name}"
        ts = dt_micro()
        body = {"spec": {"holderIdentity": spec.name, "leaseDurationSeconds": LEASE_SECONDS,
                         "renewTime": ts}}
        try:
            self.kube.merge_patch(path, body)
        except ApiError as exc:
            if exc.status != 404:
                raise
            node = self.kube.get(f"/api/v1/nodes/{spec.name}")
            self.kube.post(f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": spec.name, "namespace": ns, "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": spec.name,
                    "uid": node["metadata"]["uid"]}]},
                **body})

    def heartbeat_loop(self) -> None:
        last_status = time.monotonic()
        while not self.stopping.wait(HEARTBEAT_SECONDS):
            post = time.monotonic() - last_status >= STATUS_SECONDS
            for spec in self.nodes:
                try:
                    self._renew_lease(spec)
                    if post:
                        self._post_status(spec)
                except Exception as exc:  # keep beating through API hiccups
                    log(f"heartbeat {spec.name}: {exc}")
            if post:
                last_status = time.monotonic()

    # ------------------------------------------------------------------ pods

    def watch_loop(self, node: str) -> None:
        rv = ""
        while not self.stopping.is_set():
            try:
                if not rv:
                    lst = self.kube.get("/api/v1/pods",
                                        query={"fieldSelector": f"spec.nodeName={node}"})
                    rv = lst["metadata"]["resourceVersion"]
                    for pod in lst["items"]:
                        self.events.put(("SYNC", pod))
                for ev in self.kube.watch("/api/v1/pods", {
                        "fieldSelector": f"spec.nodeName={node}", "resourceVersion": rv}):
                    if self.stopping.is_set():
                        return
                    obj = ev.get("object") or {}
                    if ev.get("type") == "ERROR":
                        rv = ""
                        break
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev.get("type") != "BOOKMARK":
                        self.events.put((str(ev["type"]), obj))
            except Exception as exc:
                if not self.stopping.is_set():
                    log(f"watch {node}: {exc}; relisting")
                    rv = ""
                    time.sleep(1)

    def relist(self) -> None:
        """Every pod bound to our nodes, straight from the API (repairs missed events)."""
        seen: set[str] = set()
        for spec in self.nodes:
            lst = self.kube.get("/api/v1/pods",
                                query={"fieldSelector": f"spec.nodeName={spec.name}"})
            for pod in lst["items"]:
                seen.add(pod["metadata"]["uid"])
                self.on_pod("SYNC", pod)
        for uid in list(self.pods):
            if uid not in seen:
                self.on_pod("DELETED", self.pods[uid].pod)

    def on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        run = self.pods.get(uid)
        if kind == "DELETED":
            if run is not None:
                log(f"pod {run.namespace}/{run.name} deleted; stopping its processes")
                run.signal_all(signal.SIGKILL)
                run.cleanup()
                del self.pods[uid]
            return
        if run is None:
            phase = (pod.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                if pod["metadata"].get("deletionTimestamp"):  # leftover: finish its deletion
                    run = PodRun(pod, self.env, self.kube)
                    run.phase = str(phase)
                    run.finalize()
                return
            run = PodRun(pod, self.env, self.kube)
            self.pods[uid] = run
            if phase == "Running" or (pod.get("status") or {}).get("containerStatuses"):
                log(f"pod {run.namespace}/{run.name} was running before this agent started")
                run.adopt_lost()
            else:
                log(f"pod {run.namespace}/{run.name} bound to {pod['spec'].get('nodeName')}")
        run.pod = pod
        if pod["metadata"].get("deletionTimestamp") and run.terminating_since is None:
            grace = pod["metadata"].get("deletionGracePeriodSeconds")
            if grace is None:
                grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            run.terminating_since = time.monotonic()
            run.kill_at = run.terminating_since + float(grace)
            if run.any_running:
                log(f"pod {run.namespace}/{run.name} terminating: SIGTERM, grace {grace}s")
                run.signal_all(signal.SIGTERM)

    def tick(self) -> None:
        for uid, run in list(self.pods.items()):
            try:
                if run.terminating_since is not None:
                    for c in run.init_containers + run.containers:
                        run.poll(c)
                    if run.any_running and run.kill_at is not None and \
                            time.monotonic() >= run.kill_at:
                        log(f"pod {run.namespace}/{run.name}: grace period over; SIGKILL")
                        run.signal_all(signal.SIGKILL)
                        run.kill_at = None
                    if not run.any_running:
                        if run.phase not in ("Succeeded", "Failed"):
                            run.phase = "Succeeded" if all(
                                c.exit_code == 0 for c in run.containers) else "Failed"
                        run.publish()
                        run.finalize()
                        del self.pods[uid]
                        log(f"pod {run.namespace}/{run.name} finalised")
                    continue
                before = run.phase
                run.step()
                run.publish()
                if run.phase != before:
                    log(f"pod {run.namespace}/{run.name}: {before} -> {run.phase}")
            except Exception as exc:
                log(f"pod {run.namespace}/{run.name}: {type(exc).__name__}: {exc}")

    def run(self) -> None:
        """Register the nodes and serve pods until SIGTERM/SIGINT."""
        self.register()
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        for spec in self.nodes:
            threading.Thread(target=self.watch_loop, args=(spec.name,), name=f"watch-{spec.name}",
                             daemon=True).start()

        def _stop(signum: int, _frame: Any) -> None:
            self.stopping.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        last_relist = time.monotonic()
        while not self.stopping.is_set():
            deadline = time.monotonic() + TICK_SECONDS
            while True:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    kind, pod = self.events.get(timeout=timeout)
                except queue.Empty:
                    break
                try:
                    self.on_pod(kind, pod)
                except Exception as exc:
                    log(f"event {kind}: {type(exc).__name__}: {exc}")
            self.tick()
            if time.monotonic() - last_relist >= RELIST_SECONDS:
                try:
                    self.relist()
                except Exception as exc:
                    log(f"relist: {exc}")
                last_relist = time.monotonic()
        self.shutdown()

    def shutdown(self) -> None:
        """Stop every pod process (SIGTERM, 5 s, SIGKILL): the cluster is going away."""
        log("stopping: terminating pod processes")
        for run in self.pods.values():
            run.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(r.any_running for r in self.pods.values()):
            for run in self.pods.values():
                for c in run.init_containers + run.containers:
                    run.poll(c)
            time.sleep(0.1)
        for run in self.pods.values():
            run.signal_all(signal.SIGKILL)
        log("stopped")


def dt_micro() -> str:
    """MicroTime, the format Lease.renewTime needs."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists()

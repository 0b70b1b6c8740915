"""Command line of the dev node agent (DEV/TEST ONLY).

    python -m hack.nodeagent start    # idempotent: background agent, waits for Ready nodes
    python -m hack.nodeagent stop     # stops it and every pod process it runs
    python -m hack.nodeagent status
    python -m hack.nodeagent run      # foreground (what `start` runs)

`start` records the agent in ``.cluster/nodeagent.pid`` and also appends it to
``.cluster/pids`` in the format hack/cluster uses, so ``make cluster-down`` stops it (first,
since it was started last) together with the control plane.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[2]
DEFAULT_STATE = Path(os.environ.get("LORA_CLUSTER_DIR", REPO / ".cluster"))
DEFAULT_KUBELET_PORT = 36330


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hack.nodeagent",
                                description="Dev node agent (DEV/TEST ONLY): runs pods bound "
                                            "to its nodes as local processes.")
    p.add_argument("command", nargs="?", default="run", choices=["run", "start", "stop", "status"])
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE,
                   help="the local cluster's state dir (.cluster)")
    p.add_argument("--kubeconfig", type=Path, default=None,
                   help="admin kubeconfig (default: STATE/kubeconfig)")
    p.add_argument("--venv", type=Path, default=REPO / ".venv",
                   help="the environment that stands in for every image")
    p.add_argument("--prefix", default="lora-dev", help="node name prefix")
    p.add_argument("--gpu-nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--gpu-product", default="Tesla-T4")
    p.add_argument("--gpu-memory-mib", type=int, default=15360,
                   help="nvidia.com/gpu.memory of the GPU nodes (15360 = a T4-class node)")
    p.add_argument("--cpu-nodes", type=int, default=1)
    p.add_argument("--node-cpu", default="16", help="advertised CPU capacity per node")
    p.add_argument("--node-memory", default="64Gi", help="advertised memory per node")
    p.add_argument("--no-dev-taint", action="store_true",
                   help="do not taint the nodes lorajob.dev/dev-node=true:NoSchedule")
    p.add_argument("--kubelet-port", type=int, default=DEFAULT_KUBELET_PORT)
    p.add_argument("--timeout", type=float, default=60.0, help="start: wait this long for Ready")
    return p.parse_args(argv)


def _pid_file(a: argparse.Namespace) -> Path:
    return Path(a.state_dir) / "nodeagent.pid"


def _running_pid(a: argparse.Namespace) -> int | None:
    try:
        pid = int(_pid_file(a).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"hack.nodeagent" in cmd or b"nodeagent/run.py" in cmd else None


def _node_names(a: argparse.Namespace) -> list[str]:
    return [f"{a.prefix}-gpu-{i}" for i in range(a.gpu_nodes)] + \
           [f"{a.prefix}-cpu-{i}" for i in range(a.cpu_nodes)]


def cmd_run(a: argparse.Namespace) -> int:
    from hack.nodeagent.agent import NodeAgent, NodeSpec, log
    from hack.nodeagent.kube import Kube
    from hack.nodeagent.kubeletapi import serve
    from hack.nodeagent.pods import Environment

    state = Path(a.state_dir).resolve()
    kube = Kube(str(a.kubeconfig or state / "kubeconfig"))
    url = urlparse(kube.server)
    nodes = [NodeSpec(name=f"{a.prefix}-gpu-{i}", gpus=a.gpus_per_node, product=a.gpu_product,
                      memory_mib=a.gpu_memory_mib, cpu=a.node_cpu, memory=a.node_memory,
                      taint_dev=not a.no_dev_taint) for i in range(a.gpu_nodes)]
    nodes += [NodeSpec(name=f"{a.prefix}-cpu-{i}", cpu=a.node_cpu, memory=a.node_memory,
                       taint_dev=not a.no_dev_taint) for i in range(a.cpu_nodes)]
    env = Environment(venv=Path(a.venv).resolve(), apiserver_host=url.hostname or "127.0.0.1",
                      apiserver_port=url.port or 443, state_dir=state,
                      log_dir=state / "logs" / "pods",
                      node_resources={n.name: n.resources() for n in nodes})
    agent = NodeAgent(kube, nodes, env, a.kubelet_port)

    def lookup(ns: str, pod: str, container: str):  # type: ignore[no-untyped-def]
        for run in list(agent.pods.values()):
            if run.namespace == ns and run.name == pod:
                for c in run.init_containers + run.containers:
                    if c.name == container:
                        return run.log_path(c), lambda c=c: c.running
        path = env.log_dir / f"{ns}_{pod}_{container}.log"
        return (path, lambda: False) if path.exists() else None

    serve(a.kubelet_port, state / "pki", state / "nodeagent", lookup)
    log(f"kubelet API (logs) on https://127.0.0.1:{a.kubelet_port}; API server {kube.server}")
    agent.run()
    return 0


def _nodes_ready(a: argparse.Namespace) -> bool:
    from hack.nodeagent.kube import Kube

    kube = Kube(str(a.kubeconfig or Path(a.state_dir) / "kubeconfig"))
    for name in _node_names(a):
        node = kube.get(f"/api/v1/nodes/{name}", ok404=True)
        if not node:
            return False
        conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        if conds.get("Ready") != "True":
            return False
    return True


def _proc_start_time(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[19]


def cmd_start(a: argparse.Namespace) -> int:
    state = Path(a.state_dir).resolve()
    pid = _running_pid(a)
    if pid is None:
        logs = state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "hack.nodeagent", "run",
                *[x for x in a.raw_argv if x != "start"]]
        with (logs / "nodeagent.log").open("ab") as out:
            proc = subprocess.Popen(argv, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        pid = proc.pid
        proc.returncode = 0  # the agent outlives this command on purpose
        _pid_file(a).write_text(f"{pid}\n")
        with (state / "pids").open("a") as f:  # hack/cluster's stop() stops it too
            f.write(f"nodeagent {pid} {_proc_start_time(pid)}\n")
        print(f"[nodeagent] started (pid {pid}); log: {logs / 'nodeagent.log'}", file=sys.stderr)
    else:
        print(f"[nodeagent] already running (pid {pid})", file=sys.stderr)
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        if _running_pid(a) is None:
            print("[nodeagent] exited during start; see .cluster/logs/nodeagent.log",
                  file=sys.stderr)
            return 1
        try:
            if _nodes_ready(a):
                print(f"[nodeagent] nodes Ready: {', '.join(_node_names(a))}", file=sys.stderr)
                return 0
        except Exception:  # API not answering yet; keep waiting
            pass
        time.sleep(0.5)
    print("[nodeagent] nodes not Ready in time", file=sys.stderr)
    return 1


def cmd_stop(a: argparse.Namespace) -> int:
    pid = _running_pid(a)
    if pid is None:
        print("[nodeagent] not running", file=sys.stderr)
        _pid_file(a).unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _running_pid(a) == pid:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    if _running_pid(a) == pid:
        os.kill(pid, signal.SIGKILL)
    _pid_file(a).unlink(missing_ok=True)
    print(f"[nodeagent] stopped (pid {pid})", file=sys.stderr)
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    pid = _running_pid(a)
    print(f"running (pid {pid})" if pid else "not running")
    return 0 if pid else 3


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    a = _args(raw)
    a.raw_argv = raw
    return {"run": cmd_run, "start": cmd_start, "stop": cmd_stop,
            "status": cmd_status}[a.command](a)

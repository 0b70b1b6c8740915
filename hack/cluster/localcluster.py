"""The local Kubernetes cluster for tests and the dev loop.

DEV/TEST INFRASTRUCTURE ONLY: nothing here ships with the operator.

Starts, on loopback only, real etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
kwok (simulated GPU nodes, see fleet.yaml and kwok-stages.yaml) and a SeaweedFS S3 gateway,
each as a process in its own process group, logging to ``.cluster/logs/<name>.log``.
Binaries come from ``build.sh`` (built from source and cached outside the repository).

It is used both by the shell entry points (``up.sh`` / ``down.sh`` run ``python
localcluster.py up|down``) and by the pytest fixture in ``tests/integration/conftest.py``,
so the logic lives here once. Standard library plus PyYAML only.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
STATE_DIR = Path(os.environ.get("LORA_CLUSTER_DIR", REPO / ".cluster")).resolve()
FLEET_FILE = HERE / "fleet.yaml"
STAGES_FILE = HERE / "kwok-stages.yaml"
CRDS_DIR = REPO / "crds"

BUCKET = "lora-test"
REGION = "us-east-1"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
FIELD_MANAGER = "lora-local-cluster"

# Fixed, uncommon loopback ports, below Linux's ephemeral range (32768-60999) so that no
# outgoing connection can be holding one when the cluster starts. If any is taken on the
# first `up`, free ephemeral ports are picked instead; whatever was chosen is kept in
# .cluster/ports.json and reused.
DEFAULT_PORTS = {
    "etcd": 26301,
    "etcd_peer": 26302,
    "apiserver": 26303,
    "controller_manager": 26304,
    "scheduler": 26305,
    "kwok": 26306,
    "s3": 26307,
    "weed_master": 26308,
    "weed_volume": 26309,
    "weed_filer": 26310,
    "weed_master_grpc": 26318,
    "weed_volume_grpc": 26319,
    "weed_filer_grpc": 26320,
    "s3_grpc": 26317,
}

BINARIES = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok", "helm", "weed"]
# Order of start; stop goes the other way.
COMPONENTS = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "s3"]

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


class ClusterError(RuntimeError):
    """A component failed to start or become ready; the message carries its log tail."""


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- paths & build


@dataclass(frozen=True)
class Paths:
    state: Path = STATE_DIR

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def pids(self) -> Path:
        return self.state / "pids"

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def env(self) -> Path:
        return self.state / "env"

    @property
    def ports(self) -> Path:
        return self.state / "ports.json"

    @property
    def s3_credentials(self) -> Path:
        return self.state / "s3-credentials.json"

    @property
    def bin_file(self) -> Path:
        return self.state / "bin"


def build(quiet: bool = False) -> Path:
    """Run build.sh (a cached no-op when the pins did not change) and return the bin dir."""
    out = subprocess.run(
        ["bash", str(HERE / "build.sh")],
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet else None,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- ports


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def choose_ports(p: Paths) -> dict[str, int]:
    if p.ports.exists():
        saved = json.loads(p.ports.read_text())
        if set(saved) == set(DEFAULT_PORTS):
            return {k: int(v) for k, v in saved.items()}
    ports = dict(DEFAULT_PORTS)
    if not all(_port_free(v) for v in ports.values()):
        ports = {}
        while len(ports) < len(DEFAULT_PORTS):
            port = _free_port()
            if port not in ports.values():
                ports[list(DEFAULT_PORTS)[len(ports)]] = port
        log(f"default ports busy; using free ports {ports}")
    p.ports.write_text(json.dumps(ports, indent=1) + "\n")
    return ports


# --------------------------------------------------------------------------- PKI


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(pki: Path, name: str, cn: str) -> None:
    if not (pki / f"{name}.crt").exists():
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.crt", "-days", "3650", "-subj", f"/CN={cn}", cwd=pki)  # fmt: skip


def _cert(pki: Path, name: str, ca: str, subject: str, ext: str) -> None:
    if (pki / f"{name}.crt").exists():
        return
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", subject, cwd=pki)  # fmt: skip
    (pki / f"{name}.ext").write_text(ext + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "3650", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
             cwd=pki)  # fmt: skip


def ensure_pki(p: Paths) -> None:
    """CAs, serving and client certificates, the ServiceAccount signing key pair (openssl).

    Only missing files are made, so an existing .cluster/pki is kept as it is.
    """
    pki = p.pki
    pki.mkdir(parents=True, exist_ok=True)
    san = ",".join(["IP:127.0.0.1", f"IP:{SERVICE_IP}", "DNS:localhost", "DNS:kubernetes",
                    "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                    "DNS:kubernetes.default.svc.cluster.local"])  # fmt: skip
    client = "extendedKeyUsage=clientAuth"
    _ca(pki, "ca", "lora-local-cluster-ca")
    _cert(pki, "apiserver", "ca", "/CN=kube-apiserver", f"subjectAltName={san}\nextendedKeyUsage=serverAuth")
    _cert(pki, "admin", "ca", "/O=system:masters/CN=kubernetes-admin", client)
    _cert(pki, "controller-manager", "ca", "/CN=system:kube-controller-manager", client)
    _cert(pki, "scheduler", "ca", "/CN=system:kube-scheduler", client)
    _cert(pki, "kwok", "ca", "/O=system:masters/CN=kwok", client)
    _cert(pki, "apiserver-kubelet-client", "ca", "/O=system:masters/CN=kube-apiserver-kubelet-client", client)
    # Front proxy (request-header authentication, as for aggregated API servers).
    _ca(pki, "front-proxy-ca", "lora-local-front-proxy-ca")
    _cert(pki, "front-proxy-client", "front-proxy-ca", "/CN=front-proxy-client", client)
    if not (pki / "sa.pub").exists():
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(p: Paths, path: Path, server: str, user: str) -> None:
    def b64(name: str) -> str:
        return base64.b64encode((p.pki / name).read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "lora-local", "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")}}
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(f"{user}.crt"), "client-key-data": b64(f"{user}.key")},
            }
        ],
        "contexts": [{"name": "lora-local", "context": {"cluster": "lora-local", "user": user}}],
        "current-context": "lora-local",
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    path.chmod(0o600)


# --------------------------------------------------------------------------- S3 credentials


def ensure_s3_credentials(p: Paths) -> dict[str, str]:
    if p.s3_credentials.exists():
        return dict(json.loads(p.s3_credentials.read_text()))
    creds = {"access_key": "LORA" + secrets.token_hex(8).upper(), "secret_key": secrets.token_urlsafe(30)}
    p.s3_credentials.write_text(json.dumps(creds) + "\n")
    p.s3_credentials.chmod(0o600)
    return creds


def write_s3_identities(p: Paths, creds: dict[str, str]) -> Path:
    path = p.state / "s3-identities.json"
    path.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "lora",
                        "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            },
            indent=1,
        )
        + "\n"
    )
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------- processes


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime), counted after the ')' that closes the command name.
    return stat.rsplit(")", 1)[1].split()[19]


def read_pids(p: Paths) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}
    if p.pids.exists():
        for line in p.pids.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                out[parts[0]] = (int(parts[1]), parts[2])
    return out


def _alive(pid: int, start: str) -> bool:
    """True when pid still runs and is the very process we started (no PID reuse)."""
    st = _proc_start_time(pid)
    if st is None or st != start:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_process(p: Paths, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    p.logs.mkdir(parents=True, exist_ok=True)
    with open(p.logs / f"{name}.log", "ab") as logf:
        logf.write(f"\n==== {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
        logf.flush()
        # Its own session, so the whole process group can be signalled on stop.
        proc = subprocess.Popen(
            argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=p.state,
            env={**os.environ, **(env or {})},
        )
    start = _proc_start_time(proc.pid) or "?"
    with p.pids.open("a") as f:
        f.write(f"{name} {proc.pid} {start}\n")
    # Popen objects are dropped on purpose: the daemons outlive this interpreter.
    proc.returncode = 0  # silence "subprocess still running" ResourceWarning
    return proc.pid


def log_tail(p: Paths, name: str, lines: int = 40) -> str:
    path = p.logs / f"{name}.log"
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _state_processes(p: Paths) -> list[int]:
    """Orphans: processes running one of our cached binaries with this state dir in argv."""
    try:
        bin_dir = Path(p.bin_file.read_text().strip())
    except OSError:
        return []
    exes = {str((bin_dir / n).resolve()) for n in BINARIES if (bin_dir / n).exists()}
    needle = str(p.state).encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            exe = os.readlink(d / "exe")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if exe in exes and needle in cmd:
            found.append(int(d.name))
    return found


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@contextlib.contextmanager
def _locked(p: Paths) -> Iterator[None]:
    p.state.mkdir(parents=True, exist_ok=True)
    with (p.state / "lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stop(p: Paths | None = None, purge: bool = True) -> None:
    """Stop every component this state dir started; with purge, drop etcd and S3 data."""
    p = p or Paths()
    with _locked(p):
        _stop(p, purge)


def _stop(p: Paths, purge: bool) -> None:
    pids = read_pids(p)
    for name in reversed(list(pids)):
        pid, start = pids[name]
        if _alive(pid, start):
            log(f"stopping {name} (pid {pid})")
            _signal_group(pid, signal.SIGTERM)
    t0 = time.monotonic()
    for name, (pid, start) in pids.items():
        # SeaweedFS drains for a long while on SIGTERM; it keeps no state we need.
        deadline = t0 + (2 if name == "s3" else 15)
        while _alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid, start):
            log(f"{name} (pid {pid}) still running {deadline - t0:.0f}s after SIGTERM; sending SIGKILL")
            _signal_group(pid, signal.SIGKILL)
    recorded = {pid for pid, _ in pids.values()}
    leftovers = [x for x in _state_processes(p) if x not in recorded]  # e.g. from a lost pids file
    for pid in leftovers:
        log(f"killing leftover pid {pid}")
        _signal_group(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # SIGKILL is asynchronous: wait until the processes are gone (their ports with them).
    deadline = time.monotonic() + 10
    for pid, start in [*pids.values(), *((x, _proc_start_time(x) or "") for x in leftovers)]:
        while _alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.05)
    p.pids.unlink(missing_ok=True)
    if purge:
        for d in ("etcd", "s3", "kcm-certs", "scheduler-certs"):
            shutil.rmtree(p.state / d, ignore_errors=True)


# --------------------------------------------------------------------------- HTTP


class Api:
    """A tiny admin client for the API server (client-certificate auth, stdlib only)."""

    def __init__(self, p: Paths, server: str):
        self.server = server
        ctx = ssl.create_default_context(cafile=str(p.pki / "ca.crt"))
        ctx.load_cert_chain(str(p.pki / "admin.crt"), str(p.pki / "admin.key"))
        self.ctx = ctx

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json", timeout: float = 10
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type, "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def apply(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply obj at path (which ends with the object's name)."""
        status, out = self.request(
            "PATCH", f"{path}?fieldManager={FIELD_MANAGER}&force=true", obj, content_type="application/apply-patch+yaml"
        )
        if status >= 300:
            raise ClusterError(f"apply {path}: HTTP {status}: {out}")
        return dict(out)


def _http_ok(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as r:
            return bool(200 <= r.status < 300)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def wait_for(p: Paths, name: str, check: Any, timeout: float, what: str) -> None:
    pids = read_pids(p)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if name in pids and not _alive(*pids[name]):
            raise ClusterError(
                f"{name} exited while waiting for {what}; tail of .cluster/logs/{name}.log:\n{log_tail(p, name)}"
            )
        time.sleep(0.2)
    raise ClusterError(
        f"timed out after {timeout:.0f}s waiting for {what}; tail of .cluster/logs/{name}.log:\n{log_tail(p, name)}"
    )


# --------------------------------------------------------------------------- fleet


def fleet_nodes(fleet_file: Path = FLEET_FILE) -> list[dict[str, Any]]:
    """The Node objects (metadata, spec and status) described by fleet.yaml."""
    fleet = yaml.safe_load(fleet_file.read_text())
    pods = str(fleet.get("pods", "110"))
    disk = str(fleet.get("disk", "10Ti"))  # ephemeral-storage: trainer pods request it
    nodes = []
    for pool in fleet["pools"]:
        gpus = int(pool.get("gpus", 0))
        for i in range(int(pool["count"])):
            name = f"{pool['name']}-{i}"
            labels = {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "lorajob.dev/pool": pool["name"],
            }
            resources = {"cpu": str(pool["cpu"]), "memory": str(pool["memory"]), "pods": pods,
                         "ephemeral-storage": str(pool.get("disk", disk))}
            spec: dict[str, Any] = {}
            if gpus:
                labels.update(
                    {
                        "nvidia.com/gpu.present": "true",
                        "nvidia.com/gpu.product": str(pool["product"]),
                        "nvidia.com/gpu.memory": str(pool["memoryMiB"]),
                        "nvidia.com/gpu.count": str(gpus),
                    }
                )
                resources["nvidia.com/gpu"] = str(gpus)
                spec["taints"] = [dict(GPU_TAINT)]
            nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": labels,
                        "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    },
                    "spec": spec,
                    "status": {"capacity": resources, "allocatable": dict(resources)},
                }
            )
    return nodes


def apply_fleet(api: Api) -> list[str]:
    names = []
    for node in fleet_nodes():
        name = node["metadata"]["name"]
        status = node.pop("status")
        api.apply(f"/api/v1/nodes/{name}", node)
        api.apply(
            f"/api/v1/nodes/{name}/status",
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "status": status},
        )
        names.append(name)
    return names


def _nodes_ready(api: Api, names: list[str]) -> bool:
    status, out = api.request("GET", "/api/v1/nodes?labelSelector=type%3Dkwok")
    if status != 200:
        return False
    ready = set()
    for n in out["items"]:
        conds = {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
        taints = {t["key"] for t in n.get("spec", {}).get("taints", [])}
        gpu_ok = "nvidia.com/gpu.count" not in n["metadata"]["labels"] or "nvidia.com/gpu" in n["status"].get(
            "allocatable", {}
        )
        if conds.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints and gpu_ok:
            ready.add(n["metadata"]["name"])
    return set(names) <= ready


# --------------------------------------------------------------------------- cluster


@dataclass
class ClusterInfo:
    """What a user of the running cluster needs; read back from .cluster/ by `info()`."""

    state_dir: Path
    bin_dir: Path
    kubeconfig: Path
    kubectl: Path
    helm: Path
    api_server: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_region: str
    s3_bucket: str
    ports: dict[str, int] = field(default_factory=dict)
    started_here: bool = False  # this up() call started the processes (else it found them up)
    crd_error: str | None = None  # why applying crds/ failed, when it did (see up(crds=...))

    @property
    def env(self) -> dict[str, str]:
        """Environment variables (the same as .cluster/env exports)."""
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_REGION": self.s3_region,
            "AWS_DEFAULT_REGION": self.s3_region,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "S3_ENDPOINT": self.s3_endpoint,
            "LORA_S3_BUCKET": self.s3_bucket,
            "LORA_CLUSTER_BIN": str(self.bin_dir),
            "LORA_KUBECTL": str(self.kubectl),
            "LORA_HELM": str(self.helm),
        }

    def kubectl_run(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            check=check,
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )


def _info(p: Paths, bin_dir: Path, ports: dict[str, int], creds: dict[str, str]) -> ClusterInfo:
    return ClusterInfo(
        state_dir=p.state,
        bin_dir=bin_dir,
        kubeconfig=p.kubeconfig,
        kubectl=bin_dir / "kubectl",
        helm=bin_dir / "helm",
        api_server=f"https://127.0.0.1:{ports['apiserver']}",
        s3_endpoint=f"http://127.0.0.1:{ports['s3']}",
        s3_access_key=creds["access_key"],
        s3_secret_key=creds["secret_key"],
        s3_region=REGION,
        s3_bucket=BUCKET,
        ports=ports,
    )


def info(p: Paths | None = None) -> ClusterInfo | None:
    """The running cluster's info, or None when .cluster/ holds no complete cluster."""
    p = p or Paths()
    try:
        ports = {k: int(v) for k, v in json.loads(p.ports.read_text()).items()}
        creds = json.loads(p.s3_credentials.read_text())
        bin_dir = Path(p.bin_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return _info(p, bin_dir, ports, creds)


def is_up(p: Paths | None = None) -> bool:
    """All recorded components run and the API server answers /readyz with our kubeconfig."""
    p = p or Paths()
    pids = read_pids(p)
    # Other dev tools (the dev node agent) may append their own entries; ignore those here.
    if not all(name in pids and _alive(*pids[name]) for name in COMPONENTS):
        return False
    ci = info(p)
    if ci is None or not p.env.exists():
        return False
    try:
        status, _ = Api(p, ci.api_server).request("GET", "/readyz", timeout=3)
    except (OSError, ssl.SSLError):
        return False
    return status == 200


def write_env(p: Paths, ci: ClusterInfo) -> None:
    lines = ["# Written by hack/cluster (local dev/test cluster). Use: source .cluster/env"]
    lines += [f"export {k}={json.dumps(v)}" for k, v in ci.env.items()]
    p.env.write_text("\n".join(lines) + "\n")
    p.env.chmod(0o600)


def _start_all(p: Paths, bin_dir: Path, ports: dict[str, int], creds: dict[str, str]) -> None:
    b = bin_dir
    pki = p.pki
    server = f"https://127.0.0.1:{ports['apiserver']}"

    # etcd
    start_process(
        p,
        "etcd",
        [
            str(b / "etcd"),
            "--name=local",
            f"--data-dir={p.state / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{ports['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{ports['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{ports['etcd_peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['etcd_peer']}",
            f"--initial-cluster=local=http://127.0.0.1:{ports['etcd_peer']}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
    )
    # S3 (SeaweedFS) starts early: it needs nothing from Kubernetes.
    identities = write_s3_identities(p, creds)
    (p.state / "s3").mkdir(exist_ok=True)
    start_process(
        p,
        "s3",
        [
            str(b / "weed"),
            "server",
            f"-dir={p.state / 's3'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['weed_master']}",
            f"-master.port.grpc={ports['weed_master_grpc']}",
            "-master.volumeSizeLimitMB=256",
            f"-volume.port={ports['weed_volume']}",
            f"-volume.port.grpc={ports['weed_volume_grpc']}",
            "-volume.max=64",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={ports['weed_filer']}",
            f"-filer.port.grpc={ports['weed_filer_grpc']}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3_grpc']}",
            f"-s3.config={identities}",
            "-s3.iam=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={p.state / 's3' / 'filer.sock'}",
            f"-s3.localSocket={p.state / 's3' / 's3.sock'}",
        ],
    )
    wait_for(p, "etcd", lambda: _http_ok(f"http://127.0.0.1:{ports['etcd']}/health"), 30, "etcd /health")

    # kube-apiserver
    start_process(
        p,
        "kube-apiserver",
        [
            str(b / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # The default plugins (NamespaceLifecycle, ServiceAccount, PodSecurity, ...) plus:
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            # Loopback is not a valid address for the `kubernetes` Service endpoints.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ],
    )
    api = Api(p, server)

    def apiserver_ready() -> bool:
        try:
            return api.request("GET", "/readyz", timeout=2)[0] == 200
        except (OSError, ssl.SSLError):
            return False

    wait_for(p, "kube-apiserver", apiserver_ready, 90, "kube-apiserver /readyz")

    # kube-controller-manager and kube-scheduler
    for user in ("controller-manager", "scheduler", "kwok"):
        write_kubeconfig(p, p.state / f"{user}.kubeconfig", server, user)
    kcm_cfg = p.state / "controller-manager.kubeconfig"
    start_process(
        p,
        "kube-controller-manager",
        [
            str(b / "kube-controller-manager"),
            f"--kubeconfig={kcm_cfg}",
            f"--authentication-kubeconfig={kcm_cfg}",
            f"--authorization-kubeconfig={kcm_cfg}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['controller_manager']}",
            f"--cert-dir={p.state / 'kcm-certs'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*",
            "--leader-elect=false",
            # The default 20 QPS per controller paces the Job controller at about 5 Jobs/s
            # (a pod create and three status writes each): the benchmarks' bursts and the
            # suites' e2e jobs then wait on it, not on the operator.
            "--kube-api-qps=200",
            "--kube-api-burst=400",
        ],
    )
    sched_cfg = p.state / "scheduler.kubeconfig"
    start_process(
        p,
        "kube-scheduler",
        [
            str(b / "kube-scheduler"),
            f"--kubeconfig={sched_cfg}",
            f"--authentication-kubeconfig={sched_cfg}",
            f"--authorization-kubeconfig={sched_cfg}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}",
            f"--cert-dir={p.state / 'scheduler-certs'}",
            "--leader-elect=false",
        ],
    )
    # kwok: only nodes annotated kwok.x-k8s.io/node=fake; other nodes (the dev node agent's)
    # are left alone.
    start_process(
        p,
        "kwok",
        [
            str(b / "kwok"),
            f"--kubeconfig={p.state / 'kwok.kubeconfig'}",
            f"--config={STAGES_FILE}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{ports['kwok']}",
            "--cidr=10.0.0.0/16",
            "--node-lease-duration-seconds=40",
        ],
    )
    wait_for(
        p,
        "kube-controller-manager",
        lambda: _http_ok(f"https://127.0.0.1:{ports['controller_manager']}/healthz", _insecure()),
        60,
        "kube-controller-manager /healthz",
    )
    wait_for(
        p,
        "kube-scheduler",
        lambda: _http_ok(f"https://127.0.0.1:{ports['scheduler']}/healthz", _insecure()),
        60,
        "kube-scheduler /healthz",
    )
    wait_for(p, "kwok", lambda: _http_ok(f"http://127.0.0.1:{ports['kwok']}/healthz"), 60, "kwok /healthz")

    # Simulated fleet; kwok marks the nodes Ready.
    names = apply_fleet(api)
    wait_for(p, "kwok", lambda: _nodes_ready(api, names), 60, f"{len(names)} kwok nodes Ready")
    wait_for(
        p,
        "kube-controller-manager",
        lambda: api.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
        60,
        "ServiceAccount default/default",
    )

    # S3: wait for the gateway, then create the bucket.
    wait_for(p, "s3", lambda: _tcp_open(ports["s3"]) and _tcp_open(ports["weed_filer"]), 60, "SeaweedFS S3 gateway")
    ensure_bucket(p, ports, creds)


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _s3_request(endpoint: str, creds: dict[str, str], method: str, path: str) -> int:
    """One S3 API call with an empty body, signed with AWS Signature Version 4 (stdlib)."""
    host = urllib.parse.urlsplit(endpoint).netloc
    now = time.gmtime()
    amz_date, day = time.strftime("%Y%m%dT%H%M%SZ", now), time.strftime("%Y%m%d", now)
    empty = hashlib.sha256(b"").hexdigest()
    signed = "host;x-amz-content-sha256;x-amz-date"
    canonical = "\n".join(
        [method, path, "", f"host:{host}", f"x-amz-content-sha256:{empty}", f"x-amz-date:{amz_date}", "", signed, empty]
    )
    scope = f"{day}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + creds["secret_key"]).encode()
    for part in (day, REGION, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    req = urllib.request.Request(
        endpoint + path,
        method=method,
        data=b"" if method == "PUT" else None,
        headers={
            "x-amz-date": amz_date,
            "x-amz-content-sha256": empty,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={creds['access_key']}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def ensure_bucket(p: Paths, ports: dict[str, int], creds: dict[str, str]) -> None:
    """Create the test bucket through the S3 API (retrying while the gateway warms up)."""
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    deadline = time.monotonic() + 60
    last: object = None
    while time.monotonic() < deadline:
        try:
            if _s3_request(endpoint, creds, "HEAD", f"/{BUCKET}") == 200:
                return
            last = _s3_request(endpoint, creds, "PUT", f"/{BUCKET}")
        except OSError as e:
            last = e
        time.sleep(0.3)
    raise ClusterError(
        f"could not create bucket {BUCKET} (last answer: {last}); tail of .cluster/logs/s3.log:\n{log_tail(p, 's3')}"
    )


def apply_crds(ci: ClusterInfo, crds_dir: Path = CRDS_DIR) -> list[Path]:
    """kubectl apply every YAML file in crds/ (none is fine) and wait until Established."""
    files = sorted(f for f in crds_dir.glob("*.y*ml")) if crds_dir.is_dir() else []
    if not files:
        return []
    for f in files:
        r = ci.kubectl_run("apply", "--server-side", "--force-conflicts", "-f", str(f), check=False)
        if r.returncode:
            raise ClusterError(f"kubectl apply -f {f.relative_to(REPO)} failed:\n{r.stderr.strip()}")
    r = ci.kubectl_run("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all", check=False)
    if r.returncode:
        raise ClusterError(f"CRDs not Established:\n{r.stderr.strip()}")
    return files


def up(bin_dir: Path | None = None, p: Paths | None = None, crds: str = "raise") -> ClusterInfo:
    """Bring the cluster up (a no-op when it already is), apply crds/, return its info.

    crds="raise": a CRD that fails to apply raises ClusterError (the cluster stays up);
    crds="record": the error goes into the returned info's crd_error instead.
    """
    p = p or Paths()
    with _locked(p):  # two `up`s at once (two test runs) start one cluster
        if is_up(p):
            ci = info(p)
            assert ci is not None
            log("already up")
        else:
            ci = _start(bin_dir, p)
            ci.started_here = True
    try:
        apply_crds(ci)
    except ClusterError as e:
        if crds == "raise":
            raise
        ci.crd_error = str(e)
    return ci


def _start(bin_dir: Path | None, p: Paths) -> ClusterInfo:
    bin_dir = bin_dir or build()
    missing = [n for n in BINARIES if not (bin_dir / n).exists()]
    if missing:
        raise ClusterError(f"missing binaries in {bin_dir}: {missing}; run hack/cluster/build.sh")
    # A partial cluster (some component died) is restarted whole; data is kept.
    _stop(p, purge=False)
    ports = choose_ports(p)
    busy = [f"{k}={v}" for k, v in ports.items() if not _port_free(v)]
    if busy:
        raise ClusterError(
            f"ports in use by another process: {busy} (see .cluster/ports.json; delete it to pick new ports)"
        )
    ensure_pki(p)
    creds = ensure_s3_credentials(p)
    p.bin_file.write_text(f"{bin_dir}\n")
    ci = _info(p, bin_dir, ports, creds)
    write_kubeconfig(p, p.kubeconfig, ci.api_server, "admin")
    try:
        _start_all(p, bin_dir, ports, creds)
        write_env(p, ci)
    except BaseException:
        _stop(p, purge=False)
        raise
    return ci


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "status"
    p = Paths()
    try:
        if cmd == "up":
            bin_dir = Path(argv[2]) if len(argv) > 2 else None
            ci = up(bin_dir, p)
            print(f"cluster up: API {ci.api_server}, S3 {ci.s3_endpoint} (bucket {ci.s3_bucket})")
            print(f"  export KUBECONFIG={ci.kubeconfig}   # or: source {p.env}")
            print(f"  kubectl: {ci.kubectl}")
        elif cmd == "down":
            stop(p, purge="--keep-data" not in argv)
            print("cluster down")
        elif cmd == "status":
            ok = is_up(p)
            print("up" if ok else "down")
            return 0 if ok else 1
        elif cmd == "fleet":
            print(yaml.safe_dump_all(fleet_nodes(), sort_keys=False))
        else:
            print(f"usage: {argv[0]} up [BIN_DIR] | down [--keep-data] | status | fleet", file=sys.stderr)
            return 2
    except ClusterError as e:
        print(f"[cluster] ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

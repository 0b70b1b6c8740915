"""Operator burst: N LoRAJobs applied at once on the local cluster, kwok completes the pods.

`python -m bench.operator_burst [--n 100,1000] [--quick]` prints the figures as JSON;
`python -m bench --only burst` also writes them into BENCHMARKS.md.

Per run: a fresh namespace, a fresh operator subprocess (`lora-operator run --standalone`,
limited to that namespace and to an instance label of its own, so operators of other
engineers on the same cluster leave these jobs alone), N LoRAJobs created by a thread pool
over raw HTTP (pre-serialised JSON), and two watches in this process that stamp, on the
client's clock, when each LoRAJob's batch Job appears and when the LoRAJob turns Succeeded.

- Base model: one config.json in the local S3 (Llama-3.2-1B's shape), the same URI for all
  jobs, so the planner reads it once and caches it.
- Output: `output.credentialsSecret` names a job Secret, so the operator's success check takes
  the trainer's checksum report (it never reads a job's own credentials) and needs no S3
  round trip per job; kwok writes the TrainerResult as the termination message.
- Nodes: `lorabench-*` kwok nodes with many GPUs and a private taint that only these jobs
  tolerate, selected by the single VRAM class of the bench's operator settings. The shared
  fleet (40 GPUs) would otherwise queue 1,000 one-GPU pods behind each other, and other
  test runs' pods never land on these nodes.

Figures: jobs/s (first apply → last Job created), latency apply → Job created and
apply → Succeeded minus the simulated run time (p50/p99), apiserver requests per job
(apiserver_request_total before/after), the operator's peak RSS and CPU seconds (psutil),
lost and duplicated Jobs (batch Jobs per LoRAJob by label). With `restart`, the operator is
SIGKILLed when half of the Jobs exist and started again at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import urllib3
import yaml

from bench.common import (
    REPO,
    RequestKey,
    cluster,
    diff_request_totals,
    log,
    parse_request_totals,
    percentile,
    summarize_requests,
)

GROUP, VERSION, PLURAL = "lorajob.dev", "v1alpha1", "lorajobs"
INSTANCE_LABEL = "lorajob.dev/operator-instance"
JOB_NAME_LABEL = "lorajob.dev/job-name"
BENCH_POOL = "lorabench"
BENCH_TAINT = {"key": "lorajob.dev/bench", "value": "true", "effect": "NoSchedule"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
MODEL_KEY = "bench/models/llama-3.2-1b/config.json"
LLAMA_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
            "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True}
NODES, PODS_PER_NODE = 4, 400
APPLY_THREADS = 16


# --------------------------------------------------------------------------- the cluster side


class Api:
    """Raw JSON over the kubernetes client's connection pool (client certificate auth)."""

    def __init__(self, kubeconfig: str, pool_size: int = 32) -> None:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        cfg.connection_pool_maxsize = pool_size
        self.cfg = cfg
        self.client = client.ApiClient(cfg)
        self.pool = self.client.rest_client.pool_manager
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if token:
            self.headers["Authorization"] = token if " " in token else f"Bearer {token}"

    def request(self, method: str, path: str, body: Any = None, raw: bool = False,
                content_type: str | None = None, timeout: float = 60) -> tuple[int, Any]:
        headers = dict(self.headers)
        if content_type:
            headers["Content-Type"] = content_type
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        deadline = time.monotonic() + 90
        while True:  # ride out an API server restart (other test suites restart it)
            try:
                resp = self.pool.request(method, self.cfg.host + path, body=data,
                                         headers=headers, timeout=timeout, preload_content=True)
                break
            except urllib3.exceptions.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        if raw:
            return resp.status, resp.data.decode()
        try:
            return resp.status, json.loads(resp.data or b"null")
        except ValueError:
            return resp.status, None

    def metrics(self) -> Counter[RequestKey]:
        status, text = self.request("GET", "/metrics", raw=True)
        if status != 200:
            raise RuntimeError(f"apiserver /metrics: HTTP {status}")
        return parse_request_totals(text)


def ensure_nodes(api: Api) -> None:
    """The bench's kwok nodes (idempotent): many GPUs, a taint only bench jobs tolerate."""
    names = []
    for i in range(NODES):
        name = f"{BENCH_POOL}-{i}"
        labels = {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "lorajob.dev/pool": BENCH_POOL,
                  "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "BENCH-80GB",
                  "nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.count": str(PODS_PER_NODE)}
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels,
                             "annotations": {"kwok.x-k8s.io/node": "fake",
                                             "node.alpha.kubernetes.io/ttl": "0"}},
                "spec": {"taints": [dict(GPU_TAINT), dict(BENCH_TAINT)]}}
        status, _ = api.request("POST", "/api/v1/nodes", node)
        if status not in (201, 409):
            raise RuntimeError(f"create node {name}: HTTP {status}")
        # ephemeral-storage: trainer pods request their scratch disk (issue 13).
        res = {"cpu": "10000", "memory": "100Ti", "ephemeral-storage": "100Pi",
               "pods": str(PODS_PER_NODE), "nvidia.com/gpu": str(PODS_PER_NODE)}
        status, _ = api.request("PATCH", f"/api/v1/nodes/{name}/status",
                                {"status": {"capacity": res, "allocatable": res}},
                                content_type="application/merge-patch+json")
        if status != 200:
            raise RuntimeError(f"patch node {name} status: HTTP {status}")
        names.append(name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, out = api.request("GET", f"/api/v1/nodes?labelSelector=lorajob.dev%2Fpool%3D{BENCH_POOL}")
        ready = {n["metadata"]["name"] for n in (out or {}).get("items", [])
                 if {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
                 .get("Ready") == "True"
                 and "nvidia.com/gpu" in n.get("status", {}).get("allocatable", {})}
        if set(names) <= ready:
            return
        time.sleep(0.5)
    raise RuntimeError("the bench's kwok nodes did not become Ready in 60 s")


def delete_nodes(api: Api) -> None:
    for i in range(NODES):
        api.request("DELETE", f"/api/v1/nodes/{BENCH_POOL}-{i}")


def upload_model_config(ci: Any) -> str:
    import boto3

    s3 = boto3.client("s3", endpoint_url=ci.s3_endpoint, aws_access_key_id=ci.s3_access_key,
                      aws_secret_access_key=ci.s3_secret_key, region_name=ci.s3_region)
    s3.put_object(Bucket=ci.s3_bucket, Key=MODEL_KEY, Body=json.dumps(LLAMA_1B).encode())
    return f"s3://{ci.s3_bucket}/{MODEL_KEY.rsplit('/', 1)[0]}/"


def make_namespace(api: Api, prefix: str) -> str:
    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    status, _ = api.request("POST", "/api/v1/namespaces",
                            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    if status != 201:
        raise RuntimeError(f"create namespace {ns}: HTTP {status}")
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bench-s3"},
              "stringData": {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}}
    api.request("POST", f"/api/v1/namespaces/{ns}/secrets", secret)
    return ns


def delete_namespace(api: Api, ns: str, wait: float = 0.0) -> None:
    api.request("DELETE", f"/api/v1/namespaces/{ns}")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status, _ = api.request("GET", f"/api/v1/namespaces/{ns}")
        if status == 404:
            return
        time.sleep(1.0)


# What a simulated trainer "published": the operator reads each job's manifest.json from
# storage and checks its sha256 against the trainer's report before Succeeded (issue 13), so
# every job's output prefix gets this file before the burst.
MANIFEST = json.dumps({"adapter": "bench", "files": []}).encode()


def put_manifests(ci: Any, ns: str, names: list[str]) -> None:
    """manifest.json under every job's output prefix (what `lorajob` reports)."""
    import concurrent.futures

    import boto3

    s3 = boto3.client("s3", endpoint_url=ci.s3_endpoint, aws_access_key_id=ci.s3_access_key,
                      aws_secret_access_key=ci.s3_secret_key, region_name=ci.s3_region)
    with concurrent.futures.ThreadPoolExecutor(APPLY_THREADS) as pool:
        list(pool.map(lambda name: s3.put_object(
            Bucket=ci.s3_bucket, Key=f"bench/adapters/{ns}/{name}/manifest.json", Body=MANIFEST),
            names))


def lorajob(ns: str, name: str, instance: str, model_uri: str, bucket: str,
            run_seconds: float) -> dict[str, Any]:
    out = f"s3://{bucket}/bench/adapters/{ns}/{name}/"
    result = {"exitCode": 0, "reason": "Completed", "adapterUri": out,
              "manifestUri": out + "manifest.json",
              "manifestSha256": hashlib.sha256(MANIFEST).hexdigest(),
              "sizeBytes": 4096, "baseEvalLoss": 2.0, "adapterEvalLoss": 1.2, "improvement": 0.4}
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRAJob",
        "metadata": {"name": name, "namespace": ns, "labels": {INSTANCE_LABEL: instance},
                     "annotations": {
                         "kwok.lorajob.dev/exit-code": "0",
                         "kwok.lorajob.dev/run-seconds": str(run_seconds),
                         "kwok.lorajob.dev/termination-message": json.dumps(result)}},
        "spec": {
            "baseModel": {"uri": model_uri},
            # The trainer is simulated (kwok) and nothing reads the data; the dataset
            # preflight stays off so the figures measure the same flow as before it existed.
            "dataset": {"uri": f"s3://{bucket}/bench/data/train.jsonl",
                        "preflight": {"enabled": False}},
            "method": "lora",
            "training": {"maxSteps": 10},
            "resources": {"tolerations": [{"key": BENCH_TAINT["key"], "operator": "Exists",
                                           "effect": "NoSchedule"}]},
            "output": {"uri": out, "credentialsSecret": "bench-s3"},
        },
    }


# --------------------------------------------------------------------------- the operator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_settings(path: Path, ci: Any, **extra: Any) -> Path:
    from lora_operator.settings import load_settings

    data = load_settings().model_dump(by_alias=True, exclude_none=True, mode="json")
    data.update({
        "vramClasses": [{"name": "bench-80gb", "memoryMiB": 81920, "maxGpus": 8,
                         "product": "BENCH-80GB", "nodeSelector": {"lorajob.dev/pool": BENCH_POOL}}],
        "s3Endpoint": ci.s3_endpoint, "s3CredentialsSecret": "bench-s3",
        "configReadTimeoutSeconds": 5, "trainerCpu": "100m", "trainerMemory": "128Mi",
        "trainerImage": "example.invalid/lora-trainer:bench",
        "devMode": True})  # the kwok.lorajob.dev/* annotations drive the simulated pods
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


def _imports_kubernetes(package: Path) -> bool:
    """Whether an operator tree imports the kubernetes client (before issue 14 it did)."""
    return any(re.search(r"^\s*(from|import) kubernetes\b", f.read_text(), re.M)
               for f in package.rglob("*.py"))


class Operator:
    """The operator as a subprocess, sampled by psutil (peak RSS, CPU seconds) across
    restarts."""

    def __init__(self, ci: Any, settings: Path, ns: str, instance: str, log_dir: Path,
                 src: Path | None = None) -> None:
        self.ci, self.settings, self.ns, self.instance = ci, settings, ns, instance
        self.log_dir = log_dir
        self.src = src  # another tree's operator/ (the "before" of a comparison)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None
        self.port = 0
        self.starts = 0
        self.cpu_done = 0.0  # CPU seconds of processes already gone
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def start(self) -> None:
        self.starts += 1
        self.port = _free_port()
        env = {**os.environ, **self.ci.env, "LORA_OPERATOR_INSTANCE": self.instance,
               "LORA_OPERATOR_LOG_FORMAT": "plain"}
        shim = self.log_dir / "src"
        shim.mkdir(exist_ok=True)
        if self.src is not None:  # that tree's package first on the path, same venv
            link = shim / "lora_operator"
            if not link.exists():
                link.symlink_to(self.src.resolve() / "operator")
        elif not _imports_kubernetes(REPO / "operator"):
            # As in the operator image, which installs only the [operator] extra: the dev
            # venv has the kubernetes client (tests, trainer), and kopf imports it if found.
            hidden = shim / "kubernetes"
            hidden.mkdir(exist_ok=True)
            (hidden / "__init__.py").write_text(
                'raise ImportError("not installed in the operator image")\n')
        env["PYTHONPATH"] = str(shim)
        cmd = [sys.executable, "-m", "lora_operator.cli", "run", "--config", str(self.settings),
               "--metrics-port", str(self.port), "--namespace", self.ns, "--standalone"]
        memray = os.environ.get("BENCH_MEMRAY")  # diagnosis: memray's install dir
        if memray:  # each start's allocations into the log dir (memray stats / flamegraph)
            env["PYTHONPATH"] += os.pathsep + memray
            cmd[1:3] = ["-m", "memray", "run", "-q", "-o",
                        str(self.log_dir / f"operator-{self.starts}.memray"), "-m", "lora_operator.cli"]
        out = (self.log_dir / f"operator-{self.starts}.log").open("wb")
        # cwd outside the repository: its operator/ folder would shadow the stdlib module.
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     cwd=self.log_dir)
        self.ps = psutil.Process(self.proc.pid)
        self._last_cpu = 0.0

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds until its /metrics answers (kopf is starting its watches then)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited: {self.logs()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1).read()
                return time.monotonic() - t0
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the operator did not serve /metrics in time")

    def gc_seconds(self) -> dict[str, float]:
        """lora_operator_gc_seconds_total by generation, from its /metrics ({}: not
        exported)."""
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                          timeout=5).read().decode()
        except OSError:
            return {}
        prefix = 'lora_operator_gc_seconds_total{generation="'
        return {line[len(prefix):].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith(prefix)}

    def cpu_seconds(self) -> float:
        return self.cpu_done + self._cpu_now()

    def _cpu_now(self) -> float:
        try:
            if self.ps is not None:
                t = self.ps.cpu_times()
                self._last_cpu = t.user + t.system
        except psutil.Error:
            pass
        return self._last_cpu

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            try:
                if self.ps is not None:
                    self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)
                    self._cpu_now()
            except psutil.Error:
                pass

    def kill(self) -> None:
        if self.proc is None:
            return
        self.cpu_done += self._cpu_now()
        self.ps, self._last_cpu = None, 0.0
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.cpu_done += self._cpu_now()
            self.ps, self._last_cpu = None, 0.0
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def close(self) -> None:
        self.stop()
        self._stop.set()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted(self.log_dir.glob("operator-*.log")))


def _profile(op: Operator) -> subprocess.Popen[bytes] | None:
    """Diagnosis: $BENCH_PYSPY=/path/to/py-spy samples the operator into
    $BENCH_PROFILE (collapsed stacks) for the burst."""
    spy, out = os.environ.get("BENCH_PYSPY"), os.environ.get("BENCH_PROFILE")
    if not spy or not out or op.proc is None:
        return None
    return subprocess.Popen([spy, "record", "--pid", str(op.proc.pid), "--format", "raw",
                             "--rate", "50", "-o", out, "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --------------------------------------------------------------------------- watching


class Watcher(threading.Thread):
    """Streams one namespaced collection and calls `on_event(type, obj, t)` with the time
    the event arrived; reconnects from the last resourceVersion."""

    def __init__(self, api: Api, path: str, on_event: Callable[[str, dict[str, Any], float], None]):
        super().__init__(daemon=True)
        self.api, self.path, self.on_event = api, path, on_event
        self.stopped = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        sep = "&" if "?" in self.path else "?"
        _, listing = self.api.request("GET", self.path)
        rv = ((listing or {}).get("metadata") or {}).get("resourceVersion", "")
        now = time.monotonic()
        for item in (listing or {}).get("items", []):
            self.on_event("ADDED", item, now)
        while not self.stopped.is_set():
            url = (f"{self.api.cfg.host}{self.path}{sep}watch=1&allowWatchBookmarks=true"
                   f"&timeoutSeconds=60&resourceVersion={rv}")
            try:
                resp = self.api.pool.request("GET", url, headers=self.api.headers,
                                             preload_content=False, timeout=90)
                self.ready.set()
                buf = b""
                for chunk in resp.stream(65536):
                    if self.stopped.is_set():
                        break
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if not line.strip():
                            continue
                        t = time.monotonic()
                        ev = json.loads(line)
                        obj = ev.get("object") or {}
                        if ev.get("type") == "ERROR":
                            rv = ""  # expired: start over from a fresh listing
                            continue
                        rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                        if ev.get("type") != "BOOKMARK":
                            self.on_event(ev["type"], obj, t)
                resp.release_conn()
            except Exception as exc:  # reconnect on any stream error
                if not self.stopped.is_set():
                    log(f"watch {self.path}: {type(exc).__name__}: {exc}; reconnecting")
                    time.sleep(0.5)


@dataclass
class Stamps:
    applied: dict[str, float] = field(default_factory=dict)   # create call returned
    sent: dict[str, float] = field(default_factory=dict)      # create call started
    job_seen: dict[str, float] = field(default_factory=dict)  # batch Job first seen
    done: dict[str, tuple[float, str]] = field(default_factory=dict)  # phase finished
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_job(self, _type: str, obj: dict[str, Any], t: float) -> None:
        owner = ((obj.get("metadata") or {}).get("labels") or {}).get(JOB_NAME_LABEL)
        if owner:
            with self.lock:
                self.job_seen.setdefault(owner, t)

    def on_lorajob(self, _type: str, obj: dict[str, Any], t: float) -> None:
        phase = (obj.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            name = obj["metadata"]["name"]
            with self.lock:
                self.done.setdefault(name, (t, phase))


# --------------------------------------------------------------------------- one run


def operator_events(api: Api, ns: str) -> int:
    """Events the operator posted in `ns` (its reportingComponent; the Events of the job
    controller and the scheduler share the API counters, so they are counted here)."""
    _, out = api.request("GET", f"/api/v1/namespaces/{ns}/events?limit=100000", timeout=120)
    return sum(1 for e in (out or {}).get("items", [])
               if "lora-operator" in (e.get("reportingComponent"),
                                      (e.get("source") or {}).get("component")))


def run_burst(ci: Any, n: int, *, restart: bool = False, run_seconds: float = 2.0,
              timeout: float | None = None, keep: bool = False,
              operator_src: Path | None = None, until_succeeded: bool = True) -> dict[str, Any]:
    """One burst of `n` LoRAJobs; returns its figures. With keep=True the namespace and the
    operator stay (for the steady-state measurement): result['_keep'] = (ns, Operator, api).
    `operator_src`: run the operator of another tree (a comparison's baseline).
    `until_succeeded=False` stops once every Job exists: at N = 10,000 the local control
    plane, not the operator, paces the rest (about 3 Succeeded/s), and the row's goals are
    apply → Job and memory; the result says how many had succeeded by then."""
    import concurrent.futures

    api = Api(str(ci.kubeconfig), pool_size=APPLY_THREADS + 8)
    ensure_nodes(api)
    model_uri = upload_model_config(ci)
    ns = make_namespace(api, f"bench-burst-{n}")
    instance = f"bench-{uuid.uuid4().hex[:6]}"
    log_dir = Path(tempfile.mkdtemp(prefix=f"lora-bench-{n}-"))
    settings = write_settings(log_dir / "settings.yaml", ci)
    op = Operator(ci, settings, ns, instance, log_dir, src=operator_src)
    stamps = Stamps()
    watch_api = Api(str(ci.kubeconfig), pool_size=4)
    watchers = [
        Watcher(watch_api, f"/apis/batch/v1/namespaces/{ns}/jobs", stamps.on_job),
        Watcher(watch_api, f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}", stamps.on_lorajob),
    ]
    result: dict[str, Any] = {"n": n, "restart": restart, "run_seconds": run_seconds,
                              "namespace": ns, "until_succeeded": until_succeeded}
    try:
        op.start()
        result["operator_start_seconds"] = op.wait_ready()
        profiler = _profile(op)
        time.sleep(1.0)  # its watches are being established
        for w in watchers:
            w.start()
        for w in watchers:
            w.ready.wait(30)
        bodies = {f"lj-{i:05d}": json.dumps(lorajob(ns, f"lj-{i:05d}", instance, model_uri,
                                                    ci.s3_bucket, run_seconds)).encode()
                  for i in range(n)}
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
        put_manifests(ci, ns, list(bodies))
        before = api.metrics()
        cpu0 = op.cpu_seconds()
        errors: list[str] = []

        def create(name: str) -> None:
            t0 = time.monotonic()
            status, out = api.request("POST", path, bodies[name])
            t1 = time.monotonic()
            if status != 201:
                errors.append(f"{name}: HTTP {status} {str(out)[:200]}")
                return
            with stamps.lock:
                stamps.sent[name], stamps.applied[name] = t0, t1

        killer = None
        restart_info: dict[str, Any] = {}
        if restart:
            def kill_midway() -> None:
                while len(stamps.job_seen) < n // 2:
                    time.sleep(0.02)
                t_kill = time.monotonic()
                op.kill()
                op.start()
                restart_info["jobs_at_kill"] = len(stamps.job_seen)
                restart_info["t_kill"] = t_kill
                restart_info["ready_seconds"] = op.wait_ready()
                restart_info["t_ready"] = time.monotonic()
            killer = threading.Thread(target=kill_midway, daemon=True)
            killer.start()

        log(f"burst n={n}{' with restart' if restart else ''}: applying")
        t_start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(APPLY_THREADS) as pool:
            list(pool.map(create, bodies))
        t_applied = time.monotonic()
        if errors:
            raise RuntimeError(f"{len(errors)} creates failed, e.g. {errors[:3]}")
        log(f"  applied {n} in {t_applied - t_start:.1f} s; waiting for Jobs and Succeeded")
        # 900 s covers N = 1,000 on a loaded machine; larger bursts get time in proportion.
        deadline = t_start + (timeout if timeout is not None else max(900.0, 0.9 * n))
        last_progress, last_count = time.monotonic(), -1
        while time.monotonic() < deadline:
            with stamps.lock:
                jobs, done = len(stamps.job_seen), len(stamps.done)
            if jobs >= n and (done >= n or not until_succeeded):
                break
            if jobs + done != last_count:
                last_count, last_progress = jobs + done, time.monotonic()
            elif time.monotonic() - last_progress > 120:
                log("  no progress for 120 s; giving up")
                break
            time.sleep(0.25)
        t_end = time.monotonic()
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(60)
        if killer is not None:
            killer.join(60)
        time.sleep(1.0)  # let the last status patches land before counting requests
        after = api.metrics()
        cpu = op.cpu_seconds() - cpu0
        gc_seconds = op.gc_seconds()  # of the last operator process (a restart resets it)

        # Lost / duplicated: batch Jobs per LoRAJob, from a fresh listing.
        _, jl = api.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs?limit=50000", timeout=120)
        per_owner = Counter(((j["metadata"].get("labels") or {}).get(JOB_NAME_LABEL))
                            for j in (jl or {}).get("items", []))
        _, ll = api.request("GET", f"{path}?limit=50000", timeout=120)
        phases = Counter(((o.get("status") or {}).get("phase") or "none")
                         for o in (ll or {}).get("items", []))
        lost = sum(1 for name in bodies if per_owner.get(name, 0) == 0)
        duplicated = sum(1 for name in bodies if per_owner.get(name, 0) > 1)
        not_succeeded = n - phases.get("Succeeded", 0) if until_succeeded else 0
        odd = [{"name": o["metadata"]["name"], "jobs": per_owner.get(o["metadata"]["name"], 0),
                "seen_done": stamps.done.get(o["metadata"]["name"]),
                "status": {k: v for k, v in (o.get("status") or {}).items()
                           if k in ("phase", "message", "conditions", "attempts")}}
               for o in (ll or {}).get("items", [])
               if (o.get("status") or {}).get("phase") != "Succeeded"][:3]

        to_job = [stamps.job_seen[k] - stamps.applied[k] for k in bodies
                  if k in stamps.job_seen and k in stamps.applied]
        to_done = [stamps.done[k][0] - stamps.applied[k] - run_seconds for k in bodies
                   if k in stamps.done and k in stamps.applied]
        # Jobs made before the watch saw their LoRAJob's create return can be "negative":
        # the operator acted before the client got its 201. Clamp at 0 for the percentiles.
        to_job = [max(0.0, x) for x in to_job]
        last_job = max(stamps.job_seen.values(), default=t_end)
        first_job = min(stamps.job_seen.values(), default=t_start)
        bench_reqs: Counter[RequestKey] = Counter({("POST", f"{GROUP}/{PLURAL}", "", "2xx"): n})
        reqs = summarize_requests(diff_request_totals(before, after), n, bench_reqs)
        reqs["reset"] = any(after.get(k, 0) < v for k, v in before.items())  # apiserver restarted
        events = operator_events(api, ns)
        result.update({
            "apply_seconds": t_applied - t_start,
            "apply_rate": n / max(t_applied - t_start, 1e-9),
            "jobs_per_second": len(stamps.job_seen) / max(last_job - t_start, 1e-9),
            "jobs_per_second_operator": len(stamps.job_seen) / max(last_job - first_job, 1e-9),
            "first_to_last_job_seconds": last_job - first_job,
            "to_job_p50": percentile(to_job, 50), "to_job_p99": percentile(to_job, 99),
            "to_job_max": max(to_job, default=float("nan")),
            "to_succeeded_p50": percentile(to_done, 50), "to_succeeded_p99": percentile(to_done, 99),
            "to_succeeded_max": max(to_done, default=float("nan")),
            "wall_seconds": t_end - t_start,
            "requests": reqs,
            "operator_cpu_seconds": cpu,
            "operator_cpu_ms_per_job": 1000 * cpu / n,
            "operator_peak_rss_mb": op.peak_rss / 1e6,
            # Writes on the way to Succeeded: creates, patches, deletes + its Events.
            "operator_writes_per_job": (reqs["operator_writes"] + events) / n,
            "operator_events_per_job": events / n,
            "operator_gc_seconds": sum(gc_seconds.values()) if gc_seconds else None,
            "operator_gc_seconds_by_generation": gc_seconds,
            "lost": lost, "duplicated": duplicated, "not_succeeded": not_succeeded,
            "phases": dict(phases), "jobs_seen": len(stamps.job_seen), "not_succeeded_sample": odd,
            "operator_errors": op.logs().count("Traceback"),
        })
        if restart:
            t_kill = restart_info.get("t_kill")
            t_ready = restart_info.get("t_ready")
            # Jobs the new replica made: seen after it was up (creates of the killed one that
            # were in flight land right at the kill).
            after_kill = [stamps.job_seen[k] for k in stamps.job_seen
                          if t_ready is not None and stamps.job_seen[k] > t_ready]
            result["restart"] = {
                "jobs_at_kill": restart_info.get("jobs_at_kill"),
                "new_operator_ready_seconds": restart_info.get("ready_seconds"),
                "first_job_after_kill_seconds": (min(after_kill) - t_kill) if after_kill else None,
            }
        log(f"  n={n}: {result['jobs_per_second']:.1f} jobs/s, to Job p50/p99 "
            f"{result['to_job_p50']:.2f}/{result['to_job_p99']:.2f} s, to Succeeded-run p50/p99 "
            f"{result['to_succeeded_p50']:.2f}/{result['to_succeeded_p99']:.2f} s, RSS "
            f"{result['operator_peak_rss_mb']:.0f} MB, CPU {cpu:.1f} s (GC {gc_seconds}), lost {lost}, dup "
            f"{duplicated}, not succeeded {not_succeeded}")
    except BaseException:
        log(f"operator log tail:\n{op.logs()[-3000:]}")
        keep = False
        raise
    finally:
        for w in watchers:
            w.stopped.set()
        if keep:
            result["_keep"] = (ns, op, api)
        else:
            op.close()
            delete_namespace(api, ns)
    return result


def finish_kept(kept: tuple[str, Operator, Api], wait: float = 0.0) -> None:
    ns, op, api = kept
    op.close()
    delete_namespace(api, ns, wait=wait)


def run(quick: bool = False, sizes: list[int] | None = None) -> dict[str, Any]:
    """Every burst (normal and with a restart) for each size; for `python -m bench`."""
    sizes = sizes or ([20] if quick else [100, 1000])
    out: dict[str, Any] = {"sizes": sizes, "runs": []}
    with cluster() as ci:
        api = Api(str(ci.kubeconfig))
        try:
            for n in sizes:
                for restart in (False, True):
                    res = run_burst(ci, n, restart=restart)
                    out["runs"].append(res)
                    # the namespace controller deletes thousands of objects: wait for it so the
                    # next run is not measured against that background load
                    delete_namespace(api, res["namespace"], wait=30)
        finally:
            delete_nodes(api)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default=None, help="comma-separated sizes (default 100,1000)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = [int(x) for x in args.n.split(",")] if args.n else None
    print(json.dumps(run(args.quick, sizes), indent=1, default=str))


if __name__ == "__main__":
    main()

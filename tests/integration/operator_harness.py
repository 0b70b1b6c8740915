"""Run the real operator as a subprocess against the local cluster, and talk to the cluster.

(The subprocess runs outside the repository root: `python -m` puts the working directory
first on sys.path, and the repository's `operator/` folder would shadow the standard
library's `operator` module.)

Test infrastructure: `OperatorProcess` starts `python -m lora_operator.cli run` with the
cluster's kubeconfig and S3 environment, a settings file pointing at the local S3, and the
namespaces a test owns; it stops it with SIGTERM (or SIGKILL, to test restarts). `Kube` is
a thin kubectl wrapper (JSON in, JSON out) so the tests read like what a user types.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]

# The peering CRDs kopf needs for `--peering`: the chart's own copy, one source.
PEERING_CRDS = (REPO / "charts" / "lora-operator" / "crds" / "kopf-peering.yaml").read_text()


class Kube:
    """kubectl against the local cluster."""

    def __init__(self, kubectl: str, kubeconfig: str) -> None:
        self.kubectl = kubectl
        self.env = {**os.environ, "KUBECONFIG": kubeconfig}

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        proc = subprocess.run([self.kubectl, *args], input=stdin, capture_output=True,
                              text=True, env=self.env, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def apply(self, obj: dict[str, Any] | str) -> None:
        text = obj if isinstance(obj, str) else yaml.safe_dump(obj)
        self.run("apply", "-f", "-", stdin=text)

    def get(self, kind: str, name: str, ns: str) -> dict[str, Any] | None:
        proc = subprocess.run([self.kubectl, "get", kind, name, "-n", ns, "-o", "json"],
                              capture_output=True, text=True, env=self.env, timeout=60)
        if proc.returncode != 0:
            return None
        out: dict[str, Any] = json.loads(proc.stdout)
        return out

    def list(self, kind: str, ns: str, selector: str | None = None) -> list[dict[str, Any]]:
        args = ["get", kind, "-n", ns, "-o", "json"]
        if selector:
            args += ["-l", selector]
        items: list[dict[str, Any]] = json.loads(self.run(*args))["items"]
        return items

    def create_namespace(self, prefix: str) -> str:
        """A fresh namespace, returned only once its `default` ServiceAccount exists: the
        controller-manager creates it asynchronously, and until then every pod create in the
        namespace is refused ("serviceaccount default not found") before admission runs."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.run("create", "namespace", name)
        self.wait_for(f"ServiceAccount {name}/default",
                      lambda: self.run("-n", name, "get", "serviceaccount", "default",
                                       "-o", "name", check=False))
        return name

    def delete_namespace(self, name: str) -> None:
        self.run("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)

    def wait_for(self, what: str, fn: Callable[[], Any], timeout: float = 60.0,
                 interval: float = 0.5) -> Any:
        """Poll `fn` until it returns something truthy; fail with `what` after `timeout`."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = fn()
            except (RuntimeError, KeyError, TypeError) as exc:
                last = exc
            else:
                if last:
                    return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")

    def status(self, ns: str, name: str) -> dict[str, Any]:
        obj = self.get("lorajob", name, ns) or {}
        out: dict[str, Any] = obj.get("status") or {}
        return out

    def wait_phase(self, ns: str, name: str, *phases: str, timeout: float = 60.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            st = self.status(ns, name)
            return st if st.get("phase") in phases else None
        out: dict[str, Any] = self.wait_for(f"{ns}/{name} in {phases}", check, timeout)
        return out


def write_settings(path: Path, s3_endpoint: str, **extra: Any) -> Path:
    """Operator settings for the local cluster: default VRAM classes, local S3."""
    from lora_operator.settings import load_settings

    data = load_settings().model_dump(by_alias=True, exclude_none=True, mode="json")
    data.update({"s3Endpoint": s3_endpoint, "s3CredentialsSecret": "s3-creds",
                 "configReadTimeoutSeconds": 3, "maxWorkers": 8,
                 "trainerImage": "example.invalid/lora-trainer:test",
                 # kwok.lorajob.dev/* annotations steer the simulated pods: a dev cluster.
                 "devMode": True})
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


class OperatorProcess:
    """One operator replica as a subprocess (`lora-operator run`)."""

    def __init__(self, kubeconfig: str, env: dict[str, str], settings: Path,
                 namespaces: list[str], *, peering: str | None = None,
                 metrics_port: int = 0, priority: int | None = None,
                 log_dir: Path | None = None, name: str = "operator",
                 instance: str | None = None) -> None:
        self.kubeconfig, self.settings, self.namespaces = kubeconfig, settings, namespaces
        self.peering, self.metrics_port, self.priority = peering, metrics_port, priority
        self.env = {**os.environ, **env, "KUBECONFIG": kubeconfig}
        if priority is not None:
            self.env["LORA_OPERATOR_PRIORITY"] = str(priority)
        # Only LoRAJobs labelled lorajob.dev/operator-instance=<instance> are ours: another
        # operator on the same cluster (a developer's, an e2e test's) leaves them alone.
        self.instance = instance
        if instance:
            self.env["LORA_OPERATOR_INSTANCE"] = instance
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="lora-operator-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "lora_operator.cli", "run", "--config", str(self.settings),
               "--metrics-port", str(self.metrics_port)]
        for ns in self.namespaces:
            cmd += ["--namespace", ns]
        cmd += ["--peering", self.peering] if self.peering else ["--standalone"]
        return cmd

    def start(self) -> OperatorProcess:
        self.starts += 1
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.command(), env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.log_dir)
        return self

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted(self.log_dir.glob(f"{self.name}-*.log")))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as when a node dies."""
        self.stop(signal.SIGKILL)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@contextmanager
def running_operator(*args: Any, **kwargs: Any) -> Iterator[OperatorProcess]:
    op = OperatorProcess(*args, **kwargs).start()
    try:
        yield op
    finally:
        op.stop()

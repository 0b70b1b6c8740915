"""One pod as local processes: volumes, env, containers, status (dev node agent, DEV/TEST ONLY).

How a pod spec maps onto this machine (the README has the table):

- **Image → environment.** There are no images: every container runs from this checkout's
  virtual environment (its ``bin`` first on PATH). A container without ``command`` gets the
  entrypoint its image would have, looked up by image name (``lora-trainer`` images run
  ``lora-trainer``, ``lora-operator`` images ``lora-operator``).
- **Volumes** are materialised under ``<state>/nodeagent/pods/<uid>/volumes/<name>`` (ConfigMap
  and Secret keys as files, projected sources including a ServiceAccount token from the
  TokenRequest API bound to this pod, downwardAPI, emptyDir; hostPath is the host path) and
  bind-mounted at their ``mountPath`` inside the container's private mount namespace
  (``unshare -m``, see sandbox.py). Nothing is rewritten: the process sees the paths its
  spec names, exactly as in a real pod.
- **Network**: pods share the host network; podIP and hostIP are 127.0.0.1, and
  ``KUBERNETES_SERVICE_HOST``/``PORT`` point at the local API server, so in-cluster clients
  work unchanged.
- **Identity**: processes run as root. ``runAsUser`` is not applied because the Python
  interpreter of this machine lives under /root (mode 0700), which no other UID can execute.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hack.nodeagent.kube import ApiError, Kube

SANDBOX = Path(__file__).resolve().parent / "sandbox.py"
REPO = Path(__file__).resolve().parents[2]
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_MAX = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
RESTART_BACKOFF_MAX = 60.0
# Image name fragment → the entrypoint that image would run (ENTRYPOINT of Dockerfile.*).
IMAGE_ENTRYPOINTS: list[tuple[str, list[str]]] = [
    ("lora-trainer", ["lora-trainer"]),
    ("lora-operator", ["lora-operator"]),
]


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConfigError(Exception):
    """The pod cannot start yet (missing ConfigMap/Secret key, ...): kubelet's
    CreateContainerConfigError, retried until it resolves or the pod is deleted."""


@dataclass
class Environment:
    """What every container of this agent runs with (the stand-in for an image)."""

    venv: Path
    apiserver_host: str
    apiserver_port: int
    state_dir: Path
    log_dir: Path
    node_resources: dict[str, dict[str, str]] = field(default_factory=dict)

    def base_env(self) -> dict[str, str]:
        path = f"{self.venv / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        port = str(self.apiserver_port)
        host = self.apiserver_host
        return {
            "PATH": path,
            "VIRTUAL_ENV": str(self.venv),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
            "KUBERNETES_PORT_443_TCP": f"tcp://{host}:{port}",
            "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
            "KUBERNETES_PORT_443_TCP_PORT": port,
            "KUBERNETES_PORT_443_TCP_ADDR": host,
        }


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known names are replaced, `$$` escapes, others stay."""
    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))
    return _VAR_REF.sub(repl, value)


@dataclass
class Container:
    """One container's run state, kept across restarts."""

    spec: dict[str, Any]
    init: bool
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    signal_no: int | None = None
    reason: str | None = None
    message: str | None = None
    restart_count: int = 0
    last_state: dict[str, Any] = field(default_factory=dict)
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    next_start: float = 0.0
    container_id: str = ""

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.exit_code is None

    @property
    def terminated(self) -> bool:
        return self.exit_code is not None

    def state(self) -> dict[str, Any]:
        if self.running:
            return {"running": {"startedAt": self.started_at}}
        if self.terminated:
            term: dict[str, Any] = {"exitCode": self.exit_code, "reason": self.reason,
                                    "startedAt": self.started_at, "finishedAt": self.finished_at,
                                    "containerID": self.container_id}
            if self.signal_no:
                term["signal"] = self.signal_no
            if self.message:
                term["message"] = self.message
            return {"terminated": term}
        reason, message = self.waiting or ("ContainerCreating", "")
        return {"waiting": {"reason": reason, **({"message": message} if message else {})}}


class PodRun:
    """A pod bound to one of the agent's nodes, and the processes that are its containers."""

    def __init__(self, pod: dict[str, Any], env: Environment, kube: Kube):
        self.pod = pod
        self.env = env
        self.kube = kube
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.dir: Path = env.state_dir / "nodeagent" / "pods" / self.uid
        spec = pod["spec"]
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.init_containers = [Container(c, True) for c in spec.get("initContainers") or []]
        self.containers = [Container(c, False) for c in spec.get("containers") or []]
        self.prepared = False
        self.start_time = now()
        self.terminating_since: float | None = None
        self.kill_at: float | None = None
        self.last_status: dict[str, Any] | None = None
        self.phase = "Pending"
        self.pod_message = ""
        self.pod_reason = ""

    # ------------------------------------------------------------------ paths

    def log_path(self, c: Container) -> Path:
        return self.env.log_dir / f"{self.namespace}_{self.name}_{c.name}.log"

    def term_path(self, c: Container) -> Path:
        return self.dir / "containers" / c.name / "termination-log"

    def pid_path(self, c: Container) -> Path:
        return self.dir / "containers" / c.name / "pid"

    # ------------------------------------------------------------------ objects

    def _get(self, kind: str, name: str) -> dict[str, Any] | None:
        plural = {"ConfigMap": "configmaps", "Secret": "secrets"}[kind]
        obj = self.kube.get(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}", ok404=True)
        return obj if isinstance(obj, dict) else None

    def _keys(self, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        """The keys of a ConfigMap or Secret as bytes, or None when optional and missing."""
        obj = self._get(kind, name)
        if obj is None:
            if optional:
                return None
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        out: dict[str, bytes] = {}
        if kind == "Secret":
            for k, v in (obj.get("data") or {}).items():
                out[k] = base64.b64decode(v)
            for k, v in (obj.get("stringData") or {}).items():
                out[k] = str(v).encode()
        else:
            for k, v in (obj.get("data") or {}).items():
                out[k] = str(v).encode()
            for k, v in (obj.get("binaryData") or {}).items():
                out[k] = base64.b64decode(v)
        return out

    def _field(self, path: str) -> str:
        meta, spec, status = self.pod["metadata"], self.pod["spec"], self.pod.get("status") or {}
        simple = {
            "metadata.name": meta.get("name", ""),
            "metadata.namespace": meta.get("namespace", ""),
            "metadata.uid": meta.get("uid", ""),
            "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
            "status.podIP": "127.0.0.1",
            "status.podIPs": "127.0.0.1",
        }
        if path in simple:
            return str(simple[path])
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        if path in ("metadata.labels", "metadata.annotations"):
            items = (meta.get(path.split(".")[1]) or {}).items()
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items))
        del status
        raise ConfigError(f"unsupported fieldRef {path}")

    def _resource(self, ref: dict[str, Any], container: dict[str, Any] | None) -> str:
        res = (container or {}).get("resources") or {}
        which, _, name = str(ref["resource"]).partition(".")
        value = (res.get(which) or {}).get(name) or (res.get("limits") or {}).get(name)
        if value is None:
            value = self.env.node_resources.get(self.pod["spec"].get("nodeName", ""), {}).get(
                name, "0")
        return str(value)

    # ------------------------------------------------------------------ volumes

    def _write_files(self, target: Path, files: dict[str, bytes], mode: int) -> None:
        for rel, data in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            tmp.chmod(mode)
            tmp.replace(path)

    def _select(self, keys: dict[str, bytes], items: list[dict[str, Any]] | None,
                what: str, optional: bool) -> dict[str, bytes]:
        if not items:
            return dict(keys)
        out: dict[str, bytes] = {}
        for it in items:
            if it["key"] not in keys:
                if optional:
                    continue
                raise ConfigError(f'couldn\'t find key {it["key"]} in {what}')
            out[it["path"]] = keys[it["key"]]
        return out

    def _token(self, source: dict[str, Any]) -> bytes:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": int(source.get("expirationSeconds", 3600)),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                   "name": self.name, "uid": self.uid},
            },
        }
        if source.get("audience"):
            body["spec"]["audiences"] = [source["audience"]]
        out = self.kube.post(
            f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{sa}/token", body)
        return str(out["status"]["token"]).encode()

    def _downward(self, items: list[dict[str, Any]]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for it in items:
            if "fieldRef" in it:
                out[it["path"]] = self._field(it["fieldRef"]["fieldPath"]).encode()
            elif "resourceFieldRef" in it:
                out[it["path"]] = self._resource(it["resourceFieldRef"], None).encode()
        return out

    def _volume_files(self, vol: dict[str, Any]) -> tuple[dict[str, bytes], int]:
        if "configMap" in vol:
            src = vol["configMap"]
            opt = bool(src.get("optional"))
            keys = self._keys("ConfigMap", src["name"], opt) or {}
            return (self._select(keys, src.get("items"), f'configmap "{src["name"]}"', opt),
                    int(src.get("defaultMode", 0o644)))
        if "secret" in vol:
            src = vol["secret"]
            opt = bool(src.get("optional"))
            keys = self._keys("Secret", src["secretName"], opt) or {}
            return (self._select(keys, src.get("items"), f'secret "{src["secretName"]}"', opt),
                    int(src.get("defaultMode", 0o644)))
        if "downwardAPI" in vol:
            src = vol["downwardAPI"]
            return self._downward(src.get("items") or []), int(src.get("defaultMode", 0o644))
        if "projected" in vol:
            files: dict[str, bytes] = {}
            for s in vol["projected"].get("sources") or []:
                if "serviceAccountToken" in s:
                    files[s["serviceAccountToken"]["path"]] = self._token(s["serviceAccountToken"])
                elif "configMap" in s:
                    c = s["configMap"]
                    opt = bool(c.get("optional"))
                    keys = self._keys("ConfigMap", c["name"], opt) or {}
                    files.update(self._select(keys, c.get("items"), f'configmap "{c["name"]}"', opt))
                elif "secret" in s:
                    c = s["secret"]
                    opt = bool(c.get("optional"))
                    keys = self._keys("Secret", c["name"], opt) or {}
                    files.update(self._select(keys, c.get("items"), f'secret "{c["name"]}"', opt))
                elif "downwardAPI" in s:
                    files.update(self._downward(s["downwardAPI"].get("items") or []))
                else:
                    raise ConfigError(f"unsupported projected source {sorted(s)}")
            return files, int(vol["projected"].get("defaultMode", 0o644))
        raise ConfigError(f"unsupported volume type {sorted(k for k in vol if k != 'name')}")

    def prepare(self) -> None:
        """Materialise every volume under the pod's directory (idempotent, retried)."""
        vols = self.dir / "volumes"
        vols.mkdir(parents=True, exist_ok=True)
        (self.dir / "home").mkdir(exist_ok=True)
        for vol in self.pod["spec"].get("volumes") or []:
            name = vol["name"]
            if "hostPath" in vol:
                continue
            if "persistentVolumeClaim" in vol or "ephemeral" in vol:
                raise ConfigError(f"volume {name}: PersistentVolumeClaims are not supported "
                                  "by the dev node agent")
            target = vols / name
            target.mkdir(exist_ok=True)
            if "emptyDir" in vol:
                target.chmod(0o777)
                continue
            files, mode = self._volume_files(vol)
            self._write_files(target, files, mode)
        for c in self.init_containers + self.containers:
            self.term_path(c).parent.mkdir(parents=True, exist_ok=True)
        self.env.log_dir.mkdir(parents=True, exist_ok=True)
        self.prepared = True

    def _volume_source(self, name: str) -> Path:
        for vol in self.pod["spec"].get("volumes") or []:
            if vol["name"] == name:
                if "hostPath" in vol:
                    return Path(vol["hostPath"]["path"])
                return self.dir / "volumes" / name
        raise ConfigError(f"volumeMount refers to unknown volume {name}")

    # ------------------------------------------------------------------ env

    def container_env(self, spec: dict[str, Any]) -> dict[str, str]:
        env = self.env.base_env()
        env["HOSTNAME"] = self.name
        env["HOME"] = str(self.dir / "home")
        for src in spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                ref = src["configMapRef"]
                keys = self._keys("ConfigMap", ref["name"], bool(ref.get("optional")))
            else:
                ref = src["secretRef"]
                keys = self._keys("Secret", ref["name"], bool(ref.get("optional")))
            for k, v in (keys or {}).items():
                env[prefix + k] = v.decode(errors="replace")
        for item in spec.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = expand(str(item.get("value", "")), env)
                continue
            vf = item["valueFrom"]
            if "fieldRef" in vf:
                env[name] = self._field(vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                env[name] = self._resource(vf["resourceFieldRef"], spec)
            elif "secretKeyRef" in vf or "configMapKeyRef" in vf:
                kind, ref = (("Secret", vf["secretKeyRef"]) if "secretKeyRef" in vf
                             else ("ConfigMap", vf["configMapKeyRef"]))
                opt = bool(ref.get("optional"))
                keys = self._keys(kind, ref["name"], opt)
                if keys is None:
                    continue
                if ref["key"] not in keys:
                    if opt:
                        continue
                    raise ConfigError(f'couldn\'t find key {ref["key"]} in {kind} '
                                      f'{self.namespace}/{ref["name"]}')
                env[name] = keys[ref["key"]].decode(errors="replace")
        return env

    def argv(self, spec: dict[str, Any], env: dict[str, str]) -> list[str]:
        command = list(spec.get("command") or [])
        if not command:
            image = str(spec.get("image", ""))
            command = next((list(cmd) for frag, cmd in IMAGE_ENTRYPOINTS if frag in image), [])
            if not command:
                raise ConfigError(f"image {image!r} has no known entrypoint and the container "
                                  "sets no command")
        return [expand(a, env) for a in command + list(spec.get("args") or [])]

    def mounts(self, c: Container) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in c.spec.get("volumeMounts") or []:
            src = self._volume_source(m["name"])
            if m.get("subPath"):
                src = src / m["subPath"]
                if not src.exists():
                    src.mkdir(parents=True)
            out.append({"source": str(src), "target": m["mountPath"],
                        "readOnly": bool(m.get("readOnly"))})
        term = c.spec.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        out.append({"source": str(self.term_path(c)), "target": term, "readOnly": False})
        return out

    # ------------------------------------------------------------------ processes

    def start(self, c: Container) -> None:
        """Start one container: resolve env and argv, then spawn the sandbox."""
        try:
            env = self.container_env(c.spec)
            argv = self.argv(c.spec, env)
            mounts = self.mounts(c)
        except ConfigError as exc:
            c.waiting = ("CreateContainerConfigError", str(exc))
            c.next_start = time.monotonic() + 2
            return
        except ApiError as exc:
            c.waiting = ("CreateContainerConfigError", str(exc))
            c.next_start = time.monotonic() + 2
            return
        term = self.term_path(c)
        term.write_bytes(b"")
        cwd = c.spec.get("workingDir") or str(self.dir / "home")
        spec_file = self.dir / "containers" / c.name / "sandbox.json"
        spec_file.write_text(json.dumps({"mounts": mounts, "argv": argv, "env": env,
                                         "cwd": cwd, "parentPid": os.getpid()}))
        spec_file.chmod(0o600)
        log_path = self.log_path(c)
        with log_path.open("ab") as logf:
            c.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--",
                 sys.executable, str(SANDBOX), str(spec_file)],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=str(self.dir), env={"PATH": env["PATH"]})
        self.pid_path(c).write_text(str(c.proc.pid))
        c.started_at = now()
        c.finished_at = c.exit_code = c.signal_no = c.reason = c.message = None
        c.waiting = None
        c.container_id = f"nodeagent://{self.uid}/{c.name}/{c.proc.pid}"

    def poll(self, c: Container) -> bool:
        """Collect a finished container's exit status; True when it just finished."""
        if c.proc is None or c.exit_code is not None:
            return False
        rc = c.proc.poll()
        if rc is None:
            return False
        if rc < 0:
            c.signal_no = -rc
            c.exit_code = 128 - rc
        else:
            c.exit_code = rc
        c.reason = "Completed" if c.exit_code == 0 else "Error"
        c.finished_at = now()
        c.message = self._termination_message(c)
        return True

    def _termination_message(self, c: Container) -> str | None:
        try:
            msg = self.term_path(c).read_bytes()[:TERMINATION_MESSAGE_MAX]
        except OSError:
            msg = b""
        if not msg and c.exit_code and \
                c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            try:
                lines = self.log_path(c).read_bytes().splitlines()[-FALLBACK_LOG_LINES:]
            except OSError:
                lines = []
            msg = b"\n".join(lines)[-FALLBACK_LOG_BYTES:]
        text = msg.decode("utf-8", errors="replace").strip()
        return text or None

    def signal_all(self, sig: int) -> None:
        for c in self.init_containers + self.containers:
            if c.running and c.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, sig)

    @property
    def any_running(self) -> bool:
        return any(c.running for c in self.init_containers + self.containers)

    # ------------------------------------------------------------------ lifecycle

    def _restart_wanted(self, c: Container) -> bool:
        if self.restart_policy == "Always" and not c.init:
            return True
        return self.restart_policy in ("Always", "OnFailure") and c.exit_code != 0

    def _schedule_restart(self, c: Container) -> None:
        c.last_state = c.state()
        c.restart_count += 1
        c.proc = None
        c.exit_code = None
        c.waiting = ("CrashLoopBackOff" if c.restart_count > 1 else "ContainerCreating",
                     f"back-off restarting failed container {c.name}")
        c.next_start = time.monotonic() + min(RESTART_BACKOFF_MAX, 2.0 ** c.restart_count)

    def step(self) -> None:
        """Advance the pod one tick: prepare, run init containers in order, then the rest."""
        if self.phase in ("Succeeded", "Failed") or self.terminating_since is not None:
            for c in self.init_containers + self.containers:
                self.poll(c)
            return
        if not self.prepared:
            try:
                self.prepare()
            except (ConfigError, ApiError) as exc:
                for c in self.init_containers + self.containers:
                    c.waiting = ("ContainerCreating", str(exc))
                return
        t = time.monotonic()
        for c in self.init_containers:
            if c.exit_code == 0:
                continue
            if c.proc is None:
                if t >= c.next_start:
                    self.start(c)
                return
            if not self.poll(c):
                return
            if c.exit_code == 0:
                continue
            if self._restart_wanted(c):
                self._schedule_restart(c)
                return
            self.phase = "Failed"
            return
        for c in self.containers:
            if c.proc is None and c.exit_code is None and t >= c.next_start:
                self.start(c)
            elif self.poll(c) and self._restart_wanted(c):
                self._schedule_restart(c)
        if all(c.terminated for c in self.containers):
            self.phase = "Succeeded" if all(c.exit_code == 0 for c in self.containers) \
                else "Failed"
        elif any(c.running for c in self.containers):
            self.phase = "Running"

    def adopt_lost(self) -> None:
        """The agent restarted while this pod ran: its processes are gone (they die with the
        agent), so report what a kubelet reports for containers it cannot find."""
        for c in self.init_containers + self.containers:
            pid_file = self.pid_path(c)
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                    os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            c.exit_code = 137
            c.reason = "ContainerStatusUnknown"
            c.message = "The container could not be located when the node agent restarted"
            c.finished_at = now()
            c.waiting = None
        self.prepared = True
        self.phase = "Failed" if self.restart_policy == "Never" else "Pending"
        if self.phase == "Pending":
            for c in self.containers:
                self._schedule_restart(c)

    # ------------------------------------------------------------------ status

    def _cstatus(self, c: Container) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": c.name, "image": c.spec.get("image", ""),
            "imageID": f"nodeagent://{self.env.venv}", "ready": c.running and not c.init,
            "restartCount": c.restart_count, "started": c.running,
            "state": c.state(), "lastState": c.last_state,
        }
        if c.container_id:
            out["containerID"] = c.container_id
        return out

    def status(self) -> dict[str, Any]:
        ts = now()
        init_done = all(c.exit_code == 0 for c in self.init_containers)
        ready = self.phase == "Running" and all(c.running for c in self.containers)
        done = self.phase in ("Succeeded", "Failed")

        def cond(kind: str, ok: bool, reason: str = "") -> dict[str, Any]:
            out: dict[str, Any] = {"type": kind, "status": "True" if ok else "False",
                                   "lastProbeTime": None, "lastTransitionTime": ts}
            if reason and not ok:
                out["reason"] = reason
            return out

        conditions = [
            cond("PodReadyToStartContainers", self.prepared),
            cond("Initialized", init_done, "ContainersNotInitialized"),
            cond("Ready", ready, "PodCompleted" if done else "ContainersNotReady"),
            cond("ContainersReady", ready, "PodCompleted" if done else "ContainersNotReady"),
            cond("PodScheduled", True),
        ]
        status: dict[str, Any] = {
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "containerStatuses": [self._cstatus(c) for c in self.containers],
            "qosClass": (self.pod.get("status") or {}).get("qosClass", "BestEffort"),
        }
        if self.init_containers:
            status["initContainerStatuses"] = [self._cstatus(c) for c in self.init_containers]
        if self.pod_message:
            status["message"] = self.pod_message
        if self.pod_reason:
            status["reason"] = self.pod_reason
        return status

    def publish(self, force: bool = False) -> None:
        """Patch pods/status when what the agent knows changed (timestamps aside)."""
        status = self.status()

        def strip(s: dict[str, Any]) -> str:
            s = json.loads(json.dumps(s))
            for cnd in s["conditions"]:
                cnd.pop("lastTransitionTime", None)
            return json.dumps(s, sort_keys=True)

        if not force and self.last_status is not None and \
                strip(self.last_status) == strip(status):
            return
        if self.last_status is not None:  # keep transition times of unchanged conditions
            old = {c["type"]: c for c in self.last_status["conditions"]}
            for cnd in status["conditions"]:
                prev = old.get(cnd["type"])
                if prev and prev["status"] == cnd["status"]:
                    cnd["lastTransitionTime"] = prev["lastTransitionTime"]
        path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status"
        try:
            self.kube.merge_patch(path, {"metadata": {"uid": self.uid}, "status": status})
        except ApiError as exc:
            if exc.status not in (404, 409, 422):
                raise
        self.last_status = status

    def finalize(self) -> None:
        """Delete the pod object with grace 0 once its processes are gone (graceful
        deletion's last step, done by the kubelet), then drop the pod's files."""
        path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": self.uid}}
        try:
            self.kube.delete(path, body, ok404=True)
        except ApiError as exc:
            if exc.status != 409:
                raise
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

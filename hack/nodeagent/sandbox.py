"""Container start-up inside a pod's private mount namespace (dev node agent, DEV/TEST ONLY).

The agent starts every container as ``unshare -m --propagation private -- python sandbox.py
SPEC.json``. This script, standard library only, then does what a container runtime would do
before handing over to the image's entrypoint:

1. bind-mounts each materialised volume (ConfigMap, Secret, projected ServiceAccount token,
   emptyDir, ...) and the per-container termination-message file at the paths the pod spec
   names, read-only where asked. The mounts live in this process's own mount namespace, so
   two pods can both see ``/var/run/secrets/kubernetes.io/serviceaccount`` with their own
   token, and nothing changes for the host (except empty placeholder mount points, which a
   bind mount needs to exist). A volume mounted over an ancestor of this checkout or of the
   Python installation (an emptyDir at ``/tmp`` while the checkout is ``/tmp/x``) would hide
   the interpreter, the venv and the other volumes' sources, so each such path is bound back
   on top from a descriptor opened before any mount;
2. asks the kernel to SIGKILL it when the agent dies (``PR_SET_PDEATHSIG``), so a crashed
   agent never leaves training processes behind;
3. changes to the working directory and ``execve``s the container's command with its
   resolved environment, so the pid the agent holds *is* the container process.

It must stay dependency-free: it runs before any environment is set up.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
MS_BIND, MS_REC = 4096, 16384
# Host paths every container needs to stay visible: this checkout (venv, editable sources,
# the agent's state with the volumes' sources) and the Python installation behind the venv.
KEEP_VISIBLE = (Path(__file__).resolve().parents[2], Path(sys.base_prefix).resolve())
# Exit statuses that mirror what a runtime reports when it cannot start a container.
EXIT_MOUNT_FAILED = 128
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126


def _fail(code: int, msg: str) -> None:
    sys.stderr.write(f"[nodeagent sandbox] {msg}\n")
    sys.stderr.flush()
    os._exit(code)


def _ensure_target(target: Path, is_file: bool) -> None:
    """A bind mount needs an existing mount point of the same kind (file or directory)."""
    if target.exists() or target.is_symlink():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_file:
        target.touch()
    else:
        target.mkdir(parents=True, exist_ok=True)


def _mount(mount: dict[str, Any]) -> None:
    source, target = Path(mount["source"]), Path(mount["target"])
    _ensure_target(target, source.is_file())
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if mount.get("readOnly"):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _hidden_by(target: Path, keep: Path) -> bool:
    return keep == target or target in keep.parents


def _rebind(fd: int, path: Path) -> None:
    """Bind `path`'s original directory (held open as `fd`) back over whatever now hides it.

    Through libc, not mount(8): the tool would canonicalise /proc/self/fd/N back to the
    hidden path name."""
    path.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(f"/proc/self/fd/{fd}".encode(), str(path).encode(), None, MS_BIND | MS_REC, None) != 0:
        raise OSError(ctypes.get_errno(), f"re-exposing {path}")


def mount_all(mounts: list[dict[str, Any]]) -> None:
    keep = {path: os.open(path, os.O_PATH) for path in KEEP_VISIBLE if path.is_dir()}
    for mount in sorted(mounts, key=lambda m: len(m["target"])):
        _mount(mount)
        target = Path(mount["target"])
        for path, fd in keep.items():
            if _hidden_by(target, path):
                _rebind(fd, path)
    for fd in keep.values():
        os.close(fd)


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the agent died before prctl took effect
        os._exit(EXIT_MOUNT_FAILED)


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[1]).read_text())
    try:
        mount_all(spec.get("mounts", []))
    except subprocess.CalledProcessError as exc:
        stderr = exc.stderr.decode(errors="replace") if exc.stderr else ""
        _fail(EXIT_MOUNT_FAILED, f"mount failed: {exc.cmd}: {stderr.strip()}")
    except OSError as exc:
        _fail(EXIT_MOUNT_FAILED, f"mount point: {exc}")
    _die_with_parent(int(spec["parentPid"]))
    cwd = spec.get("cwd")
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as exc:
            _fail(EXIT_MOUNT_FAILED, f"workingDir {cwd}: {exc}")
    cmd: list[str] = spec["argv"]
    env: dict[str, str] = spec["env"]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        os.execvpe(cmd[0], cmd, env)
    except FileNotFoundError:
        _fail(EXIT_NOT_FOUND, f"executable not found in $PATH: {cmd[0]!r}")
    except PermissionError:
        _fail(EXIT_NOT_EXECUTABLE, f"permission denied: {cmd[0]!r}")


if __name__ == "__main__":
    main(sys.argv)

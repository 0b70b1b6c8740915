"""Training progress: JSON lines on stdout, a bar for humans, and the LoRAJob's status.

Three sinks of one `api.Progress` snapshot:
- stdout: one JSON object per line (`{"event": "progress", ...}`), for logs and tests;
- a progress bar on stderr, only when stderr is a terminal (never pollutes the JSON lines);
- in a cluster, a server-side-apply patch of `status.progress` owned by the field manager
  `lora-trainer`, throttled to one per interval plus a final one. The API being unreachable
  never fails a run: the termination message carries the verdict anyway.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lora_operator import api
from lora_operator.contract import PROGRESS_FIELD_MANAGER, JobIdentity

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
FINAL_PATCH_ATTEMPTS = 5


def emit(event: str, /, **fields: Any) -> None:
    """One JSON line on stdout (`event` first), flushed so a log follower sees it at once."""
    write_event(sys.stdout, event, fields)


def write_event(stream: IO[str], event: str, fields: dict[str, Any]) -> None:
    stream.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    stream.flush()


def snapshot(step: int, total: int, epoch: float | None, loss: float | None,
             eval_loss: float | None, tokens: int, elapsed: float) -> api.Progress:
    """A progress record with percent, tokens/s and a linear ETA."""
    rate = tokens / elapsed if elapsed > 0 else None
    eta = (total - step) * elapsed / step if step > 0 and total >= step else None
    return api.Progress(step=step, total_steps=total,
                        percent=round(100.0 * step / total, 2) if total else None,
                        epoch=round(epoch, 4) if epoch is not None else None,
                        loss=loss, eval_loss=eval_loss,
                        tokens_per_second=round(rate, 2) if rate is not None else None,
                        eta_seconds=round(eta, 1) if eta is not None else None,
                        updated_at=api.now_rfc3339())


def status_patch(job: JobIdentity, progress: api.Progress) -> dict[str, Any]:
    """The apply-patch body for the LoRAJob's status subresource (camelCase Progress)."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": job.name, "namespace": job.namespace},
        "status": {"progress": progress.model_dump(by_alias=True, exclude_none=True, mode="json")},
    }


def status_path(job: JobIdentity) -> str:
    return (f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{job.namespace}/{api.PLURAL}/{job.name}"
            f"/status?fieldManager={PROGRESS_FIELD_MANAGER}&force=true")


@dataclass
class InCluster:
    """Where and how to reach the API server from a pod (service-account token + CA).

    The token is a projected ServiceAccount token: the kubelet rotates the file well before
    the token expires, so `reload_token` reads it again when the API server answers 401.
    """

    host: str
    token: str
    ca_file: str | None
    token_file: Path | None = None

    def reload_token(self) -> bool:
        """Read the token file again; True when it now holds a different token."""
        if self.token_file is None:
            return False
        try:
            fresh = self.token_file.read_text().strip()
        except OSError:
            return False
        changed = bool(fresh) and fresh != self.token
        self.token = fresh or self.token
        return changed

    @classmethod
    def detect(cls, sa_dir: Path = SA_DIR) -> InCluster | None:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        token_file = sa_dir / "token"
        if not host or not token_file.is_file():
            return None
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        ca = sa_dir / "ca.crt"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", token_file.read_text().strip(),
                   str(ca) if ca.is_file() else None, token_file)


class StatusPatcher:
    """Applies status.progress; logs the first failure once and then keeps quiet."""

    def __init__(self, job: JobIdentity, cluster: InCluster, timeout: float = 5.0):
        self.job = job
        self.cluster = cluster
        self.timeout = timeout
        self.failed_once = False
        self.unauthorized = False
        self.context = ssl.create_default_context(cafile=cluster.ca_file)

    def apply(self, progress: api.Progress, attempts: int = 1, backoff: float = 1.0) -> bool:
        """One patch, or up to `attempts` with doubling waits while the API server is away
        (connection refused, 5xx, 429): the final patch is the one the user reads after the
        run, so it is worth a few seconds; an answer like 403 or 404 is not retried."""
        for attempt in range(attempts):
            retryable = self._apply_once(progress)
            if retryable is None:
                return True
            if self.unauthorized and self.cluster.reload_token():
                retryable = self._apply_once(progress)  # the rotated token, at once
                if retryable is None:
                    return True
            if not retryable or attempt == attempts - 1:
                return False
            time.sleep(backoff * 2 ** attempt)
        return False

    def _apply_once(self, progress: api.Progress) -> bool | None:
        """None when applied; else whether trying again could help."""
        body = json.dumps(status_patch(self.job, progress)).encode()  # JSON is valid YAML
        request = urllib.request.Request(  # noqa: S310 (https to the API server only)
            self.cluster.host + status_path(self.job), data=body, method="PATCH",
            headers={"Content-Type": "application/apply-patch+yaml",
                     "Authorization": f"Bearer {self.cluster.token}"})
        self.unauthorized = False
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,  # noqa: S310
                                        context=self.context):
                return None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.unauthorized = isinstance(exc, urllib.error.HTTPError) and exc.code == 401
            if not self.failed_once:
                log.warning("cannot patch LoRAJob %s/%s status (continuing without): %s",
                            self.job.namespace, self.job.name, exc)
                self.failed_once = True
            if isinstance(exc, urllib.error.HTTPError):
                return exc.code >= 500 or exc.code == 429
            return not isinstance(exc, ValueError)


@dataclass
class ProgressReporter:
    """Fans a snapshot out to stdout, the bar and (throttled) the API server."""

    patcher: StatusPatcher | None = None
    interval: float = 5.0
    stream: IO[str] | None = None
    bar: IO[str] | None = None
    last_patch: float = field(default=-1e18)
    latest: api.Progress | None = None

    @classmethod
    def create(cls, job: JobIdentity, report: bool, interval: float) -> ProgressReporter:
        cluster = InCluster.detect() if report else None
        bar = sys.stderr if sys.stderr.isatty() else None
        return cls(StatusPatcher(job, cluster) if cluster else None, interval, bar=bar)

    def report(self, progress: api.Progress, final: bool = False) -> None:
        self.latest = progress
        write_event(self.stream or sys.stdout, "progress",
                    progress.model_dump(exclude_none=True, mode="json"))
        if self.bar is not None:
            self._draw(progress, final)
        now = time.monotonic()
        if self.patcher is not None and (final or now - self.last_patch >= self.interval):
            self.last_patch = now
            self.patcher.apply(progress)

    def finish(self) -> None:
        """The final patch, so status shows the last step even inside the throttle window;
        retried for about 15 s (1 + 2 + 4 + 8) should the API server be restarting."""
        if self.latest is not None and self.patcher is not None:
            self.patcher.apply(self.latest, attempts=FINAL_PATCH_ATTEMPTS)

    def _draw(self, p: api.Progress, final: bool) -> None:
        assert self.bar is not None
        width = 30
        done = int(width * (p.percent or 0) / 100)
        text = (f"\r[{'#' * done}{'.' * (width - done)}] {p.step}/{p.total_steps} "
                f"loss {p.loss if p.loss is not None else '-'} "
                f"{p.tokens_per_second or 0:.0f} tok/s ETA {p.eta_seconds or 0:.0f}s")
        self.bar.write(text + ("\n" if final else ""))
        self.bar.flush()

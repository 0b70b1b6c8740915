"""Training progress: JSON lines on stdout and a bar for humans.

Two sinks of one `api.Progress` snapshot:
- stdout: one JSON object per line (`{"event": "progress", ...}`, `contract.PROGRESS_EVENT`).
  In a cluster this is the only way progress leaves the pod: the trainer holds no API
  token, and the operator reads the newest such line from the pod's log
  (`contract.last_progress`) and writes it to the LoRAJob's status;
- a progress bar on stderr, only when stderr is a terminal (never pollutes the JSON lines).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import IO, Any

from lora_operator import api
from lora_operator.contract import PROGRESS_EVENT


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


@dataclass
class ProgressReporter:
    """Fans a snapshot out to stdout and the bar."""

    stream: IO[str] | None = None
    bar: IO[str] | None = None
    latest: api.Progress | None = None

    @classmethod
    def create(cls) -> ProgressReporter:
        return cls(bar=sys.stderr if sys.stderr.isatty() else None)

    def report(self, progress: api.Progress, final: bool = False) -> None:
        self.latest = progress
        write_event(self.stream or sys.stdout, PROGRESS_EVENT,
                    progress.model_dump(exclude_none=True, mode="json"))
        if self.bar is not None:
            self._draw(progress, final)

    def _draw(self, p: api.Progress, final: bool) -> None:
        assert self.bar is not None
        width = 30
        done = int(width * (p.percent or 0) / 100)
        text = (f"\r[{'#' * done}{'.' * (width - done)}] {p.step}/{p.total_steps} "
                f"loss {p.loss if p.loss is not None else '-'} "
                f"{p.tokens_per_second or 0:.0f} tok/s ETA {p.eta_seconds or 0:.0f}s")
        self.bar.write(text + ("\n" if final else ""))
        self.bar.flush()

"""Running trainers' progress, read from their logs off the reconcile path.

The trainer pod holds no API token (see `build.job`), so its progress reaches the status
through the operator: the trainer prints `{"event": "progress", ...}` lines on stdout, this
reader fetches the tail of each running trainer's log at most once a progress interval and
hands the newest progress to the reconcile, which writes it with the rest of the status.

Why not read inside the reconcile: a log passes through the node's kubelet, which may be
slow or absent (a simulated node); a worker waiting on it is a worker not reconciling, and
in a burst the operator's view of a pod can lag its real state by more than an interval.
Here reads run in their own task, at most `concurrency` at once; a read that fails backs off
(doubling, up to 8 intervals) so an unreadable pod costs a handful of requests, not one
per interval; and a pod first seen running is read one interval later, so a trainer that
finishes within an interval costs no read at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lora_operator import contract, metrics

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
Obj = dict[str, Any]
# The tail read: enough lines to hold the newest progress line among others, never a log.
TAIL_LINES = 50
TAIL_BYTES = 32 * 1024
MAX_BACKOFF = 8  # a failing pod is read at most every 8 intervals


@dataclass
class _Watched:
    pod: str
    due: float  # monotonic time of the next read
    failures: int = 0
    latest: Obj | None = None  # the newest progress read (camelCase, as in the status)


class ProgressReader(Generic[K]):
    """`watch` the running trainer of a key; `latest` is what was read; `on_progress(key)`
    is called when a read brought something new (the controller queues the key)."""

    def __init__(self, read_tail: Callable[[K, str], Awaitable[str]],
                 on_progress: Callable[[K], None], interval: float, concurrency: int = 2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read_tail = read_tail
        self._on_progress = on_progress
        self._interval = interval
        self._concurrency = max(1, concurrency)
        self._clock = clock
        self._watched: dict[K, _Watched] = {}
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, key: K, pod: str) -> None:
        """The key's current trainer pod is running (a new pod starts its clock afresh)."""
        seen = self._watched.get(key)
        if seen is not None and seen.pod == pod:
            return
        self._watched[key] = _Watched(pod, self._clock() + self._interval,
                                      latest=seen.latest if seen else None)
        self._start()

    def unwatch(self, key: K) -> None:
        """No trainer of this key is running (any more): stop reading, forget what was read."""
        self._watched.pop(key, None)

    def latest(self, key: K) -> Obj | None:
        seen = self._watched.get(key)
        return seen.latest if seen else None

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run())

    async def close(self) -> None:
        """Stop the reading task (one left behind by a loop that has ended is dropped)."""
        task, self._task = self._task, None
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        """Read every due pod, then sleep until the next one is due."""
        while True:
            due = self.due()
            if due:
                limit = asyncio.Semaphore(self._concurrency)
                await asyncio.gather(*(self._read(key, limit) for key in due))
                continue
            waits = [w.due - self._clock() for w in self._watched.values()]
            await asyncio.sleep(max(0.05, min(waits, default=self._interval)))

    def due(self) -> list[K]:
        now = self._clock()
        return [key for key, w in self._watched.items() if w.due <= now]

    async def _read(self, key: K, limit: asyncio.Semaphore) -> None:
        async with limit:
            watched = self._watched.get(key)
            if watched is None:
                return
            await self.read_once(key, watched)

    async def read_once(self, key: K, watched: _Watched) -> None:
        """One read of one pod; the next is due an interval later (more after failures)."""
        try:
            tail = await self._read_tail(key, watched.pod)
        except Exception as exc:  # a node without a log endpoint, the pod just gone
            metrics.PROGRESS_READ_ERRORS.inc()
            watched.failures += 1
            watched.due = self._clock() + self._interval * min(MAX_BACKOFF, 2 ** watched.failures)
            log.debug("reading the log of %s (%s) for progress failed: %s", key, watched.pod, exc)
            return
        watched.failures = 0
        watched.due = self._clock() + self._interval
        found = contract.last_progress(tail)
        if found is None:
            return
        progress = found.model_dump(by_alias=True, exclude_none=True, mode="json")
        if progress != watched.latest and self._watched.get(key) is watched:
            watched.latest = progress
            self._on_progress(key)

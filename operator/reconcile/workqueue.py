"""A keyed work queue with a fixed pool of async workers, as controller-runtime has.

Why a queue instead of reconciling inside each watch handler: a LoRAJob sees ~15-20 watch
events in its life (its own status echoes, the Job's and the pod's every change). Run as
they arrive, a burst of N new jobs interleaves N·20 reconciles, so every job waits for all
the others, and half the work is reconciling state the operator has just written. Here a
watch event only marks its key dirty:

- a key is queued at most once: events that arrive while it waits are served by the one
  reconcile that will run (it reads the latest state from the watch caches);
- a key is never processed by two workers at once: an event during its reconcile marks it
  dirty, and it is queued again when that reconcile ends;
- keys marked `first` (a LoRAJob with no status yet: nobody has planned it) go before the
  rest, so a burst of new jobs is not queued behind status work of running ones;
- `add_after` is the retry path (exponential backoff is the caller's, `backoff.Backoff`):
  one timer per key, replaced by a newer one, cancelled by `forget`.

Workers start lazily on the first `add` (they need the running event loop) and the queue is
FIFO within each class, so no key starves.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Dirty keys waiting for `process`; see the module docstring for the guarantees."""

    def __init__(self, process: Callable[[K], Awaitable[None]], workers: int,
                 name: str = "reconcile",
                 on_depth: Callable[[int], None] | None = None) -> None:
        self._process = process
        self._n_workers = max(1, workers)
        self._name = name
        self._on_depth = on_depth or (lambda _depth: None)
        self._first: deque[K] = deque()
        self._rest: deque[K] = deque()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._ready: asyncio.Semaphore | None = None
        self._workers: list[asyncio.Task[None]] = []

    def __len__(self) -> int:
        return len(self._queued)

    def busy(self) -> bool:
        """Whether any key is queued or being processed (tests wait for this to clear)."""
        return bool(self._queued or self._active)

    # ------------------------------------------------------------------ producers

    def add(self, key: K, first: bool = False) -> None:
        """Mark `key` dirty: it is reconciled once more, after everything already queued
        in its class."""
        if key in self._queued:
            return
        if key in self._active:
            self._dirty.add(key)
            return
        self._push(key, first)

    def add_after(self, key: K, delay: float) -> None:
        """`add(key)` after `delay` seconds (replacing the key's earlier timer)."""
        loop = asyncio.get_running_loop()
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        self._timers[key] = loop.call_later(max(0.0, delay), self._fire, key)

    def forget(self, key: K) -> None:
        """The object is gone: no retry timer for it any more (a queued pass still runs and
        finds nothing to do)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._dirty.discard(key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def _push(self, key: K, first: bool) -> None:
        self._start()
        (self._first if first else self._rest).append(key)
        self._queued.add(key)
        self._on_depth(len(self._queued))
        assert self._ready is not None
        self._ready.release()

    # ------------------------------------------------------------------ workers

    def _start(self) -> None:
        if self._workers:
            return
        self._ready = asyncio.Semaphore(0)
        self._workers = [asyncio.create_task(self._work(), name=f"{self._name}-{i}")
                         for i in range(self._n_workers)]

    async def _work(self) -> None:
        assert self._ready is not None
        while True:
            await self._ready.acquire()
            key = (self._first or self._rest).popleft()
            self._queued.discard(key)
            self._on_depth(len(self._queued))
            self._active.add(key)
            try:
                await self._process(key)
            except asyncio.CancelledError:
                raise
            except Exception:  # the process function retries its own failures
                log.exception("%s of %s raised", self._name, key)
            finally:
                self._active.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self._push(key, False)

    async def stop(self) -> None:
        """Cancel the workers and timers (the operator is shutting down)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

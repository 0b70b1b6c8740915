"""The keyed work queue (operator/reconcile/workqueue.py): what the controller relies on to
reconcile each LoRAJob once per burst of events, never twice at once, new jobs first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from lora_operator.reconcile.workqueue import WorkQueue


async def _drain(q: WorkQueue[str], timeout: float = 5.0) -> None:
    async def idle() -> None:
        while q.busy():
            await asyncio.sleep(0.001)
    await asyncio.wait_for(idle(), timeout)


def _run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def test_events_for_a_queued_key_coalesce_into_one_reconcile() -> None:
    seen: list[str] = []

    async def process(key: str) -> None:
        seen.append(key)

    async def body() -> None:
        q = WorkQueue(process, workers=2)
        for _ in range(20):
            q.add("a")
        q.add("b")
        await _drain(q)
        await q.stop()

    _run(body)
    assert sorted(seen) == ["a", "b"]


def test_a_key_is_never_processed_twice_at_once_and_an_event_during_it_runs_it_again() -> None:
    running: set[str] = set()
    overlaps: list[str] = []
    passes: list[str] = []
    gate = asyncio.Event()

    async def process(key: str) -> None:
        if key in running:
            overlaps.append(key)
        running.add(key)
        passes.append(key)
        if len(passes) == 1:
            await gate.wait()  # the first pass is slow: events arrive meanwhile
        running.discard(key)

    async def body() -> None:
        q = WorkQueue(process, workers=4)
        q.add("a")
        await asyncio.sleep(0.01)
        for _ in range(5):
            q.add("a")  # four idle workers: none may take "a" while it runs
        await asyncio.sleep(0.01)
        assert passes == ["a"]
        gate.set()
        await _drain(q)
        await q.stop()

    _run(body)
    assert overlaps == []
    assert passes == ["a", "a"]  # the events during the first pass: exactly one more pass


def test_new_keys_go_before_queued_status_work() -> None:
    order: list[str] = []

    async def process(key: str) -> None:
        order.append(key)

    async def body() -> None:
        q = WorkQueue(process, workers=1)
        for key in ("old1", "old2", "old3"):
            q.add(key)
        q.add("new1", first=True)
        q.add("new2", first=True)
        await _drain(q)
        await q.stop()

    _run(body)
    # The single worker was handed old1 when it was added; the new keys overtake the rest.
    assert order[order.index("new1"):order.index("new1") + 2] == ["new1", "new2"]
    assert order.index("new2") < order.index("old2")


def test_add_after_replaces_the_earlier_retry_and_forget_cancels_it() -> None:
    seen: list[str] = []

    async def process(key: str) -> None:
        seen.append(key)

    async def body() -> None:
        q = WorkQueue(process, workers=1)
        q.add_after("a", 0.05)
        q.add_after("a", 0.01)  # replaces: one retry, not two
        q.add_after("gone", 0.01)
        q.forget("gone")
        await asyncio.sleep(0.1)
        await _drain(q)
        await q.stop()

    _run(body)
    assert seen == ["a"]


def test_a_raising_reconcile_does_not_kill_its_worker() -> None:
    seen: list[str] = []

    async def process(key: str) -> None:
        seen.append(key)
        if key == "bad":
            raise RuntimeError("boom")

    async def body() -> None:
        q = WorkQueue(process, workers=1)
        q.add("bad")
        q.add("good")
        await _drain(q)
        await q.stop()

    _run(body)
    assert seen == ["bad", "good"]


def test_depth_is_reported() -> None:
    depths: list[int] = []

    async def process(key: str) -> None:
        await asyncio.sleep(0)

    async def body() -> None:
        q = WorkQueue(process, workers=1, on_depth=depths.append)
        for key in "abc":
            q.add(key)
        assert len(q) == 3
        await _drain(q)
        await q.stop()

    _run(body)
    assert max(depths) == 3 and depths[-1] == 0

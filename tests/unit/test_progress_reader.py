"""The progress reader's timing: a trainer first seen running is read one interval later,
then every interval; a failing read backs off; reads run at most `concurrency` at once;
only new progress queues the key."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from lora_operator import metrics
from lora_operator.reconcile.progress_reader import MAX_BACKOFF, ProgressReader

INTERVAL = 5.0
LINE = '{"event": "progress", "step": %d, "total_steps": 100}'


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Logs:
    """Pod logs by name; a value that is an exception is raised by the read."""

    def __init__(self) -> None:
        self.text: dict[str, str | Exception] = {}
        self.reads: list[str] = []
        self.active = 0
        self.most_at_once = 0

    async def read(self, key: str, pod: str) -> str:
        self.reads.append(pod)
        self.active += 1
        self.most_at_once = max(self.most_at_once, self.active)
        await asyncio.sleep(0.01)
        self.active -= 1
        got = self.text.get(pod, "")
        if isinstance(got, Exception):
            raise got
        return got


def make(concurrency: int = 2) -> tuple[ProgressReader[str], Logs, Clock, list[str]]:
    logs, clock, queued = Logs(), Clock(), []
    reader: ProgressReader[str] = ProgressReader(logs.read, queued.append, INTERVAL,
                                                 concurrency=concurrency, clock=clock)
    reader._start = lambda: None  # type: ignore[method-assign]  # driven by `tick` instead
    return reader, logs, clock, queued


async def tick(reader: ProgressReader[str]) -> None:
    """What the reader's own task does once: read every pod that is due."""
    limit = asyncio.Semaphore(reader._concurrency)
    await asyncio.gather(*(reader._read(key, limit) for key in reader.due()))


def test_first_read_one_interval_after_first_seen_then_each_interval() -> None:
    async def go() -> None:
        reader, logs, clock, queued = make()
        logs.text["p"] = LINE % 3
        reader.watch("job", "p")
        await tick(reader)
        assert logs.reads == []  # a trainer done within an interval is never read
        clock.now += INTERVAL
        await tick(reader)
        assert logs.reads == ["p"] and queued == ["job"]
        assert reader.latest("job") == {"step": 3, "totalSteps": 100}
        reader.watch("job", "p")  # seen running again: the clock is not restarted
        clock.now += INTERVAL / 2
        await tick(reader)
        assert logs.reads == ["p"]
        clock.now += INTERVAL / 2
        await tick(reader)  # read again, nothing new: the key is not queued again
        assert logs.reads == ["p", "p"] and queued == ["job"]
        logs.text["p"] = LINE % 9
        clock.now += INTERVAL
        await tick(reader)
        assert queued == ["job", "job"] and reader.latest("job") == {"step": 9, "totalSteps": 100}
        await reader.close()
    asyncio.run(go())


def test_a_failing_pod_is_read_less_and_less_often() -> None:
    async def go() -> None:
        reader, logs, clock, queued = make()
        logs.text["p"] = ConnectionError("no kubelet on this node")
        before = metrics.PROGRESS_READ_ERRORS._value.get()
        reader.watch("job", "p")
        times = []
        for _ in range(40):
            clock.now += INTERVAL
            n = len(logs.reads)
            await tick(reader)
            if len(logs.reads) > n:
                times.append(clock.now)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps[:3] == [2 * INTERVAL, 4 * INTERVAL, MAX_BACKOFF * INTERVAL]
        assert set(gaps[3:]) == {MAX_BACKOFF * INTERVAL}
        assert metrics.PROGRESS_READ_ERRORS._value.get() == before + len(times)
        assert queued == [] and reader.latest("job") is None
        logs.text["p"] = LINE % 5  # it answers again: back to every interval
        clock.now += MAX_BACKOFF * INTERVAL
        await tick(reader)
        clock.now += INTERVAL
        n = len(logs.reads)
        await tick(reader)
        assert len(logs.reads) == n + 1 and queued == ["job"]
    asyncio.run(go())


def test_unwatch_and_a_new_pod() -> None:
    async def go() -> None:
        reader, logs, clock, _ = make()
        logs.text = {"p1": LINE % 50, "p2": LINE % 1}
        reader.watch("job", "p1")
        clock.now += INTERVAL
        await tick(reader)
        reader.watch("job", "p2")  # the Job replaced the pod: its clock starts afresh
        clock.now += INTERVAL / 2
        await tick(reader)
        assert logs.reads == ["p1"]
        assert reader.latest("job") == {"step": 50, "totalSteps": 100}  # kept meanwhile
        clock.now += INTERVAL / 2
        await tick(reader)
        assert logs.reads == ["p1", "p2"] and reader.latest("job") == {"step": 1, "totalSteps": 100}
        reader.unwatch("job")
        clock.now += INTERVAL
        await tick(reader)
        assert logs.reads == ["p1", "p2"] and reader.latest("job") is None and len(reader) == 0
    asyncio.run(go())


@pytest.mark.parametrize("concurrency", [1, 3])
def test_reads_run_at_most_concurrency_at_once(concurrency: int) -> None:
    async def go() -> None:
        reader, logs, clock, _ = make(concurrency)
        for i in range(10):
            logs.text[f"p{i}"] = LINE % i
            reader.watch(f"job{i}", f"p{i}")
        clock.now += INTERVAL
        await tick(reader)
        assert len(logs.reads) == 10 and logs.most_at_once == concurrency
    asyncio.run(go())


def test_the_readers_own_task_reads_when_due() -> None:
    """Started by the first watch; reads without being driven, and stops on close."""
    async def go() -> None:
        logs, queued = Logs(), []
        logs.text["p"] = LINE % 7
        reader: ProgressReader[str] = ProgressReader(logs.read, queued.append, 0.05)
        reader.watch("job", "p")
        for _ in range(100):
            if queued:
                break
            await asyncio.sleep(0.02)
        assert queued == ["job"] and reader.latest("job") == {"step": 7, "totalSteps": 100}
        await reader.close()
    asyncio.run(go())

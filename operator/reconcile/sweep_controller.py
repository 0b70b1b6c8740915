"""The LoRASweep reconcile loop: read the sweep and its trials' LoRAJobs, act, write status.

Level-triggered like `controller.Controller`: every event of a sweep or of one of its
LoRAJobs queues the sweep (workqueue.py); a worker runs `SweepController.reconcile(namespace,
name)`, which derives everything from the current objects through the pure functions of
`sweep.py`, in this order:

1. a finished or invalid sweep → nothing more (an invalid one is Failed with the field);
2. observe every trial (last status record + its LoRAJob), apply the median rule;
3. write the status first — an early-stopped trial is recorded before its LoRAJob is
   deleted, so a restart never mistakes the deleted trial for one still to be created;
4. delete early-stopped trials' LoRAJobs (uid-guarded), then create the next trials
   within `parallelism`, by deterministic name: 409 adopts the existing LoRAJob only when
   it is controlled by this sweep (same uid); anything else fails that trial, untouched.

Per-sweep lock and coalescing as in the LoRAJob controller; our own status writes bridge the
time until the watch delivers them (`_fresher`), so a record is never read back stale.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from lora_operator import api, metrics, sweep_api
from lora_operator.reconcile import sweep
from lora_operator.reconcile.backoff import Backoff
from lora_operator.reconcile.controller import CallsIO, _fresher
from lora_operator.reconcile.kube import ApiClient, ApiError
from lora_operator.reconcile.status import Event
from lora_operator.reconcile.workqueue import WorkQueue

log = logging.getLogger("lora_operator.sweep")
T = TypeVar("T")
Key = tuple[str, str]
Obj = Mapping[str, Any]
EventPoster = Callable[[Obj, Event], None]


class SweepView(Protocol):
    """What the watches saw: a sweep by (namespace, name), and its trials' LoRAJobs."""

    def sweep(self, key: Key) -> Obj | None: ...
    def trials(self, key: Key) -> dict[str, Obj]: ...


class DictSweepView:
    """A SweepView over plain dicts (tests)."""

    def __init__(self) -> None:
        self.sweeps: dict[Key, Obj] = {}
        self.trial_map: dict[Key, dict[str, Obj]] = {}

    def sweep(self, key: Key) -> Obj | None:
        return self.sweeps.get(key)

    def trials(self, key: Key) -> dict[str, Obj]:
        return dict(self.trial_map.get(key) or {})


class SweepKube:
    """The API calls of the sweep controller, on the LoRAJob controller's `ApiClient`."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    async def create_lorajob(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create a trial's LoRAJob; None when one of that name already exists."""
        try:
            return await self.client.create(body)
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise

    async def read_lorajob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.client.get(api.KIND, namespace, name)

    async def delete_lorajob(self, namespace: str, name: str, uid: str) -> None:
        """Delete a trial's LoRAJob (its Job and pod follow), only the one with `uid`."""
        await self.client.delete(api.KIND, namespace, name, uid)

    async def read_sweep(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.client.get(sweep_api.KIND, namespace, name)

    async def patch_sweep_status(self, namespace: str, name: str, status: dict[str, Any],
                                 resource_version: str | None) -> dict[str, Any] | None:
        """Merge-patch the status, refused (None) if the sweep changed since it was read."""
        return await self.client.patch_status(sweep_api.KIND, namespace, name, status,
                                              resource_version)


class SweepController(CallsIO):
    """Operator-wide state of the sweep loop: API calls, caches, locks, retry timers."""

    def __init__(self, kube: SweepKube, executor: concurrent.futures.Executor,
                 view: SweepView | None = None, post_event: EventPoster | None = None,
                 workers: int = 4) -> None:
        self.kube = kube
        self.executor = executor
        self.view: SweepView = view or DictSweepView()
        self.post_event = post_event or (lambda body, ev: None)
        self._written: dict[Key, Obj] = {}
        self.queue: WorkQueue[Key] = WorkQueue(
            lambda key: self.reconcile(*key), workers, "sweep",
            metrics.QUEUE_DEPTH.labels(queue="lorasweeps").set)
        self._errors = Backoff()

    def enqueue(self, key: Key) -> None:
        """A watch event of the sweep or one of its trials: reconcile it soon."""
        self.queue.add(key)

    def forget(self, key: Key) -> None:
        self.queue.forget(key)
        self._written.pop(key, None)
        self._errors.reset(key)

    def requeue(self, key: Key, delay: float) -> None:
        self.queue.add_after(key, delay)

    def _emit(self, body: Obj, events: list[Event]) -> None:
        for ev in events:
            try:
                self.post_event(body, ev)
            except Exception:  # an Event is a courtesy; never fail a reconcile for it
                log.exception("could not post event %s", ev.reason)

    async def reconcile(self, namespace: str, name: str) -> None:
        """Move one sweep one step on (see the module docstring); run by the queue's
        workers, never twice at once for one sweep."""
        key = (namespace, name)
        try:
            for _ in range(5):  # a conflict means someone wrote first: derive again
                if not await self._reconcile_once(key):
                    break
        except Exception:
            delay = self._errors.next(key)
            log.exception("reconcile of sweep %s/%s failed; retrying in %.0fs", *key, delay)
            self.requeue(key, delay)
        else:
            self._errors.reset(key)

    async def _patch(self, key: Key, body: Obj, status: dict[str, Any]) -> Obj | None:
        rv = (body.get("metadata") or {}).get("resourceVersion")
        out = await self._io(self.kube.patch_sweep_status, key[0], key[1], status, rv)
        if out is not None:
            self._written[key] = out
        return out

    async def _reread(self, key: Key) -> bool:
        """After a refused patch: take the server's copy; True to derive again."""
        fresh = await self._io(self.kube.read_sweep, *key)
        if fresh is None:
            return False
        self._written[key] = fresh
        return True

    async def _reconcile_once(self, key: Key) -> bool:
        body = _fresher(self.view.sweep(key), self._written, key)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return False
        status = body.get("status") or {}
        if status.get("phase") in (sweep_api.SweepPhase.SUCCEEDED.value,
                                   sweep_api.SweepPhase.FAILED.value):
            return False
        problem, spec, trials = self._plan(body)
        if problem or spec is None:
            out = await self._patch(key, body, sweep.failed_status(body, "InvalidSpec", problem))
            if out is None:
                return await self._reread(key)
            self._emit(out, [Event("Warning", "InvalidSpec", problem)])
            return False

        uid = str((body.get("metadata") or {}).get("uid") or "")
        children = {n: c for n, c in self.view.trials(key).items() if sweep.owned_by(c, uid)}
        records = sweep.observe_trials(trials, key[1], status.get("trials") or [], children)
        stops = sweep.early_stops(records, spec.early_stopping)
        records = sweep.apply_stops(records, stops)
        start = sweep.trials_to_create(records, spec.parallelism)
        new_status = sweep.summarize(body, records)
        if sweep.status_changed(status, new_status):
            out = await self._patch(key, body, new_status)
            if out is None:
                return await self._reread(key)
            events = [Event("Normal", "TrialEarlyStopped", f"{s.name}: {s.message}") for s in stops]
            if new_status["phase"] != status.get("phase") and new_status["phase"] != "Running":
                events.append(Event("Normal" if new_status["phase"] == "Succeeded" else "Warning",
                                    f"Sweep{new_status['phase']}", new_status["message"]))
            self._emit(out, events)
            body = out
        for child in sweep.children_to_delete(records, children):
            meta = child.get("metadata") or {}
            await self._io(self.kube.delete_lorajob, key[0], meta["name"], meta.get("uid") or "")
            log.info("sweep %s/%s: deleted early-stopped trial %s", *key, meta["name"])
        return await self._start(key, body, spec, trials, records, start, uid)

    def _plan(self, body: Obj) -> tuple[str, sweep_api.LoRASweepSpec | None,
                                        list[dict[str, Any]]]:
        """(problem, spec, trials): the spec validated and every trial's values generated."""
        name = str((body.get("metadata") or {}).get("name") or "")
        if len(name) > sweep_api.MAX_NAME_LENGTH:
            return (f"metadata.name: at most {sweep_api.MAX_NAME_LENGTH} characters, so that "
                    f"trial names <name>-t<N> fit (got {len(name)})", None, [])
        try:
            spec = sweep_api.parse_sweep_spec(dict(body.get("spec") or {}))
        except api.SpecError as exc:
            return str(exc), None, []
        trials = sweep.generate_trials(spec)
        problems = sweep.trial_problems(spec, trials, name)
        if problems:
            return "trial specs refused: " + "; ".join(problems[:5]), None, []
        return "", spec, trials

    async def _start(self, key: Key, body: Obj, spec: sweep_api.LoRASweepSpec,
                     trials: list[dict[str, Any]], records: list[dict[str, Any]],
                     start: list[int], uid: str) -> bool:
        """Create the trials' LoRAJobs; True when a trial had to be failed (derive again)."""
        refused: dict[str, str] = {}
        for index in start:
            manifest = sweep.child_lorajob(body, spec, index, trials[index])
            name = manifest["metadata"]["name"]
            if await self._io(self.kube.create_lorajob, manifest) is not None:
                log.info("sweep %s/%s: created trial %s %s", *key, name, trials[index])
                continue
            existing = await self._io(self.kube.read_lorajob, key[0], name)
            if existing is not None and not sweep.owned_by(existing, uid):
                refused[name] = (f"a LoRAJob named {name} already exists and is not controlled "
                                 "by this sweep; it was left untouched")
        if not refused:
            return False
        failed = [dict(r, phase=sweep_api.TrialPhase.FAILED.value, message=refused[r["name"]])
                  if r["name"] in refused else r for r in records]
        out = await self._patch(key, body, sweep.summarize(body, failed))
        if out is None:
            return await self._reread(key)
        self._emit(out, [Event("Warning", "TrialNameTaken", m) for m in refused.values()])
        return True

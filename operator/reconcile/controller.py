"""The reconcile loop: gather a LoRAJob's children, act, and write the derived status.

Level-triggered, like a controller-runtime reconciler: every watch event of a LoRAJob, of
one of its Jobs or of one of its pods marks the LoRAJob dirty in a keyed work queue
(`workqueue.WorkQueue`); its workers call `Controller.reconcile(namespace, name)`, which
looks at the whole current state and moves it one step on. A key is queued once however
many events arrive, never reconciled twice at once, and new LoRAJobs go first. Nothing is
remembered that the cluster does not also hold, except caches: restart the operator at any
moment and it continues where it was.

What it does, in order:
1. finished job → (re)schedule its TTL deletion, nothing else;
2. no placement yet → validate the spec, plan through the estimator (or Fail at once with
   the reason and memory breakdown); the placement is written with step 7's patch, after
   the Job exists (before a dataset preflight, at once);
3. no Job for the current attempt → create it, its only child (the trainer's config rides
   in its pod template), by deterministic name (409 = adopt what this LoRAJob controls;
   someone else's object fails the job with NameConflict, a refused create with
   ChildRejected);
4. keep Job.spec.suspend in line with runPolicy.suspend (never unsuspending a Kueue job);
5. a trainer that succeeded (its pod, or its Job says so) → verify the manifest in
   storage (`manifest.check`);
6. a running trainer → take the newest progress line of its log, which a reader reads off
   this path at most every `progress_interval_seconds` (`progress_reader`; the trainer
   holds no API token, see `build.job`);
7. derive the status (`status.derive_status`), patch it (optimistic concurrency), post
   Events for what needs attention (`status.milestone`); after out-of-memory, re-plan one
   class up and start the next attempt;
8. Failed, for any reason → delete the attempt's unfinished Job so no GPU keeps burning.

Only the operator writes the status (the trainer pod has no credentials), so Succeeded,
once written, is final. The attempt is still counted from the Jobs this LoRAJob controls
and a Job is built from the placement the operator planned (kept in memory, else planned
again), not from status fields: a status patch may be lost to a crash after the Job exists.

Writes per job on the way to Succeeded: the Job, and the status at each phase a user acts
on (the plan with the Job's outcome, Running, Succeeded). A step in between that usually
lasts moments (the pod bound, its container starting, the pod done before its Job) is
written only if it still holds a progress interval after it was first seen
(`status.BRIEF_REASONS`).

Errors are retried with per-key exponential backoff (`backoff.Backoff`), reset on success.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import functools
import inspect
import logging
import time
from collections.abc import Callable, Coroutine, Hashable, Mapping
from typing import Any, Protocol, TypeVar, overload

from lora_operator import api, contract, metrics
from lora_operator.build import job, names
from lora_operator.plan import policy
from lora_operator.reconcile import manifest as manifests
from lora_operator.reconcile import planning, preflight, progress_reader, projection
from lora_operator.reconcile.backoff import Backoff
from lora_operator.reconcile.children import attempt_of, parse_result, trainer_state
from lora_operator.reconcile.kube import (
    ChildRejectedError,
    Kube,
    NameConflictError,
    controller_uid,
)
from lora_operator.reconcile.status import (
    Derived,
    Event,
    derive_status,
    failed_patch,
    milestone,
    plan_message,
    planned_patch,
    ttl_deadline,
)
from lora_operator.reconcile.timestamps import parse_time
from lora_operator.reconcile.verdicts import ManifestCheck
from lora_operator.reconcile.workqueue import WorkQueue
from lora_operator.settings import Settings

log = logging.getLogger("lora_operator.controller")
T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
Key = tuple[str, str]
Obj = Mapping[str, Any]
EventPoster = Callable[[Obj, Event], None]


class RetryLater(Exception):  # noqa: N818 (not an error: a wait)
    """Something the reconcile needs may come by itself (the estimator, a model's
    config.json): try again after the key's backoff, without a traceback."""


def _finished(obj: Obj | None) -> bool:
    """Whether a Job has run to its end (Complete or Failed): its pods hold no GPU."""
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in ((obj or {}).get("status") or {}).get("conditions") or [])


def _rv(obj: Obj | None) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _newest(*objs: Obj | None) -> Obj | None:
    """The freshest of several copies of one object (watch cache vs our own writes)."""
    present = [o for o in objs if o]
    return max(present, key=_rv) if present else None


def _remember(written: dict[K, Obj], key: K, obj: dict[str, Any]) -> None:
    """Keep our own write's response until the watch delivers it, trimmed in place as the
    watch trims what it delivers (projection.py): both copies read the same, and the bridge
    is small."""
    written[key] = projection.project(obj)


def _echoed(written: dict[K, Obj], key: K, body: Obj) -> bool:
    """Whether `body` is our own last write to `key` coming back through the watch; then
    the bridge copy goes, since kopf indexes an event before its handlers run, so the index
    holds that version now (kept, every finished job's final status write stayed twice)."""
    mine = written.get(key)
    if mine is None or _rv(mine) != _rv(body):
        return False
    del written[key]
    return True


def _fresher(seen: Obj | None, written: dict[K, Obj], key: K) -> Obj | None:
    """The newer of the watch's copy and our own last write; our copy only bridges the time
    until the watch delivers it, so it is dropped once the watch has caught up (kept, a
    thousand finished jobs would hold a second full copy of every LoRAJob and Job)."""
    mine = written.get(key)
    if mine is not None and seen is not None and _rv(seen) >= _rv(mine):
        del written[key]
        return seen
    return _newest(seen, mine)


def local_uri_problem(spec: api.LoRAJobSpec, settings: Settings) -> str | None:
    """file:// URIs name the operator's or a node's disk: refused unless allowLocalUris."""
    if settings.allow_local_uris:
        return None
    uris = {"spec.baseModel.uri": spec.base_model.uri, "spec.dataset.uri": spec.dataset.uri,
            "spec.dataset.validation.uri": spec.dataset.validation.uri,
            "spec.dataset.test.uri": spec.dataset.test.uri if spec.dataset.test else None,
            "spec.output.uri": spec.output.uri}
    bad = [path for path, uri in uris.items() if uri and uri.startswith("file://")]
    if not bad:
        return None
    return (f"{', '.join(bad)}: file:// URIs are only for local runs (lora-trainer run); "
            "the operator's settings have allowLocalUris false")


def _metadata_address(url: str) -> bool:
    """Whether a URL's host is, or resolves to, a link-local / cloud-metadata address."""
    import ipaddress
    import socket
    import urllib.parse

    host = urllib.parse.urlparse(url).hostname or ""
    addresses = [host]
    with contextlib.suppress(OSError, UnicodeError):  # unresolvable: the name itself is checked
        addresses += [str(info[4][0]) for info in socket.getaddrinfo(host, None)]
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_link_local or ip == ipaddress.ip_address("fd00:ec2::254"):
            return True
    return False


def endpoint_problem(spec: api.LoRAJobSpec) -> str | None:
    """Endpoints on link-local / metadata addresses are refused: the operator itself calls
    the model's and the output's endpoint (config.json, manifest HEAD) with its own
    credentials, so such an endpoint would be a server-side request forgery (blocking: DNS)."""
    endpoints = {"spec.baseModel.endpoint": spec.base_model.endpoint,
                 "spec.dataset.endpoint": spec.dataset.endpoint,
                 "spec.output.endpoint": spec.output.endpoint}
    bad = [path for path, url in endpoints.items() if url and _metadata_address(url)]
    if not bad:
        return None
    return (f"{', '.join(bad)}: link-local / cloud-metadata addresses (169.254.0.0/16, "
            "fe80::/10, fd00:ec2::254) are not allowed")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A new LoRAJob's placement, not yet written. The Job is created from it first and the
    placement goes into the same status patch as the Job's outcome: one status write on the
    way to the Job instead of two. A crash in between loses nothing: planning again gives
    the same placement (deterministic), and the Job is adopted by name."""

    patch: dict[str, Any]
    event: Event

    def applied_to(self, body: Obj) -> Obj:
        """`body` as if the plan were written (still with the read's resourceVersion, which
        guards the eventual patch)."""
        status = {**(body.get("status") or {}),
                  **{k: v for k, v in self.patch.items() if v is not None}}
        placement = self.patch.get("placement") or {}
        status["placement"] = {k: v for k, v in placement.items() if v is not None}
        return {**body, "status": status}

    def merged_with(self, derived: Mapping[str, Any]) -> dict[str, Any]:
        """The plan's patch under the derived one (later facts win; placements merge)."""
        out = {**self.patch, **derived}
        if "placement" in derived:
            out["placement"] = {**(self.patch.get("placement") or {}), **derived["placement"]}
        return out


class View(Protocol):
    """Read access to what the watches saw, keyed by the LoRAJob's (namespace, name)."""

    def lorajob(self, key: Key) -> Obj | None: ...
    def jobs(self, key: Key) -> dict[str, Obj]: ...
    def pods(self, key: Key) -> list[Obj]: ...


class DictView:
    """A View over plain dicts (tests, or a caller feeding it by hand)."""

    def __init__(self) -> None:
        self.lorajobs: dict[Key, Obj] = {}
        self.job_map: dict[Key, dict[str, Obj]] = {}
        self.pod_map: dict[Key, dict[str, Obj]] = {}

    def lorajob(self, key: Key) -> Obj | None:
        return self.lorajobs.get(key)

    def jobs(self, key: Key) -> dict[str, Obj]:
        return dict(self.job_map.get(key) or {})

    def pods(self, key: Key) -> list[Obj]:
        return list((self.pod_map.get(key) or {}).values())


class CallsIO:
    """`_io`, shared by the controllers: API calls are coroutines, awaited on the loop;
    blocking work (planning, manifest checks, DNS) and plain functions (the unit tests'
    fake clients) run in the executor, off the loop."""

    executor: concurrent.futures.Executor

    @overload
    async def _io(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T: ...

    @overload
    async def _io(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))


class Controller(CallsIO):
    """Holds the operator-wide state: settings, API clients, caches and timers."""

    def __init__(self, settings: Settings, kube: Kube,
                 executor: concurrent.futures.Executor | None = None,
                 post_event: EventPoster | None = None, view: View | None = None) -> None:
        self.settings = settings
        self.kube = kube
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(settings.max_workers)
        self.post_event = post_event or (lambda body, ev: None)
        # What the watches saw (kopf indexes in the operator, dicts in tests).
        self.view: View = view or DictView()
        self._written: dict[Key, Obj] = {}  # our latest status patch responses
        # Jobs we created or patched, by LoRAJob then Job name (a reconcile looks up its own
        # key only: no scan over every job's entries, which grew with the cluster).
        self._jobs_written: dict[Key, dict[str, Obj]] = {}
        # Watch events only mark a key dirty here; workers run `reconcile` (workqueue.py).
        self.queue: WorkQueue[Key] = WorkQueue(
            lambda key: self.reconcile(*key), settings.max_workers, "reconcile",
            metrics.QUEUE_DEPTH.labels(queue="lorajobs").set)
        self._timers: dict[Key, asyncio.TimerHandle] = {}  # TTL deletions
        self._manifests: dict[tuple[str, int], ManifestCheck] = {}
        # The placement the operator planned for (uid, attempt): what the next Job is built
        # from (status.placement may lag the Jobs after a crash, so it is only shown).
        self._placements: dict[Key, tuple[str, int, api.Placement]] = {}
        # Running trainers' progress, read from their logs off the reconcile path (step 6).
        self.progress: progress_reader.ProgressReader[Key] = progress_reader.ProgressReader(
            self._read_tail, self.enqueue, settings.progress_interval_seconds)
        # Which brief step each job is in, since when (monotonic): step 7's throttle.
        self._brief: dict[Key, tuple[str, float]] = {}
        self._errors = Backoff()  # reconciles that raised
        self._rechecks = Backoff(base=2.0)  # storage or pod state not there yet

    # ------------------------------------------------------------------ watch feed

    def enqueue(self, key: Key, first: bool = False) -> None:
        """A watch event concerning `key`: reconcile it soon (`first`: a new LoRAJob)."""
        self.queue.add(key, first)

    def is_echo(self, key: Key, body: Obj) -> bool:
        """Whether a LoRAJob event only echoes our own last status write: that state was
        derived from, so reconciling it again would change nothing."""
        return _echoed(self._written, key, body)

    def is_job_echo(self, key: Key, body: Obj) -> bool:
        """Whether a Job event only echoes our own create or patch of that Job."""
        name = (body.get("metadata") or {}).get("name") or ""
        return _echoed(self._jobs_written.get(key, {}), name, body)

    def forget(self, key: Key) -> None:
        """The LoRAJob is gone: drop our caches and timers (its children follow via GC)."""
        self.queue.forget(key)
        self._written.pop(key, None)
        self._jobs_written.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()
        self._placements.pop(key, None)
        self.progress.unwatch(key)
        self._brief.pop(key, None)
        self._errors.reset(key)
        self._rechecks.reset(key)
        metrics.observe_phase(key, None)

    # ------------------------------------------------------------------ helpers

    def _lorajob(self, key: Key) -> Obj | None:
        return _fresher(self.view.lorajob(key), self._written, key)

    def _job(self, key: Key, attempt: int) -> Obj | None:
        name = names.job_name(key[1], attempt)
        return _fresher(self.view.jobs(key).get(name), self._jobs_written.get(key, {}), name)

    def _emit(self, body: Obj, events: list[Event]) -> None:
        """Post the milestones among `events` (`status.milestone`): the steps in between
        are in the status and its conditions, and an Event each is a write per step."""
        for ev in filter(milestone, events):
            try:
                self.post_event(body, dataclasses.replace(
                    ev, message=contract.redact_url_secrets(ev.message)))
            except Exception:  # an Event is a courtesy; never fail a reconcile for it
                log.exception("could not post event %s", ev.reason)

    async def _patch(self, key: Key, body: Obj, patch: dict[str, Any]) -> Obj | None:
        """Patch status guarded by the resourceVersion we derived it from."""
        rv = (body.get("metadata") or {}).get("resourceVersion")
        patch = contract.redact_messages(patch)  # presigned URLs are credentials
        out = await self._io(self.kube.patch_status, key[0], key[1], patch, rv)
        if out is not None:
            _remember(self._written, key, out)
            phase = (out.get("status") or {}).get("phase")
            if phase and phase != (body.get("status") or {}).get("phase"):
                metrics.TRANSITIONS.labels(phase=phase).inc()
            metrics.observe_phase(key, phase)
        return out

    async def _refresh(self, key: Key) -> Obj | None:
        fresh = await self._io(self.kube.read_lorajob, key[0], key[1])
        if fresh is None:
            return None
        _remember(self._written, key, fresh)
        return fresh

    # ------------------------------------------------------------------ the loop

    async def reconcile(self, namespace: str, name: str) -> None:
        """Bring one LoRAJob one step closer to done (see the module docstring). Run by the
        queue's workers, never twice at once for one key."""
        key = (namespace, name)
        started = time.monotonic()
        try:
            for _ in range(5):  # a conflict means someone wrote first: derive again
                if not await self._reconcile_once(key):
                    break
        except RetryLater as exc:
            delay = self._errors.next(key)
            log.warning("%s/%s: %s; retrying in %.0fs", *key, exc, delay)
            self.requeue(key, delay)
        except Exception as exc:
            metrics.RECONCILE_ERRORS.labels(error=type(exc).__name__).inc()
            delay = self._errors.next(key)
            log.exception("reconcile of %s/%s failed; retrying in %.0fs", *key, delay)
            self.requeue(key, delay)
        else:
            self._errors.reset(key)
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    async def _reconcile_once(self, key: Key) -> bool:
        """One pass; True when it should run again at once (conflict or a new attempt)."""
        body = self._lorajob(key)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return False
        status = body.get("status") or {}
        if status.get("phase") == api.Phase.FAILED.value:
            await self._stop_jobs(key, body)  # again: the operator may have died in between
            self.schedule_ttl(key, body)
            return False
        try:
            names.job_name(key[1], 1)  # created before the CRD capped names
        except names.NameTooLongError as exc:
            return await self._fail(key, body, "NameTooLong", str(exc), planning=True)
        uid = (body.get("metadata") or {}).get("uid") or ""
        owned = self._owned_jobs(key, uid)
        attempt = max(owned, default=1)
        if status.get("phase") == api.Phase.SUCCEEDED.value:
            self.progress.unwatch(key)
            self.schedule_ttl(key, body)  # written by the operator: final
            return False

        try:
            spec = api.parse_spec(dict(body.get("spec") or {}))
        except api.SpecError as exc:
            return await self._fail(key, body, "InvalidSpec", str(exc), planning=True)
        problem = local_uri_problem(spec, self.settings)
        if problem:
            return await self._fail(key, body, "LocalURIRefused", problem, planning=True)
        if refused := policy.violation(spec, key[0], self.settings):
            return await self._fail(key, body, refused.reason, refused.message, planning=True)
        problem = await self._io(endpoint_problem, spec)
        if problem:
            return await self._fail(key, body, "EndpointRefused", problem, planning=True)

        plan: _Plan | None = None
        if not status.get("placement"):
            if spec.dataset.preflight.enabled:  # written now: the preflight runs first
                return await self._plan(key, body, spec, attempt)
            # Written later, in the one status patch after the Job exists (see `_Plan`).
            plan = await self._plan_only(key, body, spec, attempt)
            if plan is None:
                return False
            body = plan.applied_to(body)

        owner = names.Owner.from_body(body)
        current = owned.get(attempt)
        try:
            if (gate := await preflight.gate(self, key, body, spec, owner)) is not None:
                return gate  # the dataset preflight (CPU only) runs before attempt 1's Job
            if current is None:
                current = await self._start_attempt(key, body, spec, owner, attempt)
                if current is None:
                    return False  # planning said no, or retries later: handled there
            else:
                current = await self._sync_suspend(key, owner, current, spec)
        except NameConflictError as exc:
            return await self._fail(key, body, "NameConflict", str(exc))
        except ChildRejectedError as exc:
            return await self._fail(key, body, "ChildRejected", str(exc))

        pods = self.view.pods(key)
        manifest = await self._manifest(key, body, spec, current, pods, attempt)
        derived = derive_status(body, current, pods, self.settings, manifest=manifest,
                                attempt=attempt, progress=self._progress(key, pods, attempt))
        if derived.escalate:
            return await self._escalate(key, body, spec, attempt)
        retry = derived.requeue or (manifest is not None and manifest.verified is None)
        return await self._apply(key, body, derived, plan=plan,
                                 retry=self._recheck_delay(key, current) if retry else None)

    def _owned_jobs(self, key: Key, uid: str) -> dict[int, Obj]:
        """This LoRAJob's trainer Jobs by attempt (the watch's copies and our own writes).
        Only a Job whose controller is this LoRAJob's uid counts, and the highest attempt
        among them is the current one: `status.attempts` may lag the Jobs after a crash."""
        seen = self.view.jobs(key)
        written = self._jobs_written.get(key, {})
        out: dict[int, Obj] = {}
        for name in set(seen) | set(written):
            obj = _fresher(seen.get(name), written, name)
            if obj is None or not uid or controller_uid(dict(obj)) != uid:
                continue
            n = attempt_of(obj)
            if n >= 1 and name == names.job_name(key[1], n):
                out[n] = obj
        return out

    def _progress(self, key: Key, pods: list[Obj], attempt: int) -> Obj | None:
        """The newest progress the running trainer of this attempt printed, as read so far
        (None when nothing was read); starts or stops reading its log."""
        pod = next((p for p in pods if attempt_of(p) == attempt and "running" in trainer_state(p)
                    and (p.get("status") or {}).get("phase") == "Running"), None)
        if pod is None:
            self.progress.unwatch(key)
            return None
        self.progress.watch(key, (pod.get("metadata") or {}).get("name") or "")
        return self.progress.latest(key)

    async def _read_tail(self, key: Key, pod: str) -> str:
        return await self._io(self.kube.read_log, key[0], pod, job.CONTAINER,
                              progress_reader.TAIL_LINES, progress_reader.TAIL_BYTES)

    def _recheck_delay(self, key: Key, current: Obj | None) -> float:
        """Backoff for looking at storage / the pod again, never past the verification
        deadline (so ManifestUnverified is decided when it is due)."""
        delay = self._rechecks.next(key)
        done = parse_time(((current or {}).get("status") or {}).get("completionTime"))
        if done is not None:
            due = done + dt.timedelta(seconds=self.settings.manifest_verify_timeout_seconds)
            left = (due - dt.datetime.now(dt.UTC)).total_seconds() + 1.0
            delay = min(delay, max(1.0, left))
        return delay

    async def _stop_jobs(self, key: Key, body: Obj) -> None:
        """Delete every unfinished Job of this LoRAJob (its pods go with it, in the
        background): a Failed job must not keep a GPU. Finished Jobs stay for their logs."""
        uid = (body.get("metadata") or {}).get("uid") or ""
        for obj in self._owned_jobs(key, uid).values():
            if _finished(obj):
                continue
            meta = obj.get("metadata") or {}
            name = meta.get("name") or ""
            if await self._io(self.kube.delete_job, key[0], name, meta.get("uid") or ""):
                metrics.JOBS_STOPPED.inc()
                log.info("deleted Job %s/%s: its LoRAJob failed", key[0], name)
            self._jobs_written.get(key, {}).pop(name, None)

    async def _apply(self, key: Key, body: Obj, derived: Derived, retry: float | None = None,
                     plan: _Plan | None = None) -> bool:
        patch, events = derived.patch, derived.events
        if plan is not None:
            patch, events = plan.merged_with(patch), [plan.event, *events]
        elif patch and (wait := self._brief_wait(key, derived.brief)) is not None:
            # A brief step: written only if it still holds an interval after it began.
            patch = {}
            retry = wait if retry is None else min(retry, wait)
        if patch:
            out = await self._patch(key, body, patch)
            if out is None:
                return await self._refresh(key) is not None
            self._emit(out, events)
            body = out
        if retry is not None:  # storage or the pod's state not there yet: look again later
            self.requeue(key, retry)
        else:
            self._rechecks.reset(key)
        if derived.phase == api.Phase.FAILED:
            await self._stop_jobs(key, body)
        if derived.phase.finished:
            self.schedule_ttl(key, body)
        return False

    def _brief_wait(self, key: Key, brief: str) -> float | None:
        """Seconds left until the brief step `brief` (a reason; "" when the state is not
        brief) has held for a progress interval, or None when it is due to be written.
        Counted from when it was first seen, not from the last write, so a reconcile that
        comes late (a deep queue) does not make a passing step look lasting."""
        if not brief:
            self._brief.pop(key, None)
            return None
        now = time.monotonic()
        seen = self._brief.get(key)
        if seen is None or seen[0] != brief:
            self._brief[key] = (brief, now)
            return self.settings.progress_interval_seconds
        left = self.settings.progress_interval_seconds - (now - seen[1])
        return left if left > 0 else None

    async def _fail(self, key: Key, body: Obj, reason: str, message: str,
                    planning: bool = False) -> bool:
        out = await self._patch(key, body, failed_patch(body, reason, message, planning=planning))
        if out is None:
            return await self._refresh(key) is not None
        self._emit(out, [Event("Warning", reason, message)])
        await self._stop_jobs(key, out)
        self.schedule_ttl(key, out)
        return False

    async def _plan_only(self, key: Key, body: Obj, spec: api.LoRAJobSpec,
                         attempt: int) -> _Plan | None:
        """Plan a new LoRAJob; None when it failed (already written: it fits nowhere)."""
        outcome = await self._io(self._planner(attempt), spec, self.settings, attempt - 1)
        if outcome.placement is None:
            if outcome.retryable:
                raise RetryLater(f"planning: {outcome.message}")
            await self._fail(key, body, outcome.reason, outcome.message, planning=True)
            return None
        self._remember(key, body, attempt, outcome.placement)
        patch = planned_patch(body, outcome.placement, attempts=attempt)
        note = f" ({outcome.message})" if outcome.message else ""
        return _Plan(patch, Event("Normal", "Planned", f"{plan_message(outcome.placement)}{note}"))

    async def _plan(self, key: Key, body: Obj, spec: api.LoRAJobSpec, attempt: int = 1) -> bool:
        """Plan and write the placement at once (before a dataset preflight)."""
        plan = await self._plan_only(key, body, spec, attempt)
        if plan is None:
            return False
        out = await self._patch(key, body, plan.patch)
        if out is None:
            return await self._refresh(key) is not None
        self._emit(out, [plan.event])
        return True  # go on (preflight, then the Job) in the same reconcile

    @staticmethod
    def _planner(attempt: int) -> Callable[[api.LoRAJobSpec, Settings, int],
                                           planning.PlanOutcome]:
        """Attempt 1 is planned from scratch; attempt n is n-1 escalations up from it."""
        if attempt > 1:
            return planning.escalate
        return lambda spec, settings, _failed: planning.plan(spec, settings)

    def _remember(self, key: Key, body: Obj, attempt: int, placement: api.Placement) -> None:
        uid = (body.get("metadata") or {}).get("uid") or ""
        self._placements[key] = (uid, attempt, placement)

    async def _placement(self, key: Key, body: Obj, spec: api.LoRAJobSpec,
                         attempt: int) -> api.Placement | None:
        """The placement the operator planned for this attempt: from memory, else planned
        again (deterministic: the same spec and settings give the same placement), never
        read back from status.placement, which a lost status patch can leave behind."""
        uid = (body.get("metadata") or {}).get("uid") or ""
        kept = self._placements.get(key)
        if kept is not None and kept[:2] == (uid, attempt):
            return kept[2]
        outcome = await self._io(self._planner(attempt), spec, self.settings, attempt - 1)
        if outcome.placement is None:
            if outcome.retryable:
                raise RetryLater(f"planning attempt {attempt}: {outcome.message}")
            await self._fail(key, body, outcome.reason, outcome.message)
            return None
        self._remember(key, body, attempt, outcome.placement)
        return outcome.placement

    async def _escalate(self, key: Key, body: Obj, spec: api.LoRAJobSpec, attempt: int) -> bool:
        outcome = await self._io(planning.escalate, spec, self.settings, attempt)
        if outcome.placement is None:
            if outcome.retryable:
                raise RetryLater(f"re-planning after out-of-memory: {outcome.message}")
            return await self._fail(key, body, "OutOfMemory", outcome.message)
        old = (body.get("status") or {}).get("placement") or {}
        msg = (f"attempt {attempt} ran out of GPU memory on {old.get('vramClass')} "
               f"({old.get('method')}); attempt {attempt + 1}: "
               f"{outcome.placement.method} on {outcome.placement.vram_class} × "
               f"{outcome.placement.gpus} GPU")
        self._remember(key, body, attempt + 1, outcome.placement)
        out = await self._patch(key, body, planned_patch(body, outcome.placement,
                                                         attempts=attempt + 1, message=msg))
        if out is None:
            return await self._refresh(key) is not None
        metrics.ESCALATIONS.inc()
        self._emit(out, [Event("Warning", "OutOfMemory", msg)])
        # The next attempt's Job now, not on the next pass: the attempt is counted from
        # the Jobs that exist (a crash before this line escalates again, to the same place).
        try:
            await self._start_attempt(key, out, spec, names.Owner.from_body(out), attempt + 1)
        except NameConflictError as exc:
            return await self._fail(key, out, "NameConflict", str(exc))
        except ChildRejectedError as exc:
            return await self._fail(key, out, "ChildRejected", str(exc))
        return True

    # ------------------------------------------------------------------ children

    def _deadline(self, body: Obj, spec: api.LoRAJobSpec, attempt: int) -> int | None:
        """activeDeadlineSeconds of this attempt: what is left of the job's deadline."""
        deadline = spec.run_policy.active_deadline_seconds
        if deadline is None or attempt == 1:
            return deadline
        created = parse_time((body.get("metadata") or {}).get("creationTimestamp"))
        if created is None:
            return deadline
        spent = int((dt.datetime.now(dt.UTC) - created).total_seconds())
        return max(1, deadline - spent)

    async def _start_attempt(self, key: Key, body: Obj, spec: api.LoRAJobSpec,
                             owner: names.Owner, attempt: int) -> Obj | None:
        placement = await self._placement(key, body, spec, attempt)
        if placement is None:
            return None
        vram_class = planning.vram_class_for(placement, self.settings)
        inputs = job.JobInputs(
            attempt=attempt, placement=placement, vram_class=vram_class,
            spec_hash=job.spec_hash(dict(body.get("spec") or {})),
            suspend=spec.run_policy.suspend or owner.queue_name is not None,
            backoff_limit=max(0, spec.run_policy.backoff_limit - (attempt - 1)),
            active_deadline_seconds=self._deadline(body, spec, attempt))
        manifest = job.build_job(owner, spec, inputs, self.settings)
        # Already there (restart, or a racing replica) and ours: adopted as it is.
        created, new = await self._io(self.kube.create, manifest)
        if new:
            metrics.JOBS_CREATED.inc()
            log.info("created Job %s/%s (attempt %d)", owner.namespace,
                     manifest["metadata"]["name"], attempt)
        _remember(self._jobs_written.setdefault(key, {}), manifest["metadata"]["name"], created)
        return created

    async def _sync_suspend(self, key: Key, owner: names.Owner, current: Obj,
                            spec: api.LoRAJobSpec) -> Obj:
        """runPolicy.suspend → Job.spec.suspend; a Kueue job is only ever suspended here,
        never unsuspended (admission is Kueue's decision)."""
        conditions = (current.get("status") or {}).get("conditions") or []
        if any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in conditions):
            return current
        want = spec.run_policy.suspend
        is_suspended = bool((current.get("spec") or {}).get("suspend"))
        if want == is_suspended or (not want and owner.queue_name):
            return current
        name = (current.get("metadata") or {}).get("name") or ""
        updated = await self._io(self.kube.set_job_suspend, owner.namespace, name, want)
        _remember(self._jobs_written.setdefault(key, {}), name, updated)
        return updated

    async def _manifest(self, key: Key, body: Obj, spec: api.LoRAJobSpec, current: Obj | None,
                        pods: list[Obj], attempt: int) -> ManifestCheck | None:
        """Check the adapter's manifest once the trainer succeeded (cached per attempt): its
        pod Succeeded, or its Job says so (`SuccessCriteriaMet`, Kubernetes 1.31+, comes
        before `Complete`), as `verdicts` read them."""
        conditions = ((current or {}).get("status") or {}).get("conditions") or []
        done = any(c.get("type") in ("Complete", "SuccessCriteriaMet") and c.get("status") == "True"
                   for c in conditions)
        if not done and not any(attempt_of(p) == attempt and
                                (p.get("status") or {}).get("phase") == "Succeeded" for p in pods):
            return None
        uid = (body.get("metadata") or {}).get("uid") or ""
        cached = self._manifests.get((uid, attempt))
        if cached is not None:
            return cached
        result = None
        for pod in pods:
            if attempt_of(pod) == attempt and (pod.get("status") or {}).get("phase") == "Succeeded":
                term = trainer_state(pod).get("terminated") or {}
                result = parse_result(term.get("message"))[0] or result
        check = await self._io(manifests.check, spec, result, uid, self.settings)
        if check.verified is not None:
            self._manifests[(uid, attempt)] = check
        return check

    # ------------------------------------------------------------------ timers

    def requeue(self, key: Key, delay: float) -> None:
        """Reconcile again after `delay` seconds (replacing an earlier retry of the key)."""
        self.queue.add_after(key, delay)

    def schedule_ttl(self, key: Key, body: Obj) -> None:
        """One timer per finished LoRAJob, firing when its TTL ends: no polling at all, so
        thousands of finished jobs cost nothing while they wait."""
        self._brief.pop(key, None)
        due = ttl_deadline(body)
        if due is None:
            return
        delay = (due - dt.datetime.now(dt.UTC)).total_seconds()
        old = self._timers.pop(key, None)
        if old:
            old.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(
            max(0.0, delay), lambda: asyncio.ensure_future(self._expire(key)))

    async def _expire(self, key: Key) -> None:
        self._timers.pop(key, None)
        body = self._lorajob(key)
        if body is None:
            return
        uid = (body.get("metadata") or {}).get("uid") or ""
        due = ttl_deadline(body)
        if due is None:
            return
        if due > dt.datetime.now(dt.UTC):
            self.schedule_ttl(key, body)
            return
        if await self._io(self.kube.delete_lorajob, key[0], key[1], uid):
            metrics.TTL_DELETIONS.inc()
            log.info("deleted %s/%s: ttlSecondsAfterFinished passed", *key)

"""kopf handlers: thin adapters from watch events to the controller's work queue.

Why `on.event` + indexes rather than `on.create/update/resume/delete`: the controller is
level-triggered (it derives everything from the current objects), so it needs every event
of a LoRAJob and of its Jobs and pods, not kopf's per-change bookkeeping. That also means
kopf writes nothing into our objects: no last-handled-configuration annotation, no progress
annotations, no finalizer (children are removed by the garbage collector through their
ownerReferences, so deletion needs no handler to block on).

Every handler only marks the LoRAJob's key dirty (`Controller.enqueue`); the queue's
workers reconcile it (workqueue.py), so a handler returns at once and a burst of events for
one job costs one reconcile. Events that only echo the operator's own write (a status
patch, a Job it created) are recognised by resourceVersion and dropped.

- create / resume: the first event of a LoRAJob (or the initial listing after a restart)
  queues it ahead of the rest while it has no status: plan, build, create.
- update: every later event queues it again; runPolicy edits (suspend, TTL) act at once,
  and an edit of an immutable field that slipped past the CRD's CEL rules is reported as
  the SpecChangeRejected condition and a Warning Event (the running trainer is untouched).
- delete: DELETED drops caches and timers.
- Job and Pod events (selected by the `lorajob.dev/job-name` label) queue their owner.

The indexes hold the watched objects in memory; kopf runs no handler until every index is
filled after a start, so a restarted operator never mistakes "not listed yet" for "missing".
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from lora_operator import api, metrics
from lora_operator.build import names
from lora_operator.reconcile import projection
from lora_operator.reconcile.controller import Controller, Key, Obj
from lora_operator.reconcile.status import Event

log = logging.getLogger("lora_operator.handlers")
CHILD_LABELS: dict[str, Any] = {names.MANAGED_BY_LABEL: names.MANAGED_BY, names.JOB_NAME_LABEL: kopf.PRESENT}

_controller: Controller | None = None
_instance: str | None = None  # see names.INSTANCE_LABEL


class KopfView:
    """The controller's View over kopf's in-memory indexes."""

    def __init__(self) -> None:
        self._lorajobs: Mapping[Any, Any] = {}
        self._jobs: Mapping[Any, Any] = {}
        self._pods: Mapping[Any, Any] = {}

    def attach(self, lorajobs: Mapping[Any, Any], jobs: Mapping[Any, Any],
               pods: Mapping[Any, Any]) -> None:
        self._lorajobs, self._jobs, self._pods = lorajobs, jobs, pods

    def lorajob(self, key: Key) -> Obj | None:
        store = self._lorajobs.get(key)
        return next(iter(store), None) if store else None

    def jobs(self, key: Key) -> dict[str, Obj]:
        return {o["metadata"]["name"]: o for o in self._jobs.get(key) or ()}

    def pods(self, key: Key) -> list[Obj]:
        return list(self._pods.get(key) or ())


VIEW = KopfView()


def install(controller: Controller, instance: str | None = None) -> None:
    """Make `controller` the one the handlers call (the runner does this before start);
    `instance` limits this operator to LoRAJobs labelled with it (names.INSTANCE_LABEL)."""
    global _controller, _instance
    _controller = controller
    _instance = instance or None
    controller.view = VIEW
    controller.post_event = post_event


def post_event(body: Obj, event: Event) -> None:
    """A Kubernetes Event on the LoRAJob (kopf posts it in the background)."""
    kopf.event(kopf.Body(dict(body)), type=event.type, reason=event.reason, message=event.message[:1024])


def _ctl(kwargs: Mapping[str, Any]) -> Controller:
    if _controller is None:
        raise kopf.PermanentError("the controller is not installed (start via run_operator)")
    VIEW.attach(kwargs["lorajob_index"], kwargs["job_index"], kwargs["pod_index"])
    return _controller


def _snapshot(body: Any) -> dict[str, Any]:
    """A private copy of a watched object (kopf reuses its body views), trimmed as the watch
    decoder trims it (projection.py). The indexes hold every LoRAJob, Job and pod for the
    operator's life; trimming here as well keeps them small when an object reached kopf
    some other way."""
    return projection.project(copy.deepcopy(dict(body)))


# --------------------------------------------------------------------------- indexes
# Handlers take **kwargs only: kopf passes many named arguments and checks the signature.
# They are coroutines, though they never await: kopf runs a plain function in its thread
# pool, and a thread hop per watch event was a measurable share of a burst's CPU.


def mine(**kw: Any) -> bool:
    """Whether this operator instance handles the object (by its instance label)."""
    return (kw["labels"].get(names.INSTANCE_LABEL) or None) == _instance


def _owner_key(kw: Mapping[str, Any]) -> Key:
    return (kw["namespace"], kw["labels"][names.JOB_NAME_LABEL])


@kopf.index(api.GROUP, api.VERSION, api.PLURAL, when=mine)
async def lorajob_index(**kw: Any) -> dict[Key, Obj]:
    key = (kw["namespace"], kw["name"])
    metrics.observe_phase(key, (kw["body"].get("status") or {}).get("phase") or "Pending")
    return {key: _snapshot(kw["body"])}


@kopf.index("batch", "v1", "jobs", labels=CHILD_LABELS, when=mine)
async def job_index(**kw: Any) -> dict[Key, Obj]:
    return {_owner_key(kw): _snapshot(kw["body"])}


@kopf.index("", "v1", "pods", labels=CHILD_LABELS, when=mine)
async def pod_index(**kw: Any) -> dict[Key, Obj]:
    return {_owner_key(kw): _snapshot(kw["body"])}


# --------------------------------------------------------------------------- events


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, when=mine)
async def lorajob_event(**kw: Any) -> None:
    ctl, key = _ctl(kw), (kw["namespace"], kw["name"])
    if kw["event"].get("type") == "DELETED":
        ctl.forget(key)
    elif not ctl.is_echo(key, kw["body"]):
        ctl.enqueue(key, first=not (kw["body"].get("status") or {}).get("phase"))


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS, when=mine)
async def job_event(**kw: Any) -> None:
    ctl, key = _ctl(kw), _owner_key(kw)
    if not ctl.is_job_echo(key, kw["body"]):
        ctl.enqueue(key)


@kopf.on.event("", "v1", "pods", labels=CHILD_LABELS, when=mine)
async def pod_event(**kw: Any) -> None:
    _ctl(kw).enqueue(_owner_key(kw))


@kopf.on.probe(id="lorajobs")
def probe_lorajobs(**_: Any) -> int:
    """Liveness detail: how many LoRAJobs this replica is tracking."""
    return sum(1 for _ in VIEW._lorajobs)


@kopf.on.startup()
def configure(**kw: Any) -> None:
    """kopf settings from the operator's Settings (see runner.configure_kopf)."""
    settings = kw["settings"]
    from lora_operator.reconcile.runner import configure_kopf

    if _controller is None:
        raise kopf.PermanentError("the controller is not installed (start via run_operator)")
    configure_kopf(settings, _controller.settings)
    metrics.freeze_after_startup()
    log.info("lora-operator started: %d VRAM classes, trainer image %s",
             len(_controller.settings.vram_classes), _controller.settings.trainer_image)

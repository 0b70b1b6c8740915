"""The controller's reconcile flow against an in-memory API (no cluster): planning writes
status before any child exists, the Job is created once by name (409 = adopt), suspend
and Kueue rules, out-of-memory escalation, conflicts, TTL, progress read from the trainer's
log and brief steps held back for a progress interval."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from typing import Any

import pytest

from lora_operator import api, metrics
from lora_operator.build import names
from lora_operator.reconcile import controller as ctl_mod
from lora_operator.reconcile import planning, progress_reader
from lora_operator.reconcile.controller import (
    Controller,
    DictView,
)
from lora_operator.reconcile.kube import (
    ApiError,
    ChildRejectedError,
    NameConflictError,
    controller_uid,
)
from lora_operator.reconcile.manifest import CREDENTIAL_ENV
from lora_operator.reconcile.status import Event
from lora_operator.settings import load_settings

SETTINGS = load_settings()
KEY = ("ml", "bot")
INTERVAL = SETTINGS.progress_interval_seconds


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


class FakeKube:
    """The Kube surface the controller uses, over dicts, recording calls."""

    def __init__(self, lorajob: dict[str, Any]) -> None:
        self.lorajob = lorajob
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.conflicts = 0  # fail this many status patches with 409
        self.rejected: dict[tuple[str, str], str] = {}  # creates the server refuses
        self.log: str | Exception = ""  # what reading the trainer's log gives (or raises)
        self.log_reads: list[tuple[str, str, str, int, int]] = []
        self.rv = 1

    def create(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        key = (body["kind"], body["metadata"]["name"])
        self.calls.append(("create", f"{key[0]}/{key[1]}"))
        if key in self.rejected:
            raise ChildRejectedError(key[0], key[1], 403, self.rejected[key])
        if key in self.objects:
            existing = self.objects[key]
            if controller_uid(existing) != controller_uid(body):
                raise NameConflictError(key[0], "ml", key[1], "someone else's")
            return copy.deepcopy(existing), False
        self.objects[key] = copy.deepcopy(body)
        return copy.deepcopy(body), True

    def delete_job(self, namespace: str, name: str, uid: str) -> bool:
        self.calls.append(("delete-job", name))
        return self.objects.pop(("Job", name), None) is not None

    def read_log(self, namespace: str, pod: str, container: str, tail_lines: int,
                 limit_bytes: int) -> str:
        self.calls.append(("log", pod))
        self.log_reads.append((namespace, pod, container, tail_lines, limit_bytes))
        if isinstance(self.log, Exception):
            raise self.log
        return self.log

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get(("Job", name)))

    def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> dict[str, Any]:
        self.calls.append(("suspend", f"{name}={suspend}"))
        self.objects[("Job", name)]["spec"]["suspend"] = suspend
        return copy.deepcopy(self.objects[("Job", name)])

    def read_lorajob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.lorajob)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any],
                     resource_version: str | None = None) -> dict[str, Any] | None:
        self.calls.append(("status", str(status.get("phase"))))
        if self.conflicts:
            self.conflicts -= 1
            self.rv += 1
            self.lorajob["metadata"]["resourceVersion"] = str(self.rv)
            return None
        self.lorajob.setdefault("status", {})
        merge(self.lorajob["status"], status)
        self.rv += 1
        self.lorajob["metadata"]["resourceVersion"] = str(self.rv)
        return copy.deepcopy(self.lorajob)

    def delete_lorajob(self, namespace: str, name: str, uid: str) -> bool:
        self.calls.append(("delete", name))
        return True

    def jobs(self) -> dict[str, Any]:
        return {n: o for (k, n), o in self.objects.items() if k == "Job"}


def new_lorajob(**meta: Any) -> dict[str, Any]:
    return {"apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRAJob",
            "metadata": {"name": "bot", "namespace": "ml", "uid": "u-1", "generation": 1,
                         "resourceVersion": "1", "creationTimestamp": "2025-01-01T00:00:00Z",
                         **meta},
            "spec": {"baseModel": {"uri": "hf://org/model"},
                     # The dataset preflight stage has tests of its own.
                     "dataset": {"uri": "s3://data/train.jsonl", "preflight": {"enabled": False}},
                     "output": {"uri": "s3://out/bot/"}, "method": "auto"}}


PLACED = planning.PlanOutcome(
    api.Placement(method="lora", vram_class="l4-24gb", gpus=1, deepspeed="none",
                  estimated_vram_gib=17.0), SETTINGS.vram_class("l4-24gb"))
UP = planning.PlanOutcome(
    api.Placement(method="lora", vram_class="a100-40gb", gpus=1, deepspeed="none"),
    SETTINGS.vram_class("a100-40gb"))


@pytest.fixture(autouse=True)
def fake_planner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planning, "plan", lambda spec, settings: PLACED)
    monkeypatch.setattr(planning, "escalate", lambda spec, settings, n: UP)


def make(lorajob: dict[str, Any]) -> tuple[Controller, FakeKube, DictView, list[Event]]:
    kube = FakeKube(lorajob)
    view = DictView()
    view.lorajobs[KEY] = lorajob
    events: list[Event] = []
    ctl = Controller(SETTINGS, kube, post_event=lambda body, ev: events.append(ev),  # type: ignore[arg-type]
                     view=view)
    return ctl, kube, view, events


def reconcile(ctl: Controller) -> None:
    async def go() -> None:
        await ctl.reconcile(*KEY)
    asyncio.run(go())


def test_first_reconcile_creates_the_job_then_writes_status_once() -> None:
    ctl, kube, _, events = make(new_lorajob())
    reconcile(ctl)
    st = kube.lorajob["status"]
    assert st["placement"]["vramClass"] == "l4-24gb" and st["attempts"] == 1
    # The Job is the only child: no ServiceAccount, Role, RoleBinding or ConfigMap (the
    # trainer's config rides in its pod template, and the trainer holds no API identity).
    assert [c for c in kube.calls if c[0] == "create"] == [("create", "Job/bot-a1")]
    assert list(kube.objects) == [("Job", "bot-a1")]
    # Two writes on the way to the Job: the Job, then one status patch with the placement
    # and the phase the Job's state gives (not a Pending write before the Job).
    writes = [c for c in kube.calls if c[0] == "status"]
    assert writes == [("status", "Scheduling")]
    assert kube.calls.index(writes[0]) > kube.calls.index(("create", "Job/bot-a1"))
    assert kube.jobs()["bot-a1"]["spec"]["suspend"] is False
    assert "Planned" in {c["type"] for c in st["conditions"]}
    assert events == []  # the way to the Job needs no attention: no Event write


def test_a_crash_between_job_and_status_replans_to_the_same_job() -> None:
    ctl, kube, _, _ = make(new_lorajob())
    kube.conflicts = 5  # every status write refused: as if the operator died after the Job
    reconcile(ctl)
    assert "placement" not in (kube.lorajob.get("status") or {})
    kube.conflicts = 0
    ctl2, kube2, _, _ = make(kube.lorajob)
    kube2.objects = kube.objects  # the Job is there; the new operator has not seen it yet
    reconcile(ctl2)
    assert list(kube2.jobs()) == ["bot-a1"]  # adopted, not duplicated
    assert kube2.lorajob["status"]["placement"]["vramClass"] == "l4-24gb"


def test_existing_job_is_adopted_not_duplicated() -> None:
    ctl, kube, _, _ = make(new_lorajob())
    reconcile(ctl)
    first = copy.deepcopy(kube.jobs()["bot-a1"])
    # A restarted operator whose cache has not seen the Job yet: create → 409 → adopt.
    ctl2 = Controller(SETTINGS, kube, view=ctl.view)
    reconcile(ctl2)
    assert kube.jobs() == {"bot-a1": first}


def test_plan_failure_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planning, "plan", lambda spec, settings: planning.PlanOutcome(
        None, reason="InsufficientGPUMemory", message="needs 300 GiB: weights 280.0"))
    ctl, kube, _, events = make(new_lorajob())
    reconcile(ctl)
    st = kube.lorajob["status"]
    assert st["phase"] == "Failed" and "weights" in st["message"]
    assert kube.jobs() == {}
    assert events[0].type == "Warning"


def test_invalid_spec_and_local_uris_fail() -> None:
    lj = new_lorajob()
    lj["spec"]["lora"] = {"r": 0}
    ctl, kube, _, _ = make(lj)
    reconcile(ctl)
    assert kube.lorajob["status"]["phase"] == "Failed"
    assert "spec.lora.r" in kube.lorajob["status"]["message"]
    lj = new_lorajob()
    lj["spec"]["dataset"]["uri"] = "file:///data/train.jsonl"
    ctl, kube, _, _ = make(lj)
    reconcile(ctl)
    assert "allowLocalUris" in kube.lorajob["status"]["message"]


def test_suspend_and_kueue_rules() -> None:
    ctl, kube, view, _ = make(new_lorajob())
    reconcile(ctl)
    kube.lorajob["spec"]["runPolicy"] = {"suspend": True}
    view.lorajobs[KEY] = copy.deepcopy(kube.lorajob)
    reconcile(ctl)
    assert ("suspend", "bot-a1=True") in kube.calls
    assert kube.lorajob["status"]["phase"] == "Suspended"

    queued = new_lorajob(labels={names.KUEUE_QUEUE_LABEL: "team-a"})
    ctl, kube, _, _ = make(queued)
    reconcile(ctl)
    job = kube.jobs()["bot-a1"]
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == "team-a"
    reconcile(ctl)
    assert not [c for c in kube.calls if c[0] == "suspend"]  # never admitted by us
    assert kube.lorajob["status"]["phase"] == "Queued"


def test_out_of_memory_starts_next_attempt_on_bigger_class() -> None:
    ctl, kube, view, events = make(new_lorajob())
    reconcile(ctl)
    job = kube.jobs()["bot-a1"]
    job["status"] = {"conditions": [{"type": "Failed", "status": "True",
                                     "reason": "PodFailurePolicy"}]}
    view.job_map[KEY] = {"bot-a1": job}
    view.pod_map[KEY] = {"p": {
        "metadata": {"name": "p", "labels": {names.ATTEMPT_LABEL: "1"}},
        "spec": {"nodeName": "gpu-l4-0"},
        "status": {"phase": "Failed", "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"exitCode": 42}}}]}}}
    view.lorajobs[KEY] = copy.deepcopy(kube.lorajob)
    reconcile(ctl)
    st = kube.lorajob["status"]
    assert st["attempts"] == 2 and st["placement"]["vramClass"] == "a100-40gb"
    assert "bot-a2" in kube.jobs()
    assert kube.jobs()["bot-a2"]["spec"]["backoffLimit"] == 1  # budget shrinks per attempt
    assert "OutOfMemory" in [e.reason for e in events]


def test_conflict_rereads_and_retries() -> None:
    ctl, kube, _, _ = make(new_lorajob())
    kube.conflicts = 1
    reconcile(ctl)
    assert kube.lorajob["status"]["placement"]["vramClass"] == "l4-24gb"
    assert len(kube.jobs()) == 1


def test_expired_ttl_deletes(monkeypatch: pytest.MonkeyPatch) -> None:
    lj = new_lorajob()
    lj["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 0}
    lj["status"] = {"phase": "Succeeded", "completionTime": api.now_rfc3339()}
    ctl, kube, _, _ = make(lj)

    async def go() -> None:
        await ctl.reconcile(*KEY)
        await asyncio.sleep(0.05)
    asyncio.run(go())
    assert ("delete", "bot") in kube.calls


def test_deadline_of_later_attempts_is_what_is_left() -> None:
    ctl, _, _, _ = make(new_lorajob())
    spec = api.parse_spec(new_lorajob()["spec"])
    created = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1000)
    body = {"metadata": {"creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ")}}
    assert ctl._deadline(body, spec, 1) == 86400
    left = ctl._deadline(body, spec, 2)
    assert left is not None and 85390 <= left <= 85400


def test_local_uri_problem_allowed_by_settings() -> None:
    spec = api.parse_spec({**new_lorajob()["spec"], "output": {"uri": "file:///tmp/out"}})
    assert ctl_mod.local_uri_problem(spec, SETTINGS)
    allowed = SETTINGS.model_copy(update={"allow_local_uris": True})
    assert ctl_mod.local_uri_problem(spec, allowed) is None


def test_own_writes_bridge_the_watch_only_until_it_catches_up() -> None:
    """Our status patch response is used while the watch still shows the older object, and
    dropped once the watch delivers it (no second copy of every finished LoRAJob and Job)."""
    ctl, kube, view, _ = make(new_lorajob())
    view.lorajobs[KEY] = copy.deepcopy(kube.lorajob)  # the watch lags: it still shows rv 1
    reconcile(ctl)
    assert KEY in ctl._written and ctl._jobs_written[KEY]
    assert ctl._lorajob(KEY)["status"]["attempts"] == 1  # type: ignore[index]  # ours, newer
    view.lorajobs[KEY] = copy.deepcopy(kube.lorajob)  # the watch caught up
    view.job_map[KEY] = {name: {**job, "metadata": {**job["metadata"], "resourceVersion": "99"}}
                         for name, job in kube.jobs().items()}
    assert ctl._lorajob(KEY) is view.lorajobs[KEY]
    assert ctl._job(KEY, 1) is view.job_map[KEY]["bot-a1"]
    assert KEY not in ctl._written and not ctl._jobs_written.get(KEY)


def test_the_echo_of_our_own_write_is_skipped_and_drops_the_bridge_copy() -> None:
    """kopf indexes an event before its handlers run, so when our write comes back through
    the watch the index holds it: our copy goes (a finished job's last status write is not
    held twice), and the copies kept until then are trimmed as the watch trims."""
    ctl, kube, view, _ = make(new_lorajob())
    view.lorajobs[KEY] = copy.deepcopy(kube.lorajob)  # the watch lags: it still shows rv 1
    reconcile(ctl)
    job = ctl._jobs_written[KEY]["bot-a1"]
    assert "template" in kube.jobs()["bot-a1"]["spec"] and "template" not in job["spec"]
    assert not ctl.is_echo(KEY, view.lorajobs[KEY]) and KEY in ctl._written  # older: no echo
    assert ctl.is_echo(KEY, copy.deepcopy(kube.lorajob))
    assert KEY not in ctl._written
    assert ctl.is_job_echo(KEY, copy.deepcopy(kube.jobs()["bot-a1"]))
    assert not ctl._jobs_written[KEY]


# ------------------------------------------------------------------ issue 13 (items 2-6)


def running(ctl: Controller, kube: FakeKube, view: DictView) -> dict[str, Any]:
    """Reconcile a new job to its first Job and feed that Job back through the watch."""
    reconcile(ctl)
    view.job_map[KEY] = copy.deepcopy(kube.jobs())
    view.lorajobs[KEY] = copy.deepcopy(kube.lorajob)
    return kube.jobs()["bot-a1"]


def test_failed_for_any_reason_deletes_the_running_job() -> None:
    """Item 4: a job that turns Failed (here: settings no longer allow its file:// dataset)
    has its unfinished Job deleted; re-running the reconcile on a Failed job does it too."""
    lj = new_lorajob()
    lj["spec"]["dataset"]["uri"] = "file:///data/train.jsonl"
    allowed = SETTINGS.model_copy(update={"allow_local_uris": True})
    kube = FakeKube(lj)
    view = DictView()
    view.lorajobs[KEY] = lj
    running(Controller(allowed, kube, view=view), kube, view)
    assert "bot-a1" in kube.jobs()
    reconcile(Controller(SETTINGS, kube, view=view))  # restarted with stricter settings
    assert kube.lorajob["status"]["phase"] == "Failed"
    assert ("delete-job", "bot-a1") in kube.calls and kube.jobs() == {}


def test_finished_job_is_not_deleted_when_the_lorajob_fails() -> None:
    ctl, kube, view, _ = make(new_lorajob())
    job = running(ctl, kube, view)
    job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "X"}]}
    view.job_map[KEY] = {"bot-a1": job}
    view.lorajobs[KEY]["status"]["phase"] = "Failed"
    reconcile(ctl)
    assert not [c for c in kube.calls if c[0] == "delete-job"]  # its pod's logs stay


def test_foreign_object_with_a_child_name_is_not_adopted() -> None:
    """Item 3: a Job of the same name that this LoRAJob does not control → Failed
    NameConflict naming it; the foreign Job is neither modified nor deleted."""
    ctl, kube, _, _ = make(new_lorajob())
    foreign = {"kind": "Job", "metadata": {"name": "bot-a1", "namespace": "ml"},
               "spec": {"suspend": False, "parallelism": 1}}
    kube.objects[("Job", "bot-a1")] = copy.deepcopy(foreign)
    reconcile(ctl)
    st = kube.lorajob["status"]
    assert st["phase"] == "Failed" and st["conditions"][-1]["reason"] == "NameConflict"
    assert "Job ml/bot-a1" in st["message"]
    assert kube.objects == {("Job", "bot-a1"): foreign}
    assert not [c for c in kube.calls if c[0] == "delete-job"]


def test_rejected_child_fails_with_the_servers_message() -> None:
    """Item 5: a create refused for good (quota, webhook, invalid) ends the job."""
    ctl, kube, _, events = make(new_lorajob())
    kube.rejected[("Job", "bot-a1")] = 'jobs.batch "bot-a1" is forbidden: exceeded quota'
    reconcile(ctl)
    st = kube.lorajob["status"]
    assert st["phase"] == "Failed" and "exceeded quota" in st["message"]
    assert [e.reason for e in events][-1] == "ChildRejected"


def test_errors_back_off_exponentially_and_reset_on_success() -> None:
    """Item 5: a reconcile that raises is retried after 1, 2, 4 ... s, not every 15 s."""
    ctl, kube, _, _ = make(new_lorajob())
    delays: list[float] = []
    ctl.requeue = lambda key, delay: delays.append(delay)  # type: ignore[method-assign]
    kube.patch_status = lambda *a, **k: (_ for _ in ()).throw(  # type: ignore[method-assign]
        RuntimeError("API server down"))
    for _ in range(4):
        reconcile(ctl)
    assert delays == [1.0, 2.0, 4.0, 8.0]
    del kube.patch_status
    reconcile(ctl)
    assert ctl._errors.failures(KEY) == 0


def test_a_status_that_disagrees_with_the_jobs_decides_nothing(clock: Clock) -> None:
    """Item 6: a status may lag the Jobs (a patch lost to a crash) or be edited by hand:
    its attempts and placement neither make a new Job nor change the one the operator
    builds (the attempt is counted from the Jobs, the placement planned)."""
    ctl, kube, view, _ = make(new_lorajob())
    running(ctl, kube, view)
    edited = copy.deepcopy(kube.lorajob)
    edited["status"].update({"attempts": 3,
                             "placement": {**edited["status"]["placement"],
                                           "vramClass": "h200-141gb", "gpus": 8}})
    kube.lorajob = copy.deepcopy(edited)
    view.lorajobs[KEY] = edited
    reconcile(ctl)  # still waiting for the pod, a brief step: corrected an interval later
    clock.now += INTERVAL
    reconcile(ctl)
    assert kube.lorajob["status"]["attempts"] == 1
    assert sorted(kube.jobs()) == ["bot-a1"]
    # A restarted operator (nothing in memory) re-plans instead of reading the status.
    del kube.objects[("Job", "bot-a1")]
    view.job_map[KEY] = {}
    view.lorajobs[KEY] = copy.deepcopy(kube.lorajob)
    reconcile(Controller(SETTINGS, kube, view=view))
    job = kube.jobs()["bot-a1"]
    assert job["metadata"]["labels"][names.VRAM_CLASS_LABEL] == "l4-24gb"


def test_success_is_final_and_completes_the_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the operator writes the status, so a Succeeded it wrote is final: reconciling
    it again reads, writes and creates nothing, though the Job still exists."""
    for name in CREDENTIAL_ENV:  # the operator has no S3 credentials: the chart's default
        monkeypatch.delenv(name, raising=False)
    ctl, kube, view, _ = make(new_lorajob())
    job = running(ctl, kube, view)
    job["status"] = {"completionTime": api.now_rfc3339(),
                     "conditions": [{"type": "Complete", "status": "True"}]}
    view.job_map[KEY] = {"bot-a1": job}
    result = ('{"exitCode": 0, "reason": "Completed", "adapterUri": "s3://out/bot/", "steps": 50, '
              '"manifestUri": "s3://out/bot/manifest.json", "manifestSha256": "' + "a" * 64 + '"}')
    view.pod_map[KEY] = {"p": {
        "metadata": {"name": "p", "labels": {names.ATTEMPT_LABEL: "1"}},
        "spec": {"nodeName": "n"},
        "status": {"phase": "Succeeded", "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": result}}}]}}}
    reconcile(ctl)  # no operator credentials in a unit test: the trainer's report is used
    st = kube.lorajob["status"]
    assert st["phase"] == "Succeeded"
    # The last step, which no log read saw (the pod was never seen running).
    assert st["progress"] == {"step": 50, "totalSteps": 50, "percent": 100.0, "etaSeconds": 0.0}
    assert not [c for c in kube.calls if c[0] == "log"]
    calls = list(kube.calls)
    view.lorajobs[KEY] = copy.deepcopy(kube.lorajob)
    reconcile(Controller(SETTINGS, kube, view=view))  # a restarted operator, too
    reconcile(ctl)
    assert kube.calls == calls
    assert "bot-a1" in kube.jobs()


def test_only_warnings_are_posted_as_events() -> None:
    """The way through the phases is in the conditions (no Event write per step); what
    needs attention, such as a pod no node can take, is posted."""
    ctl, kube, view, events = make(new_lorajob())
    running(ctl, kube, view)
    assert events == []  # Planned, waiting for the pod: only in the status
    view.pod_map[KEY] = {"p": trainer_pod(phase="Pending", unschedulable="0/3 nodes are available")}
    reconcile(ctl)
    assert kube.lorajob["status"]["phase"] == "Scheduling"
    assert [(e.type, e.reason) for e in events] == [("Warning", "Unschedulable")]


# ------------------------------------------------------------------ progress and brief steps


class Clock:
    """The controller's monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(ctl_mod, "time", fake)
    return fake


def trainer_pod(phase: str = "Running", node: str | None = "gpu-l4-0",
                unschedulable: str | None = None) -> dict[str, Any]:
    state = {"running": {"startedAt": "2025-01-01T00:01:00Z"}} if phase == "Running" else \
        {"waiting": {"reason": "ContainerCreating"}}
    conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                   "message": unschedulable}] if unschedulable else []
    return {"metadata": {"name": "bot-a1-x7k2p", "labels": {names.ATTEMPT_LABEL: "1"}},
            "spec": {"nodeName": None if unschedulable else node},
            "status": {"phase": phase, "conditions": conditions,
                       "containerStatuses": [{"name": "trainer", "state": state}]}}


LOG = "\n".join([
    '{"event": "progress", "step": 30, "total_steps": 100, "percent": 30.0, "loss": 1.5}',
    '{"event": "progress", "step": 40, "total_steps": 100, "percent": 40.0, "loss": 1.25}',
    '{"event": "checkpoint", "step": 40, "uri": "s3://out/bot/.checkpoints/u-1/40/"}',
    "{'not json'",
])


def watch(kube: FakeKube, view: DictView) -> None:
    """The watch delivers the latest LoRAJob."""
    view.lorajobs[KEY] = copy.deepcopy(kube.lorajob)


def requeues(ctl: Controller) -> list[float]:
    delays: list[float] = []
    ctl.requeue = lambda key, delay: delays.append(delay)  # type: ignore[method-assign]
    return delays


def read_progress(ctl: Controller) -> None:
    """One read of the watched trainer's log by the controller's progress reader (its own
    task does this every interval; see test_progress_reader.py for the timing)."""
    async def go() -> None:
        await ctl.progress.read_once(KEY, ctl.progress._watched[KEY])
        await ctl.progress.close()
    asyncio.run(go())


def test_running_trainers_progress_is_read_from_its_log(clock: Clock) -> None:
    ctl, kube, view, _ = make(new_lorajob())
    running(ctl, kube, view)
    queued: list[tuple[str, str]] = []
    ctl.queue.add = lambda key, first=False: queued.append(key)  # type: ignore[method-assign]
    kube.log = LOG
    view.pod_map[KEY] = {"p": trainer_pod()}
    reconcile(ctl)  # first seen running: Running written, its log watched, not read yet
    assert kube.lorajob["status"]["phase"] == "Running"
    assert "progress" not in kube.lorajob["status"] and kube.log_reads == []
    assert len(ctl.progress) == 1
    read_progress(ctl)
    assert kube.log_reads == [("ml", "bot-a1-x7k2p", "trainer", progress_reader.TAIL_LINES,
                               progress_reader.TAIL_BYTES)]
    assert queued == [KEY]  # something new: the key is reconciled
    watch(kube, view)
    reconcile(ctl)
    # The newest progress line, camelCase in the status; the other lines skipped.
    assert kube.lorajob["status"]["progress"] == {"step": 40, "totalSteps": 100,
                                                  "percent": 40.0, "loss": 1.25}
    assert kube.lorajob["status"]["phase"] == "Running"
    writes = len([c for c in kube.calls if c[0] == "status"])
    read_progress(ctl)  # the same progress again: the key is not queued, nothing written
    watch(kube, view)
    reconcile(ctl)
    assert queued == [KEY]
    assert len([c for c in kube.calls if c[0] == "status"]) == writes
    kube.log = '{"event": "progress", "step": 100, "total_steps": 100, "percent": 100.0}'
    read_progress(ctl)
    clock.now += INTERVAL  # Exporting is a brief step: written once it has lasted
    for _ in range(2):
        watch(kube, view)
        reconcile(ctl)
        clock.now += INTERVAL
    assert kube.lorajob["status"]["phase"] == "Uploading"
    assert kube.lorajob["status"]["progress"]["step"] == 100


def test_a_pod_that_stops_running_is_no_longer_read(clock: Clock) -> None:
    ctl, kube, view, _ = make(new_lorajob())
    running(ctl, kube, view)
    view.pod_map[KEY] = {"p": trainer_pod()}
    reconcile(ctl)
    assert len(ctl.progress) == 1
    view.pod_map[KEY] = {"p": {**trainer_pod(), "status": {"phase": "Failed", "containerStatuses": [
        {"name": "trainer", "state": {"terminated": {"exitCode": 1}}}]}}}
    watch(kube, view)
    reconcile(ctl)
    assert len(ctl.progress) == 0 and kube.log_reads == []


@pytest.mark.parametrize("error", [ApiError(502, "Bad Gateway", "no kubelet"), TimeoutError()],
                         ids=["api-error", "timeout"])
def test_a_failed_log_read_changes_nothing(clock: Clock, error: Exception) -> None:
    ctl, kube, view, _ = make(new_lorajob())
    running(ctl, kube, view)
    view.pod_map[KEY] = {"p": trainer_pod()}
    reconcile(ctl)
    before = metrics.PROGRESS_READ_ERRORS._value.get()
    kube.log = error
    read_progress(ctl)
    assert len(kube.log_reads) == 1
    assert metrics.PROGRESS_READ_ERRORS._value.get() == before + 1
    watch(kube, view)
    reconcile(ctl)
    assert ctl._errors.failures(KEY) == 0
    assert kube.lorajob["status"]["phase"] == "Running" and "progress" not in kube.lorajob["status"]
    kube.log = LOG
    read_progress(ctl)
    watch(kube, view)
    reconcile(ctl)
    assert kube.lorajob["status"]["progress"]["step"] == 40


def test_a_brief_step_is_written_only_once_it_has_lasted_an_interval(clock: Clock) -> None:
    """A step that usually lasts moments (here: the pod bound, its container starting) is
    written only if it still holds a progress interval after the operator first saw it,
    however late the reconcile that sees it comes; a step users act on (Running) is
    written at once."""
    ctl, kube, view, _ = make(new_lorajob())
    running(ctl, kube, view)  # the plan and "waiting for the pod", one write
    delays = requeues(ctl)
    writes = [c for c in kube.calls if c[0] == "status"]
    view.pod_map[KEY] = {"p": trainer_pod(phase="Pending")}
    clock.now += 3 * INTERVAL  # a deep queue: first seen long after the last write
    reconcile(ctl)
    assert [c for c in kube.calls if c[0] == "status"] == writes  # held back
    assert delays == [INTERVAL]  # looked at again when it has lasted an interval
    clock.now += INTERVAL / 2
    reconcile(ctl)  # not yet
    assert [c for c in kube.calls if c[0] == "status"] == writes
    assert delays[-1] == INTERVAL / 2
    clock.now += INTERVAL / 2
    reconcile(ctl)  # still starting an interval after it was first seen: written
    assert len([c for c in kube.calls if c[0] == "status"]) == len(writes) + 1
    scheduled = next(c for c in kube.lorajob["status"]["conditions"] if c["type"] == "Scheduled")
    assert scheduled["status"] == "True"
    watch(kube, view)
    view.pod_map[KEY] = {"p": trainer_pod()}
    reconcile(ctl)  # right after that write, but Running is not brief
    assert kube.lorajob["status"]["phase"] == "Running"
    assert len([c for c in kube.calls if c[0] == "status"]) == len(writes) + 2


def test_a_passing_brief_step_is_never_written(clock: Clock) -> None:
    """The pod is bound and running before an interval has passed: the starting step in
    between costs no write."""
    ctl, kube, view, _ = make(new_lorajob())
    running(ctl, kube, view)
    requeues(ctl)
    view.pod_map[KEY] = {"p": trainer_pod(phase="Pending")}
    reconcile(ctl)
    clock.now += INTERVAL / 2
    view.pod_map[KEY] = {"p": trainer_pod()}
    reconcile(ctl)
    assert [c[1] for c in kube.calls if c[0] == "status"] == ["Scheduling", "Running"]

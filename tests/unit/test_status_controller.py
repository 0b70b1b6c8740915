"""The controller's reconcile flow against an in-memory API (no cluster): planning writes
status before any child exists, children are created once by name (409 = adopt), suspend
and Kueue rules, out-of-memory escalation, conflicts, TTL."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from typing import Any

import pytest

from lora_operator import api
from lora_operator.build import names
from lora_operator.reconcile import controller as ctl_mod
from lora_operator.reconcile import planning
from lora_operator.reconcile.controller import Controller, DictView
from lora_operator.reconcile.status import Event
from lora_operator.settings import load_settings

SETTINGS = load_settings()
KEY = ("ml", "bot")


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
        self.rv = 1

    def create(self, body: dict[str, Any]) -> dict[str, Any] | None:
        key = (body["kind"], body["metadata"]["name"])
        self.calls.append(("create", f"{key[0]}/{key[1]}"))
        if key in self.objects:
            return None
        self.objects[key] = copy.deepcopy(body)
        return copy.deepcopy(body)

    def replace_config_map_data(self, body: dict[str, Any]) -> None:
        self.calls.append(("configmap", body["metadata"]["name"]))
        self.objects[("ConfigMap", body["metadata"]["name"])] = copy.deepcopy(body)

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
        assert "progress" not in status  # the trainer's field, never ours
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
                     "dataset": {"uri": "s3://data/train.jsonl"},
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


def test_first_reconcile_plans_then_builds_in_order() -> None:
    ctl, kube, _, events = make(new_lorajob())
    reconcile(ctl)
    st = kube.lorajob["status"]
    assert st["placement"]["vramClass"] == "l4-24gb" and st["attempts"] == 1
    created = [c for c in kube.calls if c[0] in ("create", "configmap")]
    assert created == [("create", "ServiceAccount/bot-trainer"), ("create", "Role/bot-trainer"),
                       ("create", "RoleBinding/bot-trainer"), ("configmap", "bot-trainer"),
                       ("create", "Job/bot-a1")]
    # Planned status is written before any child is created.
    assert kube.calls.index(("status", "Pending")) < kube.calls.index(
        ("create", "ServiceAccount/bot-trainer"))
    assert kube.jobs()["bot-a1"]["spec"]["suspend"] is False
    assert "Planned" in [e.reason for e in events]


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
    assert KEY in ctl._written and ctl._jobs_written
    assert ctl._lorajob(KEY)["status"]["attempts"] == 1  # type: ignore[index]  # ours, newer
    view.lorajobs[KEY] = copy.deepcopy(kube.lorajob)  # the watch caught up
    view.job_map[KEY] = {name: {**job, "metadata": {**job["metadata"], "resourceVersion": "99"}}
                         for name, job in kube.jobs().items()}
    assert ctl._lorajob(KEY) is view.lorajobs[KEY]
    assert ctl._job(KEY, 1) is view.job_map[KEY]["bot-a1"]
    assert KEY not in ctl._written and not ctl._jobs_written

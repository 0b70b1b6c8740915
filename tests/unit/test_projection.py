"""Watched objects are trimmed as they are decoded (operator/reconcile/projection.py): what
kopf queues and indexes keeps what kopf and the controller read, and nothing else."""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
from typing import Any

from kopf._cogs.clients import api as kopf_api
from kopf._cogs.clients import fetching, watching

from lora_operator.build import names
from lora_operator.reconcile import projection
from tests.unit.test_build_job import build
from tests.unit.test_handlers_index import real_job, real_pod

LORAJOB = {"apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRAJob",
           "metadata": {"name": "bot", "namespace": "ml", "resourceVersion": "7",
                        "labels": {"a": "b"}, "finalizers": ["x"],
                        "managedFields": [{"manager": "kubectl"}]},
           "spec": {"baseModel": {"uri": "hf://m"}, "lora": {"r": 8}},
           "status": {"phase": "Running"}}


def test_pod_keeps_metadata_status_node_and_container_resources() -> None:
    full = real_pod("Running")
    slim = projection.project(copy.deepcopy(full))
    assert slim["metadata"] == {k: v for k, v in full["metadata"].items() if k != "managedFields"}
    assert slim["status"] == full["status"]
    assert slim["spec"] == {"nodeName": full["spec"]["nodeName"],
                            "containers": [{"name": "trainer",
                                            "resources": full["spec"]["containers"][0]["resources"]}]}
    assert len(json.dumps(slim)) < len(json.dumps(full)) / 2


def test_pod_loses_the_trainer_config_annotation_and_keeps_the_others() -> None:
    """The trainer's config (a few KB only the trainer reads, through its downwardAPI
    volume) is not held for every pod the operator watches."""
    full = real_pod("Running")
    full["metadata"]["annotations"] = dict(build()["spec"]["template"]["metadata"]["annotations"])
    assert len(full["metadata"]["annotations"][names.CONFIG_ANNOTATION]) > 500
    slim = projection.project(copy.deepcopy(full))
    assert slim["metadata"]["annotations"] == {
        k: v for k, v in full["metadata"]["annotations"].items() if k != names.CONFIG_ANNOTATION}
    assert slim["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "trainer"
    assert projection.project(copy.deepcopy(slim)) == slim
    # Only pods: an annotation of that name on another kind is not the operator's to drop.
    for other in (real_job(), copy.deepcopy(LORAJOB)):
        other["metadata"]["annotations"] = {names.CONFIG_ANNOTATION: "kept", "x": "y"}
        assert projection.project(other)["metadata"]["annotations"] == {
            names.CONFIG_ANNOTATION: "kept", "x": "y"}


def test_job_keeps_the_spec_keys_the_controller_reads() -> None:
    full = real_job(suspend=True, deadline=60)
    slim = projection.project(copy.deepcopy(full))
    assert "template" in full["spec"]
    assert slim["spec"] == {k: full["spec"][k] for k in projection.JOB_SPEC_KEYS if k in full["spec"]}
    assert slim["spec"]["suspend"] is True and slim["spec"]["activeDeadlineSeconds"] == 60
    assert slim["status"] == full["status"]


def test_lorajob_keeps_its_spec_and_loses_managed_fields_only() -> None:
    slim = projection.project(copy.deepcopy(LORAJOB))
    assert slim["spec"] == LORAJOB["spec"] and slim["status"] == LORAJOB["status"]
    assert "managedFields" not in slim["metadata"]
    assert slim["metadata"]["finalizers"] == ["x"]


def test_projection_is_idempotent_and_ignores_non_object_events() -> None:
    once = projection.project(copy.deepcopy(real_pod("Running")))
    assert projection.project(copy.deepcopy(once)) == once
    status = {"type": "ERROR", "object": {"kind": "Status", "code": 410}}
    assert projection.project_event(copy.deepcopy(status)) == status
    assert projection.project_event({"type": "BOOKMARK"}) == {"type": "BOOKMARK"}
    assert projection.project_event(None) is None


def test_installed_kopf_decodes_watch_lines_projected() -> None:
    projection.install()
    projection.install()  # idempotent
    line = json.dumps({"type": "MODIFIED", "object": real_pod("Running")})
    event: Any = kopf_api.json.loads(line)
    assert set(event["object"]["spec"]) == {"nodeName", "containers"}
    assert "managedFields" not in event["object"]["metadata"]


def test_installed_kopf_projects_its_initial_listing() -> None:
    """kopf lists every object before it watches (at start and after a watch expires)."""
    projection.install()
    assert getattr(fetching.list_objs, "projected", False)
    assert "fetching.list_objs(" in inspect.getsource(watching)  # where kopf calls it

    async def listing(**kwargs: Any) -> tuple[list[dict[str, Any]], str]:
        assert kwargs == {"namespace": "ml"}
        return [real_pod("Running"), real_job(), copy.deepcopy(LORAJOB)], "42"

    items, rv = asyncio.run(projection.projected_listing(listing)(namespace="ml"))
    assert rv == "42"
    pod, job, lj = items
    assert set(pod["spec"]) == {"nodeName", "containers"} and "template" not in job["spec"]
    assert lj["spec"] == LORAJOB["spec"]
    assert all("managedFields" not in o["metadata"] for o in items)

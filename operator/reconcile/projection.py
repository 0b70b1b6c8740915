"""What the operator keeps of a watched object: applied to each watch event as it is decoded.

A watched object waits, whole, in kopf's per-object queue until a worker reaches it, and
during a burst most of the operator's heap is that backlog (memray, BENCHMARKS.md): a pod
carries its whole spec (env, volumes, probes, security context) and every object its
`metadata.managedFields`, none of which the controller reads. Projecting at decode time
keeps the backlog, kopf's bodies and the indexes small, with one rule for all three.

What stays is what kopf needs (all other metadata: name, uid, labels, annotations,
resourceVersion, finalizers, deletionTimestamp, ownerReferences), the whole status, and of
the spec: everything for a LoRAJob (the controller plans from it), `JOB_SPEC_KEYS` for a
Job, and for a pod its node and its containers' names and resources, and of a pod's
annotations all but the trainer's config (`names.CONFIG_ANNOTATION`, a few KB that only
the trainer reads). The operator never
writes a watched body back whole (status is merge-patched, Jobs are created from the spec),
so nothing it dropped can be lost on the server.
"""

from __future__ import annotations

from typing import Any

from lora_operator.build.names import CONFIG_ANNOTATION

# What `verdicts`/`status.derive_status` and the controller read of a Job's spec.
JOB_SPEC_KEYS = frozenset(("suspend", "activeDeadlineSeconds", "backoffLimit", "completions",
                           "parallelism"))


def _job_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k in JOB_SPEC_KEYS}


def _pod_spec(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"containers": [{"name": c.get("name"), "resources": c.get("resources")}
                                          for c in spec.get("containers") or ()]}
    if "nodeName" in spec:
        out["nodeName"] = spec["nodeName"]
    return out


_SPECS = {("batch/v1", "Job"): _job_spec, ("v1", "Pod"): _pod_spec}


def project(obj: dict[str, Any]) -> dict[str, Any]:
    """Trim `obj` in place (and return it); idempotent, and a no-op on other kinds' specs."""
    metadata = obj.get("metadata")
    kind = (obj.get("apiVersion"), obj.get("kind"))
    if isinstance(metadata, dict):
        metadata.pop("managedFields", None)
        annotations = metadata.get("annotations")
        if kind == ("v1", "Pod") and isinstance(annotations, dict):
            annotations.pop(CONFIG_ANNOTATION, None)
    trim = _SPECS.get(kind)  # type: ignore[arg-type]
    spec = obj.get("spec")
    if trim is not None and isinstance(spec, dict):
        obj["spec"] = trim(spec)
    return obj


def project_event(event: Any) -> Any:
    """A decoded watch line (`{"type": ..., "object": {...}}`) with its object projected;
    anything else (an ERROR's Status, a BOOKMARK) passes through unchanged."""
    if isinstance(event, dict) and isinstance(event.get("object"), dict):
        project(event["object"])
    return event


def projected_listing(list_objs: Any) -> Any:
    """kopf's `fetching.list_objs`, with every listed object projected."""
    async def projected_list_objs(**kwargs: Any) -> tuple[list[Any], str]:
        items, resource_version = await list_objs(**kwargs)  # kind and apiVersion are set
        return [project(item) for item in items], resource_version

    projected_list_objs.projected = True  # type: ignore[attr-defined]
    return projected_list_objs


def install() -> None:
    """Project every object kopf receives: its watch lines (through fastjson's decoder) and
    its initial listings (after a start or a watch restart, every object at once). Idempotent."""
    from kopf._cogs.clients import fetching

    from lora_operator.reconcile import fastjson

    fastjson.install(after=project_event)
    if not getattr(fetching.list_objs, "projected", False):
        fetching.list_objs = projected_listing(fetching.list_objs)

"""The dataset preflight's batch/v1 Job: `lora-trainer preflight` on CPU, before any GPU.

A pure function of the LoRAJob and the operator's settings, like the trainer's Job
(`build.job`), and built from the same parts so the two cannot drift: the trainer image
and command, the rendered config (an annotation read through a downwardAPI volume; no
placement yet), credentials as `secretKeyRef` env, the
restricted Pod Security context and volumes. What differs is what a CPU check needs: no
GPU limit, no GPU toleration or affinity, no VRAM-class node selector, modest CPU and
memory (`Settings.preflight_*`), and no API token: the report travels back as the
container's termination message, which the operator reads from the pod status.

The pod carries the standard child labels (so the operator's Job and Pod watches see it)
but no attempt label (so nothing that counts trainer attempts or GPU-hours counts it);
`COMPONENT_LABEL=preflight` tells the two kinds apart.
"""

from __future__ import annotations

from typing import Any

from lora_operator import api, contract
from lora_operator.build import job, names, trainer_config
from lora_operator.settings import Settings

CONTAINER = "preflight"
COMPONENT_LABEL = f"{api.GROUP}/component"
COMPONENT = "preflight"
# Test/dev hook, as for the trainer pod (`job.pod_annotations`): LoRAJob annotations
# `kwok.lorajob.dev/preflight.<key>` reach the preflight pod as `kwok.lorajob.dev/<key>`,
# so the local cluster's kwok stages can simulate its outcome. No kubelet reads them.
KWOK_PREFLIGHT_PREFIX = f"{names.KWOK_ANNOTATION_PREFIX}preflight."
BACKOFF_LIMIT = 2  # storage hiccups are retried; permanent exit codes fail at once


def preflight_job_name(lorajob: str) -> str:
    """`<name>-preflight` (fits: LoRAJob names are capped at api.MAX_NAME_LENGTH)."""
    return names.child_name(lorajob, "-preflight")


def is_preflight(obj: Any) -> bool:
    """Whether a Job or pod is a preflight's (by its component label)."""
    labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
    return bool(labels.get(COMPONENT_LABEL) == COMPONENT)


def pod_failure_policy() -> dict[str, Any]:
    """The trainer Job's policy for the preflight container: disruptions are not counted,
    permanent exit codes (a bad dataset is DATA) fail the Job at once."""
    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob",
         "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                         "values": sorted(int(c) for c in contract.ExitCode if c.permanent)}},
    ]}


def pod_annotations(owner: names.Owner, dev_mode: bool, config: str = "") -> dict[str, str]:
    out = {"kubectl.kubernetes.io/default-container": CONTAINER}
    if config:
        out[names.CONFIG_ANNOTATION] = config
    if not dev_mode:
        return out
    for key, value in owner.annotations.items():
        if key.startswith(KWOK_PREFLIGHT_PREFIX):
            out[names.KWOK_ANNOTATION_PREFIX + key.removeprefix(KWOK_PREFLIGHT_PREFIX)] = value
    return out


def build_preflight_job(owner: names.Owner, spec: api.LoRAJobSpec, settings: Settings,
                        dev_mode: bool = True) -> dict[str, Any]:
    """The preflight Job (see the module docstring)."""
    labels = {**names.labels(owner), COMPONENT_LABEL: COMPONENT}
    vols, mounts = job.volumes()
    config = trainer_config.render(trainer_config.trainer_config(
        owner, spec, api.Placement(), 1, settings))
    memory = settings.preflight_memory
    container = {
        "name": CONTAINER,
        "image": settings.trainer_image,
        "command": [*settings.trainer_command, "preflight"],
        "env": job.env(spec, settings),
        "resources": {"requests": {"cpu": settings.preflight_cpu, "memory": memory},
                      "limits": {"memory": memory}},
        "volumeMounts": mounts,
        "securityContext": job.container_security_context(),
        "terminationMessagePath": contract.TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # it reports through its termination message
        "enableServiceLinks": False,
        "securityContext": job.pod_security_context(),
        "containers": [container],
        "volumes": vols,
        "tolerations": job.tolerations(spec, 0),  # the spec's own; never the GPU taint's
    }
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": names.metadata(owner, preflight_job_name(owner.name), extra_labels=labels),
        "spec": {
            "parallelism": 1,
            "completions": 1,
            "backoffLimit": BACKOFF_LIMIT,
            "activeDeadlineSeconds": settings.preflight_deadline_seconds,
            "podFailurePolicy": pod_failure_policy(),
            "podReplacementPolicy": "Failed",
            "template": {"metadata": {"labels": labels,
                                      "annotations": pod_annotations(owner, dev_mode, config)},
                         "spec": pod_spec},
        },
    }

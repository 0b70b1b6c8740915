"""The trainer's batch/v1 Job: one pod on the right GPU node, failing fast on permanent errors.

A pure function of the LoRAJob, its placement and the operator's settings. The trainer pod
holds no Kubernetes credentials at all (no ServiceAccount token is mounted): its config is
an annotation of its own pod, read through a downwardAPI volume; storage credentials
arrive as `secretKeyRef` env (the operator never reads a secret's value); it reports
progress on stdout and its result in its termination message, both read by the operator.
A trainer that runs hostile code therefore has nothing to forge a status with, and a job
costs the API server one object (the Job) instead of five. The Pod failure policy is
generated from `contract.ExitCode`, so the trainer's exit-code table and the Job's reaction
to it cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from lora_operator import api, contract
from lora_operator.build import names, trainer_config
from lora_operator.settings import Settings, VramClass

CONTAINER = "trainer"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
RUN_AS_USER = 1000
SCRATCH_DIR = "/scratch"
# Weight of the "smallest node that fits" preference; the scheduler adds it per node.
SMALLEST_FIT_WEIGHT = 100


def fail_job_exit_codes() -> list[int]:
    """Exit codes that end the Job at once: permanent errors, and out-of-memory.

    Out-of-memory fails the Job instead of retrying it in place because the same pod on
    the same class would run out again; the operator re-plans one class up and creates
    the next attempt's Job itself.
    """
    codes = {int(c) for c in contract.ExitCode if c.permanent}
    codes.add(int(contract.ExitCode.OUT_OF_MEMORY))
    return sorted(codes)


def pod_failure_policy() -> dict[str, Any]:
    """Disruptions (preemption, drain, eviction) do not count against backoffLimit;
    permanent and out-of-memory exit codes fail the Job; anything else is retried."""
    return {"rules": [
        {"action": "Ignore",
         "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob",
         "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                         "values": fail_job_exit_codes()}},
    ]}


def spec_hash(spec: dict[str, Any]) -> str:
    """A stable hash of the immutable part of a spec (camelCase dict, as the API stores it).

    Stored on each Job so the operator can tell, without any other state, that a spec
    change slipped past the CRD's immutability rules after the job started.
    """
    part = {k: spec.get(k) for k in api.IMMUTABLE_SPEC_FIELDS}
    return hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


def next_class_memory(vram_class: VramClass, settings: Settings) -> int | None:
    """Memory of the next bigger class, the bound of the "smallest fitting node" preference."""
    bigger = [c.memory_mib for c in settings.classes_by_size() if c.memory_mib > vram_class.memory_mib]
    return min(bigger) if bigger else None


def affinity(vram_class: VramClass | None, settings: Settings) -> dict[str, Any] | None:
    """Required: a GPU with at least the class's memory. Preferred: the smallest such GPU.

    `Gt memory-1` means `>= memory`, since node affinity has no Ge operator. The preference
    keeps an 80 GB job off a 141 GB node while a smaller node that fits is free.
    """
    if vram_class is None:
        return None
    required = {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": GPU_MEMORY_LABEL, "operator": "Gt", "values": [str(vram_class.memory_mib - 1)]},
    ]}]}
    node_affinity: dict[str, Any] = {"requiredDuringSchedulingIgnoredDuringExecution": required}
    upper = next_class_memory(vram_class, settings)
    if upper is not None:
        node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [{
            "weight": SMALLEST_FIT_WEIGHT,
            "preference": {"matchExpressions": [
                {"key": GPU_MEMORY_LABEL, "operator": "Lt", "values": [str(upper)]},
            ]},
        }]
    return {"nodeAffinity": node_affinity}


def tolerations(spec: api.LoRAJobSpec, gpus: int) -> list[dict[str, Any]]:
    """The usual GPU taint (when the pod asks for GPUs), then the spec's own tolerations."""
    out: list[dict[str, Any]] = [dict(GPU_TOLERATION)] if gpus > 0 else []
    for tol in spec.resources.tolerations:
        item = tol.model_dump(by_alias=True, exclude_none=True, mode="json")
        if item not in out:
            out.append(item)
    return out


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def env(spec: api.LoRAJobSpec, settings: Settings) -> list[dict[str, Any]]:
    """Config path, storage endpoint/region, and credentials by reference only."""
    out: list[dict[str, Any]] = [
        {"name": contract.CONFIG_ENV, "value": f"{contract.CONFIG_DIR}/{contract.CONFIG_KEY}"},
        {"name": contract.TERMINATION_MESSAGE_ENV, "value": contract.TERMINATION_MESSAGE_PATH},
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "HF_HOME", "value": f"{SCRATCH_DIR}/hf"},
        {"name": "TMPDIR", "value": "/tmp"},  # noqa: S108 (an emptyDir, not the image's /tmp)
        {"name": "AWS_REGION", "value": spec.output.region or settings.s3_region},
        {"name": "AWS_DEFAULT_REGION", "value": spec.output.region or settings.s3_region},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]
    endpoint = spec.output.endpoint or settings.s3_endpoint
    if endpoint:
        out.append({"name": "AWS_ENDPOINT_URL", "value": endpoint})
    secret = spec.output.credentials_secret or settings.s3_credentials_secret
    if secret:
        out.extend(_secret_env(key, secret, key) for key in contract.S3_SECRET_KEYS)
    model = spec.base_model
    if model.credentials_secret and model.uri.startswith("hf://"):
        out.append(_secret_env("HF_TOKEN", model.credentials_secret, "HF_TOKEN"))
    if model.credentials_secret and model.uri.startswith("s3://"):
        out.extend(_s3_secret_env(contract.MODEL_CREDENTIALS_PREFIX, model.credentials_secret))
    if spec.dataset.credentials_secret and _dataset_uris_use_s3(spec.dataset):
        out.extend(_s3_secret_env(contract.DATASET_CREDENTIALS_PREFIX, spec.dataset.credentials_secret))
    return out


def _s3_secret_env(prefix: str, secret: str) -> list[dict[str, Any]]:
    """A location's own S3 keys, under prefixed names (see contract.S3_SECRET_KEYS)."""
    return [_secret_env(prefix + key, secret, key) for key in contract.S3_SECRET_KEYS]


def _dataset_uris_use_s3(ds: api.DatasetSpec) -> bool:
    uris = [ds.uri, ds.validation.uri or "", ds.test.uri if ds.test else ""]
    return any(u.startswith("s3://") for u in uris)


def container_security_context() -> dict[str, Any]:
    """Pod Security Standard "restricted", plus a read-only root filesystem."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def volumes(disk: str = "100Gi", shm: str = "8Gi",
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): the config (the pod's `CONFIG_ANNOTATION`) read-only; /tmp, a
    model cache and /dev/shm writable, each with a sizeLimit (a job cannot fill the node's
    disk or memory through them)."""
    config = {"path": contract.CONFIG_KEY, "fieldRef": {
        "fieldPath": f"metadata.annotations['{names.CONFIG_ANNOTATION}']"}}
    vols: list[dict[str, Any]] = [
        {"name": "config", "downwardAPI": {"items": [config]}},
        {"name": "tmp", "emptyDir": {"sizeLimit": disk}},
        {"name": "scratch", "emptyDir": {"sizeLimit": disk}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": contract.CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108
        {"name": "scratch", "mountPath": SCRATCH_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108
    ]
    return vols, mounts


def pod_annotations(owner: names.Owner, attempt: int = 1, dev_mode: bool = True,
                    config: str = "") -> dict[str, str]:
    """Test/dev hook: `kwok.lorajob.dev/*` annotations of the LoRAJob, copied to the pod,
    only when the operator runs with `devMode` (a kwok test cluster): elsewhere a job's
    author must not steer how pods are simulated or reported (issue 13).

    `kwok.lorajob.dev/attempt-<N>.<key>` applies to attempt N only, as `kwok.lorajob.dev/<key>`
    (so a test can make attempt 1 run out of memory and attempt 2 succeed). No kubelet reads
    these; they only steer the local cluster's simulated pods.
    """
    prefix = names.KWOK_ANNOTATION_PREFIX
    mine = f"{prefix}attempt-{attempt}."
    out = {"kubectl.kubernetes.io/default-container": CONTAINER}
    if config:
        out[names.CONFIG_ANNOTATION] = config
    if not dev_mode:
        return out
    for key, value in owner.annotations.items():
        if key.startswith(prefix) and not key.startswith(f"{prefix}attempt-"):
            out[key] = value
    for key, value in owner.annotations.items():
        if key.startswith(mine):
            out[prefix + key.removeprefix(mine)] = value
    return out


@dataclass(frozen=True)
class JobInputs:
    """What one attempt's Job is built from, besides the spec and the settings."""

    attempt: int
    placement: api.Placement
    vram_class: VramClass | None
    spec_hash: str = ""
    suspend: bool = False
    backoff_limit: int = 0
    active_deadline_seconds: int | None = None
    extra_labels: dict[str, str] = field(default_factory=dict)


def build_job(owner: names.Owner, spec: api.LoRAJobSpec, inputs: JobInputs,
              settings: Settings) -> dict[str, Any]:
    """The batch/v1 Job of one attempt (see the module docstring)."""
    gpus = inputs.placement.gpus or 0
    vram_class = inputs.vram_class
    name = names.job_name(owner.name, inputs.attempt)
    job_labels = dict(inputs.extra_labels)
    if owner.queue_name:
        job_labels[names.KUEUE_QUEUE_LABEL] = owner.queue_name
    pod_labels = names.labels(owner, inputs.attempt)
    if vram_class is not None:
        pod_labels[names.VRAM_CLASS_LABEL] = vram_class.name
        job_labels[names.VRAM_CLASS_LABEL] = vram_class.name
    annotations = {names.SPEC_HASH_ANNOTATION: inputs.spec_hash, names.GPUS_ANNOTATION: str(gpus)}

    resources: dict[str, Any] = {
        "requests": {"cpu": settings.trainer_cpu, "memory": settings.trainer_memory,
                     "ephemeral-storage": settings.trainer_ephemeral_storage},
        "limits": {"memory": settings.trainer_memory,
                   "ephemeral-storage": settings.trainer_ephemeral_storage},
    }
    if gpus > 0:
        resources["limits"][GPU_RESOURCE] = str(gpus)
    vols, mounts = volumes(settings.trainer_ephemeral_storage, settings.trainer_shm_size)
    config = trainer_config.render(trainer_config.trainer_config(
        owner, spec, inputs.placement, inputs.attempt, settings))
    container = {
        "name": CONTAINER,
        "image": settings.trainer_image,
        "command": list(settings.trainer_command),
        "env": env(spec, settings),
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePath": contract.TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    node_selector = {**(vram_class.node_selector if vram_class else {}),
                     **spec.resources.node_selector}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # no API identity: see the module docstring
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 120,  # time to write a last checkpoint on SIGTERM
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": vols,
        "tolerations": tolerations(spec, gpus),
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    aff = affinity(vram_class, settings) if gpus > 0 else None
    if aff:
        pod_spec["affinity"] = aff
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name

    job_spec: dict[str, Any] = {
        "parallelism": 1,
        "completions": 1,
        "backoffLimit": inputs.backoff_limit,
        "suspend": inputs.suspend,
        "podFailurePolicy": pod_failure_policy(),
        "podReplacementPolicy": "Failed",
        "template": {
            "metadata": {"labels": pod_labels,
                         "annotations": pod_annotations(owner, inputs.attempt,
                                                        settings.dev_mode, config)},
            "spec": pod_spec,
        },
    }
    if inputs.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = inputs.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": names.metadata(owner, name, attempt=inputs.attempt,
                                   extra_labels=job_labels, annotations=annotations),
        "spec": job_spec,
    }

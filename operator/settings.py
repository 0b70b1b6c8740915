"""The operator's configuration: VRAM classes, trainer image, storage defaults, limits.

One file feeds everything that needs it: the operator at start-up, `lora-operator plan`,
and the Helm chart (values → ConfigMap → this file). The default ships in the package so a
plan works with no cluster at all.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from lora_operator.api import DNS_LABEL_PATTERN, errors_of

CONFIG_ENV = "LORA_OPERATOR_CONFIG"


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class VramClass(_Model):
    """A kind of GPU node the cluster offers, matched by GPU Feature Discovery labels."""

    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63, description="Class name, e.g. h100-80gb.")
    memory_mib: int = Field(ge=1024, alias="memoryMiB", description=(
        "Memory per GPU as GFD reports it in nvidia.com/gpu.memory (MiB); nodes match when "
        "their label is at least this."))
    max_gpus: int = Field(default=8, ge=1, le=8, description="Most GPUs one node of this class has.")
    product: str | None = Field(default=None, description="nvidia.com/gpu.product, for display.")
    node_selector: dict[str, str] = Field(default_factory=dict,
                                          description="Extra node selector for this class.")
    price_per_gpu_hour: float | None = Field(default=None, ge=0, description="USD per GPU-hour.")
    bf16: bool = Field(default=True, description="Whether the GPU computes in bf16 (T4 does not).")

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


class Settings(_Model):
    """Everything the operator is told at start-up."""

    vram_classes: list[VramClass] = Field(min_length=1, description="Smallest first is not required.")
    safety_margin: float = Field(default=0.10, ge=0.0, le=1.0, description=(
        "Fraction of a GPU's memory kept free beyond the estimate (fragmentation, drift)."))
    trainer_image: str = Field(default="ghcr.io/lorajob/lora-trainer:0.1.0",
                               description="Image of the trainer pods.")
    trainer_command: list[str] = Field(default_factory=lambda: ["lora-trainer"],
                                       description="Entrypoint run in the trainer container.")
    s3_endpoint: str | None = Field(default=None, description="Default S3 endpoint for jobs.")
    s3_credentials_secret: str | None = Field(default=None, description=(
        "Default Secret (in each job's namespace) with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY."))
    s3_region: str = Field(default="us-east-1", description="Default S3 region.")
    namespaces: list[str] = Field(default_factory=list,
                                  description="Namespaces to watch; empty means all.")
    max_workers: int = Field(default=20, ge=1, le=1000, description=(
        "Work-queue workers: LoRAJobs (and LoRASweeps) reconciled at once; also the threads "
        "for planning and storage checks."))
    allow_local_uris: bool = Field(default=False, description=(
        "Accept file:// and host-path URIs in cluster mode (dev clusters only)."))
    config_read_timeout_seconds: float = Field(default=10.0, gt=0, le=300, description=(
        "Timeout for reading a base model's config.json when planning."))
    trainer_cpu: str = Field(default="4", description="CPU request of trainer pods.")
    trainer_memory: str = Field(default="32Gi", description="Memory request of trainer pods.")
    trainer_ephemeral_storage: str = Field(default="100Gi", description=(
        "Local disk of a trainer pod (model, data, checkpoints, adapter): its ephemeral-storage "
        "request and limit, and the sizeLimit of its /tmp and /scratch emptyDirs, so a job "
        "cannot fill the node's disk (the kubelet evicts the pod instead)."))
    trainer_shm_size: str = Field(default="8Gi", description=(
        "sizeLimit of the trainer pod's /dev/shm (memory-backed; counts against its memory)."))
    progress_interval_seconds: float = Field(default=5.0, ge=1.0, description=(
        "How often the operator reads a running trainer's progress from its log, and the least "
        "time between two status writes of a step that usually lasts moments (the pod "
        "starting, the Job noticing its pod finished)."))
    preflight_cpu: str = Field(default="1", description="CPU request of dataset preflight pods.")
    preflight_memory: str = Field(default="4Gi", description=(
        "Memory of dataset preflight pods (request and limit): the dataset's rows and the "
        "tokenizer are held in memory."))
    preflight_deadline_seconds: int = Field(default=1800, ge=60, le=86400, description=(
        "activeDeadlineSeconds of a dataset preflight Job."))
    manifest_verify_timeout_seconds: float = Field(default=900.0, ge=1.0, le=86400, description=(
        "How long after a trainer finished its adapter's manifest may stay unverifiable "
        "(storage not answering) before the job fails with ManifestUnverified."))
    # ---- multi-tenant policy (issue 13): what a LoRAJob may name; see README "Security model"
    signed_endpoints: list[str] | None = Field(default=None, description=(
        "S3 endpoints the operator signs its own reads (config.json, manifest.json) for. "
        "Unset: only its own endpoint (s3Endpoint, else $AWS_ENDPOINT_URL, else AWS). Any "
        "other endpoint a job names gets anonymous (unsigned) requests."))
    storage_prefixes: dict[str, list[str]] = Field(default_factory=dict, description=(
        "Namespace → URI prefixes its jobs may write adapters and checkpoints under; the key "
        "'*' covers every namespace not listed, '{namespace}' in a prefix is the job's "
        "namespace. Empty mapping: no restriction (single-tenant clusters)."))
    allow_trust_remote_code: bool = Field(default=False, description=(
        "Whether jobs may set spec.baseModel.trustRemoteCode (runs the model repo's code)."))
    allowed_toleration_keys: list[str] | None = Field(default=None, description=(
        "Toleration keys jobs may add (spec.resources.tolerations); unset: any key except "
        "the empty key that tolerates every taint."))
    allowed_priority_classes: list[str] | None = Field(default=None, description=(
        "PriorityClass names jobs may use; unset: any."))
    allowed_secrets: list[str] | None = Field(default=None, description=(
        "Secret names (shell-style patterns) jobs may name in credentialsSecret fields; "
        "unset: any Secret of the job's own namespace."))
    dev_mode: bool = Field(default=False, description=(
        "Copy kwok.lorajob.dev/* annotations onto trainer pods (local kwok test clusters)."))

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        names = [c.name for c in self.vram_classes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"vramClasses: duplicate class names {dupes}")
        return self

    def vram_class(self, name: str) -> VramClass | None:
        return next((c for c in self.vram_classes if c.name == name), None)

    def classes_by_size(self) -> list[VramClass]:
        return sorted(self.vram_classes, key=lambda c: (c.memory_mib, c.price_per_gpu_hour or 0))


class SettingsError(ValueError):
    pass


def parse_settings(data: dict[str, Any], source: str = "settings") -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        msg = "; ".join(f"{p}: {m}" for p, m in errors_of(exc))
        raise SettingsError(f"{source}: {msg}") from None


def default_settings_text() -> str:
    return resources.files("lora_operator").joinpath("config/default.yaml").read_text()


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read settings from `path`, else $LORA_OPERATOR_CONFIG, else the packaged default."""
    chosen = path or os.environ.get(CONFIG_ENV)
    if chosen:
        text, source = Path(chosen).read_text(), str(chosen)
    else:
        text, source = default_settings_text(), "default settings"
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise SettingsError(f"{source}: expected a mapping at the top level")
    return parse_settings(data, source)

"""The contract between the operator and the trainer pod: config, exit codes, result.

Both sides import this module (the trainer may import the API; never the reverse), so the
exit-code table the trainer exits with and the Pod failure policy the operator builds from
it cannot drift apart.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any

from pydantic import Field, ValidationError

from lora_operator.api import ApiModel, LoRAJobSpec, Placement, Progress

CONFIG_ENV = "LORA_TRAINER_CONFIG"
CONFIG_DIR = "/etc/lora-trainer"
CONFIG_KEY = "trainer.yaml"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_ENV = "LORA_TERMINATION_MESSAGE_PATH"
RESULT_MAX_BYTES = 4096
# The trainer prints progress as JSON lines `{"event": "progress", <api.Progress fields>}` on
# stdout; the operator reads the newest from the pod's log (the trainer holds no API token).
PROGRESS_EVENT = "progress"
PROGRESS_LINE_MAX_CHARS = 2048
# S3 keys of a Secret named by spec.*.credentialsSecret, and the env prefixes under which the
# trainer pod receives them: the output's keys keep the plain AWS names; a base model or
# dataset with a Secret of its own gets them prefixed, so each location uses its own keys.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MODEL_CREDENTIALS_PREFIX = "LORA_MODEL_"
DATASET_CREDENTIALS_PREFIX = "LORA_DATASET_"


class ExitCode(enum.IntEnum):
    """What the trainer's exit status means, and so what the operator does next."""

    OK = 0
    INTERNAL = 1            # unexpected error: retried within backoffLimit
    CONFIG = 2              # permanent: the rendered config or the spec is unusable
    DATA = 3                # permanent: dataset missing, malformed, empty or all-truncated
    MODEL = 4               # permanent: base model missing, corrupt or unsupported
    AUTH = 5                # permanent: credentials refused by storage or the hub
    QUALITY_GATE = 6        # permanent: adapter did not beat the base by evaluation.minImprovement
    OUTPUT_CONFLICT = 7     # permanent: another job's adapter is at output.uri, overwrite false
    OUT_OF_MEMORY = 42      # escalate: CUDA out of memory; retry one VRAM class up / QLoRA
    STORAGE = 75            # retryable: storage unreachable or failing after retries
    PREEMPTED = 143         # retryable: SIGTERM (node drain, preemption, suspend)

    @property
    def permanent(self) -> bool:
        return self in PERMANENT_EXIT_CODES

    @property
    def reason(self) -> str:
        return _REASONS[self]


PERMANENT_EXIT_CODES = frozenset({ExitCode.CONFIG, ExitCode.DATA, ExitCode.MODEL, ExitCode.AUTH,
                                  ExitCode.QUALITY_GATE, ExitCode.OUTPUT_CONFLICT})
_REASONS = {
    ExitCode.OK: "Completed", ExitCode.INTERNAL: "TrainerError", ExitCode.CONFIG: "InvalidConfig",
    ExitCode.DATA: "InvalidDataset", ExitCode.MODEL: "InvalidModel",
    ExitCode.AUTH: "Unauthorized", ExitCode.QUALITY_GATE: "QualityGateFailed",
    ExitCode.OUTPUT_CONFLICT: "OutputConflict", ExitCode.OUT_OF_MEMORY: "OutOfMemory",
    ExitCode.STORAGE: "StorageUnavailable", ExitCode.PREEMPTED: "Preempted",
}


class JobIdentity(ApiModel):
    """Which LoRAJob this run belongs to (checkpoints and manifests are keyed by uid)."""

    name: str
    namespace: str = "default"
    uid: str = Field(description="The LoRAJob's metadata.uid; local runs make one up.")
    attempt: int = Field(default=1, ge=1)


class TrainerConfig(ApiModel):
    """What the operator renders into the file the trainer pod reads (`CONFIG_DIR`)."""

    job: JobIdentity
    spec: LoRAJobSpec
    placement: Placement
    checkpoint_uri: str = Field(description="Where checkpoints go (beside the output).")
    allowed_output_prefixes: list[str] | None = Field(default=None, description=(
        "Storage prefixes this job's namespace may write under (operator setting "
        "storagePrefixes); the trainer refuses any other output. None: unrestricted."))


class TrainerResult(ApiModel):
    """The ≤ 4 KiB JSON the trainer writes to the termination-message path."""

    exit_code: int
    reason: str
    message: str = ""
    adapter_uri: str | None = None
    manifest_uri: str | None = None
    manifest_sha256: str | None = None
    size_bytes: int | None = None
    base_eval_loss: float | None = None
    adapter_eval_loss: float | None = None
    improvement: float | None = None
    base_test_loss: float | None = None
    adapter_test_loss: float | None = None
    merged_uri: str | None = None
    steps: int | None = None
    train_seconds: float | None = None
    peak_memory_gib: float | None = None


# Query parameters that make a URL a credential (S3 SigV4/SigV2 presigned URLs, STS tokens,
# GCS and Azure SAS signatures).
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:X-Amz-(?:Signature|Credential|Security-Token)|X-Goog-(?:Signature|Credential)"
    r"|Signature|AWSAccessKeyId|sig|se|sv|token)=)[^&\s'\"<>#]*")


def redact_url_secrets(text: str) -> str:
    """`text` with the values of presigned-URL query parameters (signatures, credentials,
    tokens) replaced by `<redacted>`: status messages and events are readable by anyone who
    can list LoRAJobs, and a presigned URL is a bearer credential."""
    return _SECRET_QUERY.sub(r"\1<redacted>", text)


def redact_messages(value: Any) -> Any:
    """A status patch with every string field named `message` passed through
    `redact_url_secrets` (top level, conditions, nested objects)."""
    if isinstance(value, dict):
        return {k: redact_url_secrets(v) if k == "message" and isinstance(v, str)
                else redact_messages(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_messages(v) for v in value]
    return value


def uri_under(uri: str, prefixes: list[str]) -> bool:
    """Whether `uri` lies under one of `prefixes`, a prefix naming a folder (`s3://b/team`
    covers `s3://b/team/x`, not `s3://b/team-2/`). A `.` or `..` segment never does: some
    stores and clients normalise them away, and the check must not be fooled by that."""
    path = uri.split("://", 1)[-1]
    if any(part in (".", "..") for part in path.split("/")):
        return False
    here = uri if uri.endswith("/") else uri + "/"
    return any(here.startswith(p if p.endswith("/") else p + "/") for p in prefixes)


def checkpoint_uri_for(output_uri: str, job_uid: str) -> str:
    """Checkpoints live beside the adapter, under a prefix private to the job's uid."""
    return output_uri.rstrip("/") + f"/.checkpoints/{job_uid}/"


def last_progress(log_tail: str) -> Progress | None:
    """The newest progress line in the tail of a trainer's log, or None.

    The log is written by the tenant's pod, so a line is trusted for nothing but its own
    job's progress: over-long lines, other events and anything that is not an
    `api.Progress` with a step (unknown keys, wrong types) are skipped."""
    for line in reversed(log_tail.splitlines()):
        if len(line) > PROGRESS_LINE_MAX_CHARS or f'"{PROGRESS_EVENT}"' not in line:
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if not isinstance(data, dict) or data.pop("event", None) != PROGRESS_EVENT:
            continue
        try:
            progress = Progress.model_validate(data)
        except ValidationError:
            continue
        if progress.step is not None:  # an empty record would only erase the last one
            return progress
    return None

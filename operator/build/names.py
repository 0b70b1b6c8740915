"""Names, labels and owner references shared by every object the operator makes.

Names are deterministic functions of the LoRAJob's name (and attempt), never random: a
restarted operator finds what it already made by name, and a create that races another
one gets 409 AlreadyExists and adopts the existing object, if its controller reference is
this LoRAJob's uid, instead of making a duplicate. Names are never shortened or hashed,
so two LoRAJobs never share a child name (the CRD caps LoRAJob names for that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_operator import api

MAX_NAME = 63  # a DNS label: Jobs put their name into pod labels, so 63, not 253

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "lora-operator"
JOB_NAME_LABEL = f"{api.GROUP}/job-name"
ATTEMPT_LABEL = f"{api.GROUP}/attempt"
VRAM_CLASS_LABEL = f"{api.GROUP}/vram-class"
SPEC_HASH_ANNOTATION = f"{api.GROUP}/spec-hash"
GPUS_ANNOTATION = f"{api.GROUP}/gpus"
# On the trainer's pod template: its config (trainer_config.render), which a downwardAPI
# volume turns into the file the trainer reads.
CONFIG_ANNOTATION = f"{api.GROUP}/trainer-config"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Which operator installation handles a LoRAJob (like Argo's instanceID): an operator started
# with an instance name handles only LoRAJobs carrying this label with that value; one
# without handles only LoRAJobs without it. Children inherit the label.
INSTANCE_LABEL = f"{api.GROUP}/operator-instance"
# Test/dev hook: LoRAJob annotations with this prefix are copied onto the trainer pod, so the
# kwok stages of the local cluster (hack/cluster/kwok-stages.yaml) can be told how a pod ends.
# Harmless in production: no kubelet reads them.
KWOK_ANNOTATION_PREFIX = "kwok.lorajob.dev/"


@dataclass(frozen=True)
class Owner:
    """The few facts about a LoRAJob that its children need (name, uid, labels)."""

    name: str
    namespace: str
    uid: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Any) -> Owner:
        """From a LoRAJob as a dict (or kopf Body)."""
        meta = body.get("metadata", {})
        return cls(name=meta["name"], namespace=meta.get("namespace") or "default",
                   uid=meta.get("uid", ""), labels=dict(meta.get("labels") or {}),
                   annotations=dict(meta.get("annotations") or {}))

    @property
    def queue_name(self) -> str | None:
        """The Kueue LocalQueue the job asked for, if any."""
        return self.labels.get(KUEUE_QUEUE_LABEL) or None


class NameTooLongError(ValueError):
    """A LoRAJob name too long for its children's names (the CRD refuses such names; one
    created before that rule existed is failed with this message instead)."""


def child_name(base: str, suffix: str) -> str:
    """`base + suffix`, never shortened: a shortened (hashed) name can collide with another
    LoRAJob's child, so a name that does not fit is refused instead. The CRD caps LoRAJob
    names at `api.MAX_NAME_LENGTH`, which leaves room for every suffix used here."""
    full = base + suffix
    if len(base) > api.MAX_NAME_LENGTH or len(full) > MAX_NAME:
        raise NameTooLongError(
            f"metadata.name {base!r} is {len(base)} characters; at most {api.MAX_NAME_LENGTH} "
            f"are allowed so that child objects such as {suffix!r} fit {MAX_NAME} characters")
    return full


def job_name(lorajob: str, attempt: int) -> str:
    """The batch/v1 Job of one attempt: `<name>-a<attempt>`."""
    return child_name(lorajob, f"-a{attempt}")


def selector_labels(owner: Owner) -> dict[str, str]:
    """Labels that find every child of one LoRAJob (`-l lorajob.dev/job-name=NAME`)."""
    return {JOB_NAME_LABEL: owner.name}


def labels(owner: Owner, attempt: int | None = None) -> dict[str, str]:
    """Labels on every child; label values are at most 63 chars, like names."""
    out = {MANAGED_BY_LABEL: MANAGED_BY, **selector_labels(owner)}
    if owner.labels.get(INSTANCE_LABEL):
        out[INSTANCE_LABEL] = owner.labels[INSTANCE_LABEL]
    if attempt is not None:
        out[ATTEMPT_LABEL] = str(attempt)
    return out


def owner_reference(owner: Owner) -> dict[str, Any]:
    """A controller reference: the garbage collector deletes children with their LoRAJob."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(owner: Owner, name: str, attempt: int | None = None,
             extra_labels: dict[str, str] | None = None,
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """Object metadata with the standard labels and the owner reference."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**labels(owner, attempt), **(extra_labels or {})},
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta

"""What a LoRAJob may ask for, by the operator's settings: checked at plan time, before any
child object exists.

Creating a LoRAJob is equivalent to creating a pod in its namespace (README, "Security
model"): the operator builds that pod with the job's tolerations, priority class, Secrets
and code. These rules let a cluster admin narrow that down per operator, and keep tenants'
adapters apart in shared storage:

- `allowTrustRemoteCode` (default false): the model repository's own Python runs in a pod
  holding storage credentials;
- `allowedTolerationKeys` (default: any key but the empty one, which tolerates every taint);
- `allowedPriorityClasses` (default: any but the `system-` classes);
- `allowedSecrets` (default: any Secret of the job's own namespace), shell-style patterns;
- `storagePrefixes`: namespace → URI prefixes its adapters (and so its checkpoints, which
  live under the adapter's prefix) may be written under; the trainer enforces the same list;
- `pvc://` locations are refused: the Job builder mounts no PersistentVolumeClaim.

Pure: `violation` returns the first broken rule, naming the field and what is allowed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from lora_operator import api, contract
from lora_operator.settings import Settings

ANY_NAMESPACE = "*"


@dataclass(frozen=True)
class Violation:
    """A refused spec: the condition reason and a message naming the field."""

    reason: str
    message: str


def allowed_prefixes(namespace: str, settings: Settings) -> list[str] | None:
    """The storage prefixes of `namespace` with `{namespace}` filled in; None: unrestricted."""
    table = settings.storage_prefixes
    if not table:
        return None
    prefixes = table.get(namespace, table.get(ANY_NAMESPACE))
    if prefixes is None:
        return []  # a restricted operator and a namespace it lists nothing for
    return [p.replace("{namespace}", namespace) for p in prefixes]


def _trust_remote_code(spec: api.LoRAJobSpec, settings: Settings) -> Violation | None:
    if spec.base_model.trust_remote_code and not settings.allow_trust_remote_code:
        return Violation("PolicyViolation", (
            "spec.baseModel.trustRemoteCode: not allowed by the operator's settings "
            "(allowTrustRemoteCode false); allowed: false"))
    return None


def _tolerations(spec: api.LoRAJobSpec, settings: Settings) -> Violation | None:
    allowed = settings.allowed_toleration_keys
    for i, tol in enumerate(spec.resources.tolerations):
        key = tol.key or ""
        if allowed is None:
            ok, what = key != "", "any key except the empty key (which tolerates every taint)"
        else:
            ok = ANY_NAMESPACE in allowed or key in allowed
            what = ", ".join(allowed) or "none"
        if not ok:
            return Violation("PolicyViolation", (
                f"spec.resources.tolerations[{i}].key: {key!r} is not allowed by the operator's "
                f"settings; allowed: {what}"))
    return None


def _priority_class(spec: api.LoRAJobSpec, settings: Settings) -> Violation | None:
    name = spec.resources.priority_class_name
    if not name:
        return None
    allowed = settings.allowed_priority_classes
    ok = (not name.startswith("system-")) if allowed is None else name in allowed
    if ok:
        return None
    what = "any class not named system-*" if allowed is None else ", ".join(allowed) or "none"
    return Violation("PolicyViolation", (
        f"spec.resources.priorityClassName: {name!r} is not allowed by the operator's "
        f"settings; allowed: {what}"))


def _secrets(spec: api.LoRAJobSpec, settings: Settings) -> Violation | None:
    allowed = settings.allowed_secrets
    if allowed is None:
        return None
    named = {"spec.baseModel.credentialsSecret": spec.base_model.credentials_secret,
             "spec.dataset.credentialsSecret": spec.dataset.credentials_secret,
             "spec.output.credentialsSecret": spec.output.credentials_secret}
    for path, secret in named.items():
        if secret and not any(fnmatch.fnmatchcase(secret, pattern) for pattern in allowed):
            return Violation("PolicyViolation", (
                f"{path}: Secret {secret!r} is not allowed by the operator's settings; "
                f"allowed: {', '.join(allowed) or 'none'}"))
    return None


def _pvc(spec: api.LoRAJobSpec) -> Violation | None:
    uris = {"spec.baseModel.uri": spec.base_model.uri, "spec.dataset.uri": spec.dataset.uri,
            "spec.dataset.validation.uri": spec.dataset.validation.uri,
            "spec.dataset.test.uri": spec.dataset.test.uri if spec.dataset.test else None,
            "spec.output.uri": spec.output.uri}
    bad = [path for path, uri in uris.items() if uri and uri.startswith("pvc://")]
    if not bad:
        return None
    return Violation("PVCNotSupported", (
        f"{', '.join(bad)}: pvc:// is not supported in cluster mode (the operator's Job "
        "mounts no PersistentVolumeClaim); allowed: s3:// (and hf:// for models, https:// "
        "for data)"))


def _storage(spec: api.LoRAJobSpec, namespace: str, settings: Settings) -> Violation | None:
    prefixes = allowed_prefixes(namespace, settings)
    if prefixes is None or contract.uri_under(spec.output.uri, prefixes):
        return None
    return Violation("StorageNotAllowed", (
        f"spec.output.uri: {spec.output.uri} is outside the storage prefixes allowed for "
        f"namespace {namespace}; allowed: {', '.join(prefixes) or 'none'} (operator setting "
        "storagePrefixes)"))


def violation(spec: api.LoRAJobSpec, namespace: str, settings: Settings) -> Violation | None:
    """The first rule `spec` breaks in `namespace`, or None when the job may run."""
    return (_trust_remote_code(spec, settings) or _tolerations(spec, settings)
            or _priority_class(spec, settings) or _secrets(spec, settings) or _pvc(spec)
            or _storage(spec, namespace, settings))

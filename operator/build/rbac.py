"""The trainer's identity: a ServiceAccount that may only report this one job's progress.

The trainer patches `status.progress` of its own LoRAJob and nothing else, so a leaked
token from one training pod can neither read secrets nor touch other jobs. The Role names
the LoRAJob in `resourceNames`, which is why each job gets its own Role.
"""

from __future__ import annotations

from typing import Any

from lora_operator import api
from lora_operator.build import names


def service_account(owner: names.Owner) -> dict[str, Any]:
    """A per-job ServiceAccount; its token is not mounted by default (the Job's pod opts in)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": names.metadata(owner, names.trainer_name(owner.name)),
        "automountServiceAccountToken": False,
    }


def role(owner: names.Owner) -> dict[str, Any]:
    """get + patch on this LoRAJob's status subresource, by name, and nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": names.metadata(owner, names.trainer_name(owner.name)),
        "rules": [{
            "apiGroups": [api.GROUP],
            "resources": [f"{api.PLURAL}/status"],
            "resourceNames": [owner.name],
            "verbs": ["get", "patch"],
        }],
    }


def role_binding(owner: names.Owner) -> dict[str, Any]:
    """Binds the job's Role to the job's ServiceAccount."""
    name = names.trainer_name(owner.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": names.metadata(owner, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    }

"""The few Kubernetes and S3 calls the controller makes, as blocking functions.

The controller runs them in a thread pool (sized by `Settings.max_workers`). Creates are
by deterministic name and treat 409 AlreadyExists as "adopt what is there" when what is
there is ours (its controller ownerReference is the LoRAJob's uid), which is what makes a
killed-and-restarted operator safe: it can never make a second Job for an attempt. An
object of that name that is not ours is never adopted or modified (`NameConflictError`), and
a create the API server refuses for good (4xx: invalid, forbidden, over quota, denied by a
webhook) raises `ChildRejectedError` with the server's message, so the job fails with it
instead of retrying forever.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from lora_operator import api

log = logging.getLogger(__name__)
# Refusals that may pass by themselves: expired credentials, a timeout, rate limiting.
TRANSIENT_4XX = frozenset({401, 408, 429})


class NameConflictError(RuntimeError):
    """A child's name is taken by an object this LoRAJob does not control."""

    def __init__(self, kind: str, namespace: str, name: str, owner: str) -> None:
        super().__init__(f"{kind} {namespace}/{name} already exists and is not controlled by "
                         f"this LoRAJob ({owner}); it was left untouched. Delete or rename it, "
                         "or rename the LoRAJob")
        self.kind, self.name = kind, name


class ChildRejectedError(RuntimeError):
    """The API server refused to create a child for a reason retrying will not change."""

    def __init__(self, kind: str, name: str, status: int, message: str) -> None:
        super().__init__(f"the API server refused to create {kind} {name} ({status}): {message}")
        self.kind, self.name, self.status = kind, name, status


def server_message(exc: ApiException) -> str:
    """The `message` of a Kubernetes Status body (what kubectl would print), else the reason."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or exc.reason or "").strip()


def controller_uid(obj: dict[str, Any]) -> str | None:
    """The uid of an object's controller ownerReference, if it has one."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid") or "")
    return None


def load_kube_config(pool_size: int = 10) -> None:
    """In-cluster credentials in a pod, else the kubeconfig ($KUBECONFIG or ~/.kube/config).

    `pool_size` should cover the reconcile workers: with fewer HTTP connections than
    workers, urllib3 discards and reopens connections under load ("Connection pool is full").
    """
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    cfg = client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = max(pool_size, cfg.connection_pool_maxsize or 0)
    client.Configuration.set_default(cfg)


class Kube:
    """Typed-enough wrappers over the kubernetes client (plain dicts in, dicts out)."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api_client = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.rbac = client.RbacAuthorizationV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    def _dict(self, obj: Any) -> dict[str, Any]:
        if isinstance(obj, dict):
            return obj
        out: dict[str, Any] = self.api_client.sanitize_for_serialization(obj)
        return out

    # ------------------------------------------------------------------ children

    def create(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create a child: (the object, True), or (the existing object, False) when one of
        this name is already there and its controller is the same owner as `body`'s (a
        restart, or a racing replica: adopted, not duplicated). Raises NameConflictError
        for someone else's object, ChildRejectedError for a refusal that will not pass."""
        kind, meta = body["kind"], body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        creators = {
            "ServiceAccount": self.core.create_namespaced_service_account,
            "ConfigMap": self.core.create_namespaced_config_map,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
            "Job": self.batch.create_namespaced_job,
        }
        try:
            return self._dict(creators[kind](ns, body)), True
        except ApiException as exc:
            if exc.status == 409:
                return self._adopt(kind, ns, name, controller_uid(body) or ""), False
            if exc.status is not None and 400 <= exc.status < 500 and \
                    exc.status not in TRANSIENT_4XX:
                raise ChildRejectedError(kind, name, exc.status, server_message(exc)) from None
            raise

    def _adopt(self, kind: str, ns: str, name: str, owner_uid: str) -> dict[str, Any]:
        """The existing object named like our child, if its controller is `owner_uid`."""
        readers = {
            "ServiceAccount": self.core.read_namespaced_service_account,
            "ConfigMap": self.core.read_namespaced_config_map,
            "Role": self.rbac.read_namespaced_role,
            "RoleBinding": self.rbac.read_namespaced_role_binding,
            "Job": self.batch.read_namespaced_job,
        }
        existing = self._dict(readers[kind](name, ns))
        uid = controller_uid(existing)
        if not owner_uid or uid != owner_uid:
            owner = f"its controller is uid {uid}" if uid else "it has no controller"
            raise NameConflictError(kind, ns, name, owner)
        return existing

    def delete_job(self, namespace: str, name: str, uid: str) -> bool:
        """Delete a Job and, in the background, its pods (the trainer stops: SIGTERM, then
        the grace period). uid-guarded: a newer Job of the same name is never touched."""
        try:
            self.batch.delete_namespaced_job(
                name, namespace,
                body={"propagationPolicy": "Background", "preconditions": {"uid": uid}})
            return True
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise

    def set_job_annotation(self, namespace: str, name: str, key: str,
                           value: str) -> dict[str, Any]:
        """Record an operator decision on the Job (a place the trainer's token cannot write)."""
        return self._dict(self.batch.patch_namespaced_job(
            name, namespace, {"metadata": {"annotations": {key: value}}}))

    def replace_config_map_data(self, body: dict[str, Any]) -> None:
        """Create the ConfigMap, or bring an existing one's data and labels up to date
        (only when it is ours: `create` raises NameConflictError otherwise)."""
        if not self.create(body)[1]:
            meta = body["metadata"]
            self.core.patch_namespaced_config_map(
                meta["name"], meta["namespace"],
                {"metadata": {"labels": meta["labels"]}, "data": body["data"]})

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._dict(self.batch.read_namespaced_job(name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> dict[str, Any]:
        return self._dict(self.batch.patch_namespaced_job(
            name, namespace, {"spec": {"suspend": suspend}}))

    # ------------------------------------------------------------------ the LoRAJob

    def read_lorajob(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._dict(self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any],
                     resource_version: str | None = None) -> dict[str, Any] | None:
        """Merge-patch `status` (never `progress`: the trainer owns it). With a
        resourceVersion the patch is refused (409) if the object changed since it was read;
        that returns None and the caller reconciles again from fresh state."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            return self._dict(self.custom.patch_namespaced_custom_object_status(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, body))
        except ApiException as exc:
            if exc.status in (404, 409):
                return None
            raise

    def delete_lorajob(self, namespace: str, name: str, uid: str) -> bool:
        """Delete (children follow through the garbage collector); uid-guarded."""
        try:
            self.custom.delete_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name,
                body={"propagationPolicy": "Background", "preconditions": {"uid": uid}})
            return True
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise


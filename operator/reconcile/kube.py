"""The few Kubernetes and S3 calls the controller makes, as blocking functions.

The controller runs them in a thread pool (sized by `Settings.max_workers`). Creates are
by deterministic name and treat 409 AlreadyExists as "adopt what is there", which is what
makes a killed-and-restarted operator safe: it can never make a second Job for an attempt.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from lora_operator import api
from lora_operator.reconcile.status import ManifestCheck

log = logging.getLogger(__name__)


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

    def create(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create a child; None when it already existed (adopted, not duplicated)."""
        kind, ns = body["kind"], body["metadata"]["namespace"]
        creators = {
            "ServiceAccount": self.core.create_namespaced_service_account,
            "ConfigMap": self.core.create_namespaced_config_map,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
            "Job": self.batch.create_namespaced_job,
        }
        try:
            return self._dict(creators[kind](ns, body))
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise

    def replace_config_map_data(self, body: dict[str, Any]) -> None:
        """Create the ConfigMap, or bring an existing one's data and labels up to date."""
        if self.create(body) is None:
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


def head_manifest(uri: str, endpoint: str | None, region: str) -> ManifestCheck:
    """HEAD the manifest with the operator's own S3 credentials (from its environment)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint or os.environ.get("AWS_ENDPOINT_URL"),
                      region_name=region,
                      config=Config(connect_timeout=5, read_timeout=10,
                                    retries={"max_attempts": 2}))
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return ManifestCheck(False, f"the trainer reported success but {uri} is not in "
                                        "storage")
        return ManifestCheck(None, f"could not check {uri} yet: {code or exc}")
    except BotoCoreError as exc:
        return ManifestCheck(None, f"could not check {uri} yet: {exc}")
    return ManifestCheck(True, f"manifest verified in storage ({head.get('ContentLength')} bytes)")

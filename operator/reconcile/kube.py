"""The few Kubernetes API calls the controllers make, as raw async HTTP (aiohttp, JSON).

Why not the `kubernetes` client: its blocking calls needed a thread per request, its model
classes and urllib3 pool were most of the operator's memory and a good part of its CPU
(bench/__main__.py), and a handful of verbs on six resources need none of it. aiohttp is
already there (kopf's own transport), so the calls run on the operator's event loop with one
connection pool. Credentials come from kopf's own minimal login helpers (service account in
a pod, else the kubeconfig); a 401 re-reads them once, because a pod's projected token is
rotated on disk while the operator runs.

Creates are by deterministic name and treat 409 AlreadyExists as "adopt what is there" when
what is there is ours (its controller ownerReference is the owner's uid), which is what makes
a killed-and-restarted operator safe: it can never make a second Job for an attempt. An
object of that name that is not ours is never adopted or modified (`NameConflictError`), and
a create the API server refuses for good (4xx: invalid, forbidden, over quota, denied by a
webhook) raises `ChildRejectedError` with the server's message, so the job fails with it
instead of retrying forever. Anything else (5xx, timeouts, a lost connection) raises
`ApiError` or aiohttp's error, which the controllers retry with backoff.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import ssl
import tempfile
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import kopf

from lora_operator import api, sweep_api
from lora_operator.reconcile import fastjson

log = logging.getLogger(__name__)
# Refusals that may pass by themselves: expired credentials, a timeout, rate limiting.
TRANSIENT_4XX = frozenset({401, 408, 429})
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_SECONDS = 30.0
# A pod's log passes through its node's kubelet: a slow or absent one must not hold a
# reconcile worker for long.
LOG_TIMEOUT_SECONDS = 5.0
Login = Callable[[], kopf.ConnectionInfo]
Obj = dict[str, Any]

_CORE, _BATCH = "/api/v1", "/apis/batch/v1"
_OURS = f"/apis/{api.GROUP}/{api.VERSION}"
# kind → (API path prefix, plural): every resource the operator writes or reads by name.
RESOURCES: dict[str, tuple[str, str]] = {
    "Pod": (_CORE, "pods"),
    "Job": (_BATCH, "jobs"),
    api.KIND: (_OURS, api.PLURAL),
    sweep_api.KIND: (_OURS, sweep_api.PLURAL),
}


class ApiError(Exception):
    """A non-2xx answer of the API server (`body` is its Status object, as text)."""

    def __init__(self, status: int, reason: str, body: str = "") -> None:
        self.status, self.reason, self.body = status, reason, body
        super().__init__(f"({status}) {server_message(self) or reason}")


class LoginError(RuntimeError):
    """Neither a service account (in a pod) nor a kubeconfig was found."""


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


def server_message(exc: ApiError) -> str:
    """The `message` of a Kubernetes Status body (what kubectl would print), else the reason."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or "").strip()


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of an object's controller ownerReference, if it has one."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid") or "")
    return None


def login() -> kopf.ConnectionInfo:
    """The service account's token and CA in a pod, else the current kubeconfig context
    ($KUBECONFIG or ~/.kube/config): client certificates, a token or basic auth."""
    info = kopf.login_with_service_account()
    if info is not None:
        return dataclasses.replace(info, server=in_cluster_server(info.server))
    info = kopf.login_with_kubeconfig()
    if info is None:
        raise LoginError("no Kubernetes credentials: not in a pod, and neither $KUBECONFIG "
                         "nor ~/.kube/config exists")
    return info


def in_cluster_server(default: str) -> str:
    """The API server as client-go finds it in a pod ($KUBERNETES_SERVICE_HOST and _PORT):
    kopf's helper names https://kubernetes.default.svc, which needs cluster DNS (not there
    for a hostNetwork pod, nor under the dev node agent)."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        return default
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def resource_path(kind: str, namespace: str, name: str = "", subresource: str = "") -> str:
    """The URL path of a namespaced collection, or of one object (and its subresource)."""
    prefix, plural = RESOURCES[kind]
    parts = [prefix, "namespaces", _quote(namespace), plural]
    if name:
        parts.append(_quote(name))
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _pem(data: bytes | str) -> bytes:
    """A kubeconfig's *-data field (base64 of PEM) as PEM bytes."""
    return base64.b64decode(data)


def _load_cert_chain(context: ssl.SSLContext, info: kopf.ConnectionInfo) -> None:
    """The client certificate, from files or from kubeconfig data (which `ssl` only takes
    as files: written to a private temporary folder, read, and removed at once)."""
    cert, key = info.certificate_path, info.private_key_path
    if cert and key:
        context.load_cert_chain(certfile=cert, keyfile=key)
        return
    if not (info.certificate_data or cert) or not (info.private_key_data or key):
        return
    with tempfile.TemporaryDirectory(prefix="lora-operator-tls-") as folder:
        if not cert:
            cert = os.path.join(folder, "tls.crt")
            with open(cert, "wb") as f:
                f.write(_pem(info.certificate_data or b""))
        if not key:
            key = os.path.join(folder, "tls.key")
            with os.fdopen(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(_pem(info.private_key_data or b""))
        context.load_cert_chain(certfile=cert, keyfile=key)


def ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext:
    """TLS as the credentials say: their CA (else the system's), a client certificate if
    any, no verification only when the kubeconfig asks for insecure-skip-tls-verify."""
    cadata = _pem(info.ca_data).decode() if info.ca_data else None
    context = ssl.create_default_context(cafile=info.ca_path or None, cadata=cadata)
    _load_cert_chain(context, info)
    if info.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def authorization(info: kopf.ConnectionInfo) -> str | None:
    """The Authorization header for a token or basic auth (None: client certificates)."""
    if info.token:
        return f"{info.scheme or 'Bearer'} {info.token}"
    if info.username and info.password:
        return aiohttp.BasicAuth(info.username, info.password).encode()
    return info.scheme or None


class ApiClient:
    """One aiohttp session to the API server: JSON in, dicts out, `ApiError` for non-2xx.

    Built outside the event loop (the runner builds it before kopf starts one); the session
    is opened by the first request, in the running loop. `login` is called once now and
    again after a 401: when it yields a different token, the request is retried once."""

    def __init__(self, login: Login = login, connections: int = 10,
                 timeout: float = REQUEST_TIMEOUT_SECONDS) -> None:
        self._login = login
        info = login()
        self.server = str(info.server).rstrip("/")
        self._ssl = ssl_context(info)
        self._auth = authorization(info)
        self._connections = max(1, connections)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections, ssl=self._ssl),
                timeout=self._timeout, headers={"Accept": JSON, "User-Agent": "lora-operator"})
        return self._session

    async def close(self) -> None:
        """Close the session (its connections); a later request opens a new one."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: Any = None,
                      content_type: str = JSON) -> Obj:
        """`method` `path` with `body` as JSON; the answer's JSON object. Raises ApiError."""
        data = None if body is None else fastjson.dumps(body)
        text = await self._exchange(method, path, data, content_type)
        out = fastjson.loads(text) if text else {}
        return out if isinstance(out, dict) else {}

    async def text(self, path: str, timeout: float = LOG_TIMEOUT_SECONDS) -> str:
        """GET `path`, whose answer is text (a pod's log). Raises ApiError, or
        TimeoutError after `timeout` seconds."""
        return await self._exchange("GET", path, None, JSON, aiohttp.ClientTimeout(total=timeout))

    async def _exchange(self, method: str, path: str, data: bytes | None, content_type: str,
                        timeout: aiohttp.ClientTimeout | None = None) -> str:
        """The answer's text; after a 401, once more with re-read credentials. Raises ApiError."""
        status, reason, text = await self._send(method, path, data, content_type, timeout)
        if status == 401 and await self._relogin():
            status, reason, text = await self._send(method, path, data, content_type, timeout)
        if status >= 300:
            raise ApiError(status, reason, text)
        return text

    async def _send(self, method: str, path: str, data: bytes | None, content_type: str,
                    timeout: aiohttp.ClientTimeout | None = None) -> tuple[int, str, str]:
        headers = {"Content-Type": content_type} if data is not None else {}
        if self._auth:
            headers["Authorization"] = self._auth
        async with self._open().request(method, self.server + path, data=data, headers=headers,
                                        timeout=timeout or self._timeout) as resp:
            return resp.status, resp.reason or "", await resp.text()

    async def _relogin(self) -> bool:
        """Read the credentials again (a rotated service-account token); True when the
        Authorization changed, so that a retry can succeed."""
        try:
            info = await asyncio.to_thread(self._login)
        except Exception:  # the original 401 is the error worth reporting
            log.exception("re-reading the Kubernetes credentials after a 401 failed")
            return False
        fresh = authorization(info)
        if fresh == self._auth:
            return False
        log.info("the API server refused our token (401); using the re-read one")
        self._auth = fresh
        return True

    # ------------------------------------------------------------------ verbs by kind

    async def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        """The object, or None when there is none (404)."""
        try:
            return await self.request("GET", resource_path(kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, body: Mapping[str, Any]) -> Obj:
        """POST `body` to its kind's collection in its namespace."""
        path = resource_path(body["kind"], body["metadata"]["namespace"])
        return await self.request("POST", path, body)

    async def merge_patch(self, kind: str, namespace: str, name: str, patch: Mapping[str, Any],
                          subresource: str = "") -> Obj:
        """A JSON merge patch (RFC 7386) of an object or its subresource."""
        path = resource_path(kind, namespace, name, subresource)
        return await self.request("PATCH", path, patch, content_type=MERGE_PATCH)

    async def patch_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any],
                           resource_version: str | None = None) -> Obj | None:
        """Merge-patch `status`; with a resourceVersion the server refuses it (409) if the
        object changed since it was read. None for 409 or 404: read again and derive."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            return await self.merge_patch(kind, namespace, name, body, "status")
        except ApiError as exc:
            if exc.status in (404, 409):
                return None
            raise

    async def delete(self, kind: str, namespace: str, name: str, uid: str) -> bool:
        """Delete the object with this uid only (a newer one of the same name is left
        alone); dependents go in the background. False when it was not there (404) or is
        another one (409, the uid precondition)."""
        options = {"propagationPolicy": "Background", "preconditions": {"uid": uid}}
        try:
            await self.request("DELETE", resource_path(kind, namespace, name), options)
            return True
        except ApiError as exc:
            if exc.status in (404, 409):
                return False
            raise


class Kube:
    """The LoRAJob controller's calls (plain dicts in, dicts out)."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    # ------------------------------------------------------------------ children

    async def create(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create a child: (the object, True), or (the existing object, False) when one of
        this name is already there and its controller is the same owner as `body`'s (a
        restart, or a racing replica: adopted, not duplicated). Raises NameConflictError
        for someone else's object, ChildRejectedError for a refusal that will not pass."""
        kind, meta = body["kind"], body["metadata"]
        try:
            return await self.client.create(body), True
        except ApiError as exc:
            if exc.status == 409:
                owner = controller_uid(body) or ""
                return await self._adopt(kind, meta["namespace"], meta["name"], owner), False
            if 400 <= exc.status < 500 and exc.status not in TRANSIENT_4XX:
                raise ChildRejectedError(kind, meta["name"], exc.status,
                                         server_message(exc)) from None
            raise

    async def _adopt(self, kind: str, ns: str, name: str, owner_uid: str) -> dict[str, Any]:
        """The existing object named like our child, if its controller is `owner_uid`."""
        existing = await self.client.request("GET", resource_path(kind, ns, name))
        uid = controller_uid(existing)
        if not owner_uid or uid != owner_uid:
            owner = f"its controller is uid {uid}" if uid else "it has no controller"
            raise NameConflictError(kind, ns, name, owner)
        return existing

    async def delete_job(self, namespace: str, name: str, uid: str) -> bool:
        """Delete a Job and, in the background, its pods (the trainer stops: SIGTERM, then
        the grace period). uid-guarded: a newer Job of the same name is never touched."""
        return await self.client.delete("Job", namespace, name, uid)

    async def read_log(self, namespace: str, pod: str, container: str, tail_lines: int,
                       limit_bytes: int) -> str:
        """The last `tail_lines` lines (at most `limit_bytes`) of a container's log."""
        query = urllib.parse.urlencode({"container": container, "tailLines": tail_lines,
                                        "limitBytes": limit_bytes})
        return await self.client.text(resource_path("Pod", namespace, pod, "log") + "?" + query)

    async def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.client.get("Job", namespace, name)

    async def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> dict[str, Any]:
        return await self.client.merge_patch("Job", namespace, name, {"spec": {"suspend": suspend}})

    # ------------------------------------------------------------------ the LoRAJob

    async def read_lorajob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.client.get(api.KIND, namespace, name)

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any],
                           resource_version: str | None = None) -> dict[str, Any] | None:
        """Merge-patch `status`. With a
        resourceVersion the patch is refused (409) if the object changed since it was read;
        that returns None and the caller reconciles again from fresh state."""
        return await self.client.patch_status(api.KIND, namespace, name, status, resource_version)

    async def delete_lorajob(self, namespace: str, name: str, uid: str) -> bool:
        """Delete (children follow through the garbage collector); uid-guarded."""
        return await self.client.delete(api.KIND, namespace, name, uid)

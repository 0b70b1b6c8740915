"""The operator's API client (operator/reconcile/kube.py) against a real local HTTP server.

The server is aiohttp.web on 127.0.0.1 answering like the API server would (Status bodies,
409 AlreadyExists / Conflict, 401 for a stale token); nothing of our own code is mocked, so
what is checked is what goes over the wire: paths, verbs, content types, bodies, headers.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from aiohttp import web

from lora_operator.reconcile import kube as kube_mod
from lora_operator.reconcile.controller import CallsIO
from lora_operator.reconcile.kube import (
    ApiClient,
    ApiError,
    ChildRejectedError,
    Kube,
    NameConflictError,
)
from lora_operator.reconcile.sweep_controller import SweepKube

Reply = tuple[int, dict[str, Any] | str]  # a str: a plain-text answer (a pod's log)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeApiServer:
    """Records every request; `reply` decides the answer (default 200 with the body),
    given after `delay` seconds."""

    reply: Callable[[Seen], Reply] = field(default=lambda seen: (200, seen.body or {}))
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    delay: float = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        text = await request.text()
        seen = Seen(request.method, request.path, dict(request.headers),
                    json.loads(text) if text else None, dict(request.query))
        self.seen.append(seen)
        if self.delay:
            await asyncio.sleep(self.delay)
        status, body = self.reply(seen)
        if isinstance(body, str):
            return web.Response(text=body, status=status)
        return web.json_response(body, status=status)


@contextlib.asynccontextmanager
async def serving(server: FakeApiServer, tls: ssl.SSLContext | None = None
                  ) -> AsyncIterator[FakeApiServer]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": message}


def child(kind: str = "Job", owner_uid: str = "uid-1") -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": kind,
            "metadata": {"name": "ft-a1", "namespace": "ml",
                         "ownerReferences": [{"kind": "LoRAJob", "name": "ft", "uid": owner_uid,
                                              "controller": True}]}}


def run(scenario: Callable[[FakeApiServer], Coroutine[Any, Any, None]],
        reply: Callable[[Seen], Reply] | None = None) -> FakeApiServer:
    """Start the server, run `scenario` against it in a fresh loop, return what it saw."""
    server = FakeApiServer(reply) if reply else FakeApiServer()

    async def body() -> None:
        async with serving(server):
            await scenario(server)

    asyncio.run(body())
    return server


def client_for(server: FakeApiServer, token: str = "t0") -> ApiClient:
    return ApiClient(lambda: kopf.ConnectionInfo(server=server.url, token=token))


async def using(server: FakeApiServer, fn: Callable[[Kube], Coroutine[Any, Any, Any]]) -> Any:
    client = client_for(server)
    try:
        return await fn(Kube(client))
    finally:
        await client.close()


# ------------------------------------------------------------------------- create / adopt


def test_create_posts_json_and_returns_the_object() -> None:
    out: list[Any] = []

    def reply(seen: Seen) -> Reply:
        return 201, {**seen.body, "metadata": {**seen.body["metadata"], "uid": "job-1"}}

    async def scenario(server: FakeApiServer) -> None:
        out.append(await using(server, lambda k: k.create(child())))

    server = run(scenario, reply)
    (obj, created), = out
    assert created is True and obj["metadata"]["uid"] == "job-1"
    (req,) = server.seen
    assert (req.method, req.path) == ("POST", "/apis/batch/v1/namespaces/ml/jobs")
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Authorization"] == "Bearer t0"
    assert req.body == child()


@pytest.mark.parametrize(("kind", "path"), [
    ("Pod", "/api/v1/namespaces/ml/pods"),
    ("Job", "/apis/batch/v1/namespaces/ml/jobs"),
    ("LoRAJob", "/apis/lorajob.dev/v1alpha1/namespaces/ml/lorajobs"),
    ("LoRASweep", "/apis/lorajob.dev/v1alpha1/namespaces/ml/lorasweeps"),
])
def test_every_kind_has_its_api_path(kind: str, path: str) -> None:
    assert kube_mod.resource_path(kind, "ml") == path
    assert kube_mod.resource_path(kind, "ml", "x", "status") == f"{path}/x/status"


def _already_exists_then(existing: dict[str, Any]) -> Callable[[Seen], Reply]:
    def reply(seen: Seen) -> Reply:
        if seen.method == "POST":
            return 409, status_body(409, "AlreadyExists", 'jobs.batch "ft-a1" already exists')
        return 200, existing
    return reply


def test_409_with_the_same_controller_adopts_the_existing_object() -> None:
    existing = {**child(), "metadata": {**child()["metadata"], "uid": "old"}}
    out: list[Any] = []

    async def scenario(server: FakeApiServer) -> None:
        out.append(await using(server, lambda k: k.create(child())))

    server = run(scenario, _already_exists_then(existing))
    assert out == [(existing, False)]
    assert [(s.method, s.path) for s in server.seen] == [
        ("POST", "/apis/batch/v1/namespaces/ml/jobs"),
        ("GET", "/apis/batch/v1/namespaces/ml/jobs/ft-a1")]


@pytest.mark.parametrize("theirs", [child(owner_uid="someone-else"),
                                    {"kind": "Job", "metadata": {"name": "ft-a1"}}])
def test_409_with_a_foreign_owner_is_a_name_conflict(theirs: dict[str, Any]) -> None:
    async def scenario(server: FakeApiServer) -> None:
        with pytest.raises(NameConflictError, match="Job ml/ft-a1"):
            await using(server, lambda k: k.create(child()))

    server = run(scenario, _already_exists_then(theirs))
    assert [s.method for s in server.seen] == ["POST", "GET"]  # looked, never modified


def test_422_is_a_rejection_with_the_servers_message() -> None:
    message = 'Job.batch "ft-1" is invalid: spec.template.spec.containers[0].image: Required'

    async def scenario(server: FakeApiServer) -> None:
        with pytest.raises(ChildRejectedError) as info:
            await using(server, lambda k: k.create(child("Job")))
        assert info.value.status == 422 and message in str(info.value)

    run(scenario, lambda seen: (422, status_body(422, "Invalid", message)))


@pytest.mark.parametrize("status", [500, 503, 429, 401])
def test_server_errors_and_transient_refusals_raise_a_retryable_api_error(status: int) -> None:
    async def scenario(server: FakeApiServer) -> None:
        with pytest.raises(ApiError) as info:
            await using(server, lambda k: k.create(child()))
        assert info.value.status == status and "etcd is sad" in str(info.value)

    run(scenario, lambda seen: (status, status_body(status, "InternalError", "etcd is sad")))


# ------------------------------------------------------------------------- status, delete, read


def test_patch_status_sends_a_guarded_merge_patch_and_returns_none_on_conflict() -> None:
    out: list[Any] = []

    async def scenario(server: FakeApiServer) -> None:
        out.append(await using(server, lambda k: k.patch_status("ml", "ft", {"phase": "Running"},
                                                                "41")))

    server = run(scenario, lambda seen: (409, status_body(409, "Conflict", "modified")))
    assert out == [None]
    (req,) = server.seen
    assert (req.method, req.path) == ("PATCH",
                                      "/apis/lorajob.dev/v1alpha1/namespaces/ml/lorajobs/ft/status")
    assert req.headers["Content-Type"] == "application/merge-patch+json"
    assert req.body == {"status": {"phase": "Running"}, "metadata": {"resourceVersion": "41"}}


def test_patch_status_returns_the_updated_object() -> None:
    out: list[Any] = []

    async def scenario(server: FakeApiServer) -> None:
        out.append(await using(server, lambda k: k.patch_status("ml", "ft", {"phase": "Running"})))

    server = run(scenario, lambda seen: (200, {"metadata": {"resourceVersion": "42"},
                                               "status": seen.body["status"]}))
    assert out == [{"metadata": {"resourceVersion": "42"}, "status": {"phase": "Running"}}]
    assert "metadata" not in server.seen[0].body  # no resourceVersion: unguarded


@pytest.mark.parametrize(("status", "deleted"), [(200, True), (404, False), (409, False)])
def test_delete_is_uid_guarded_and_in_the_background(status: int, deleted: bool) -> None:
    out: list[Any] = []

    async def scenario(server: FakeApiServer) -> None:
        out.append(await using(server, lambda k: k.delete_job("ml", "ft-1", "job-uid")))

    server = run(scenario, lambda seen: (status, status_body(status, "x", "y")))
    assert out == [deleted]
    (req,) = server.seen
    assert (req.method, req.path) == ("DELETE", "/apis/batch/v1/namespaces/ml/jobs/ft-1")
    assert req.body == {"propagationPolicy": "Background", "preconditions": {"uid": "job-uid"}}


def test_delete_lorajob_and_reads() -> None:
    out: list[Any] = []

    def reply(seen: Seen) -> Reply:
        if seen.path.endswith("/missing"):
            return 404, status_body(404, "NotFound", "not found")
        return 200, {"kind": "LoRAJob", "metadata": {"name": seen.path.rsplit("/", 1)[1]}}

    async def scenario(server: FakeApiServer) -> None:
        async def calls(k: Kube) -> None:
            out.append(await k.read_lorajob("ml", "missing"))
            out.append(await k.read_job("ml", "ft-1"))
            out.append(await k.delete_lorajob("ml", "ft", "u"))
            out.append(await k.set_job_suspend("ml", "ft-1", True))
        await using(server, calls)

    server = run(scenario, reply)
    assert out[0] is None and out[1]["metadata"]["name"] == "ft-1" and out[2] is True
    assert server.seen[2].path == "/apis/lorajob.dev/v1alpha1/namespaces/ml/lorajobs/ft"
    assert server.seen[3].body == {"spec": {"suspend": True}}
    assert server.seen[3].headers["Content-Type"] == "application/merge-patch+json"


# ------------------------------------------------------------------------- a pod's log


LOG = '{"event": "progress", "step": 3}\n{"event": "checkpoint", "step": 3}\n'


def test_read_log_gets_the_tail_of_one_container_as_text() -> None:
    out: list[Any] = []

    async def scenario(server: FakeApiServer) -> None:
        out.append(await using(server, lambda k: k.read_log("ml", "ft-a1-x7k2p", "trainer",
                                                            50, 32768)))

    server = run(scenario, lambda seen: (200, LOG))
    assert out == [LOG]  # the text as it is, not decoded as JSON
    (req,) = server.seen
    assert (req.method, req.path) == ("GET", "/api/v1/namespaces/ml/pods/ft-a1-x7k2p/log")
    assert req.query == {"container": "trainer", "tailLines": "50", "limitBytes": "32768"}
    assert req.headers["Authorization"] == "Bearer t0"


@pytest.mark.parametrize("status", [404, 500, 502])
def test_read_log_errors_raise_an_api_error(status: int) -> None:
    """A pod gone, a kubelet unreachable: the caller decides (the controller skips a read)."""
    async def scenario(server: FakeApiServer) -> None:
        with pytest.raises(ApiError) as info:
            await using(server, lambda k: k.read_log("ml", "p", "trainer", 50, 32768))
        assert info.value.status == status and "kubelet" in str(info.value)

    run(scenario, lambda seen: (status, status_body(status, "x", "the kubelet did not answer")))


def test_a_slow_log_times_out_long_before_other_requests() -> None:
    """A log passes through the pod's node: a node that does not answer must not hold a
    reconcile worker for the client's whole request timeout."""
    assert kube_mod.LOG_TIMEOUT_SECONDS < kube_mod.REQUEST_TIMEOUT_SECONDS
    server = FakeApiServer(lambda seen: (200, LOG), delay=1.0)

    async def body() -> None:
        async with serving(server):
            client = client_for(server)
            try:
                with pytest.raises(TimeoutError):
                    await client.text("/api/v1/namespaces/ml/pods/p/log", timeout=0.2)
            finally:
                await client.close()

    asyncio.run(body())
    assert len(server.seen) == 1


# ------------------------------------------------------------------------- the sweep's calls


def test_sweep_calls_share_the_client() -> None:
    out: list[Any] = []

    def reply(seen: Seen) -> Reply:
        if seen.method == "POST":
            return 409, status_body(409, "AlreadyExists", "exists")
        return 200, {"metadata": {"resourceVersion": "9"}}

    async def scenario(server: FakeApiServer) -> None:
        client = client_for(server)
        sk = SweepKube(client)
        out.append(await sk.create_lorajob({"kind": "LoRAJob",
                                            "metadata": {"name": "s-t0", "namespace": "ml"}}))
        out.append(await sk.patch_sweep_status("ml", "s", {"phase": "Running"}, "8"))
        await client.close()

    server = run(scenario, reply)
    assert out == [None, {"metadata": {"resourceVersion": "9"}}]
    assert server.seen[1].path == "/apis/lorajob.dev/v1alpha1/namespaces/ml/lorasweeps/s/status"


# ------------------------------------------------------------------------- credentials


def test_a_401_rereads_the_token_once_and_retries(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("old")
    logins: list[str] = []

    def login() -> kopf.ConnectionInfo:
        logins.append(token_file.read_text())
        return kopf.ConnectionInfo(server=server.url, token=token_file.read_text())

    def reply(seen: Seen) -> Reply:
        if seen.headers.get("Authorization") != "Bearer new":
            return 401, status_body(401, "Unauthorized", "Unauthorized")
        return 200, {"kind": "LoRAJob"}

    server = FakeApiServer(reply)

    async def body() -> None:
        async with serving(server):
            client = ApiClient(login)
            token_file.write_text("new")  # the kubelet rotated the projected token
            assert await Kube(client).read_lorajob("ml", "ft") == {"kind": "LoRAJob"}
            await client.close()

    asyncio.run(body())
    assert logins == ["old", "new"]
    assert [s.headers["Authorization"] for s in server.seen] == ["Bearer old", "Bearer new"]


def test_a_401_with_an_unchanged_token_is_not_retried() -> None:
    async def scenario(server: FakeApiServer) -> None:
        with pytest.raises(ApiError) as info:
            await using(server, lambda k: k.read_job("ml", "ft-1"))
        assert info.value.status == 401

    server = run(scenario, lambda seen: (401, status_body(401, "Unauthorized", "Unauthorized")))
    assert len(server.seen) == 1


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


def _pki(folder: Path) -> None:
    """A CA, a serving certificate for 127.0.0.1 and a client certificate (as the local
    cluster's kubeconfig has: hack/cluster/localcluster.py)."""
    _openssl(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"),
                      ("admin", "extendedKeyUsage=clientAuth")):
        _openssl(folder, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", f"/O=system:masters/CN={name}")
        (folder / f"{name}.ext").write_text(ext + "\n")
        _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey",
                 "ca.key", "-CAcreateserial", "-days", "1", "-out", f"{name}.crt",
                 "-extfile", f"{name}.ext")


@pytest.mark.skipif(os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"),
                    reason="in a pod the service account wins over the kubeconfig")
def test_kubeconfig_client_certificate_data_over_tls(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The local test cluster's kind of kubeconfig: CA and client certificate inline."""
    try:
        _pki(tmp_path)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no openssl")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.crt"))
    tls.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    tls.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no handshake
    server = FakeApiServer(lambda seen: (200, {"kind": "Job", "auth": seen.headers.get(
        "Authorization")}))

    def b64(name: str) -> str:
        return base64.b64encode((tmp_path / name).read_bytes()).decode()

    def kubeconfig() -> None:
        (tmp_path / "kubeconfig").write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "local",
            "clusters": [{"name": "c", "cluster": {"server": server.url,
                                                   "certificate-authority-data": b64("ca.crt")}}],
            "users": [{"name": "u", "user": {"client-certificate-data": b64("admin.crt"),
                                             "client-key-data": b64("admin.key")}}],
            "contexts": [{"name": "local", "context": {"cluster": "c", "user": "u"}}]}))

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    out: list[Any] = []

    async def body() -> None:
        async with serving(server, tls):
            kubeconfig()
            client = ApiClient(connections=2)
            out.append(await Kube(client).read_job("ml", "ft-1"))
            await client.close()

    asyncio.run(body())
    assert out == [{"kind": "Job", "auth": None}]


# ------------------------------------------------------------------------- the controllers' _io


def test_io_awaits_coroutines_on_the_loop_and_runs_plain_functions_in_the_executor() -> None:
    class Recording(concurrent.futures.ThreadPoolExecutor):
        def __init__(self) -> None:
            super().__init__(1)
            self.used = 0

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            self.used += 1
            return super().submit(fn, *args, **kwargs)

    async def api_call(x: int) -> int:
        return x + 1

    def blocking(x: int) -> int:
        return x * 2

    io = CallsIO()
    io.executor = Recording()

    async def body() -> tuple[int, int]:
        return await io._io(api_call, 1), await io._io(blocking, 2)

    assert asyncio.run(body()) == (2, 4)
    assert io.executor.used == 1  # only the blocking one
    io.executor.shutdown()


@pytest.mark.parametrize(("host", "port", "server"), [
    ("10.96.0.1", "443", "https://10.96.0.1:443"),
    ("fd00::1", "6443", "https://[fd00::1]:6443"),
    ("", "", "https://kubernetes.default.svc"),
])
def test_in_a_pod_the_api_server_is_found_like_client_go(
        host: str, port: str, server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    assert kube_mod.in_cluster_server("https://kubernetes.default.svc") == server

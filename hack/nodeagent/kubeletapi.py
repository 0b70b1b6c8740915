"""The part of the kubelet API that `kubectl logs` needs (dev node agent, DEV/TEST ONLY).

`kubectl logs` asks the API server, which proxies to the node's kubelet endpoint
(``status.daemonEndpoints.kubeletEndpoint.Port`` on the node's InternalIP) at
``GET /containerLogs/<namespace>/<pod>/<container>?follow=&tailLines=&limitBytes=``.
This server answers that from the per-container log files the agent writes
(``.cluster/logs/pods/<namespace>_<pod>_<container>.log``), over TLS with a serving
certificate signed by the cluster CA, and accepts only clients presenting a certificate from
that CA (the API server's kubelet client certificate).
"""

from __future__ import annotations

import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

# (namespace, pod, container) → (log file, still running?)
LogLookup = Callable[[str, str, str], tuple[Path, Callable[[], bool]] | None]


def ensure_serving_cert(pki: Path, out_dir: Path) -> tuple[Path, Path]:
    """A kubelet serving certificate for 127.0.0.1, signed by the cluster CA when readable."""
    out_dir.mkdir(parents=True, exist_ok=True)
    crt, key = out_dir / "kubelet.crt", out_dir / "kubelet.key"
    if crt.exists() and key.exists():
        return crt, key
    ext = out_dir / "kubelet.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "extendedKeyUsage=serverAuth\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(out_dir / "kubelet.csr"), "-subj",
                    "/O=system:nodes/CN=system:node:dev-node-agent"],
                   check=True, capture_output=True)
    if (pki / "ca.key").exists():
        sign = ["-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"), "-CAcreateserial"]
    else:
        sign = ["-signkey", str(key)]
    subprocess.run(["openssl", "x509", "-req", "-in", str(out_dir / "kubelet.csr"), *sign,
                    "-out", str(crt), "-days", "3650", "-extfile", str(ext)],
                   check=True, capture_output=True)
    return crt, key


def _tail(data: bytes, lines: int | None, limit: int | None) -> bytes:
    if lines is not None:
        parts = data.splitlines(keepends=True)
        data = b"".join(parts[-lines:]) if lines > 0 else b""
    if limit is not None:
        data = data[:limit]
    return data


class _Handler(BaseHTTPRequestHandler):
    lookup: LogLookup
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def _error(self, code: int, msg: str) -> None:
        body = msg.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        parts = url.path.strip("/").split("/")
        if parts[:1] == ["healthz"]:
            self._error(200, "ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._error(404, f"the dev node agent serves only /containerLogs (not {url.path})")
            return
        _, ns, pod, container = parts
        found = type(self).lookup(ns, pod, container)
        if found is None:
            self._error(404, f"container {container} of pod {ns}/{pod} not found on this node")
            return
        path, running = found
        q = parse_qs(url.query)
        follow = q.get("follow", ["false"])[0] == "true"
        lines = int(q["tailLines"][0]) if "tailLines" in q else None
        limit = int(q["limitBytes"][0]) if "limitBytes" in q else None
        data = path.read_bytes() if path.exists() else b""
        first = _tail(data, lines, limit)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        if not follow:
            self.send_header("Content-Length", str(len(first)))
            self.end_headers()
            self.wfile.write(first)
            return
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(first)
        self.wfile.flush()
        pos = len(data)
        try:
            while True:
                alive = running()
                with path.open("rb") as f:
                    f.seek(pos)
                    chunk = f.read()
                if chunk:
                    pos += len(chunk)
                    self.wfile.write(chunk)
                    self.wfile.flush()
                elif not alive:
                    return
                time.sleep(0.5)
        except (BrokenPipeError, ConnectionResetError):
            return


def serve(port: int, pki: Path, cert_dir: Path, lookup: LogLookup) -> ThreadingHTTPServer:
    """Start the HTTPS server on 127.0.0.1:port in a daemon thread."""
    crt, key = ensure_serving_cert(pki, cert_dir)
    handler = type("KubeletHandler", (_Handler,), {"lookup": staticmethod(lookup)})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(crt), str(key))
    if (pki / "ca.crt").exists():
        ctx.load_verify_locations(str(pki / "ca.crt"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="kubelet-api", daemon=True).start()
    return server

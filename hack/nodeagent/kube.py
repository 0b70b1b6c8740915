"""A small JSON-in, JSON-out client for the API server (dev node agent, DEV/TEST ONLY).

The agent works on plain dicts (what the API server sends), not on the generated client
models: status patches are computed by comparing dicts, and unknown fields pass through. The
kubernetes package still does the authentication and TLS from the kubeconfig.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from kubernetes import client, config
from kubernetes.watch.watch import iter_resp_lines


class ApiError(RuntimeError):
    def __init__(self, status: int, body: str, what: str):
        self.status = status
        self.body = body
        super().__init__(f"{what}: HTTP {status}: {body[:500]}")


class Kube:
    """HTTP verbs against the API server with the credentials of a kubeconfig file."""

    def __init__(self, kubeconfig: str):
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        self.configuration = cfg
        self.api = client.ApiClient(cfg)
        self.server: str = cfg.host

    def request(self, method: str, path: str, body: Any = None, *,
                query: dict[str, Any] | None = None,
                content_type: str = "application/json",
                timeout: float = 30, ok404: bool = False) -> Any:
        url = self.server + path + (("?" + urlencode(query)) if query else "")
        headers = {"Accept": "application/json", "Content-Type": content_type}
        self.api.update_params_for_auth(headers, [], ["BearerToken"])
        data = None if body is None else json.dumps(body)
        resp = self.api.rest_client.pool_manager.request(
            method, url, body=data, headers=headers, timeout=timeout, preload_content=True)
        text = resp.data.decode("utf-8", errors="replace") if resp.data else ""
        if resp.status == 404 and ok404:
            return None
        if resp.status >= 300:
            raise ApiError(resp.status, text, f"{method} {path}")
        return json.loads(text) if text else None

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any, **kw: Any) -> Any:
        return self.request("POST", path, body, **kw)

    def merge_patch(self, path: str, body: Any, **kw: Any) -> Any:
        return self.request("PATCH", path, body,
                            content_type="application/merge-patch+json", **kw)

    def delete(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("DELETE", path, body, **kw)

    def watch(self, path: str, query: dict[str, Any],
              timeout_seconds: int = 60) -> Iterator[dict[str, Any]]:
        """Yield watch events ({type, object}) until the server closes the stream."""
        q = {**query, "watch": "true", "allowWatchBookmarks": "true",
             "timeoutSeconds": str(timeout_seconds)}
        url = self.server + path + "?" + urlencode(q)
        headers = {"Accept": "application/json"}
        self.api.update_params_for_auth(headers, [], ["BearerToken"])
        resp = self.api.rest_client.pool_manager.request(
            "GET", url, headers=headers, preload_content=False, timeout=timeout_seconds + 10)
        try:
            if resp.status >= 300:
                raise ApiError(resp.status, resp.data.decode(errors="replace"), f"watch {path}")
            for line in iter_resp_lines(resp):
                if line:
                    yield json.loads(line)
        finally:
            resp.release_conn()

"""Every S3 read the operator itself makes (a base model's config.json, a job's manifest.json).

A LoRAJob names its own storage endpoint, so a read the operator makes on a job's behalf is
a request to a host the job's author chose. Three rules keep that from becoming a confused
deputy or a memory bomb:

- **Sign only for allow-listed endpoints.** `Settings.signed_endpoints` (default: the
  operator's own endpoint) get requests signed with the operator's credentials; any other
  endpoint gets an anonymous request (botocore `UNSIGNED`), so a public bucket still works
  but the operator's keys never leave for a host a tenant picked. (Refusing such endpoints
  outright would break public model buckets; an anonymous GET carries nothing of ours.)
- **Small, bounded reads.** A `Range` request for `max_bytes + 1` bytes, refused at once when
  the object's size is known to be larger, and cut off (connection closed) as soon as more
  than `max_bytes` arrive from a server that ignores the range.
- **A real deadline, in the caller's thread.** Connect and read timeouts, then a deadline
  checked before every socket read while streaming, each read itself limited to the time
  left: when `read_object` returns or raises, no thread of it keeps downloading.

Clients are cached (building one costs ~8 MB and tens of ms): one per (endpoint, signed,
region), least recently used first out, so a stream of jobs naming random endpoints cannot
grow the cache without bound.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.parse
from collections import OrderedDict
from typing import Any

from lora_operator.settings import Settings

DEFAULT_MAX_BYTES = 1 << 20
CLIENT_CACHE_SIZE = 32
_CHUNK = 64 * 1024


class ObjectStoreError(RuntimeError):
    """A read the operator could not make; the message says which object and why."""


class NotFound(ObjectStoreError):  # noqa: N818 (names of the interface other modules use)
    """The object (or its bucket) does not exist."""


class TooLarge(ObjectStoreError):  # noqa: N818
    """The object is bigger than the caller's cap; nothing beyond the cap was read."""


class Unavailable(ObjectStoreError):  # noqa: N818
    """Storage did not answer in time or failed (retryable)."""


class NotAllowed(ObjectStoreError):  # noqa: N818
    """The read is not permitted: not an s3:// URI, or storage refused it (401/403)."""


def normalize_endpoint(url: str | None) -> str | None:
    """`HTTP://Host:443/` and `https://host` name the same server; None is AWS's default."""
    if not url:
        return None
    parts = urllib.parse.urlsplit(url.strip())
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}{parts.path.rstrip('/')}"


def own_endpoint(settings: Settings) -> str | None:
    """The operator's own S3 endpoint: the setting, else $AWS_ENDPOINT_URL, else AWS."""
    return settings.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or None


def is_signed(endpoint: str | None, settings: Settings) -> bool:
    """Whether the operator's credentials may be sent to `endpoint` (already resolved)."""
    allowed = settings.signed_endpoints
    if allowed is None:
        allowed_set = {normalize_endpoint(own_endpoint(settings))}
    else:
        allowed_set = {normalize_endpoint(e) for e in allowed}
    return normalize_endpoint(endpoint) in allowed_set


_CLIENTS: OrderedDict[tuple[str | None, bool, str, float], Any] = OrderedDict()
_CLIENTS_LOCK = threading.Lock()


def _client(endpoint: str | None, signed: bool, region: str, timeout: float) -> Any:
    key = (endpoint, signed, region, timeout)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is not None:
            _CLIENTS.move_to_end(key)
            return client
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(connect_timeout=timeout, read_timeout=timeout, region_name=region,
                    retries={"max_attempts": 1}, **({"signature_version": UNSIGNED}
                                                    if not signed else {}))
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
    with _CLIENTS_LOCK:
        _CLIENTS[key] = client
        _CLIENTS.move_to_end(key)
        while len(_CLIENTS) > CLIENT_CACHE_SIZE:
            _CLIENTS.popitem(last=False)
    return client


def cached_clients() -> int:
    """How many clients are cached (bounded by CLIENT_CACHE_SIZE)."""
    with _CLIENTS_LOCK:
        return len(_CLIENTS)


def clear_clients() -> None:
    with _CLIENTS_LOCK:
        _CLIENTS.clear()


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` → (bucket, key); NotAllowed for anything else."""
    if not uri.startswith("s3://"):
        raise NotAllowed(f"{uri}: the operator reads only s3:// objects")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise NotAllowed(f"{uri}: expected s3://bucket/key")
    return bucket, key


def _total_size(response: dict[str, Any]) -> int | None:
    """The object's full size: from Content-Range (`bytes 0-N/TOTAL`) or Content-Length."""
    content_range = str(response.get("ContentRange") or "")
    if "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = response.get("ContentLength")
    return int(length) if length is not None else None


def _classify(uri: str, exc: Exception) -> ObjectStoreError:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err: dict[str, Any] = dict(exc.response.get("Error") or {})
        meta: dict[str, Any] = dict(exc.response.get("ResponseMetadata") or {})
        code = str(err.get("Code") or "")
        status = int(meta.get("HTTPStatusCode") or 0)
        if status == 404 or code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            return NotFound(f"{uri} does not exist")
        if status in (401, 403) or code in ("AccessDenied", "403", "401"):
            return NotAllowed(f"storage refused to read {uri}: {code or status}")
        return Unavailable(f"could not read {uri}: {code or status}")
    return Unavailable(f"could not read {uri}: {type(exc).__name__}: {exc}")


def read_object(uri: str, *, endpoint: str | None, region: str, settings: Settings,
                max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The object at `uri` (at most `max_bytes`), within `settings.config_read_timeout_seconds`.

    `endpoint` is the job's endpoint (None: the operator's own). Raises NotFound, TooLarge,
    Unavailable (retryable) or NotAllowed, all ObjectStoreError.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_uri(uri)
    timeout = float(settings.config_read_timeout_seconds)
    deadline = time.monotonic() + timeout
    resolved = endpoint or own_endpoint(settings)
    client = _client(resolved, is_signed(resolved, settings), region, timeout)
    try:
        response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{max_bytes}")
    except ClientError as exc:
        error: dict[str, Any] = dict(exc.response.get("Error") or {})
        if str(error.get("Code")) == "InvalidRange":
            return b""  # S3 answers 416 to a range on an empty object
        raise _classify(uri, exc) from None
    except (BotoCoreError, OSError) as exc:
        raise _classify(uri, exc) from None
    body = response["Body"]
    try:
        total = _total_size(response)
        if total is not None and total > max_bytes:
            raise TooLarge(f"{uri} is {total} bytes; the operator reads at most {max_bytes}")
        return _stream(uri, body, deadline, max_bytes, timeout)
    finally:
        body.close()


def _set_read_timeout(raw: Any, seconds: float) -> None:
    """The socket timeout of the response's connection (the path botocore's own
    `set_socket_timeout` uses); nothing to do once the body was read to its end and
    http.client let the socket go."""
    fp = getattr(getattr(raw, "_fp", None), "fp", None)
    sock = getattr(getattr(fp, "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _stream(uri: str, body: Any, deadline: float, max_bytes: int, timeout: float) -> bytes:
    """Read `body` until EOF, the cap or the deadline; every socket read is bounded by the
    time left (`read1`: one read of the socket, never a loop that a trickling server keeps
    alive byte by byte)."""
    raw = getattr(body, "_raw_stream", None)
    read = raw.read1 if raw is not None and hasattr(raw, "read1") else body.read
    out = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unavailable(f"could not read {uri} within {timeout:g} s")
        _set_read_timeout(raw, max(0.01, left))
        try:
            chunk = read(_CHUNK)
        except Exception as exc:  # a socket timeout or reset: storage failed
            raise Unavailable(f"could not read {uri} within {timeout:g} s: "
                              f"{type(exc).__name__}") from None
        if not chunk:
            return bytes(out)
        out += chunk
        if len(out) > max_bytes:
            raise TooLarge(f"{uri} is larger than {max_bytes} bytes; the operator reads at "
                           f"most {max_bytes}")

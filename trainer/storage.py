"""Moving files between the pod and wherever the job's URIs point.

Schemes: `s3://bucket/key` (any S3-compatible endpoint), `file:///path`, `pvc://claim/path`
(a volume the operator mounted at `/mnt/pvc/<claim>`), `hf://org/name` (download only) and
`https://host/path` (single files, for datasets). Every function maps failures onto the
exit-code table so the operator can tell a wrong key (AUTH, permanent) from a flaky
endpoint (STORAGE, retried): that distinction is the whole point of this module.

Credentials come from the environment only (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
HF_TOKEN) and are never logged. URIs and endpoints that climb out of their prefix (`..`) or
point at link-local / cloud-metadata addresses are refused before any request is made, and
again right before every request: https downloads connect to the very address that was
checked (no DNS rebinding between check and connect) and every redirect is re-validated;
every S3 request re-resolves and re-checks its endpoint's host (`before-send`).
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import fnmatch
import hashlib
import http.client
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lora_operator.contract import S3_SECRET_KEYS, ExitCode
from lora_trainer.errors import TrainerError, redact

log = logging.getLogger(__name__)

PVC_ROOT_ENV = "LORA_PVC_ROOT"
PVC_ROOT_DEFAULT = "/mnt/pvc"
SCHEMES = ("s3", "file", "pvc", "hf", "https")
_LINK_LOCAL_V4 = ipaddress.ip_network("169.254.0.0/16")
_METADATA_V6 = ipaddress.ip_address("fd00:ec2::254")
_CHUNK = 8 * 1024 * 1024
T = TypeVar("T")


@dataclass(frozen=True)
class Location:
    """A parsed URI: scheme, bucket/claim/host/repo, and the path inside it (no leading /)."""

    scheme: str
    root: str
    path: str

    def child(self, name: str) -> Location:
        """The location of `name` below this one (a key or file under the prefix)."""
        base = self.path.rstrip("/")
        return Location(self.scheme, self.root, f"{base}/{name}" if base else name)

    @property
    def uri(self) -> str:
        if self.scheme == "file":
            return f"file:///{self.path}"
        return f"{self.scheme}://{self.root}/{self.path}"


@dataclass(frozen=True)
class StorageOptions:
    """How to reach S3: endpoint (else env AWS_ENDPOINT_URL / S3_ENDPOINT), region, fan-out."""

    endpoint: str | None = None
    region: str = "us-east-1"
    # Env prefix of this location's own keys (contract.MODEL_/DATASET_CREDENTIALS_PREFIX);
    # "" means the plain AWS_* names, the output's.
    credentials_prefix: str = ""
    workers: int = 8
    attempts: int = 5
    backoff_seconds: float = 0.5

    def resolved_endpoint(self) -> str | None:
        endpoint = self.endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT")
        if endpoint:
            check_endpoint(endpoint)
        return endpoint or None


@dataclass
class FileDigest:
    """Size and sha256 of one file, as written to manifest.json."""

    size: int
    sha256: str


@dataclass
class Transfer:
    """What one upload or download moved: relative name → digest, in the order written."""

    files: dict[str, FileDigest] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(d.size for d in self.files.values())


# --------------------------------------------------------------------------- validation


def parse_uri(uri: str) -> Location:
    """Split a URI, refusing unknown schemes, `..` segments and metadata-service hosts."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in SCHEMES:
        raise TrainerError(ExitCode.CONFIG, f"unsupported URI scheme in {uri!r}; "
                                            f"use one of {', '.join(s + '://' for s in SCHEMES)}")
    path = urllib.parse.unquote(parsed.path)
    if ".." in path.split("/"):
        raise TrainerError(ExitCode.CONFIG, f"refusing {uri!r}: '..' path segments are not allowed")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise TrainerError(ExitCode.CONFIG, f"file URI must be file:///absolute/path (got {uri!r})")
        return Location("file", "", path.lstrip("/"))
    if not parsed.netloc:
        raise TrainerError(ExitCode.CONFIG, f"URI {uri!r} has no bucket, claim or host")
    if parsed.scheme == "https":
        check_host(parsed.hostname or "", uri)
    return Location(parsed.scheme, parsed.netloc, path.lstrip("/"))


def check_endpoint(endpoint: str) -> None:
    """Refuse endpoints on link-local / metadata addresses (credential theft via SSRF)."""
    parsed = urllib.parse.urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise TrainerError(ExitCode.CONFIG, f"endpoint must be an http(s) URL (got {endpoint!r})")
    check_host(parsed.hostname, endpoint)


def _forbidden_ip(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (isinstance(ip, ipaddress.IPv4Address) and ip in _LINK_LOCAL_V4) or ip == _METADATA_V6


def check_host(host: str, where: str) -> None:
    """Refuse a host that is, or resolves to, a link-local or cloud-metadata address."""
    addresses = [host]
    with contextlib.suppress(OSError, UnicodeError):  # unresolvable: the request fails later
        addresses += [str(info[4][0]) for info in socket.getaddrinfo(host, None)]
    if any(_forbidden_ip(a) for a in addresses):
        raise _refused(where)


def _refused(where: str) -> TrainerError:
    return TrainerError(ExitCode.CONFIG, f"refusing {where!r}: link-local / metadata "
                                         "addresses (169.254.0.0/16, fd00:ec2::254) are not allowed")


def checked_address(host: str, port: int, where: str) -> str:
    """Resolve `host` now, refuse it if any address is forbidden, and return the address to
    connect to: the caller connects to exactly what was checked, so a DNS answer that
    changes between check and connect (rebinding) cannot reach a metadata service."""
    if _forbidden_ip(host):
        raise _refused(where)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise TrainerError(ExitCode.STORAGE, f"{where}: cannot resolve {host!r} "
                                             f"({type(exc).__name__})") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses or any(_forbidden_ip(a) for a in addresses):
        raise _refused(where)
    return addresses[0]


def safe_relative(name: str) -> str:
    """A relative file name from a listing, refused if it would escape the target folder."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise TrainerError(ExitCode.CONFIG, f"refusing object name {name!r}: path traversal")
    return "/".join(parts)


# --------------------------------------------------------------------------- hashing, retries


def sha256_file(path: Path) -> str:
    """Streamed sha256 (adapters and merged models do not fit comfortably in memory twice)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_file(path: Path) -> FileDigest:
    return FileDigest(size=path.stat().st_size, sha256=sha256_file(path))


def with_retries(action: Callable[[], T], opts: StorageOptions, what: str) -> T:
    """Run `action`, retrying STORAGE failures with exponential backoff; others fail at once."""
    for attempt in range(1, opts.attempts + 1):
        try:
            return action()
        except TrainerError as exc:
            if exc.code != ExitCode.STORAGE or attempt == opts.attempts:
                raise
            delay = opts.backoff_seconds * 2 ** (attempt - 1)
            log.warning("%s failed (attempt %d/%d), retrying in %.1fs: %s",
                        redact(what), attempt, opts.attempts, delay, exc.message)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _parallel(jobs: Iterable[Callable[[], T]], workers: int) -> list[T]:
    with futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [f.result() for f in [pool.submit(j) for j in jobs]]


# --------------------------------------------------------------------------- local paths


def local_path(loc: Location) -> Path:
    """The filesystem path of a file:// or pvc:// location (pvc claims are mounted volumes)."""
    if loc.scheme == "file":
        return Path("/" + loc.path)
    if loc.scheme == "pvc":
        root = Path(os.environ.get(PVC_ROOT_ENV, PVC_ROOT_DEFAULT)) / loc.root
        return root / loc.path
    raise ValueError(f"{loc.uri} is not a local location")


def is_local(uri: str) -> bool:
    return parse_uri(uri).scheme in ("file", "pvc")


# --------------------------------------------------------------------------- S3


def s3_client(opts: StorageOptions) -> Any:
    """A boto3 S3 client for the endpoint; credentials come from the environment only."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 3, "mode": "standard"},
                    s3={"addressing_style": "path"}, max_pool_connections=max(10, opts.workers * 2),
                    connect_timeout=10, read_timeout=120)
    key_id, secret = _credentials(opts.credentials_prefix)
    session = boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret)
    client = session.client("s3", endpoint_url=opts.resolved_endpoint(), region_name=opts.region,
                            config=config)
    client.meta.events.register("before-send.s3", _recheck_request_host)
    return client


def _recheck_request_host(request: Any, **_: Any) -> None:
    """botocore hook, run right before every S3 request (retries and region redirects
    included): the host it is about to reach is resolved and checked again, so a name that
    was fine when the client was made and now answers with a metadata address is refused."""
    url = str(request.url)
    host = urllib.parse.urlparse(url).hostname or ""
    check_host(host, redact(url.split("?", 1)[0]))


def _credentials(prefix: str) -> tuple[str | None, str | None]:
    """Explicit keys for a location with its own Secret; (None, None) lets a fresh boto3
    session read the plain AWS_* environment as it is now."""
    if not prefix:
        return None, None
    key_id, secret = (os.environ.get(prefix + name) for name in S3_SECRET_KEYS)
    return (key_id, secret) if key_id and secret else (None, None)


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=_CHUNK, multipart_chunksize=_CHUNK,
                          max_concurrency=4, use_threads=True)


def s3_error(exc: BaseException, what: str, missing: ExitCode) -> TrainerError:
    """Map a boto/botocore exception onto the exit-code table (message carries no secrets)."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return TrainerError(ExitCode.AUTH, f"{what}: no S3 credentials (set AWS_ACCESS_KEY_ID "
                                           "and AWS_SECRET_ACCESS_KEY)")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden") \
                or status in (401, 403):
            return TrainerError(ExitCode.AUTH, f"{what}: S3 refused the credentials ({code or status})")
        if code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404") or status == 404:
            return TrainerError(missing, f"{what}: not found ({code or status})")
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError"):
            return TrainerError(ExitCode.STORAGE, f"{what}: S3 error {code or status}")
        return TrainerError(ExitCode.STORAGE, f"{what}: S3 error {code or status}")
    if isinstance(exc, EndpointConnectionError | ConnectionError | OSError):
        return TrainerError(ExitCode.STORAGE, f"{what}: cannot reach S3 ({type(exc).__name__})")
    return TrainerError(ExitCode.STORAGE, f"{what}: {type(exc).__name__}: {exc}")


def _s3_call(action: Callable[[], T], what: str, missing: ExitCode) -> T:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return action()
    except (BotoCoreError, ClientError, OSError) as exc:
        raise s3_error(exc, what, missing) from None


def _s3_list(client: Any, loc: Location, missing: ExitCode) -> list[str]:
    prefix = loc.path.rstrip("/") + "/" if loc.path.rstrip("/") else ""

    def page() -> list[str]:
        keys: list[str] = []
        for resp in client.get_paginator("list_objects_v2").paginate(Bucket=loc.root, Prefix=prefix):
            keys += [str(obj["Key"])[len(prefix):] for obj in resp.get("Contents", [])]
        return keys

    return _s3_call(page, f"list {loc.uri}", missing)


# --------------------------------------------------------------------------- public API


def list_files(uri: str, opts: StorageOptions, missing: ExitCode = ExitCode.STORAGE) -> list[str]:
    """Relative names of every file under a prefix (recursive); [] when there is none."""
    loc = parse_uri(uri)
    if loc.scheme in ("file", "pvc"):
        root = local_path(loc)
        if not root.is_dir():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    if loc.scheme == "s3":
        client = s3_client(opts)
        return sorted(with_retries(lambda: _s3_list(client, loc, missing), opts, f"list {uri}"))
    raise TrainerError(ExitCode.CONFIG, f"cannot list {uri}: {loc.scheme}:// is read-only here")


def read_text(uri: str, opts: StorageOptions) -> str | None:
    """A small object's text, or None when it does not exist (manifests, checkpoint pointers)."""
    loc = parse_uri(uri)
    if loc.scheme in ("file", "pvc"):
        path = local_path(loc)
        return path.read_text() if path.is_file() else None
    if loc.scheme == "s3":
        client = s3_client(opts)

        def get() -> str | None:
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                body = client.get_object(Bucket=loc.root, Key=loc.path)["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise s3_error(exc, f"read {uri}", ExitCode.STORAGE) from None
            except (BotoCoreError, OSError) as exc:
                raise s3_error(exc, f"read {uri}", ExitCode.STORAGE) from None
            return bytes(body).decode()

        return with_retries(get, opts, f"read {uri}")
    raise TrainerError(ExitCode.CONFIG, f"cannot read {uri} as text")


def download(uri: str, dest: Path, opts: StorageOptions, missing: ExitCode,
             revision: str | None = None, include: Sequence[str] | None = None) -> Path:
    """Make `uri` (a file or a prefix) available locally and return its local path.

    file:// and pvc:// are used in place (no copy: a mounted model is read where it lies).
    `missing` is the exit code for "does not exist" (MODEL for models, DATA for datasets).
    `include` (glob patterns on the relative names) fetches only the matching files of a
    prefix: the dataset preflight takes a model's tokenizer files and never its weights.
    """
    loc = parse_uri(uri)
    if loc.scheme in ("file", "pvc"):
        path = local_path(loc)
        if not path.exists():
            raise TrainerError(missing, f"{uri}: no such file or directory")
        return path
    dest.mkdir(parents=True, exist_ok=True)
    if loc.scheme == "s3":
        return _download_s3(loc, dest, opts, missing, include)
    if loc.scheme == "hf":
        return _download_hf(loc, dest, missing, revision, include)
    return _download_https(uri, dest, opts, missing)


def _download_s3(loc: Location, dest: Path, opts: StorageOptions, missing: ExitCode,
                 include: Sequence[str] | None = None) -> Path:
    client = s3_client(opts)
    listed = with_retries(lambda: _s3_list(client, loc, missing), opts, f"list {loc.uri}")
    listed = [n for n in listed if n]
    names = [n for n in listed if include is None or matches(n, include)]
    if listed and not names:
        raise TrainerError(missing, f"{loc.uri} has none of {', '.join(include or ())}")
    if not names:  # a single object rather than a prefix
        target = dest / Path(loc.path).name
        _s3_get(client, loc, target, opts, missing)
        return target
    target_dir = dest / (Path(loc.path.rstrip("/")).name or loc.root)
    jobs = [_bind_get(client, loc.child(safe_relative(n)), target_dir / safe_relative(n), opts, missing)
            for n in names]
    _parallel(jobs, opts.workers)
    return target_dir


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a relative object name matches one of the glob patterns."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _bind_get(client: Any, loc: Location, target: Path, opts: StorageOptions,
              missing: ExitCode) -> Callable[[], None]:
    return lambda: _s3_get(client, loc, target, opts, missing)


def _s3_get(client: Any, loc: Location, target: Path, opts: StorageOptions, missing: ExitCode) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    with_retries(lambda: _s3_call(
        lambda: client.download_file(loc.root, loc.path, str(tmp), Config=_transfer_config()),
        f"download {loc.uri}", missing), opts, f"download {loc.uri}")
    tmp.replace(target)


def _download_hf(loc: Location, dest: Path, missing: ExitCode, revision: str | None,
                 include: Sequence[str] | None = None) -> Path:
    """hf://org/name via snapshot_download with HF_TOKEN (gated repos need it)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = f"{loc.root}/{loc.path}".strip("/")
    target = dest / repo_id.replace("/", "--")
    try:
        snapshot_download(repo_id=repo_id, revision=revision, local_dir=str(target),
                          token=os.environ.get("HF_TOKEN") or None,
                          allow_patterns=list(include) if include is not None else None)
    except GatedRepoError:
        raise TrainerError(ExitCode.AUTH, f"hf://{repo_id}: gated repository; HF_TOKEN "
                                          "missing or without access") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise TrainerError(missing, f"hf://{repo_id}: {type(exc).__name__} (or no access "
                                    "with the given HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise TrainerError(ExitCode.STORAGE, f"hf://{repo_id}: the Hub is unreachable") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        code = ExitCode.AUTH if status in (401, 403) else ExitCode.STORAGE
        raise TrainerError(code, f"hf://{repo_id}: HTTP {status}") from None
    except OSError as exc:
        raise TrainerError(ExitCode.STORAGE, f"hf://{repo_id}: {type(exc).__name__}") from None
    return target


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS that resolves and checks the host right before connecting, then connects to
    the checked address (the certificate is still verified against the host name)."""

    def connect(self) -> None:
        address = checked_address(self.host, self.port, f"https://{self.host}:{self.port}")
        sock = socket.create_connection((address, self.port), self.timeout,
                                        getattr(self, "source_address", None))
        context: Any = getattr(self, "_context", None) or ssl.create_default_context()
        self.sock = context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_PinnedHTTPSConnection, req)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to another https URL whose host passes the same check."""

    max_redirections = 5

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        target = urllib.parse.urlparse(urllib.parse.urljoin(req.full_url, newurl))
        if target.scheme != "https" or not target.hostname:
            raise TrainerError(ExitCode.CONFIG, f"refusing the redirect from {req.full_url} to "
                                                f"{target.geturl()}: only https:// is followed")
        check_host(target.hostname, target.geturl())
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def https_opener() -> urllib.request.OpenerDirector:
    """urllib without proxies (a proxy would connect where we did not check), with pinned
    connections and re-validated redirects."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _PinnedHTTPSHandler(),
                                       _CheckedRedirects())


def _download_https(uri: str, dest: Path, opts: StorageOptions, missing: ExitCode) -> Path:
    name = Path(urllib.parse.urlparse(uri).path).name or "download"
    target = dest / name
    opener = https_opener()

    def fetch() -> None:
        try:
            with opener.open(uri, timeout=60) as resp, target.open("wb") as fh:
                shutil.copyfileobj(resp, fh, _CHUNK)
        except urllib.error.HTTPError as exc:
            code = ExitCode.AUTH if exc.code in (401, 403) else missing if exc.code == 404 \
                else ExitCode.STORAGE
            raise TrainerError(code, f"{uri}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise TrainerError(ExitCode.STORAGE, f"{uri}: {type(exc).__name__}") from None

    with_retries(fetch, opts, f"download {uri}")
    return target


def upload(src: Path, names: list[str], uri: str, opts: StorageOptions) -> Transfer:
    """Upload `names` (relative to `src`) under `uri` in parallel; return size + sha256 of each.

    The caller orders uploads (the manifest goes in a later, separate call) so that a reader
    who sees manifest.json can trust every file it lists is already there.
    """
    loc = parse_uri(uri)
    rel = [safe_relative(n) for n in names]
    digests = _parallel([_bind_digest(src / n) for n in rel], opts.workers)
    if loc.scheme in ("file", "pvc"):
        root = local_path(loc)
        _parallel([_bind_copy(src / n, root / n) for n in rel], opts.workers)
    elif loc.scheme == "s3":
        client = s3_client(opts)
        _parallel([_bind_put(client, src / n, loc.child(n), opts) for n in rel], opts.workers)
    else:
        raise TrainerError(ExitCode.CONFIG, f"cannot write to {uri}: use s3://, pvc:// or file://")
    return Transfer(files=dict(zip(rel, digests, strict=True)))


def _bind_digest(path: Path) -> Callable[[], FileDigest]:
    return lambda: digest_file(path)


def _bind_copy(src: Path, dst: Path) -> Callable[[], None]:
    def copy() -> None:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".part")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)
        except PermissionError as exc:
            raise TrainerError(ExitCode.AUTH, f"cannot write {dst}: {exc.strerror}") from None
        except OSError as exc:
            raise TrainerError(ExitCode.STORAGE, f"cannot write {dst}: {exc.strerror}") from None

    return copy


def _bind_put(client: Any, src: Path, loc: Location, opts: StorageOptions) -> Callable[[], None]:
    return lambda: with_retries(lambda: _s3_call(
        lambda: client.upload_file(str(src), loc.root, loc.path, Config=_transfer_config()),
        f"upload {loc.uri}", ExitCode.STORAGE), opts, f"upload {loc.uri}")


def delete_prefix(uri: str, opts: StorageOptions) -> None:
    """Remove everything under a prefix (old checkpoints once the adapter is safely out)."""
    loc = parse_uri(uri)
    if loc.scheme in ("file", "pvc"):
        shutil.rmtree(local_path(loc), ignore_errors=True)
        return
    if loc.scheme == "s3":
        client = s3_client(opts)
        for name in list_files(uri, opts):
            _s3_delete(client, loc.root, loc.child(name).path)


def _s3_delete(client: Any, bucket: str, key: str) -> None:
    _s3_call(lambda: client.delete_object(Bucket=bucket, Key=key), f"delete s3://{bucket}/{key}",
             ExitCode.STORAGE)


# --------------------------------------------------------------------------- conditional writes


@dataclass(frozen=True)
class Versioned:
    """A small object's text and the version tag a conditional write can name (S3 ETag;
    for file:// and pvc:// the sha256 of the content)."""

    text: str
    etag: str


def read_versioned(uri: str, opts: StorageOptions) -> Versioned | None:
    """A small object with its version tag, or None when it does not exist."""
    loc = parse_uri(uri)
    if loc.scheme in ("file", "pvc"):
        path = local_path(loc)
        if not path.is_file():
            return None
        data = path.read_bytes()
        return Versioned(data.decode(), hashlib.sha256(data).hexdigest())
    if loc.scheme != "s3":
        raise TrainerError(ExitCode.CONFIG, f"cannot read {uri}: use s3://, pvc:// or file://")
    client = s3_client(opts)

    def get() -> Versioned | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = client.get_object(Bucket=loc.root, Key=loc.path)
            return Versioned(bytes(resp["Body"].read()).decode(), str(resp["ETag"]))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise s3_error(exc, f"read {uri}", ExitCode.STORAGE) from None
        except (BotoCoreError, OSError) as exc:
            raise s3_error(exc, f"read {uri}", ExitCode.STORAGE) from None

    return with_retries(get, opts, f"read {uri}")


def put_if(uri: str, body: bytes, opts: StorageOptions, etag: str | None) -> str | None:
    """Write a small object only if it is unchanged: `etag` None creates it only where there
    is none (S3 `If-None-Match: *`), else it replaces only that version (`If-Match`).

    Returns the new version tag, or None when the precondition failed (someone else wrote
    first). A retried PUT whose first try did land is recognised by its content.
    """
    loc = parse_uri(uri)
    if loc.scheme in ("file", "pvc"):
        return _local_put_if(local_path(loc), body, etag)
    if loc.scheme != "s3":
        raise TrainerError(ExitCode.CONFIG, f"cannot write to {uri}: use s3://, pvc:// or file://")
    client = s3_client(opts)
    condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}

    def put() -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return str(client.put_object(Bucket=loc.root, Key=loc.path, Body=body,
                                         **condition)["ETag"])
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status != 412:
                raise s3_error(exc, f"write {uri}", ExitCode.STORAGE) from None
        except (BotoCoreError, OSError) as exc:
            raise s3_error(exc, f"write {uri}", ExitCode.STORAGE) from None
        now = read_versioned(uri, opts)
        return now.etag if now is not None and now.text.encode() == body else None

    return with_retries(put, opts, f"write {uri}")


def _local_put_if(path: Path, body: bytes, etag: str | None) -> str | None:
    """file:// / pvc://: the body is written whole to a private temporary file first, so no
    reader ever sees a half-written object (an empty lock would read as expired). A create
    links it into place (atomic, fails if the name exists); a replace compares the content's
    sha256 first and renames over it (not atomic against a writer between compare and rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.part")
    tmp.write_bytes(body)
    try:
        if etag is None:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return None
        elif not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != etag:
            return None
        else:
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return hashlib.sha256(body).hexdigest()


def delete_if(uri: str, opts: StorageOptions, etag: str) -> None:
    """Delete an object only while it is still the version `etag` (best effort: a server
    without conditional deletes answers 501 and the object is left to expire)."""
    loc = parse_uri(uri)
    if loc.scheme in ("file", "pvc"):
        path = local_path(loc)
        with contextlib.suppress(OSError):
            if hashlib.sha256(path.read_bytes()).hexdigest() == etag:
                path.unlink()
        return
    client = s3_client(opts)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.delete_object(Bucket=loc.root, Key=loc.path, IfMatch=etag)
    except (BotoCoreError, ClientError, OSError) as exc:
        log.warning("could not release %s: %s", uri, type(exc).__name__)


def copy_within(src_uri: str, dst_uri: str, opts: StorageOptions) -> None:
    """Copy one object to another key of the same store (S3: server-side copy)."""
    src, dst = parse_uri(src_uri), parse_uri(dst_uri)
    if src.scheme in ("file", "pvc"):
        _bind_copy(local_path(src), local_path(dst))()
        return
    client = s3_client(opts)
    with_retries(lambda: _s3_call(
        lambda: client.copy({"Bucket": src.root, "Key": src.path}, dst.root, dst.path,
                            Config=_transfer_config()),
        f"copy {src.uri} to {dst.uri}", ExitCode.STORAGE), opts, f"copy {dst.uri}")


def download_to(uri: str, folder: Path, opts: StorageOptions) -> list[str]:
    """Copy every file under a prefix into `folder`, local sources included (so the bytes
    that are verified are the bytes that are loaded); returns the relative names."""
    loc = parse_uri(uri)
    names = [safe_relative(n) for n in list_files(uri, opts)]
    if loc.scheme in ("file", "pvc"):
        source = local_path(loc)
        _parallel([_bind_copy(source / n, folder / n) for n in names], opts.workers)
    elif loc.scheme == "s3":
        client = s3_client(opts)
        _parallel([_bind_get(client, loc.child(n), folder / n, opts, ExitCode.STORAGE)
                   for n in names], opts.workers)
    else:
        raise TrainerError(ExitCode.CONFIG, f"cannot download {uri}: use s3://, pvc:// or file://")
    return names

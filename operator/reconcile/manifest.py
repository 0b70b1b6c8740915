"""Is the adapter the trainer reported really there, and really this job's?

The trainer's result (its termination message) is written by code running in the tenant's
pod, so the operator checks it before it says Succeeded:

1. the reported manifest URI lies under `spec.output.uri` (a trainer cannot point the
   LoRAJob at another job's adapter);
2. when the operator can read storage (`objectstore.read_object`: its own endpoint with its
   own credentials, another endpoint anonymously), manifest.json must exist, hash to the
   sha256 the trainer reported, and name this LoRAJob's uid;
3. when it cannot (no operator credentials, as with the chart's default values, or storage
   refuses the operator), the trainer's checksum report is the evidence: the fallback
   values.yaml documents for `operatorS3CredentialsSecret`;
4. when storage does not answer, the check is retried with backoff until
   `Settings.manifest_verify_timeout_seconds` after the Job completed, then the job fails
   (`ManifestUnverified`, decided in `status.derive_status`).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections.abc import Callable

from lora_operator import api, contract, objectstore
from lora_operator.reconcile.verdicts import ManifestCheck
from lora_operator.settings import Settings

SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Environment variables through which boto3 finds credentials in a pod without a shared
# credentials file: static keys, IRSA / pod identity web tokens, the ECS/EKS agent.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE",
                  "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
Reader = Callable[..., bytes]


def operator_has_credentials() -> bool:
    """Whether the operator was given S3 credentials of its own (the chart sets them only
    with `operatorS3CredentialsSecret`). Without them a signed read can only fail."""
    return any(os.environ.get(name) for name in CREDENTIAL_ENV)


def under_output(uri: str, output_uri: str) -> bool:
    """Whether `uri` names an object inside the `output_uri` prefix (no `..` escapes)."""
    prefix = output_uri.rstrip("/") + "/"
    if not uri.startswith(prefix):
        return False
    rest = uri[len(prefix):]
    return bool(rest) and ".." not in rest.split("/") and \
        posixpath.normpath("/" + rest) == "/" + rest


def check_bytes(uri: str, data: bytes, result: contract.TrainerResult,
                job_uid: str) -> ManifestCheck:
    """Compare the manifest read from storage with the trainer's report and the job."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != (result.manifest_sha256 or "").lower():
        return ManifestCheck(False, f"{uri} in storage has sha256 {digest}, but the trainer "
                                    f"reported {result.manifest_sha256 or 'none'}",
                             reason="ManifestMismatch")
    try:
        doc = json.loads(data)
    except ValueError:
        return ManifestCheck(False, f"{uri} is not JSON", reason="ManifestMismatch")
    job = doc.get("job") if isinstance(doc, dict) else None
    uid = job.get("uid") if isinstance(job, dict) else None
    if uid is not None and uid != job_uid:
        return ManifestCheck(False, f"{uri} was written by job uid {uid}, not by this "
                                    f"LoRAJob (uid {job_uid})", reason="ManifestMismatch")
    return ManifestCheck(True, f"manifest verified in storage ({len(data)} bytes, sha256 "
                               f"{digest})")


def check(spec: api.LoRAJobSpec, result: contract.TrainerResult | None, job_uid: str,
          settings: Settings, read: Reader = objectstore.read_object) -> ManifestCheck:
    """The verdict on the trainer's reported manifest (blocking: may read storage)."""
    if result is None:
        return ManifestCheck(None, "no result yet")
    uri = result.manifest_uri
    if not uri:
        return ManifestCheck(False, "the trainer reported success without a manifest",
                             reason="ManifestMissing")
    if not under_output(uri, spec.output.uri):
        return ManifestCheck(False, f"the trainer reported manifest {uri}, which is not under "
                                    f"spec.output.uri {spec.output.uri}",
                             reason="ManifestMismatch")
    if not SHA256.match((result.manifest_sha256 or "").lower()):
        return ManifestCheck(False, f"the trainer reported manifest {uri} without a sha256",
                             reason="ManifestMismatch")
    fallback = ManifestCheck(True, f"manifest {uri} taken on the trainer's checksum report "
                                   f"(sha256 {result.manifest_sha256}): the operator cannot "
                                   "read this storage itself")
    if not uri.startswith("s3://"):
        return fallback
    endpoint = spec.output.endpoint or None
    resolved = endpoint or objectstore.own_endpoint(settings)
    if objectstore.is_signed(resolved, settings) and not operator_has_credentials():
        return fallback  # storage it would sign for, but no credentials to sign with
    try:
        data = read(uri, endpoint=endpoint, region=spec.output.region or settings.s3_region,
                    settings=settings)
    except objectstore.NotFound:
        return ManifestCheck(False, f"the trainer reported success but {uri} is not in "
                                    "storage", reason="ManifestMissing")
    except objectstore.TooLarge as exc:
        return ManifestCheck(False, str(exc), reason="ManifestMismatch")
    except objectstore.NotAllowed:
        return fallback
    except objectstore.ObjectStoreError as exc:
        return ManifestCheck(None, f"could not check {uri} yet: {exc}")
    return check_bytes(uri, data, result, job_uid)

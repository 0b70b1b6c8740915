"""Checkpoints in storage: one private prefix per attempt, a sha256 manifest, a checked resume.

Layout under the job's checkpoint prefix (`<output>/.checkpoints/<job-uid>/`):

    <run>/checkpoint-N/...            one attempt's checkpoints; <run> = a<attempt>-<random>
    <run>/checkpoint-N/checkpoint.json   size + sha256 of every file, uploaded last
    latest                            "<run>/checkpoint-N" and the sha256 of its checkpoint.json

Each attempt writes only under its own `<run>/`, so two live attempts of one job (a pod
still terminating while its replacement starts, a partitioned node) never overwrite or
delete each other's files; at the end an attempt removes only its own run (and the
`latest` pointer if it still points there), never a checkpoint another attempt may be
writing or resuming from.

Resuming unpickles the optimizer, scheduler and RNG state (and DeepSpeed's shards), so a
checkpoint is loaded only after every file matches checkpoint.json, checkpoint.json
matches the digest the pointer carries, and nothing else is in the folder. A checkpoint
that fails is refused (a `checkpoint_refused` event says why) and training starts from
step 0: a corrupt, half-deleted, mixed or edited checkpoint is never loaded. What this
cannot stop is a writer who rewrites the files, checkpoint.json and the pointer together:
keeping others out of the prefix is the storage-prefix policy's job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from lora_operator.contract import ExitCode, JobIdentity
from lora_trainer import progress, storage
from lora_trainer.errors import TrainerError

log = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "checkpoint.json"
_POINTER = re.compile(r"^(a\d+-[0-9a-f]{8})/(checkpoint-\d+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class CheckpointStore:
    """Where this attempt's checkpoints go and where a resume may come from."""

    root: str
    run: str
    opts: storage.StorageOptions

    @classmethod
    def for_attempt(cls, root: str, job: JobIdentity, opts: storage.StorageOptions
                    ) -> CheckpointStore:
        return cls(root.rstrip("/") + "/", f"a{job.attempt}-{secrets.token_hex(4)}", opts)

    def uri(self, relative: str) -> str:
        return self.root + relative

    def save(self, folder: Path, name: str) -> str:
        """Upload one checkpoint folder, then its manifest, then point `latest` at it."""
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                       if p.is_file() and p.name != MANIFEST)
        target = self.uri(f"{self.run}/{name}")
        sent = storage.upload(folder, files, target, self.opts)
        body = json.dumps({"files": {n: {"size": d.size, "sha256": d.sha256}
                                     for n, d in sent.files.items()}}, indent=1) + "\n"
        (folder / MANIFEST).write_text(body)
        storage.upload(folder, [MANIFEST], target, self.opts)
        pointer = folder.parent / LATEST
        pointer.write_text(f"{self.run}/{name}\n{hashlib.sha256(body.encode()).hexdigest()}\n")
        storage.upload(folder.parent, [LATEST], self.root, self.opts)
        return target

    def latest(self, dest: Path) -> Path | None:
        """The newest checkpoint of this job, downloaded and verified; None to start fresh."""
        pointer = storage.read_text(self.uri(LATEST), self.opts)
        if not pointer:
            return None
        lines = pointer.split()
        match = _POINTER.match(lines[0]) if lines else None
        if match is None or len(lines) != 2 or not _SHA256.match(lines[1]):
            return _refuse(f"the `latest` pointer is not '<run>/checkpoint-N <sha256>' "
                           f"({pointer[:80]!r})")
        relative = f"{match.group(1)}/{match.group(2)}"
        uri = self.uri(relative)
        if not storage.list_files(uri, self.opts):
            return _refuse(f"{relative} is gone (removed by the attempt that wrote it?)")
        folder = dest / match.group(1) / match.group(2)
        try:
            storage.download_to(uri, folder, self.opts)
        except TrainerError as exc:
            if exc.code != ExitCode.STORAGE:
                raise
            return _refuse(f"{relative} could not be downloaded whole: {exc.message}")
        problem = verify(folder, lines[1])
        return folder if problem is None else _refuse(f"{relative}: {problem}")

    def cleanup(self) -> None:
        """Remove this attempt's own checkpoints (the adapter is safely out): never another
        run's, and the pointer only while it still points into ours."""
        storage.delete_prefix(self.uri(self.run + "/"), self.opts)
        pointer = storage.read_versioned(self.uri(LATEST), self.opts)
        if pointer is not None and pointer.text.startswith(self.run + "/"):
            storage.delete_if(self.uri(LATEST), self.opts, pointer.etag)


def verify(folder: Path, manifest_sha256: str) -> str | None:
    """Why the downloaded checkpoint must not be loaded, or None when every byte checks out."""
    path = folder / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST}"
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest_sha256:
        return f"{MANIFEST} does not match the digest in `latest`"
    try:
        listed = json.loads(raw)["files"]
        expected = {str(n): (int(e["size"]), str(e["sha256"])) for n, e in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is not a checkpoint manifest"
    present = {str(p.relative_to(folder)) for p in folder.rglob("*")
               if p.is_file() and p.name != MANIFEST}
    if present != set(expected):
        extra, missing = sorted(present - set(expected)), sorted(set(expected) - present)
        return f"files differ from {MANIFEST} (unlisted: {extra[:5]}, missing: {missing[:5]})"
    for name, (size, sha) in expected.items():
        digest = storage.digest_file(folder / name)
        if digest.size != size or digest.sha256 != sha:
            return f"{name} does not match its sha256 in {MANIFEST}"
    return None


def _refuse(reason: str) -> Path | None:
    log.warning("not resuming: %s; training starts from step 0", reason)
    progress.emit("checkpoint_refused", reason=reason)
    return None

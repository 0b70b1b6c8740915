"""Data movement: the trainer's storage layer vs plain boto3, against the local S3.

`python -m bench.data_movement [--quick]` prints JSON; `python -m bench --only data` writes
BENCHMARKS.md.

- Download: a multi-file "model" (4 × 512 MiB of random bytes + small config/tokenizer
  files; `--quick`: 4 × 32 MiB) through `lora_trainer.storage.download` vs one
  `download_file` per file with boto3's default TransferConfig, one file after another (what
  a hand-written script does).
- Upload: an "adapter" (~100 MB safetensors + config + tokenizer) through
  `lora_trainer.storage.upload` (which also computes the sha256 of every file for the
  manifest) vs one `upload_file` per file.

The two sides alternate (ours first on odd repetitions), 3 repetitions (1 with --quick),
median reported. Files are generated once under /tmp and uploaded once. The CPU seconds of
this process and of the SeaweedFS processes are recorded for each transfer: on a small
machine the server, not the client, is often what limits throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench.common import cluster, log, median

MiB = 1024 * 1024
WORK = Path(tempfile.gettempdir()) / "lora-bench-data"


def _write_random(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as fh:
        left = size
        while left:
            n = min(left, 16 * MiB)
            fh.write(os.urandom(n))
            left -= n
    tmp.replace(path)


def make_files(quick: bool) -> tuple[Path, list[str], Path, list[str]]:
    shard = (32 if quick else 512) * MiB
    model = WORK / ("model-quick" if quick else "model")
    model_files = {f"model-0000{i + 1}-of-00004.safetensors": shard for i in range(4)}
    model_files.update({"config.json": 700, "generation_config.json": 200,
                        "tokenizer.json": 7 * MiB, "tokenizer_config.json": 50_000,
                        "model.safetensors.index.json": 30_000, "special_tokens_map.json": 500})
    adapter = WORK / ("adapter-quick" if quick else "adapter")
    adapter_files = {"adapter_model.safetensors": (8 if quick else 96) * MiB,
                     "adapter_config.json": 900, "tokenizer.json": 7 * MiB,
                     "tokenizer_config.json": 50_000, "README.md": 4000, "metrics.json": 600}
    for root, files in ((model, model_files), (adapter, adapter_files)):
        for name, size in files.items():
            _write_random(root / name, size)
    return model, sorted(model_files), adapter, sorted(adapter_files)


def _s3(ci: Any, **config: Any) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=ci.s3_endpoint, aws_access_key_id=ci.s3_access_key,
                        aws_secret_access_key=ci.s3_secret_key, region_name=ci.s3_region,
                        config=Config(**config) if config else None)


def ensure_uploaded(ci: Any, src: Path, names: list[str], prefix: str) -> None:
    s3 = _s3(ci)
    present = {o["Key"]: o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=ci.s3_bucket, Prefix=prefix) for o in page.get("Contents", [])}
    for name in names:
        size = (src / name).stat().st_size
        if present.get(prefix + name) != size:
            s3.upload_file(str(src / name), ci.s3_bucket, prefix + name)


def _weed_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if "weed" in (p.info["name"] or "") or any("weed" in Path(c).name
                                                      for c in (p.info["cmdline"] or [])[:1]):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
        except psutil.Error:
            pass
    return total


def timed(fn: Callable[[], Any], nbytes: int) -> dict[str, float]:
    me, weed = [psutil.Process()], _weed_processes()
    c_me, c_weed = _cpu(me), _cpu(weed)
    t0 = time.monotonic()
    fn()
    secs = time.monotonic() - t0
    return {"seconds": secs, "mb_per_s": nbytes / 1e6 / secs,
            "client_cpu_s": _cpu(me) - c_me, "server_cpu_s": _cpu(weed) - c_weed}


def run(quick: bool = False, reps: int | None = None) -> dict[str, Any]:
    from lora_operator.contract import ExitCode
    from lora_trainer import storage

    reps = reps or (1 if quick else 3)
    model, model_names, adapter, adapter_names = make_files(quick)
    model_bytes = sum((model / n).stat().st_size for n in model_names)
    adapter_bytes = sum((adapter / n).stat().st_size for n in adapter_names)
    out: dict[str, Any] = {"model_bytes": model_bytes, "model_files": len(model_names),
                           "adapter_bytes": adapter_bytes, "adapter_files": len(adapter_names),
                           "reps": reps, "download": {"ours": [], "boto3": []},
                           "upload": {"ours": [], "boto3": []}}
    with cluster() as ci:
        os.environ.update({k: v for k, v in ci.env.items() if k.startswith("AWS_")})
        prefix = f"bench/data/{model.name}/"
        log(f"data: uploading the {model_bytes / MiB:.0f} MiB model once (if not there)")
        ensure_uploaded(ci, model, model_names, prefix)
        opts = storage.StorageOptions(endpoint=ci.s3_endpoint, region=ci.s3_region)
        out["storage_options"] = {"workers": opts.workers,
                                  "transfer": _describe(storage._transfer_config())}
        scratch = Path(tempfile.mkdtemp(prefix="lora-bench-dl-", dir=WORK))
        try:
            def ours_down() -> None:
                dest = scratch / "ours"
                shutil.rmtree(dest, ignore_errors=True)
                storage.download(f"s3://{ci.s3_bucket}/{prefix}", dest, opts, ExitCode.MODEL)

            def boto_down() -> None:
                dest = scratch / "boto3"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                s3 = _s3(ci)
                keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
                    Bucket=ci.s3_bucket, Prefix=prefix) for o in page.get("Contents", [])]
                for key in keys:
                    s3.download_file(ci.s3_bucket, key, str(dest / key.rsplit("/", 1)[1]))

            up_prefix = f"bench/upload/{adapter.name}"

            def ours_up() -> None:
                storage.upload(adapter, adapter_names, f"s3://{ci.s3_bucket}/{up_prefix}/ours/", opts)

            def boto_up() -> None:
                s3 = _s3(ci)
                for name in adapter_names:
                    s3.upload_file(str(adapter / name), ci.s3_bucket, f"{up_prefix}/boto3/{name}")

            for rep in range(reps):
                order = [("ours", ours_down, ours_up), ("boto3", boto_down, boto_up)]
                if rep % 2:
                    order.reverse()
                for side, down, _up in order:
                    r = timed(down, model_bytes)
                    out["download"][side].append(r)
                    log(f"  download {side} rep {rep + 1}: {r['seconds']:.1f} s "
                        f"({r['mb_per_s']:.0f} MB/s)")
                for side, _down, up in order:
                    r = timed(up, adapter_bytes)
                    out["upload"][side].append(r)
                    log(f"  upload {side} rep {rep + 1}: {r['seconds']:.2f} s "
                        f"({r['mb_per_s']:.0f} MB/s)")
                shutil.rmtree(scratch / "ours", ignore_errors=True)
                shutil.rmtree(scratch / "boto3", ignore_errors=True)
            # Where does the upload's time go? The sha256 of every file (for the manifest)
            # is part of the storage layer's upload; time it alone.
            t0 = time.monotonic()
            for name in adapter_names:
                storage.sha256_file(adapter / name)
            out["upload_hash_seconds"] = time.monotonic() - t0
            # Diagnostics: the same download with other fan-outs, to see what limits it.
            out["variants"] = _variants(ci, storage, prefix, scratch, model_bytes, quick)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    for what in ("download", "upload"):
        ours = median([r["seconds"] for r in out[what]["ours"]])
        base = median([r["seconds"] for r in out[what]["boto3"]])
        out[what]["ours_median_s"], out[what]["boto3_median_s"] = ours, base
        out[what]["speedup"] = base / ours
    return out


def _describe(cfg: Any) -> dict[str, Any]:
    return {"multipart_chunksize_mib": cfg.multipart_chunksize / MiB,
            "max_concurrency": cfg.max_concurrency}


def _variants(ci: Any, storage: Any, prefix: str, scratch: Path, nbytes: int,
              quick: bool) -> list[dict[str, Any]]:
    """One download each with other (workers × per-file concurrency, chunk) settings, by
    swapping the storage layer's TransferConfig for the run (diagnosis only)."""
    from boto3.s3.transfer import TransferConfig

    from lora_operator.contract import ExitCode

    original = storage._transfer_config
    rows = []
    cases = [(1, 1, 8), (8, 1, 8), (8, 4, 32)]
    if quick:
        cases = cases[:2]
    try:
        for workers, conc, chunk in cases:
            storage._transfer_config = (lambda c=conc, k=chunk: TransferConfig(
                multipart_threshold=k * MiB, multipart_chunksize=k * MiB, max_concurrency=c))
            opts = storage.StorageOptions(endpoint=ci.s3_endpoint, region=ci.s3_region,
                                          workers=workers)
            dest = scratch / "variant"
            shutil.rmtree(dest, ignore_errors=True)
            r = timed(lambda o=opts, d=dest: storage.download(
                f"s3://{ci.s3_bucket}/{prefix}", d, o, ExitCode.MODEL), nbytes)
            r.update({"workers": workers, "per_file_concurrency": conc, "chunk_mib": chunk})
            rows.append(r)
            log(f"  variant workers={workers} concurrency={conc} chunk={chunk} MiB: "
                f"{r['seconds']:.1f} s ({r['mb_per_s']:.0f} MB/s)")
            shutil.rmtree(dest, ignore_errors=True)
    finally:
        storage._transfer_config = original
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.reps), indent=1))


if __name__ == "__main__":
    main()

"""`make bench` = `python -m bench`: every benchmark, then BENCHMARKS.md.

    python -m bench                          # burst, steady, data, trainer (< 30 min on 2 cores)
    python -m bench --only burst,steady      # a part; the other sections of BENCHMARKS.md stay
    python -m bench --quick                  # smoke run: N = 20, small files, short windows
    python -m bench --quick --no-write       # print the JSON only
    python -m bench --only gpu               # on one GPU (< 8 min): the trainer's GPU rows and
                                             # the VRAM-accuracy table (not part of the default)
    python -m bench --only burst --compare ../before --sizes 100,1000
                                             # before/after in one run: each burst also with
                                             # the operator of another tree (a git worktree)

The local cluster is brought up if it is down (and stopped again at the end); a cluster that
was already up is left up. Quick runs never overwrite BENCHMARKS.md unless --write is given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import report
from bench.common import REPO, cluster, log, machine

PARTS = ("burst", "steady", "data", "trainer")
GPU_PARTS = ("gpu",)  # only when asked for: needs a CUDA device (`--quick`: a CPU dry run)

# Why a missed goal was missed, and the next step (written from the issue-14 runs of
# 2026-12-02, before/after in one run; shown in BENCHMARKS.md only for goals that are missed).
NOTES = {
    "burst_rate": (
        "the operator's event loop is one core, and it shares the machine's two with etcd, the "
        "API server (about one core of its own during a burst), the controller manager, kwok "
        "and the load generator, so the absolute rate is a floor; read the before/after table, "
        "measured side by side in one run: issue 14 took N = 1,000 from 17.8 to 31.2 jobs/s "
        "(1.75×) and CPU per job from 85 to 40 ms. What it changed: a keyed work queue instead "
        "of a reconcile per watch event, new LoRAJobs first, raw aiohttp instead of the typed "
        "client, no kopf diff base, GC thresholds raised after a start-up freeze, orjson for "
        "the watch streams, watched objects trimmed as they are decoded, own-write copies "
        "dropped at their echo, index handlers without a thread hop, and no O(jobs) scan per "
        "reconcile. What is left on the path to a Job is kopf's per-event work on three watch "
        "streams (a third of the operator's CPU in the profile: per-object workers, "
        "indexing), five creates over TLS and planning. Next step: a watcher of our own that "
        "feeds the work queue directly (kopf kept for peering), then a machine whose control "
        "plane has its own cores."),
    "burst_p99": (
        "follows from the rate on these 2 shared cores: the last of N LoRAJobs gets its Job "
        "after ≈ N / rate (N = 100 met it: p99 2.6 s, 3.9 s with a restart). New LoRAJobs go "
        "first in the work queue, so status work of running jobs does not delay them. Next "
        "step: the rate (above)."),
    "burst_rss": (
        "151 MB at N = 1,000 (462 MB before issue 14; 170 vs 666 MB in the restart burst). "
        "Two changes of 2026-12-02 did most of it: watched objects trimmed as they are decoded "
        "(`reconcile/projection.py`: no managedFields, a pod's spec cut to its node and "
        "containers' resources, a Job's to the keys the controller reads), because a memray "
        "profile put half of the heap in watch events queued in kopf while the operator is "
        "behind; and the controller's copy of its own last write dropped when the watch "
        "echoes it (every finished job's last status write and every created Job were held "
        "twice, untrimmed): 274 → 150 MB at N = 1,000 in a one-run A/B of that change alone."),
    "huge_rss": (
        "360 MB (about 1.1 GB before watched objects were trimmed at decode time). About "
        "110 MB is the process itself (the N = 100 peak); the rest is about 25 KB per job: "
        "the indexes hold every LoRAJob whole (spec and status, which the controller plans "
        "and derives from), its Job and pod trimmed, kopf's per-object state, and the watch "
        "events still queued. Next step: a watcher of our own that keeps only the newest "
        "event per object (as the work queue keeps only a key) and an index entry per "
        "LoRAJob without the parts of the spec planning no longer needs once placed."),
    "huge_rate": (
        "during the N = 10,000 burst the API server used a whole core (10,000 "
        "LoRAJobs, Jobs and pods in one namespace) and the operator about a third of one: at that size the rate is the "
        "control plane's on these two shared cores. The burst stops once every Job exists "
        "(`--jobs-only-sizes`): Succeeded is paced by the local Job controller and kwok. "
        "Next step: measure on a cluster whose control plane has its own cores."),
    "burst_writes": (
        "4.0 at N = 100 (the Job and 3 status patches: the plan with the Job's outcome, "
        "Running, Succeeded; 0 Events); 13.6 before the token-less trainer. The trainer pod "
        "now holds no API token, so the per-job ServiceAccount, Role, RoleBinding, ConfigMap "
        "and verified-at record are gone, and only Warnings are posted as Events. Above 4 at "
        "N = 1,000: steps that usually pass in moments (the pod bound, its container "
        "starting) that really lasted longer than the progress interval in the saturated "
        "cluster, which the status then shows."),
    "burst_lost": (
        "no Job was lost, but some LoRAJobs ended **Failed (NoResult)** although their pod "
        "succeeded with a valid TrainerResult: a race in the status derivation (proposal 1). "
        "This is a correctness bug, the most important finding of this benchmark; it shows up "
        "under load, so a clean run does not clear it."),
    "burst_dup": "more than one batch Job for one LoRAJob: see its row.",
    "steady_cpu": "see the steady-state section.",
    "_findings": (
        "- **A race marks successful LoRAJobs Failed (`NoResult`) under load**: the Job's "
        "`Complete` can reach the operator before the pod's terminated state does, and the "
        "status derivation then fails the job at once. 21 of 1,000 LoRAJobs in the earlier full "
        "run (\"Earlier runs\" in the burst section), 7 of 1,000 and 1 of 100 in other runs; "
        "0 in the last run at lower load. Fixed after these runs (proposal 1, commit \"Operator: a Job that "
        "completes before its pod's final state is watched waits\"), with unit tests.\n"
        "- **The operator held its own writes twice**: the copy of its last status write "
        "(and of each Job it created) bridged the time until the watch delivered it, but "
        "the watch's echo of that write was skipped without dropping the copy, so every "
        "finished LoRAJob stayed in memory twice, untrimmed. Now the echo drops it (kopf "
        "indexes an event before its handlers run), and the copies are trimmed like the "
        "watch's: peak RSS at N = 1,000 274 → 150 MB in a one-run A/B of that change alone "
        "(2026-12-02, `--compare` against the commit before it).\n"
        "- **Lost or duplicated Jobs: none** in any run, SIGKILL mid-burst included "
        "(deterministic Job names, 409 = adopt).\n"
        "- **The local cluster is shared**: another suite's kube-apiserver restart "
        "(`tests/reliability/test_operator_faults.py`) aborted one full run; the bench now "
        "retries API calls for 90 s."),
    "download": (
        "this machine's ceiling, not the storage layer's fan-out. One file at a time with a "
        "single thread already moves as much as the storage layer's 8 files × 4 threads and "
        "boto3's default 10 threads per file (diagnosis table): the transfer is CPU-bound "
        "(client and SeaweedFS on the same 2 loaded cores), so more parallel streams cannot "
        "help here. Where parallelism pays (real network latency, many cores, a remote S3) the "
        "layer's fan-out is the right shape. Next step: re-measure against a remote S3 from a "
        "machine with ≥ 8 cores, and cut client CPU per byte (proposal 6)."),
}

PROPOSALS = """
## Proposed changes (1-4 done; 5 in part by issue 14; the rest are next steps)

1. **Done after these runs.** **Correctness — `operator/reconcile/status.py`, `_job_verdict`**
   (since issue 14 `verdicts.py`, `completed`; the `Complete` / `SuccessCriteriaMet` branch):
   when the Job is complete but no pod of the attempt in the operator's pod index has a
   terminated trainer container yet (the pod watch lags the Job watch under load, or the index
   has not seen the pod at all), it returns `Failed/NoResult` at once.
   Seen in 3 of 6 burst runs on 2026-11-23: 21 of 1,000 LoRAJobs (the earlier full run, see
   "Earlier runs"), 7 of 1,000 (a run aborted by another suite's API server restart) and 1 of
   100 (a restart burst); not in the last run, at lower load (the pod watch must lag the Job
   watch). Every such pod had `state.terminated.message` with a valid TrainerResult. Change: in that case return an
   Uploading verdict with reason `WaitingForPodStatus` (and have the controller requeue, as it does
   for `VerifyingManifest`), and fail with `NoResult` only when a pod whose trainer container *is*
   terminated carries no parseable result, or when no such pod appears within a grace period
   (e.g. 60 s after `Job.status.completionTime`, for pods deleted before they were seen).
   A unit test: Job Complete + pod still Running in the index → not Failed.
2. **Done** (figures in the burst table; before: "Earlier runs").
   **`operator/plan/shapes.py`**: single-flight `resolve_shape` per `(uri, revision, ggufFile)`
   (a per-key `threading.Lock` taken from a dict under `_CACHE_LOCK`, re-checking `_CACHE` after
   acquiring it), and in `_read_s3` reuse one boto3 client per endpoint (a module-level dict under
   a lock; boto3 clients are thread-safe). A burst of N jobs on one base model then reads
   config.json once instead of once per worker: −100 MB peak RSS (15 concurrent clients measured
   +118 MB) and the first Jobs of a burst no longer wait behind 15-20 client constructions.
3. **Done**, together with dropping the controller's own-write caches once the watch has caught
   up. **`operator/reconcile/handlers.py`, the three `kopf.index` functions**: store a projection
   instead of `copy.deepcopy` of the whole body — pods: metadata (name, labels, uid,
   creationTimestamp, resourceVersion), `spec.nodeName`, `status.phase`, `status.conditions`,
   `status.containerStatuses`; Jobs: metadata, `spec.suspend`, `status`; LoRAJobs: as today. Saves
   the 5 % of CPU in `_snapshot` and most of the per-job RSS (a pod object is the biggest of the
   three); `derive_status` reads only these fields.
4. **Done after these runs** (pool = workers + 4).
   **`operator/reconcile/kube.py`, `load_kube_config`**: raise the client's urllib3 pool to at
   least `Settings.max_workers` (`cfg = client.Configuration.get_default_copy();
   cfg.connection_pool_maxsize = 32; client.Configuration.set_default(cfg)`, or pass the size
   in). Today the pool is 10 (5 × cores) for 20 workers: the operator logs "Connection pool is
   full, discarding connection" throughout a burst and pays new TLS handshakes.
5. **Fewer status writes** (issue 14, in part: one status patch on the way to the Job, status
   written only on change, Events only for milestones, own echoes skipped). Before: at N = 20
   each LoRAJob took ~9 `PATCH lorajobs/status` and ~1.7
   `GET lorajobs` (refreshes after 409 conflicts), and ~10 core Events were posted per job in
   total. Derive once per coalesced batch of events and skip intermediate phases the Job has
   already left (Scheduling → Running → Uploading within one second is one patch, not three);
   patch without the resourceVersion precondition where the patch is a pure function of the
   children (no read-modify-write), which removes the conflict refreshes.
6. **`trainer/storage.py`, `_transfer_config`**: on small machines the transfer is CPU-bound
   (see the data-movement diagnosis); boto3's CRT transfer client
   (`TransferConfig(preferred_transfer_client="crt")`, needs the `awscrt` package in the
   `[trainer]` extra) moves bytes outside the GIL. Not measured yet: with boto3 1.43 +
   awscrt 0.38 it failed against the loopback endpoint (`AWS_IO_DNS_INVALID_NAME`: it builds a
   virtual-hosted name on an IP address even with path-style addressing), so it needs a DNS
   name for the endpoint; measure it against the classic client before adopting it.
   The client spends ~2.5-3 ms of CPU per MB here (client CPU column), the server ~1.3 ms.
7. **Done in part (QPS and burst, 2026-12-02).** **Local cluster
   (`hack/cluster/localcluster.py`)**: the controller manager ran with the default
   `--kube-api-qps=20 --kube-api-burst=30 --concurrent-job-syncs=5`, so
   "→ Succeeded − run" at N = 1,000 is bounded by the Job controller (it creates every pod and
   updates every Job status), not by the operator; `--kube-api-qps=200 --kube-api-burst=400
   --concurrent-job-syncs=50` would make the local cluster a fairer stand-in for a real one.
   Also: `tests/reliability/test_operator_faults.py` restarts the shared kube-apiserver, which
   aborted one full `make bench` run here (the bench now retries API calls for 90 s).
"""


def run_trainer(quick: bool) -> dict[str, Any]:
    """bench/trainer_throughput.py (the trainer engineer's), as a subprocess; it writes
    bench/TRAINER.md itself."""
    script = REPO / "bench" / "trainer_throughput.py"
    if not script.exists():
        return {"note": "bench/trainer_throughput.py is not in the repository yet"}
    cmd = [sys.executable, "-m", "bench.trainer_throughput"]
    try:
        helptext = subprocess.run([*cmd, "--help"], cwd=REPO, capture_output=True, text=True,
                                  timeout=120).stdout
    except subprocess.SubprocessError:
        helptext = ""
    if quick and "--quick" in helptext:
        cmd.append("--quick")
    log(f"trainer: {' '.join(cmd[1:])}")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, timeout=20 * 60)
    return {"command": "python " + " ".join(cmd[1:]), "returncode": proc.returncode,
            "seconds": time.monotonic() - t0, "machine": machine()}


def run_gpu(quick: bool, write: bool) -> dict[str, Any]:
    """bench/trainer_gpu.py in-process: the GPU rows and the VRAM table (`quick`: CPU dry run,
    written to a scratch file so the real rows are never overwritten by it)."""
    from bench import trainer_gpu

    t0 = time.monotonic()
    scratch = Path(tempfile.gettempdir())
    out = report.TRAINER_GPU_MD if write and not quick else scratch / "bench-gpu-dry-run.md"
    vram = report.VRAM_MD if write and not quick else scratch / "bench-vram-dry-run.md"
    trainer_gpu.run(out, dry=quick, budget=trainer_gpu.BUDGET_S, vram_out=vram)
    return {"command": "python -m bench --only gpu" + (" --quick" if quick else ""),
            "seconds": time.monotonic() - t0, "report": str(out)}


def _sizes(arg: str | None) -> list[int]:
    return [int(x) for x in arg.split(",")] if arg else []


def baseline_label(tree: Path) -> str:
    """`commit abc1234` of a comparison's tree (its path when it is not a git checkout)."""
    try:
        sha = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                             check=True, capture_output=True, text=True).stdout.strip()
        return f"commit `{sha}`"
    except (OSError, subprocess.CalledProcessError):
        return f"`{tree}`"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts: {', '.join(PARTS + GPU_PARTS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md even with --quick")
    parser.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--compare", type=Path, default=None, metavar="TREE",
                        help="also run every burst with the operator of TREE (e.g. a worktree "
                             "of the commit before a change): before/after in one run")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated burst sizes (default 100,1000; --quick 20)")
    parser.add_argument("--compare-sizes", default=None,
                        help="the sizes --compare also runs the baseline at (default: all)")
    parser.add_argument("--restart-sizes", default=None,
                        help="the sizes also run with a restart mid-burst (default: all)")
    parser.add_argument("--jobs-only-sizes", default=None,
                        help="the sizes whose bursts stop once every Job exists instead of "
                             "waiting for Succeeded (e.g. 10000, paced by the local control plane)")
    args = parser.parse_args(argv)
    if args.compare is not None and not (args.compare / "operator" / "cli.py").is_file():
        parser.error(f"--compare {args.compare}: no operator/cli.py there")
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS + GPU_PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS + GPU_PARTS)}")
    command = "python -m bench" + (f" --only {','.join(parts)}" if set(parts) != set(PARTS) else "") \
        + (" --quick" if args.quick else "") + (f" --sizes {args.sizes}" if args.sizes else "") \
        + (f" --compare {args.compare}" if args.compare else "") \
        + (f" --compare-sizes {args.compare_sizes}" if args.compare_sizes else "") \
        + (f" --restart-sizes {args.restart_sizes}" if args.restart_sizes else "") \
        + (f" --jobs-only-sizes {args.jobs_only_sizes}" if args.jobs_only_sizes else "")
    write = (args.write or not args.quick) and not args.no_write
    data = report.previous() if write else {}
    t0 = time.monotonic()
    loads = [os.getloadavg()[0]]
    log(f"{command}: load {loads[0]:.1f} on {os.cpu_count()} cores")

    def stamp(section: dict[str, Any], started_load: float) -> dict[str, Any]:
        m = machine()
        m["load_seen"] = [started_load, os.getloadavg()[0]]
        loads.extend(m["load_seen"])
        section.update({"machine": m, "command": command})
        return section

    need_cluster = any(p in parts for p in ("burst", "steady", "data"))

    def save() -> None:
        if write:
            data["meta"] = {"machine": machine(), "command": command, "loads": loads,
                            "wall_seconds": time.monotonic() - t0}
            if set(parts) == set(PARTS) and not args.quick:
                data["meta_full"] = data["meta"]
            report.write(data, NOTES, PROPOSALS)

    def guarded(name: str, fn: Any) -> None:
        """Run one part; a failure is recorded in its section, the other parts still run."""
        l0 = os.getloadavg()[0]
        try:
            fn()
            data.get("errors", {}).pop(name, None)
        except Exception as exc:  # reported, and the exit status says so
            failures.append(name)
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            data.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:500]
        for key in ("burst", "steady", "data", "trainer", "gpu"):
            section = data.get(key)
            if isinstance(section, dict) and section.get("_fresh"):
                section.pop("_fresh")
                stamp(section, l0)
        save()

    failures: list[str] = []
    with cluster() if need_cluster else _Nothing() as ci:
        if "data" in parts:
            from bench import data_movement

            def data_part() -> None:
                data["data"] = {**data_movement.run(args.quick), "_fresh": True}
            guarded("data", data_part)
        if "burst" in parts or "steady" in parts:
            from bench import operator_burst, steady_state

            def burst_part() -> None:
                sizes = _sizes(args.sizes) or ([20] if args.quick else [100, 1000])
                compared = _sizes(args.compare_sizes) or sizes if args.compare else []
                restarted = _sizes(args.restart_sizes) or sizes
                jobs_only = _sizes(args.jobs_only_sizes)
                burst: dict[str, Any] = {"sizes": sizes, "runs": []}
                if args.compare is not None:
                    burst["baseline"] = {"label": baseline_label(args.compare), "runs": []}
                api = operator_burst.Api(str(ci.kubeconfig))
                try:
                    for n in sizes:
                        for restart in (False, True) if n in restarted else (False,):
                            if args.compare is not None and n in compared:  # before, then after
                                old = operator_burst.run_burst(ci, n, restart=restart,
                                                               operator_src=args.compare,
                                                               until_succeeded=n not in jobs_only)
                                burst["baseline"]["runs"].append(old)
                                operator_burst.delete_namespace(api, old["namespace"], wait=30)
                            keep = "steady" in parts and n == max(sizes) and not restart
                            res = operator_burst.run_burst(ci, n, restart=restart, keep=keep,
                                                           until_succeeded=n not in jobs_only)
                            kept = res.pop("_keep", None)
                            burst["runs"].append(res)
                            if kept is not None:
                                try:
                                    ls = os.getloadavg()[0]
                                    data["steady"] = stamp(
                                        steady_state.measure(kept, n, args.quick), ls)
                                finally:
                                    operator_burst.finish_kept(kept)
                            operator_burst.delete_namespace(api, res["namespace"], wait=30)
                finally:
                    operator_burst.delete_nodes(api)
                    if burst["runs"]:
                        if data.get("burst"):  # keep the last runs for comparison
                            data["burst_history"] = [
                                data["burst"], *(data.get("burst_history") or [])][:2]
                        data["burst"] = {**burst, "_fresh": True}

            def steady_part() -> None:
                data["steady"] = {**steady_state.run(args.quick), "_fresh": True}
            guarded("burst" if "burst" in parts else "steady",
                    burst_part if "burst" in parts else steady_part)
    if "trainer" in parts:
        def trainer_part() -> None:
            data["trainer"] = {**run_trainer(args.quick), "_fresh": True}
        guarded("trainer", trainer_part)
    if "gpu" in parts:
        def gpu_part() -> None:
            data["gpu"] = {**run_gpu(args.quick, write), "_fresh": True}
        guarded("gpu", gpu_part)
    log(f"done in {time.monotonic() - t0:.0f} s")
    if write:
        save()
        log(f"wrote {report.BENCHMARKS.relative_to(REPO)}")
        for what, value, goal, text, _met in report.goal_rows(data):
            log(f"  {what}: {value} (goal {goal}) {text}")
    else:
        data["meta"] = {"machine": machine(), "command": command, "loads": loads,
                        "wall_seconds": time.monotonic() - t0}
        print(json.dumps(data, indent=1, default=str))
    if failures:
        log(f"failed parts: {', '.join(failures)}")
        return 1
    return 0


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    sys.exit(main())

"""Steady state: an idle operator with 1,000 finished LoRAJobs (plus their Jobs and pods).

Kubeflow's training-operator re-queued every finished job every 30 s (issue #965); here a
finished LoRAJob should cost a TTL timer and nothing else. Measured on the jobs of the
operator burst (they went through the whole real lifecycle, so their Jobs and Succeeded
pods are there too, and the operator watches all three kinds):

1. the operator that ran the burst, after it settled: CPU over the idle window, RSS, and
   the API requests the operator made meanwhile (apiserver_request_total);
2. a freshly (re)started operator: time and CPU to list everything, then the same idle
   window.

`python -m bench.steady_state [--quick]` runs its own burst first (N=1,000; 20 with
--quick); under `python -m bench` it reuses the N=1,000 burst's namespace.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from bench.common import cluster, diff_request_totals, log, summarize_requests

SETTLE_SECONDS = 10.0


def measure_idle(op: Any, api: Any, seconds: float) -> dict[str, Any]:
    before = api.metrics()
    cpu0, t0 = op.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    cpu, elapsed = op.cpu_seconds() - cpu0, time.monotonic() - t0
    after = api.metrics()
    reqs = summarize_requests(diff_request_totals(before, after), 1)
    rss = op.ps.memory_info().rss / 1e6 if op.ps is not None else float("nan")
    return {"seconds": elapsed, "cpu_seconds": cpu, "cpu_percent": 100 * cpu / elapsed,
            "rss_mb": rss, "operator_requests": reqs["operator"],
            "cluster_requests": reqs["total"]}


def measure(kept: tuple[str, Any, Any], finished: int, quick: bool = False) -> dict[str, Any]:
    _ns, op, api = kept
    window = 10.0 if quick else 60.0
    log(f"steady: {finished} finished LoRAJobs; settling {SETTLE_SECONDS:.0f} s, then "
        f"{window:.0f} s idle")
    time.sleep(SETTLE_SECONDS)
    after_burst = measure_idle(op, api, window)
    log(f"  after the burst: {after_burst['cpu_percent']:.2f} % of a core, "
        f"{after_burst['operator_requests']} operator requests")
    # A fresh operator: list everything, then idle.
    op.stop()
    cpu_before = op.cpu_seconds()
    t0 = time.monotonic()
    op.start()
    op.wait_ready()
    time.sleep(SETTLE_SECONDS)
    startup = {"seconds": time.monotonic() - t0, "cpu_seconds": op.cpu_seconds() - cpu_before}
    fresh = measure_idle(op, api, window / 2)
    log(f"  restarted: start+list {startup['cpu_seconds']:.1f} CPU s; idle "
        f"{fresh['cpu_percent']:.2f} % of a core")
    return {"finished": finished, "window_seconds": window, "after_burst": after_burst,
            "restart_listing": startup, "fresh": fresh}


def run(quick: bool = False) -> dict[str, Any]:
    from bench import operator_burst

    n = 20 if quick else 1000
    with cluster() as ci:
        api = operator_burst.Api(str(ci.kubeconfig))
        res = operator_burst.run_burst(ci, n, keep=True)
        kept = res.pop("_keep")
        try:
            return measure(kept, n, quick)
        finally:
            operator_burst.finish_kept(kept)
            operator_burst.delete_nodes(api)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=1))


if __name__ == "__main__":
    main()

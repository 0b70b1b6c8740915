"""Prometheus metrics of the operator, served on `--metrics-port` (path /metrics).

Names follow Prometheus conventions (`_total` counters, `_seconds` histograms). The phase
gauge is computed from the operator's in-memory view of every LoRAJob it watches, so it is
correct right after a restart without replaying history.
"""

from __future__ import annotations

import collections
import gc
import threading
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from lora_operator import api

JOBS_BY_PHASE = Gauge("lora_operator_lorajobs", "LoRAJobs by phase (as the operator sees them).",
                      ["phase"])
RECONCILE_SECONDS = Histogram(
    "lora_operator_reconcile_duration_seconds", "Time to reconcile one LoRAJob.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
RECONCILE_ERRORS = Counter("lora_operator_reconcile_errors_total",
                           "Reconciles that raised, by exception type.", ["error"])
JOBS_CREATED = Counter("lora_operator_trainer_jobs_created_total",
                       "Trainer Jobs created (one per attempt).")
JOBS_STOPPED = Counter("lora_operator_trainer_jobs_stopped_total",
                       "Unfinished trainer Jobs deleted because their LoRAJob failed.")
ESCALATIONS = Counter("lora_operator_oom_escalations_total",
                      "Out-of-memory attempts re-planned one VRAM class up.")
TTL_DELETIONS = Counter("lora_operator_ttl_deletions_total",
                        "Finished LoRAJobs deleted by runPolicy.ttlSecondsAfterFinished.")
TRANSITIONS = Counter("lora_operator_phase_transitions_total",
                      "LoRAJob phase transitions, by the phase entered.", ["phase"])
PROGRESS_READ_ERRORS = Counter(
    "lora_operator_progress_read_errors_total",
    "Reads of a running trainer's log for its progress that failed (node, timeout).")

QUEUE_DEPTH = Gauge("lora_operator_workqueue_depth",
                    "Keys waiting in a work queue (not counting those being reconciled).",
                    ["queue"])
GC_SECONDS = Counter("lora_operator_gc_seconds_total",
                     "Time the interpreter spent in garbage collection, by generation.",
                     ["generation"])
GC_COLLECTIONS = Counter("lora_operator_gc_collections_total",
                         "Garbage collections run, by generation.", ["generation"])

for _phase in api.Phase:  # every phase on /metrics from the start, at 0
    JOBS_BY_PHASE.labels(phase=_phase.value)
_lock = threading.Lock()
_phases: dict[tuple[str, str], str] = {}
_counts: collections.Counter[str] = collections.Counter()


def _move(old: str | None, new: str | None) -> None:
    """Shift one LoRAJob between phase counts and publish the two that changed (a recount
    of every job per transition made each one O(jobs))."""
    for phase, step in ((old, -1), (new, 1)):
        if phase is not None:
            _counts[phase] += step
            JOBS_BY_PHASE.labels(phase=phase).set(_counts[phase])


def observe_phase(key: tuple[str, str], phase: str | None) -> None:
    """Record the phase of one LoRAJob (None: forget it, it was deleted)."""
    with _lock:
        old = _phases.get(key)
        if old == phase:
            return
        if phase is None:
            del _phases[key]
        else:
            _phases[key] = phase
        _move(old, phase)


def serve(port: int) -> None:
    """Start the /metrics HTTP server in a background thread (0 disables it)."""
    if port:
        start_http_server(port)


_gc_started: list[float] = []


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    """gc.callbacks hook: time each collection (start/stop come in pairs, on one thread)."""
    if phase == "start":
        _gc_started.append(time.perf_counter())
    elif _gc_started:
        generation = str(info.get("generation", ""))
        GC_SECONDS.labels(generation=generation).inc(time.perf_counter() - _gc_started.pop())
        GC_COLLECTIONS.labels(generation=generation).inc()


def track_gc() -> None:
    """Export GC time on /metrics: full collections over a large heap were a measurable
    share of the operator's CPU in bursts (BENCHMARKS.md), and this is how to see them."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


# Collector thresholds for the operator (CPython's default: 700, 10, 10). A burst allocates
# watch bodies, index snapshots and queued work that live for seconds: at the default they
# survive two young collections, reach the old generation and trigger full collections of
# the whole heap again and again. Young collections 20x rarer let such objects die by
# reference count first; cyclic garbage (asyncio tasks, exceptions) is still collected, in
# larger batches. Measured at N = 1,000 (one run each, BENCHMARKS.md): GC 26.2 s -> 6.7 s,
# full collections 19.5 s -> 0.4 s; 50,000 saved no more.
GC_THRESHOLDS = (14_000, 10, 10)


def freeze_after_startup() -> None:
    """Move everything allocated so far (imports, settings, clients: most of the heap at
    start) out of the collector's view, so each full collection walks only what the
    operator allocated since; nothing frozen is ever freed, which is what we want for
    module-level objects. Then set the operator's thresholds (`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)

"""GC time on /metrics (operator/metrics.py): how the burst's collector cost is watched."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from lora_operator import metrics


def _sample(name: str) -> float:
    return sum(REGISTRY.get_sample_value(name, {"generation": g}) or 0.0 for g in "012")


def test_collections_are_counted_and_timed() -> None:
    metrics.track_gc()
    metrics.track_gc()  # idempotent: one hook, not two
    assert gc.callbacks.count(metrics._on_gc) == 1
    runs, seconds = _sample("lora_operator_gc_collections_total"), \
        _sample("lora_operator_gc_seconds_total")
    cycles = [[] for _ in range(1000)]
    for c in cycles:
        c.append(c)  # reference cycles: only the collector frees them
    del cycles
    gc.collect()
    assert _sample("lora_operator_gc_collections_total") >= runs + 1
    assert _sample("lora_operator_gc_seconds_total") > seconds


def test_freeze_moves_the_startup_heap_out_of_the_collectors_view() -> None:
    old = gc.get_threshold()
    try:
        metrics.freeze_after_startup()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == metrics.GC_THRESHOLDS  # young collections rarer
        assert metrics.GC_THRESHOLDS[0] > old[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*old)

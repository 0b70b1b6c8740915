"""The LoRAJobs-by-phase gauge (operator/metrics.py): counts follow each job's transitions
and deletion, whatever the order of events."""

from __future__ import annotations

from prometheus_client import REGISTRY

from lora_operator import metrics


def _gauge(phase: str) -> float:
    return REGISTRY.get_sample_value("lora_operator_lorajobs", {"phase": phase}) or 0.0


def test_phase_counts_follow_transitions_and_deletions() -> None:
    base = {p: _gauge(p) for p in ("Pending", "Running", "Succeeded")}
    a, b = ("phases-ns", "a"), ("phases-ns", "b")
    metrics.observe_phase(a, "Pending")
    metrics.observe_phase(b, "Pending")
    metrics.observe_phase(b, "Pending")  # a repeat changes nothing
    assert _gauge("Pending") == base["Pending"] + 2
    metrics.observe_phase(a, "Running")
    assert (_gauge("Pending"), _gauge("Running")) == (base["Pending"] + 1, base["Running"] + 1)
    metrics.observe_phase(a, "Succeeded")
    metrics.observe_phase(b, None)  # deleted while Pending
    metrics.observe_phase(("phases-ns", "never-seen"), None)  # deleting the unknown is harmless
    assert _gauge("Pending") == base["Pending"]
    assert _gauge("Running") == base["Running"]
    assert _gauge("Succeeded") == base["Succeeded"] + 1
    metrics.observe_phase(a, None)
    assert _gauge("Succeeded") == base["Succeeded"]

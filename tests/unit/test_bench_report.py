"""The benchmarks' pure helpers: statistics, goal verdicts, apiserver metrics parsing and the
data block of BENCHMARKS.md. No timing here: figures are measured by `make bench`, never
asserted in tests."""

from __future__ import annotations

import math
from collections import Counter

from bench import report
from bench.common import (
    diff_request_totals,
    median,
    parse_request_totals,
    percentile,
    summarize_requests,
    verdict,
)


def _sample(code: str, group: str, resource: str, sub: str, verb: str, value: int) -> str:
    return (f'apiserver_request_total{{code="{code}",component="apiserver",dry_run="",'
            f'group="{group}",resource="{resource}",scope="resource",subresource="{sub}",'
            f'verb="{verb}",version="v1"}} {value}')


METRICS = "\n".join([
    "# HELP apiserver_request_total [STABLE] Counter of apiserver requests",
    "# TYPE apiserver_request_total counter",
    _sample("201", "batch", "jobs", "", "POST", 10),
    _sample("409", "batch", "jobs", "", "POST", 2),
    _sample("200", "lorajob.dev", "lorajobs", "status", "PATCH", 30),
    _sample("200", "", "pods", "status", "PATCH", 7),
    _sample("201", "", "events", "", "POST", 4),
    'apiserver_request_duration_seconds_bucket{le="0.1"} 99',
])


def test_percentile_interpolates_like_numpy() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert math.isclose(percentile(list(range(101)), 99), 99.0)
    assert math.isclose(percentile([5.0, 1.0, 3.0], 99), 4.96)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    assert median([3.0, 1.0, 2.0]) == 2.0


def test_verdict_ratio_and_direction() -> None:
    assert verdict(100, 50, True).met and verdict(100, 50, True).ratio == 2.0
    assert not verdict(25, 50, True).met
    lower = verdict(2.5, 5.0, False)
    assert lower.met and lower.ratio == 2.0 and "2.00× goal" in lower.text()
    assert not verdict(10.0, 5.0, False).met and "missed" in verdict(10.0, 5.0, False).text()
    zero = verdict(0, 0, False)
    assert zero.met and zero.text() == "met"
    assert not verdict(1, 0, False).met
    assert verdict(math.nan, 1, True).text() == "not measured"


def test_parse_and_diff_request_totals() -> None:
    before = parse_request_totals(METRICS)
    assert before[("POST", "batch/jobs", "", "2xx")] == 10
    assert before[("POST", "batch/jobs", "", "4xx")] == 2
    assert before[("PATCH", "lorajob.dev/lorajobs", "status", "2xx")] == 30
    assert before[("POST", "events", "", "2xx")] == 4
    after = before.copy()
    after[("POST", "batch/jobs", "", "2xx")] += 5
    after[("PATCH", "pods", "status", "2xx")] += 3
    assert diff_request_totals(before, after) == Counter({("POST", "batch/jobs", "", "2xx"): 5,
                                                          ("PATCH", "pods", "status", "2xx"): 3})


def test_summarize_requests_splits_operator_share() -> None:
    delta = Counter({("POST", "batch/jobs", "", "2xx"): 10,
                     ("PATCH", "lorajob.dev/lorajobs", "status", "2xx"): 40,
                     ("POST", "lorajob.dev/lorajobs", "", "2xx"): 10,   # the bench's creates
                     ("PUT", "batch/jobs", "status", "2xx"): 20,        # the Job controller
                     ("GET", "lorajob.dev/lorajobs", "", "2xx"): 5,     # a read, not a write
                     ("POST", "events", "", "2xx"): 30})
    s = summarize_requests(delta, 10, Counter({("POST", "lorajob.dev/lorajobs", "", "2xx"): 10}))
    assert s["total"] == 105 and s["total_per_job"] == 10.5
    assert s["operator"] == 55 and s["operator_per_job"] == 5.5
    assert s["operator_writes"] == 50
    assert s["events_per_job"] == 3.0
    assert s["table"][0] == ("PATCH lorajob.dev/lorajobs/status", 40, 4.0)


def _run(n: int, restart: bool, rate: float, p99: float, rss: float) -> dict[str, object]:
    return {"n": n, "restart": restart, "run_seconds": 2.0, "apply_rate": 100.0,
            "jobs_per_second": rate, "to_job_p50": p99 / 2, "to_job_p99": p99,
            "to_succeeded_p50": 1.0, "to_succeeded_p99": 2.0, "operator_cpu_seconds": 1.0,
            "operator_cpu_ms_per_job": 10.0, "operator_peak_rss_mb": rss, "lost": 0,
            "duplicated": 0, "not_succeeded": 0,
            "requests": {"operator_per_job": 5.0, "total_per_job": 20.0, "table": []}}


def test_goal_rows_use_the_largest_normal_burst() -> None:
    data = {"burst": {"runs": [_run(100, False, 80.0, 1.0, 150.0), _run(1000, False, 40.0, 6.0, 190.0),
                               _run(1000, True, 30.0, 9.0, 210.0)]},
            "steady": {"after_burst": {"cpu_percent": 0.5}, "fresh": {"cpu_percent": 0.7}},
            "data": {"download": {"speedup": 2.4}}}
    rows = {r[0]: r for r in report.goal_rows(data)}
    rate = next(r for k, r in rows.items() if "apply → Job created" in k and "p99" not in k)
    assert "N = 1,000" in rate[0] and rate[1] == "40.0 jobs/s" and not rate[4]
    p99 = next(r for k, r in rows.items() if "p99" in k)
    assert not p99[4]
    rss = next(r for k, r in rows.items() if "RSS" in k)
    assert rss[1] == "210.0 MB" and not rss[4]  # the worst run counts
    assert all(r[4] for k, r in rows.items() if "lost" in k or "Duplicated" in k or "Idle" in k)
    assert next(r for k, r in rows.items() if "download" in k)[4]


def test_data_block_round_trips_through_the_page() -> None:
    data = {"burst": {"runs": [_run(20, False, 10.0, 1.0, 100.0)]},
            "meta": {"machine": {"nproc": 2}, "command": "python -m bench --quick", "loads": [0.5]},
            "weird": "a -- b"}
    page = report.render(data)
    back = report.extract_data(page)
    assert back["burst"] == data["burst"]
    assert back["weird"] == "a -- b"
    assert "a --" not in page.split("<!-- bench-data", 1)[1]  # an HTML comment may not hold "--"
    assert report.extract_data("no block here") == {}


def test_before_after_table_pairs_runs_and_states_the_ratios() -> None:
    after = {**_run(1000, False, 40.0, 4.0, 150.0), "operator_writes_per_job": 5.0,
             "operator_events_per_job": 3.0, "operator_gc_seconds": 2.5}
    before = {**_run(1000, False, 20.0, 8.0, 300.0), "operator_writes_per_job": 17.0}
    data = {"burst": {"runs": [after], "machine": {}, "command": "python -m bench",
                      "baseline": {"label": "commit `abc1234`", "runs": [before]}}}
    text = report.burst_section(data)
    assert "commit `abc1234` (before)" in text
    assert "| 1,000 | no | before | 20.0 | 8.00 s | 300 MB | 10 | 17.0 | n/a | n/a |" in text
    assert "| 1,000 | no | after | 40.0 | 4.00 s | 150 MB | 10 | 5.0 | 3.0 | 2.5 |" in text
    assert "throughput 2.00×, p99 → Job 0.50×, peak RSS 0.50×" in text
    assert "writes / job 17.0 → 5.0" in text
    rows = {r[0]: r for r in report.goal_rows(data)}
    writes = rows["Operator API writes per LoRAJob, N = 1,000 (Events included)"]
    assert writes[1] == "5.00 writes" and not writes[4]  # 5 > 4: missed


def test_the_scale_row_has_its_own_goals_and_leaves_n_1000_alone() -> None:
    data = {"burst": {"runs": [_run(1000, False, 40.0, 6.0, 190.0), _run(1000, True, 30.0, 9.0, 195.0),
                               _run(10_000, False, 34.0, 60.0, 280.0)]}}
    rows = {r[0]: r for r in report.goal_rows(data)}
    rate = rows["Operator burst: apply → Job created, N = 1,000"]
    assert rate[1] == "40.0 jobs/s"  # the 10,000 row does not replace the N = 1,000 goal
    assert rows["Operator peak RSS (any burst up to N = 1,000)"][1] == "195.0 MB"
    huge_rss = rows["Operator peak RSS, N = 10,000"]
    assert huge_rss[1] == "280.0 MB" and huge_rss[4]
    ratio = rows["Throughput at N = 10,000 relative to N = 1,000"]
    assert ratio[1] == "0.85 ×" and ratio[4]  # 34 / 40 is within 20 %
    slow = {"burst": {"runs": [_run(1000, False, 40.0, 6.0, 190.0), _run(10_000, False, 30.0, 60.0, 350.0)]}}
    rows = {r[0]: r for r in report.goal_rows(slow)}
    assert not rows["Throughput at N = 10,000 relative to N = 1,000"][4]
    assert not rows["Operator peak RSS, N = 10,000"][4]


def test_a_burst_stopped_at_jobs_says_so_instead_of_a_not_succeeded_count() -> None:
    huge = {**_run(10_000, False, 30.0, 60.0, 350.0), "until_succeeded": False,
            "phases": {"Succeeded": 685, "Running": 9315}}
    data = {"burst": {"sizes": [1000, 10_000],
                      "runs": [_run(1000, False, 40.0, 6.0, 190.0), huge]}}
    page = report.burst_section(data)
    assert "not waited for (685 Succeeded when the last Job appeared)" in page
    assert "stopped once every Job existed" in page
    assert report.figures(data)["burst_lost"] == 0  # not counted as lost
    waited = {"burst": {"runs": [_run(1000, False, 40.0, 6.0, 190.0)]}}
    assert "stopped once" not in report.burst_section(waited)

"""Shared helpers of the benchmarks: the machine, statistics, the local cluster, apiserver metrics.

The pure helpers (`percentile`, `median`, `verdict`, `parse_request_totals`,
`diff_request_totals`, `summarize_requests`) have unit tests in
tests/unit/test_bench_report.py; the rest talks to the machine or the cluster.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import math
import os
import platform
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    rank = (len(xs) - 1) * min(max(p, 0.0), 100.0) / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (rank - lo))


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


@dataclass(frozen=True)
class Verdict:
    """A figure against its goal: ratio (>1 means better than the goal) and met or not."""

    value: float
    goal: float
    higher_is_better: bool

    @property
    def met(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    @property
    def ratio(self) -> float:
        """How many times better than the goal (≥ 1 met); for 'at most 0' goals, inf or 0."""
        if math.isnan(self.value):
            return math.nan
        if self.higher_is_better:
            return self.value / self.goal if self.goal else math.inf
        if self.value == 0:
            return math.inf
        return self.goal / self.value

    def text(self) -> str:
        mark = "met" if self.met else "**missed**"
        r = self.ratio
        if math.isnan(r):
            return "not measured"
        if math.isinf(r):
            return f"{mark}"
        return f"{mark} ({r:.2f}× goal)"


def verdict(value: float, goal: float, higher_is_better: bool) -> Verdict:
    return Verdict(float(value), float(goal), higher_is_better)


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


# --------------------------------------------------------------------------- apiserver metrics

_SAMPLE = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
RequestKey = tuple[str, str, str, str]  # verb, group/resource, subresource, code class


def parse_request_totals(text: str) -> Counter[RequestKey]:
    """apiserver_request_total from a /metrics page, summed per (verb, group/resource,
    subresource, code class like '2xx')."""
    out: Counter[RequestKey] = Counter()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group("labels")))
        group = labels.get("group", "")
        resource = f"{group}/{labels.get('resource', '')}" if group else labels.get("resource", "")
        code = labels.get("code", "")
        key = (labels.get("verb", ""), resource, labels.get("subresource", ""),
               f"{code[:1]}xx" if code else "")
        out[key] += int(float(m.group("value")))
    return out


def diff_request_totals(before: Counter[RequestKey], after: Counter[RequestKey]) -> Counter[RequestKey]:
    """after - before, keeping only keys that grew."""
    return Counter({k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0})


# What the operator does on the API (watch LoRAJobs/Jobs/Pods, create children, patch status,
# post Events). Requests on these keys come from the operator alone (the bench's own
# create/list/watch of LoRAJobs is subtracted by the caller); Events are shared with the
# controller manager and the scheduler, so they are shown apart.
OPERATOR_RESOURCES = {
    "lorajob.dev/lorajobs", "serviceaccounts", "rbac.authorization.k8s.io/roles",
    "rbac.authorization.k8s.io/rolebindings", "configmaps",
}
OPERATOR_JOB_VERBS = {"POST", "GET", "PATCH"}  # the job controller only updates status
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE"}


def summarize_requests(delta: Counter[RequestKey], jobs: int,
                       bench_requests: Counter[RequestKey] | None = None) -> dict[str, Any]:
    """Requests per job: the whole cluster, the operator's share, and a verb/resource table."""
    delta = Counter(delta)
    for k, v in (bench_requests or Counter()).items():
        delta[k] = max(0, delta[k] - v)
    per: dict[str, float] = {}
    operator_total = operator_writes = 0
    for (verb, resource, sub, _code), n in delta.items():
        if not n:
            continue
        label = f"{verb} {resource}" + (f"/{sub}" if sub else "")
        per[label] = per.get(label, 0) + n
        if resource in OPERATOR_RESOURCES or (resource == "batch/jobs" and not sub
                                              and verb in OPERATOR_JOB_VERBS):
            operator_total += n
            if verb in WRITE_VERBS:
                operator_writes += n
    events = sum(n for (verb, res, _s, _c), n in delta.items()
                 if verb == "POST" and res in ("events", "events.k8s.io/events"))
    total = sum(delta.values())
    jobs = max(jobs, 1)
    top = sorted(per.items(), key=lambda kv: -kv[1])
    return {"total": total, "total_per_job": total / jobs,
            "operator": operator_total, "operator_per_job": operator_total / jobs,
            "operator_writes": operator_writes,
            "events_per_job": events / jobs,
            "table": [(label, n, n / jobs) for label, n in top[:25]]}


# --------------------------------------------------------------------------- the machine


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = math.nan
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"nproc": os.cpu_count() or 0, "cpu": cpu, "mem_gib": round(mem_gib, 1),
            "gpu": gpu_name(), "python": platform.python_version(), "commit": commit,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load": list(os.getloadavg())}


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "none"


def load_note(loads: Iterable[float], nproc: int) -> str:
    load1 = max(loads, default=0.0)
    if load1 < nproc:
        return ""
    return (f"the machine was shared (1-min load up to {load1:.1f} on {nproc} cores when a "
            "part started, from other engineers' test runs): figures are pessimistic")


# --------------------------------------------------------------------------- the local cluster


def localcluster() -> ModuleType:
    """hack/cluster/localcluster.py as a module (it is not a package)."""
    name = "lora_bench_localcluster"
    if name in sys.modules:
        return sys.modules[name]
    path = REPO / "hack" / "cluster" / "localcluster.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextmanager
def cluster() -> Iterator[Any]:
    """The local cluster's ClusterInfo; starts it when it is down and stops it afterwards
    (leaving the machine as it was found)."""
    lc = localcluster()
    ci = lc.up(crds="record")
    try:
        yield ci
    finally:
        if ci.started_here:
            lc.stop()


def log(msg: str) -> None:
    print(f"[bench {dt.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

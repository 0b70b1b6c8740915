"""BENCHMARKS.md: every figure in one place, with the machine, the date, the command, and the
ratio to its goal or baseline.

The figures themselves are kept as JSON at the end of BENCHMARKS.md (an HTML comment), so a
partial run (`python -m bench --only data`) replaces its own sections and keeps the others.
The pure parts (`extract_data`, `embed_data`, `goal_rows`) are unit-tested.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from bench.common import REPO, fmt, load_note, verdict

BENCHMARKS = REPO / "BENCHMARKS.md"
BURST_PNG = REPO / "bench" / "operator_burst.png"
TRAINER_MD = REPO / "bench" / "TRAINER.md"
VRAM_MD = REPO / "bench" / "VRAM_ACCURACY.md"
TRAINER_GPU_MD = REPO / "bench" / "TRAINER_GPU.md"
GPU_COMMAND = "python -m bench --only gpu"
_DATA = re.compile(r"<!-- bench-data\n(.*?)\n-->", re.S)

GOALS = {
    "burst_rate": ("Operator burst: apply → Job created, N = 1,000", 50.0, True, "jobs/s"),
    "burst_p99": ("Operator burst: p99 apply → Job created, N = 1,000", 5.0, False, "s"),
    "burst_rss": ("Operator peak RSS (any burst up to N = 1,000)", 200.0, False, "MB"),
    "huge_rss": ("Operator peak RSS, N = 10,000", 300.0, False, "MB"),
    "huge_rate": ("Throughput at N = 10,000 relative to N = 1,000", 0.8, True, "×"),
    "burst_lost": ("LoRAJobs lost or not Succeeded (all bursts, restart included)", 0.0, False, "jobs"),
    "burst_dup": ("Duplicated Jobs (all bursts, restart included)", 0.0, False, "jobs"),
    "burst_writes": ("Operator API writes per LoRAJob, N = 1,000 (Events included)", 4.0, False,
                     "writes"),
    "steady_cpu": ("Idle operator, 1,000 finished LoRAJobs", 2.0, False, "% of a core"),
    "download": ("Model download vs boto3 per file", 2.0, True, "× faster"),
}


# --------------------------------------------------------------------------- data in the file


def extract_data(text: str) -> dict[str, Any]:
    m = _DATA.search(text)
    if not m:
        return {}
    try:
        out: dict[str, Any] = json.loads(m.group(1))
        return out
    except ValueError:
        return {}


def embed_data(data: dict[str, Any]) -> str:
    return "<!-- bench-data\n" + json.dumps(data, sort_keys=True, default=str).replace("--", "-\\u002d") + "\n-->\n"


def previous() -> dict[str, Any]:
    try:
        return extract_data(BENCHMARKS.read_text())
    except OSError:
        return {}


# --------------------------------------------------------------------------- goals


def _runs(data: dict[str, Any]) -> list[dict[str, Any]]:
    return list((data.get("burst") or {}).get("runs") or [])


HUGE = 10_000  # the scale row: its own goals, kept out of the N = 1,000 ones


def _at(data: dict[str, Any], n: int | None = None, restart: bool = False) -> dict[str, Any] | None:
    """The run at size `n`; without `n`, the largest below the scale row (N = 1,000 in a
    full run, the only size in a --quick one)."""
    runs = [r for r in _runs(data) if bool(r.get("restart")) == restart]
    if n is None:
        runs = [r for r in runs if r["n"] < HUGE]
        return max(runs, key=lambda r: r["n"]) if runs else None
    return next((r for r in runs if r["n"] == n), None)


def _not_succeeded(run: dict[str, Any]) -> str:
    """The not-Succeeded cell; a run that stopped once every Job existed says so instead."""
    if run.get("until_succeeded", True):
        return str(run.get("not_succeeded", 0))
    done = (run.get("phases") or {}).get("Succeeded", 0)
    return f"not waited for ({done:,} Succeeded when the last Job appeared)"


def figures(data: dict[str, Any]) -> dict[str, float]:
    """The value of each goal's figure (NaN when not measured)."""
    out = {k: math.nan for k in GOALS}
    big = _at(data)
    if big:
        out["burst_rate"] = big["jobs_per_second"]
        out["burst_p99"] = big["to_job_p99"]
        out["burst_writes"] = big.get("operator_writes_per_job", math.nan)
    huge = _at(data, HUGE)
    if huge:
        out["huge_rss"] = huge["operator_peak_rss_mb"]
        if big:
            out["huge_rate"] = huge["jobs_per_second"] / big["jobs_per_second"]
    runs = _runs(data)
    if runs:
        out["burst_rss"] = max((r["operator_peak_rss_mb"] for r in runs if r["n"] < HUGE),
                               default=math.nan)
        out["burst_lost"] = sum(r["lost"] + r.get("not_succeeded", 0) for r in runs)
        out["burst_dup"] = sum(r["duplicated"] for r in runs)
    steady = data.get("steady")
    if steady:
        out["steady_cpu"] = max(steady["after_burst"]["cpu_percent"], steady["fresh"]["cpu_percent"])
    dm = data.get("data")
    if dm:
        out["download"] = dm["download"]["speedup"]
    return out


def goal_rows(data: dict[str, Any]) -> list[tuple[str, str, str, str, bool]]:
    """(what, measured, goal, verdict text, met) per goal."""
    rows = []
    values = figures(data)
    for key, (what, goal, higher, unit) in GOALS.items():
        v = verdict(values[key], goal, higher)
        digits = 0 if unit == "jobs" else 2
        if key in ("burst_rss", "burst_rate", "huge_rss"):
            digits = 1
        goal_txt = f"{'≥' if higher else ('=' if goal == 0 else '≤')} {fmt(goal, 0 if goal == int(goal) else 1)} {unit}"
        n = ""
        if key in ("burst_rate", "burst_p99", "burst_writes") and _at(data):
            n = f" (N = {_at(data)['n']:,})"  # type: ignore[index]
        rows.append((what.replace("N = 1,000", n.strip(" ()") or "N = 1,000"),
                     f"{fmt(values[key], digits)} {unit}", goal_txt, v.text(), v.met))
    return rows


# --------------------------------------------------------------------------- the plot


def plot_burst(data: dict[str, Any], path: Path = BURST_PNG) -> bool:
    runs = _runs(data)
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for restart, style in ((False, "o-"), (True, "s--")):
        rs = sorted((r for r in runs if bool(r["restart"]) == restart), key=lambda r: r["n"])
        if not rs:
            continue
        ns = [r["n"] for r in rs]
        tag = " (restart mid-burst)" if restart else ""
        ax1.plot(ns, [r["to_job_p50"] for r in rs], style, label=f"p50 → Job{tag}")
        ax1.plot(ns, [r["to_job_p99"] for r in rs], style, label=f"p99 → Job{tag}")
        ax1.plot(ns, [r["to_succeeded_p99"] for r in rs], style, alpha=0.5,
                 label=f"p99 → Succeeded − run{tag}")
        ax2.plot(ns, [r["jobs_per_second"] for r in rs], style, label=f"apply → Job{tag}")
    ax1.axhline(5.0, color="red", lw=0.8, ls=":", label="goal p99 ≤ 5 s")
    ax2.axhline(50.0, color="red", lw=0.8, ls=":", label="goal ≥ 50 jobs/s")
    for ax, title, unit in ((ax1, "Latency vs N", "seconds"), (ax2, "Throughput vs N", "jobs/s")):
        ax.set_xscale("log")
        ax.set_xlabel("LoRAJobs applied at once (N)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- sections


def _meta_line(section: dict[str, Any]) -> str:
    m = section.get("machine") or {}
    if not m:
        return ""
    seen = m.get("load_seen") or m.get("load") or []
    note = load_note(seen[:1], int(m.get("nproc") or 0))  # at the start: others' load
    return (f"_Measured {m.get('date')} at commit `{m.get('commit')}`, command "
            f"`{section.get('command', 'python -m bench')}`; 1-min load at start/end "
            f"{', '.join(fmt(x, 1) for x in (m.get('load_seen') or m.get('load') or [])[:3])}"
            f"{'; ' + note if note else ''}._\n")


def _reqs(req: dict[str, Any]) -> str:
    if req.get("reset") or req.get("total_per_job", 0) < 1:
        return "n/a ²"
    return f"{fmt(req['operator_per_job'], 1)} / {fmt(req['total_per_job'], 1)}"


def burst_section(data: dict[str, Any]) -> str:
    b = data.get("burst")
    if not b:
        return "## Operator burst\n\nNot measured yet (`python -m bench --only burst`).\n"
    runs = sorted(_runs(data), key=lambda r: (r["n"], bool(r["restart"])))
    lines = ["## Operator burst", "", _meta_line(b),
             "N LoRAJobs created at once (16 client threads, raw JSON POSTs) in a fresh namespace; "
             "one operator subprocess (`lora-operator run --standalone`, default settings: "
             "20 workers); kwok GPU nodes finish each pod after "
             f"{fmt(runs[0]['run_seconds'], 0)} s with a TrainerResult termination message. "
             "Times are on the client's clock (watch events), from the moment the create call "
             "returned. \"→ Succeeded\" has the simulated run time taken off; it includes the "
             "control plane's own work (Job controller → pod → scheduler → kwok → Job status). "
             "\"Restart\" SIGKILLs the operator once half of the Jobs exist and starts a new one "
             "at once.", "",
             "| N | restart | apply (client) | jobs/s apply → Job | p50 → Job | p99 → Job | "
             "p50 → Succeeded − run | p99 → Succeeded − run | API requests / job (operator / all) "
             "| operator CPU | CPU ms / job | peak RSS | lost | duplicated | not Succeeded |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        req = r["requests"]
        lines.append(
            f"| {r['n']:,} | {'yes' if r['restart'] else 'no'} | {fmt(r['apply_rate'], 0)}/s "
            f"| {fmt(r['jobs_per_second'], 1)} | {fmt(r['to_job_p50'])} s | {fmt(r['to_job_p99'])} s "
            f"| {fmt(r['to_succeeded_p50'])} s | {fmt(r['to_succeeded_p99'])} s "
            f"| {_reqs(req)} "
            f"| {fmt(r['operator_cpu_seconds'], 1)} s | {fmt(r['operator_cpu_ms_per_job'], 0)} "
            f"| {fmt(r['operator_peak_rss_mb'], 0)} MB | {r['lost']} | {r['duplicated']} "
            f"| {_not_succeeded(r)} |")
    if any(_reqs(r["requests"]) == "n/a ²" for r in runs):
        lines += ["", "² The API server restarted during this run (another suite restarts the "
                  "shared cluster's kube-apiserver), which resets its request counters."]
    lines.append("")
    normal = {r["n"]: r for r in runs if not r["restart"]}
    if len(normal) >= 2:
        lo, hi = min(normal), max(normal)
        a, z = normal[lo], normal[hi]
        lines += [f"**Growth {lo:,} → {hi:,} jobs ({hi / lo:.0f}×)**: throughput "
                  f"{fmt(a['jobs_per_second'], 1)} → {fmt(z['jobs_per_second'], 1)} jobs/s "
                  f"({z['jobs_per_second'] / a['jobs_per_second']:.2f}×); p99 → Job "
                  f"{fmt(a['to_job_p99'])} → {fmt(z['to_job_p99'])} s "
                  f"({z['to_job_p99'] / max(a['to_job_p99'], 1e-9):.1f}×); peak RSS "
                  f"{fmt(a['operator_peak_rss_mb'], 0)} → {fmt(z['operator_peak_rss_mb'], 0)} MB; "
                  f"CPU per job {fmt(a['operator_cpu_ms_per_job'], 0)} → "
                  f"{fmt(z['operator_cpu_ms_per_job'], 0)} ms; requests per job (operator) "
                  f"{fmt(a['requests']['operator_per_job'], 1)} → "
                  f"{fmt(z['requests']['operator_per_job'], 1)}"
                  + ("" if z.get("until_succeeded", True) else
                     f" (the N = {hi:,} burst stopped once every Job existed: its CPU and "
                     "requests per job cover the way to the Job, not to Succeeded)")
                  + ".", ""]
    lines += comparison_lines(b)
    rs = [r for r in runs if r["restart"] and isinstance(r.get("restart"), dict)]
    for r in rs:
        info = r["restart"]
        lines.append(f"Restart at N = {r['n']:,}: killed with {info.get('jobs_at_kill')} Jobs made; "
                     f"the new operator served /metrics after "
                     f"{fmt(info.get('new_operator_ready_seconds'), 1)} s; the first Job seen after "
                     f"that came {fmt(info.get('first_job_after_kill_seconds'), 1)} s after the "
                     "kill (it lists every LoRAJob, Job and pod before it acts).")
    if rs:
        lines.append("")
    if BURST_PNG.exists():
        lines += ["![latency and throughput vs N](bench/operator_burst.png)", ""]
    history = data.get("burst_history") or []
    if history:
        lines += ["Earlier runs of this benchmark (kept to show the spread on a shared machine):",
                  "", "| measured | load at start | N | restart | jobs/s | p99 → Job | peak RSS "
                  "| CPU ms / job | not Succeeded |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for old in history:
            m = old.get("machine") or {}
            for r in sorted(old.get("runs") or [], key=lambda r: (r["n"], bool(r["restart"]))):
                lines.append(
                    f"| {m.get('date')} | {fmt((m.get('load_seen') or [math.nan])[0], 1)} "
                    f"| {r['n']:,} | {'yes' if r['restart'] else 'no'} "
                    f"| {fmt(r['jobs_per_second'], 1)} | {fmt(r['to_job_p99'])} s "
                    f"| {fmt(r['operator_peak_rss_mb'], 0)} MB "
                    f"| {fmt(r['operator_cpu_ms_per_job'], 0)} | {_not_succeeded(r)} |")
        lines.append("")
    big = _at(data)
    if big:
        lines += [f"API requests at N = {big['n']:,}, per LoRAJob (whole cluster: the operator, "
                  "the Job controller, the scheduler, kwok; \"operator\" counts lorajobs, "
                  "serviceaccounts, roles, rolebindings, configmaps and batch/jobs POST/GET/PATCH; "
                  "Events are shared with the controller manager; the bench's own LoRAJob POSTs "
                  "are subtracted; other engineers' test runs on the same cluster add noise):", "",
                  "| request | count | per job |", "|---|---:|---:|"]
        for label, count, per in big["requests"]["table"][:16]:
            lines.append(f"| `{label}` | {count:,} | {fmt(per, 2)} |")
        lines.append("")
    return "\n".join(lines)


def comparison_lines(b: dict[str, Any]) -> list[str]:
    """Before / after in one run (`--compare TREE`): the same bursts, alternating the two
    operators on the same cluster and machine, so the ratio is not a cross-run guess."""
    base = b.get("baseline") or {}
    before = {(r["n"], bool(r["restart"])): r for r in base.get("runs") or []}
    if not before:
        return []
    lines = [f"**Before / after, one run**: the same bursts with the operator of "
             f"{base.get('label', 'the baseline tree')} (before) and of this commit (after), "
             "alternating on the same cluster. Writes / job: the operator's creates, patches "
             "and deletes (API server counters) plus the Events it posted (listed after the "
             "burst); GC s: `lora_operator_gc_seconds_total` of the last operator process "
             "(n/a where the baseline does not export it).", "",
             "| N | restart | side | jobs/s | p99 → Job | peak RSS | CPU ms / job | writes / job "
             "| Events / job | GC s | lost | duplicated | not Succeeded |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(b.get("runs") or [], key=lambda r: (r["n"], bool(r["restart"]))):
        old = before.get((r["n"], bool(r["restart"])))
        for side, x in (("before", old), ("after", r)):
            if x is None:
                continue
            lines.append(
                f"| {x['n']:,} | {'yes' if x['restart'] else 'no'} | {side} "
                f"| {fmt(x['jobs_per_second'], 1)} | {fmt(x['to_job_p99'])} s "
                f"| {fmt(x['operator_peak_rss_mb'], 0)} MB | {fmt(x['operator_cpu_ms_per_job'], 0)} "
                f"| {fmt(x.get('operator_writes_per_job', math.nan), 1)} "
                f"| {fmt(x.get('operator_events_per_job', math.nan), 1)} "
                f"| {fmt(x.get('operator_gc_seconds'), 1)} "
                f"| {x['lost']} | {x['duplicated']} | {_not_succeeded(x)} |")
    lines.append("")
    for (n, restart), old in sorted(before.items()):
        new = next((r for r in b.get("runs") or []
                    if r["n"] == n and bool(r["restart"]) == restart), None)
        if new is None or restart:
            continue
        lines.append(
            f"After / before at N = {n:,}: throughput "
            f"{new['jobs_per_second'] / max(old['jobs_per_second'], 1e-9):.2f}×, p99 → Job "
            f"{new['to_job_p99'] / max(old['to_job_p99'], 1e-9):.2f}×, peak RSS "
            f"{new['operator_peak_rss_mb'] / max(old['operator_peak_rss_mb'], 1e-9):.2f}×, CPU / job "
            f"{new['operator_cpu_ms_per_job'] / max(old['operator_cpu_ms_per_job'], 1e-9):.2f}×, "
            f"writes / job {fmt(old.get('operator_writes_per_job', math.nan), 1)} → "
            f"{fmt(new.get('operator_writes_per_job', math.nan), 1)}.")
    lines.append("")
    return lines


def steady_section(data: dict[str, Any]) -> str:
    s = data.get("steady")
    if not s:
        return "## Steady state\n\nNot measured yet (`python -m bench --only steady`).\n"
    a, f, r = s["after_burst"], s["fresh"], s["restart_listing"]
    v1 = verdict(a["cpu_percent"], 2.0, False)
    v2 = verdict(f["cpu_percent"], 2.0, False)
    return "\n".join([
        "## Steady state", "", _meta_line(s),
        f"{s['finished']:,} finished LoRAJobs (with their Jobs and Succeeded pods, from the "
        "burst) in one namespace; the operator watches LoRAJobs, Jobs and pods.", "",
        "| operator | idle window | CPU | API requests on the operator's resources ¹ | RSS "
        "| goal < 2 % |",
        "|---|---:|---:|---:|---:|---|",
        f"| the one that ran the burst | {fmt(a['seconds'], 0)} s | {fmt(a['cpu_percent'])} % of a core "
        f"| {a['operator_requests']} | {fmt(a['rss_mb'], 0)} MB | {v1.text()} |",
        f"| freshly restarted (after listing) | {fmt(f['seconds'], 0)} s | "
        f"{fmt(f['cpu_percent'])} % of a core | {f['operator_requests']} | {fmt(f['rss_mb'], 0)} MB "
        f"| {v2.text()} |", "",
        "¹ Cluster-wide (apiserver_request_total on lorajobs, jobs, serviceaccounts, roles, "
        "rolebindings, configmaps): other test suites on the shared cluster add to it. The "
        "operator's own share is bounded by its CPU: at these CPU figures it cannot have made "
        "more than a handful of requests (its three watches renew every 5 minutes).", "",
        f"Restarting costs {fmt(r['cpu_seconds'], 1)} CPU s (start, list {s['finished']:,} "
        f"LoRAJobs + Jobs + pods, reconcile each once) over {fmt(r['seconds'], 1)} s; finished "
        "jobs are not re-queued afterwards (no periodic resync, one TTL timer each).", ""])


def data_section(data: dict[str, Any]) -> str:
    d = data.get("data")
    if not d:
        return "## Data movement\n\nNot measured yet (`python -m bench --only data`).\n"
    so = d.get("storage_options") or {}
    dl, up = d["download"], d["upload"]
    mb = 1e6
    lines = [
        "## Data movement", "", _meta_line(d),
        f"Against the local SeaweedFS S3 gateway on loopback. Download: a model of "
        f"{d['model_files']} files, {d['model_bytes'] / 2**30:.2f} GiB (4 random shards + "
        f"config/tokenizer files); upload: an adapter of {d['adapter_files']} files, "
        f"{d['adapter_bytes'] / mb:.0f} MB. Ours = `lora_trainer.storage.download` / `upload` "
        f"({so.get('workers')} files in parallel, TransferConfig "
        f"{fmt((so.get('transfer') or {}).get('multipart_chunksize_mib'), 0)} MiB parts × "
        f"{(so.get('transfer') or {}).get('max_concurrency')} threads per file; upload also "
        "computes the sha256 of every file for the manifest). Baseline = boto3 `download_file` / "
        f"`upload_file` once per file, one after another, default TransferConfig (8 MiB parts, "
        f"10 threads). {d['reps']} repetitions, order alternating, median.", "",
        "| transfer | ours (median) | boto3 per file (median) | speedup | goal |",
        "|---|---:|---:|---:|---|",
        f"| download {d['model_bytes'] / 2**30:.2f} GiB | {fmt(dl['ours_median_s'], 1)} s "
        f"({fmt(d['model_bytes'] / mb / dl['ours_median_s'], 0)} MB/s) | {fmt(dl['boto3_median_s'], 1)} s "
        f"({fmt(d['model_bytes'] / mb / dl['boto3_median_s'], 0)} MB/s) | {dl['speedup']:.2f}× "
        f"| ≥ 2× : {verdict(dl['speedup'], 2.0, True).text()} |",
        f"| upload {d['adapter_bytes'] / mb:.0f} MB | {fmt(up['ours_median_s'], 2)} s | "
        f"{fmt(up['boto3_median_s'], 2)} s | {up['speedup']:.2f}× | (no goal; sha256 of the files "
        f"alone: {fmt(d.get('upload_hash_seconds'), 2)} s) |", ""]
    rows = []
    for what in ("download", "upload"):
        for side in ("ours", "boto3"):
            for i, r in enumerate(d[what][side]):
                rows.append(f"| {what} | {side} | {i + 1} | {fmt(r['seconds'], 2)} s | "
                            f"{fmt(r['mb_per_s'], 0)} MB/s | {fmt(r['client_cpu_s'], 1)} s | "
                            f"{fmt(r['server_cpu_s'], 1)} s |")
    lines += ["Every repetition (CPU seconds of this client process and of the SeaweedFS "
              "processes during the transfer):", "",
              "| transfer | side | rep | time | throughput | client CPU | S3 server CPU |",
              "|---|---|---:|---:|---:|---:|---:|", *rows, ""]
    if d.get("variants"):
        lines += ["Diagnosis: the storage layer's download with other fan-outs (TransferConfig "
                  "swapped for the run):", "",
                  "| files in parallel | threads per file | part size | time | throughput | "
                  "client CPU | S3 server CPU |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for v in d["variants"]:
            lines.append(f"| {v['workers']} | {v['per_file_concurrency']} | {v['chunk_mib']} MiB "
                         f"| {fmt(v['seconds'], 1)} s | {fmt(v['mb_per_s'], 0)} MB/s "
                         f"| {fmt(v['client_cpu_s'], 1)} s | {fmt(v['server_cpu_s'], 1)} s |")
        lines.append("")
    return "\n".join(lines)


def _demote(md: str) -> str:
    return re.sub(r"^(#+) ", lambda m: "##" + m.group(1) + " ", md, flags=re.M)


def trainer_section(data: dict[str, Any]) -> str:
    t = data.get("trainer") or {}
    lines = ["## Trainer", ""]
    if TRAINER_MD.exists():
        if t:
            lines.append(f"_`python -m bench.trainer_throughput` ran in {fmt(t.get('seconds'), 0)} s "
                         f"(exit {t.get('returncode')}) on {(t.get('machine') or {}).get('date')}; "
                         "its report, bench/TRAINER.md, follows._\n")
        lines.append(_demote(TRAINER_MD.read_text().strip()))
    else:
        why = t.get("note") or "bench/trainer_throughput.py has not produced bench/TRAINER.md yet"
        lines.append(f"Not measured yet: {why}.")
    lines += ["", gpu_rows_text(), "", "## VRAM estimate accuracy", ""]
    if VRAM_MD.exists():
        text = VRAM_MD.read_text().strip()
        if "Not measured yet" in text or "still to be" in text.lower():
            lines.append("**Still to be measured: no GPU** on this machine "
                         "(`python -m bench.vram_accuracy` on a CUDA machine writes "
                         "bench/VRAM_ACCURACY.md). Its current text:\n")
        lines.append(_demote(text))
    else:
        lines.append("Still to be measured: no GPU.")
    lines.append("")
    return "\n".join(lines)


def gpu_rows_text() -> str:
    """The GPU rows (bench/TRAINER_GPU.md from `python -m bench --only gpu`), or why not yet."""
    if TRAINER_GPU_MD.exists() and "dry run" not in TRAINER_GPU_MD.read_text():
        return _demote(TRAINER_GPU_MD.read_text().strip())
    return ("### Trainer on one GPU: not measured yet\n\n"
            "**No GPU was lent to the session that built these paths**, so the GPU rows (ours vs "
            "the TRL SFTTrainer + PEFT recipe on a Llama-3.2-1B-shaped model with its 128k "
            "vocabulary: tokens/s and peak CUDA memory; and the VRAM-accuracy table below) are "
            f"not measured. Goals: ≥ 1.8× the recipe's tokens/s at ≤ 50 % of its peak memory; "
            f"estimator within ±10 % of measured peaks. Command, on one H100/H200 (< 8 min): "
            f"`{GPU_COMMAND}` (it writes bench/TRAINER_GPU.md and bench/VRAM_ACCURACY.md; carry "
            "wheels for pydantic, PyYAML, trl, datasets, liger-kernel and bitsandbytes, which a "
            "bare torch + transformers + peft + accelerate machine lacks: without trl/datasets "
            "the recipe row is marked missing, without liger-kernel our row runs the chunked "
            "loss and says so, without bitsandbytes the QLoRA rows are skipped).")


# --------------------------------------------------------------------------- the page


def render(data: dict[str, Any], notes: dict[str, str] | None = None,
           proposals: str = "") -> str:
    m = (data.get("meta") or {}).get("machine") or {}
    rows = goal_rows(data)
    head = [
        "# Benchmarks", "",
        "Every figure of the project in one place. Regenerate with `make bench` "
        "(`python -m bench`; `--only burst,steady,data,trainer` for a part, `--quick` for a "
        "smoke run with small sizes). Written by `bench/report.py`; do not edit by hand.", "",
        f"**Machine**: {m.get('nproc')} cores ({m.get('cpu')}), {m.get('mem_gib')} GiB RAM, "
        f"GPU: {m.get('gpu')}; Python {m.get('python')}. **Last run**: {m.get('date')}, "
        f"`{(data.get('meta') or {}).get('command')}`, wall time "
        f"{fmt((data.get('meta') or {}).get('wall_seconds'), 0)} s, commit `{m.get('commit')}`.",
        "",
    ]
    full = data.get("meta_full") or {}
    if full and full is not data.get("meta") and full != data.get("meta"):
        head += [f"**Last full `make bench`** (every part): {((full.get('machine') or {}).get('date'))}, "
                 f"wall time {fmt(full.get('wall_seconds'), 0)} s "
                 f"({fmt((full.get('wall_seconds') or math.nan) / 60, 1)} min).", ""]
    starts = [((data.get(k) or {}).get("machine") or {}).get("load_seen", [0.0])[0]
              for k in ("burst", "steady", "data", "trainer") if data.get(k)]
    note = load_note(starts, int(m.get("nproc") or 0))
    head += ["**Load**: " + (f"{note}. " if note else "") + "The local cluster (etcd, "
             "kube-apiserver, controller manager, scheduler, kwok, SeaweedFS), the operator and "
             "the load generator all share these 2 cores, so a burst itself drives the load to "
             "4-5; the 1-min load at the start of each part (other engineers' test runs) is in "
             "its section.", ""]
    head += ["## Goals", "", "| figure | measured | goal | verdict |", "|---|---:|---:|---|"]
    head += [f"| {w} | {v} | {g} | {t} |" for w, v, g, t, _ in rows]
    head.append("")
    missed = [w for w, _v, _g, t, met in rows if not met and t != "not measured"]
    notes = notes or {}
    if missed:
        head += ["### Missed goals: why, and the next step", ""]
        for key, row in zip(GOALS, rows, strict=True):
            if row[4] or row[3] == "not measured":
                continue
            head.append(f"- **{row[0]}** ({row[1]}): {notes.get(key, 'see its section below.')}")
        head.append("")
    if notes.get("_findings"):
        head += ["### Found along the way", "", notes["_findings"].strip(), ""]
    errors = data.get("errors") or {}
    if errors:
        head += ["### Parts that failed in the last run", ""]
        head += [f"- `{k}`: {v}" for k, v in sorted(errors.items())]
        head.append("")
    body = [burst_section(data), steady_section(data), data_section(data), trainer_section(data)]
    if proposals:
        body.append(proposals.strip() + "\n")
    return "\n".join(head + body) + "\n" + embed_data(data)


def write(data: dict[str, Any], notes: dict[str, str] | None = None,
          proposals: str = "") -> Path:
    plot_burst(data)
    BENCHMARKS.write_text(render(data, notes, proposals))
    return BENCHMARKS

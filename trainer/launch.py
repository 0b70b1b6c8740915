"""Multi-GPU runs: torchrun as a child of a Python parent that exits with the ranks' verdict.

torchrun itself exits 1 whenever a rank fails, whatever the rank's exit code was, so a
container whose entry point *is* torchrun turns every failure into INTERNAL: the OOM
escalation (42) and the permanent codes (2-7) of the contract table would never reach the
Pod failure policy. Instead the pod's process stays a Python parent: it runs torchrun as a
child, every rank records its exit code and result in a private folder, and the parent
exits with rank 0's recorded code (and writes that result as the termination message).

When a rank other than 0 fails first, torchrun stops the others with SIGTERM, so rank 0
records PREEMPTED (143); the parent then takes the failing rank's own code instead (a
rank 1 that ran out of GPU memory makes the pod exit 42, not 143). With no record at all
(a rank killed by a signal before it could write) the launcher's own status is used.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from lora_operator.contract import ExitCode, TrainerResult

RESULT_DIR_ENV = "LORA_RANK_RESULT_DIR"


@dataclass(frozen=True)
class RankRecord:
    """One rank's recorded outcome."""

    rank: int
    code: int
    result: TrainerResult


def record(code: int, result: TrainerResult) -> None:
    """Under the parent's torchrun: write this rank's exit code and result (else nothing)."""
    folder = os.environ.get(RESULT_DIR_ENV)
    if not folder:
        return
    rank = int(os.environ.get("RANK", "0"))
    path = Path(folder) / f"rank-{rank}.json"
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps({"code": int(code),
                               "result": result.model_dump(mode="json", by_alias=True)}))
    tmp.replace(path)


def read_records(folder: Path) -> list[RankRecord]:
    """Every rank's record in the folder, by rank."""
    records = []
    for path in sorted(folder.glob("rank-*.json")):
        try:
            raw = json.loads(path.read_text())
            rank = int(path.stem.removeprefix("rank-"))
            records.append(RankRecord(rank, int(raw["code"]),
                                      TrainerResult.model_validate(raw["result"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(records, key=lambda r: r.rank)


def verdict(records: list[RankRecord], launcher_code: int) -> tuple[int, TrainerResult | None]:
    """The pod's exit code: rank 0's, unless rank 0 was only stopped (143) because another
    rank failed with a code of its own; the launcher's status when nobody recorded one."""
    first = next((r for r in records if r.rank == 0), None)
    own_failures = [r for r in records if r.code not in (ExitCode.OK, ExitCode.PREEMPTED)]
    if first is not None and not (first.code == ExitCode.PREEMPTED and own_failures):
        return first.code, first.result
    if own_failures:
        return own_failures[0].code, own_failures[0].result
    if records:
        return records[0].code, records[0].result
    return (launcher_code if launcher_code > 0 else int(ExitCode.INTERNAL)), None


def run_distributed(command: list[str]) -> tuple[int, TrainerResult | None]:
    """Run the torchrun `command` as a child, forwarding SIGTERM/SIGINT to it (the ranks
    checkpoint and stop), and return the verdict of its ranks."""
    with tempfile.TemporaryDirectory(prefix="lora-ranks-") as folder:
        child = subprocess.Popen(command, env={**os.environ, RESULT_DIR_ENV: folder})

        def forward(signum: int, frame: FrameType | None) -> None:
            child.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            launcher_code = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return verdict(read_records(Path(folder)), launcher_code)

"""The dataset preflight: what a job's data will do to training, known before any GPU.

`lora-trainer preflight` reads the train, validation and test splits exactly as training
reads and splits them (`job.read_splits`, `data.read_rows`), normalises and tokenizes every
row with the base model's own tokenizer and chat template (`data.to_sample`,
`data.tokenize_sample`), and reports per split: rows, rows the trainer would refuse (with
file:line and why), token length p50/p95/max, the share of rows longer than
`training.maxSeqLength`, duplicate rows, and exact overlap between the splits by a hash of
the normalised text. Only the tokenizer is fetched, never the weights (a GGUF model's
tokenizer lives inside its GGUF file, so that one file is the exception).

The verdict is Failed when training could not succeed or would measure nothing: a split
without valid rows, any refused row (the trainer stops at the first), every row of a split
truncated, more truncation than `dataset.preflight.maxTruncatedFraction`, or a held-out
split that overlaps another by more than `maxOverlapFraction`. In a pod the report is the
container's termination message (compact JSON, at most 4 KiB) and the exit code is DATA
(3) on a Failed verdict, so the operator needs nothing else to decide.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_operator import api
from lora_operator.contract import MODEL_CREDENTIALS_PREFIX, RESULT_MAX_BYTES, ExitCode
from lora_trainer import data, job, storage
from lora_trainer.errors import TrainerError
from lora_trainer.model import load_tokenizer, resolve_source

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
# What AutoTokenizer reads from a model folder: tokenizer and vocabulary files, the chat
# template, and config.json (it names the tokenizer class when tokenizer_config.json does not).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                   "merges.txt", "chat_template*", "config.json", "*.tiktoken", "spiece.model",
                   "sentencepiece*.model")
REFUSED_SHOWN = 5
REASON_CHARS = 200
MESSAGE_CHARS = 1024
_WHERE = re.compile(r"^(?P<file>[^:\s]+):(?P<line>\d+): (?P<reason>.*)$", re.S)
_SPACE = re.compile(r"\s+")


# --------------------------------------------------------------------------- scanning


@dataclass
class SplitScan:
    """One split, row by row: what the report's figures are computed from."""

    rows: int = 0
    refused: list[api.RefusedRow] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens per valid row, before truncation
    truncated: int = 0
    hashes: list[str] = field(default_factory=list)  # normalised text hash per valid row

    @property
    def valid(self) -> int:
        return len(self.lengths)

    @property
    def duplicates(self) -> int:
        return len(self.hashes) - len(set(self.hashes))


def normalised_hash(sample: data.Sample) -> str:
    """A hash of the row's text that ignores case, Unicode form and whitespace runs, so
    "Hello  World" and "hello world" count as the same row."""
    parts = [f"{role}\x1f{text}" for role, text in sample.messages] if sample.is_chat \
        else [f"prompt\x1f{sample.prompt}", f"completion\x1f{sample.completion}"]
    text = "\x1e".join(_SPACE.sub(" ", unicodedata.normalize("NFKC", p)).strip().casefold()
                       for p in parts)
    return hashlib.sha256(text.encode()).hexdigest()


def refused_row(message: str, row: data.Row | None = None) -> api.RefusedRow:
    """A refusal from a `file:line: reason` error message (or the row it was raised for)."""
    found = _WHERE.match(message)
    if found:
        return api.RefusedRow(file=found["file"], line=int(found["line"]),
                              reason=found["reason"][:REASON_CHARS])
    return api.RefusedRow(file=row.file if row else "", line=row.line if row else 0,
                          reason=message[:REASON_CHARS])


def scan_split(tokenizer: Any, rows: Sequence[data.Row], fmt: api.DatasetFormat | str,
               max_len: int, completion_only: bool) -> SplitScan:
    """Normalise, tokenize and measure every row the way training would (`data`)."""
    scan = SplitScan(rows=len(rows))
    for row in rows:
        try:
            sample = data.to_sample(row, fmt)
            example = data.tokenize_sample(tokenizer, sample, completion_only)
        except TrainerError as exc:
            if exc.code != ExitCode.DATA:
                raise
            scan.refused.append(refused_row(exc.message, row))
            continue
        _, was_cut = data.truncate(example, max_len)
        if not was_cut and all(label == data.IGNORE_INDEX for label in example.labels):
            scan.refused.append(refused_row("row has no tokens to learn from", row))
            continue
        scan.truncated += int(was_cut)
        scan.lengths.append(len(example))
        scan.hashes.append(normalised_hash(sample))
    return scan


# --------------------------------------------------------------------------- the report


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (a value that occurs in the data)."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return int(sorted_values[rank - 1])


def split_report(scan: SplitScan) -> api.SplitReport:
    lengths = sorted(scan.lengths)
    tokens = api.TokenLength(p50=percentile(lengths, 0.5), p95=percentile(lengths, 0.95),
                             max=lengths[-1]) if lengths else None
    pct = round(100.0 * scan.truncated / scan.valid, 2) if scan.valid else None
    return api.SplitReport(rows=scan.rows, refused=len(scan.refused), token_length=tokens,
                           truncated_percent=pct, duplicates=scan.duplicates)


def overlap(scans: dict[str, SplitScan]) -> api.DatasetOverlap:
    """Rows of the later split whose normalised text is in the earlier one."""
    def shared(seen: str, held_out: str) -> tuple[int, float]:
        if seen not in scans or held_out not in scans or not scans[held_out].hashes:
            return 0, 0.0
        known = set(scans[seen].hashes)
        count = sum(1 for h in scans[held_out].hashes if h in known)
        return count, count / len(scans[held_out].hashes)

    tv, tt, vt = shared("train", "validation"), shared("train", "test"), shared("validation", "test")
    return api.DatasetOverlap(train_validation=tv[0], train_test=tt[0], validation_test=vt[0],
                              max_fraction=round(max(tv[1], tt[1], vt[1]), 4))


def problems(scans: dict[str, SplitScan], over: api.DatasetOverlap, max_len: int,
             limits: api.PreflightSpec) -> list[str]:
    """Why training would fail or measure nothing (empty when it can go ahead)."""
    out = []
    refused = [r for scan in scans.values() for r in scan.refused]
    if refused:
        first = refused[0]
        out.append(f"{len(refused)} row(s) refused, the trainer stops at the first: "
                   f"{first.file}:{first.line}: {first.reason}")
    for name, scan in scans.items():
        if not scan.valid:
            out.append(f"{name} split has no valid rows")
        elif scan.truncated == scan.valid:
            out.append(f"every {name} row is longer than training.maxSeqLength {max_len} "
                       f"(shortest {min(scan.lengths)} tokens); raise maxSeqLength")
    train = scans.get("train")
    if train and train.valid and train.truncated < train.valid and \
            train.truncated / train.valid > limits.max_truncated_fraction:
        out.append(f"{train.truncated / train.valid:.1%} of train rows are longer than "
                   f"training.maxSeqLength {max_len} (dataset.preflight.maxTruncatedFraction "
                   f"{limits.max_truncated_fraction:g})")
    if over.max_fraction > limits.max_overlap_fraction:
        out.append(f"held-out rows also in another split: {over.max_fraction:.1%} "
                   f"(train∩validation {over.train_validation}, train∩test {over.train_test}, "
                   f"validation∩test {over.validation_test}; dataset.preflight."
                   f"maxOverlapFraction {limits.max_overlap_fraction:g})")
    return out


def summary(scans: dict[str, SplitScan], fmt: str, max_len: int) -> str:
    rows = ", ".join(f"{name} {scan.rows}" for name, scan in scans.items())
    train = scans.get("train")
    p95 = percentile(sorted(train.lengths), 0.95) if train and train.lengths else 0
    return f"{fmt} rows: {rows}; train p95 {p95} of {max_len} tokens"


def build_report(scans: dict[str, SplitScan], fmt: str, max_len: int,
                 limits: api.PreflightSpec) -> api.DatasetReport:
    """The verdict and figures from the scanned splits (pure: unit-tested with fake scans)."""
    over = overlap(scans)
    found = problems(scans, over, max_len, limits)
    splits = api.DatasetSplits(**{name: split_report(scan) for name, scan in scans.items()})
    refused = [r for scan in scans.values() for r in scan.refused][:REFUSED_SHOWN]
    verdict: dict[str, Any] = (
        {"verdict": "Failed", "reason": ExitCode.DATA.reason, "message": "; ".join(found)}
        if found else {"verdict": "Passed", "reason": "DatasetValidated",
                       "message": summary(scans, fmt, max_len)})
    return api.DatasetReport(format=fmt, max_seq_length=max_len, splits=splits, overlap=over,
                             refused=refused, **verdict)


def failed_report(code: ExitCode, message: str, refused: Iterable[api.RefusedRow] = ()
                  ) -> api.DatasetReport:
    return api.DatasetReport(verdict="Failed", reason=code.reason, message=message,
                             refused=list(refused))


# --------------------------------------------------------------------------- running


def tokenizer_files(gguf_file: str | None) -> tuple[str, ...]:
    """What to fetch of a model folder: the GGUF file (its tokenizer is inside), or the
    tokenizer files; never safetensors or .bin weights."""
    return (gguf_file,) if gguf_file else TOKENIZER_FILES


def fetch_tokenizer(spec: api.LoRAJobSpec, workdir: Path, model_uri: str | None = None) -> Any:
    """The base model's tokenizer, downloading only its tokenizer files."""
    model = spec.base_model
    opts = job.storage_options(spec, model.endpoint,
                               MODEL_CREDENTIALS_PREFIX if model.credentials_secret else "")
    uri = model_uri or model.uri
    local = storage.download(uri, workdir / "model", opts, missing=ExitCode.MODEL,
                             revision=model.revision, include=tokenizer_files(model.gguf_file))
    if not storage.is_local(uri):
        fetched = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()) \
            if local.is_dir() else [local.name]
        log.info("tokenizer files fetched from %s: %s", uri, ", ".join(fetched))
    return load_tokenizer(resolve_source(local, model.gguf_file, model.trust_remote_code))


def run_preflight(spec: api.LoRAJobSpec, workdir: Path,
                  model_uri: str | None = None) -> api.DatasetReport:
    """Read and measure the dataset; a dataset that cannot even be read is a Failed report
    naming the file and line, anything else (model, storage, auth) raises its TrainerError."""
    try:
        fmt, rows_of = job.read_splits(spec, workdir)
    except TrainerError as exc:
        if exc.code != ExitCode.DATA:
            raise
        where = _WHERE.match(exc.message)
        return failed_report(ExitCode.DATA, exc.message, [refused_row(exc.message)] if where else [])
    tokenizer = fetch_tokenizer(spec, workdir, model_uri)
    t = spec.training
    scans = {name: scan_split(tokenizer, rows, fmt, t.max_seq_length, t.completion_only_loss)
             for name, rows in rows_of.items() if name != "test" or spec.dataset.test}
    return build_report(scans, str(api.DatasetFormat(fmt).value), t.max_seq_length,
                        spec.dataset.preflight)


def exit_code(report: api.DatasetReport) -> ExitCode:
    """0 for Passed; the reason's exit code for Failed (DATA for a bad dataset)."""
    if report.verdict == "Passed":
        return ExitCode.OK
    return next((c for c in ExitCode if c.reason == report.reason), ExitCode.DATA)


def encode(report: api.DatasetReport, limit: int = RESULT_MAX_BYTES) -> str:
    """Compact JSON within the termination message's 4 KiB: the message is cut to 1 KiB,
    then refused rows are dropped from the end, then the message is shortened further."""
    def dump(r: api.DatasetReport) -> str:
        return r.model_dump_json(by_alias=True, exclude_none=True)

    report = report.model_copy(update={"message": report.message[:MESSAGE_CHARS],
                                       "refused": report.refused[:REFUSED_SHOWN]})
    text = dump(report)
    while len(text.encode()) > limit and report.refused:
        report = report.model_copy(update={"refused": report.refused[:-1]})
        text = dump(report)
    while len(text.encode()) > limit and report.message:
        report = report.model_copy(update={"message": report.message[: len(report.message) // 2]})
        text = dump(report)
    return text


def decode(text: str | None) -> api.DatasetReport | None:
    """A report from a termination message; None when it is not one."""
    try:
        return api.DatasetReport.model_validate(json.loads(text or ""))
    except ValueError:
        return None


def render(report: api.DatasetReport) -> str:
    """The report as a terminal table (`lora-trainer preflight --job`)."""
    lines = [f"dataset preflight: {report.verdict}"
             + (f" ({report.reason})" if report.verdict == "Failed" else "")]
    if report.format:
        lines.append(f"format: {report.format}, maxSeqLength {report.max_seq_length}")
    if report.splits is not None:
        lines.append(f"{'split':<11}{'rows':>6}{'refused':>9}{'tokens p50/p95/max':>20}"
                     f"{'truncated':>11}{'duplicates':>12}")
        for name in SPLITS:
            s = getattr(report.splits, name)
            if s is None:
                continue
            tl = s.token_length
            tokens = f"{tl.p50}/{tl.p95}/{tl.max}" if tl else "-"
            trunc = f"{s.truncated_percent:.1f} %" if s.truncated_percent is not None else "-"
            lines.append(f"{name:<11}{s.rows:>6}{s.refused:>9}{tokens:>20}{trunc:>11}"
                         f"{s.duplicates:>12}")
    if report.overlap is not None:
        o = report.overlap
        lines.append(f"overlap: train∩validation {o.train_validation}, train∩test {o.train_test}, "
                     f"validation∩test {o.validation_test} (max {o.max_fraction:.1%} of a "
                     "held-out split)")
    for r in report.refused:
        lines.append(f"refused: {r.file}:{r.line}: {r.reason}")
    lines.append(f"message: {report.message}")
    return "\n".join(lines)

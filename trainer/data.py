"""From a dataset file to packed, label-masked training rows.

Pure functions except for file reading and the tokenizer call, so each step has its own test:
read rows (.jsonl / .json / .parquet) → detect the format → normalise each row to either a
chat (messages) or a plain prompt/completion → tokenize with the chat template and mask the
prompt (labels -100) → truncate (counted) → pack best-fit-decreasing → collate.

Packing without cross-sample attention: every packed row carries `position_ids` that restart
at 0 for each sample and no `attention_mask`. transformers (≥ 4.53, torch ≥ 2.6) turns that
into a block-diagonal causal mask for the sdpa and eager kernels and into varlen calls for
flash-attention, so samples sharing a row never attend to one another. The first token of
every sample is never a label, so the loss of a packed row equals the loss of its samples
trained one by one. Padding (to the longest packed row of a micro-batch) forms its own
segment and carries no labels.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_operator.api import DatasetFormat
from lora_operator.contract import ExitCode
from lora_trainer.errors import TrainerError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
FORMAT_COLUMNS: list[tuple[DatasetFormat, frozenset[str]]] = [
    (DatasetFormat.CHAT, frozenset({"messages"})),
    (DatasetFormat.ALPACA, frozenset({"instruction", "output"})),
    (DatasetFormat.COMPLETION, frozenset({"prompt", "completion"})),
    (DatasetFormat.TEXT, frozenset({"text"})),
]


@dataclass(frozen=True)
class Row:
    """One record and where it came from (so a bad row is reported by file and line)."""

    data: dict[str, Any]
    file: str
    line: int


@dataclass(frozen=True)
class Sample:
    """A row normalised: either `messages` (chat template) or raw `prompt` + `completion`."""

    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    completion: str = ""

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


@dataclass
class Example:
    """A tokenized sample (or a packed row of several): ids, labels and positions."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def as_features(self) -> dict[str, list[int]]:
        positions = self.position_ids or list(range(len(self.input_ids)))
        return {"input_ids": self.input_ids, "labels": self.labels, "position_ids": positions}


@dataclass
class SplitStats:
    """What tokenization did to a split: reported in metrics.json and the model card."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_all_truncated: int = 0
    tokens: int = 0
    label_tokens: int = 0
    packed_rows: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def data_error(row: Row | None, reason: str, file: str = "") -> TrainerError:
    where = f"{row.file}:{row.line}" if row else file
    return TrainerError(ExitCode.DATA, f"{where}: {reason}")


# --------------------------------------------------------------------------- reading


def read_rows(path: Path) -> list[Row]:
    """All records of a .jsonl, .json (array, or {"data": [...]}) or .parquet file."""
    if not path.is_file():
        raise TrainerError(ExitCode.DATA, f"{path}: dataset file not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise TrainerError(ExitCode.DATA, f"{path}: unsupported file type {suffix!r} "
                                      "(use .jsonl, .json or .parquet)")


def _read_jsonl(path: Path) -> list[Row]:
    rows: list[Row] = []
    with path.open(encoding="utf-8", errors="strict") as fh:
        try:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TrainerError(ExitCode.DATA,
                                       f"{path.name}:{number}: invalid JSON ({exc.msg})") from None
                except RecursionError:
                    raise _too_deep(f"{path.name}:{number}") from None
                if not isinstance(obj, dict):
                    raise TrainerError(ExitCode.DATA,
                                       f"{path.name}:{number}: expected a JSON object per line")
                rows.append(Row(obj, path.name, number))
        except UnicodeDecodeError as exc:
            raise TrainerError(ExitCode.DATA, f"{path.name}: not UTF-8 ({exc.reason})") from None
    return rows


def _too_deep(where: str) -> TrainerError:
    """JSON nested deeper than the parser's recursion limit: bad data, not a trainer crash."""
    return TrainerError(ExitCode.DATA, f"{where}: JSON nested too deeply (a row must be an "
                                       "object of strings, lists and objects a few levels deep)")


def _read_json(path: Path) -> list[Row]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrainerError(ExitCode.DATA, f"{path.name}: invalid JSON ({exc})") from None
    except RecursionError:
        raise _too_deep(path.name) from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise TrainerError(ExitCode.DATA, f"{path.name}: expected a JSON array of objects")
    rows = []
    for index, item in enumerate(obj):
        if not isinstance(item, dict):
            raise TrainerError(ExitCode.DATA, f"{path.name}:{index + 1}: expected an object")
        rows.append(Row(item, path.name, index + 1))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise TrainerError(ExitCode.DATA, f"{path.name}: unreadable parquet ({exc})") from None
    return [Row(rec, path.name, i + 1) for i, rec in enumerate(table.to_pylist())]


# --------------------------------------------------------------------------- formats


def detect_format(rows: Sequence[Row]) -> DatasetFormat:
    """The format whose required columns the first row has (chat, alpaca, completion, text)."""
    if not rows:
        raise TrainerError(ExitCode.DATA, "dataset is empty")
    keys = set(rows[0].data)
    for fmt, columns in FORMAT_COLUMNS:
        if columns <= keys:
            return fmt
    raise data_error(rows[0], f"cannot detect the format from columns {sorted(keys)}; expected "
                              "messages, instruction/output, prompt/completion or text")


def _text(row: Row, key: str, required: bool = True) -> str:
    value = row.data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise data_error(row, f"field {key!r} must be a string (got {type(value).__name__})")
    if required and not value.strip():
        raise data_error(row, f"field {key!r} is empty")
    return value


def to_sample(row: Row, fmt: DatasetFormat | str) -> Sample:
    """Normalise one row of a known format, failing with its file and line when malformed."""
    fmt = DatasetFormat(fmt)
    if fmt == DatasetFormat.CHAT:
        return Sample(messages=_messages(row))
    if fmt == DatasetFormat.ALPACA:
        user = _text(row, "instruction")
        extra = _text(row, "input", required=False)
        if extra.strip():
            user = f"{user}\n\n{extra}"
        system = _text(row, "system", required=False)
        turns = ((("system", system),) if system else ()) + (("user", user),
                                                              ("assistant", _text(row, "output")))
        return Sample(messages=turns)
    if fmt == DatasetFormat.COMPLETION:
        return Sample(prompt=_text(row, "prompt", required=False),
                      completion=_text(row, "completion"))
    if fmt == DatasetFormat.TEXT:
        return Sample(completion=_text(row, "text"))
    raise data_error(row, f"format {fmt.value!r} must be resolved before reading rows")


def _messages(row: Row) -> tuple[tuple[str, str], ...]:
    raw = row.data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise data_error(row, "field 'messages' must be a non-empty list")
    turns = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise data_error(row, f"messages[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise data_error(row, f"messages[{i}].role must be one of {', '.join(ROLES)} "
                                  f"(got {role!r})")
        if not isinstance(content, str):
            raise data_error(row, f"messages[{i}].content must be a string")
        turns.append((str(role), content))
    if not any(role == "assistant" for role, _ in turns):
        raise data_error(row, "messages has no assistant turn to learn from")
    return tuple(turns)


# --------------------------------------------------------------------------- tokenizing


def _template_ids(tokenizer: Any, turns: Sequence[tuple[str, str]], generation: bool) -> list[int]:
    messages = [{"role": r, "content": c} for r, c in turns]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def chat_example(tokenizer: Any, turns: Sequence[tuple[str, str]], completion_only: bool) -> Example:
    """Chat-templated ids; with completion_only, only assistant turns carry labels.

    Each assistant turn's span is found by templating the conversation up to it (with and
    without the generation prompt), which works for any template whose rendering of a
    prefix is a prefix of the whole: the usual case, checked and refused otherwise.
    """
    ids = _template_ids(tokenizer, turns, generation=False)
    if not completion_only:
        return Example(ids, [IGNORE_INDEX, *ids[1:]])
    labels = [IGNORE_INDEX] * len(ids)
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        start = len(_template_ids(tokenizer, turns[:i], generation=True))
        upto = _template_ids(tokenizer, turns[: i + 1], generation=False)
        if ids[: len(upto)] != upto:
            raise TrainerError(ExitCode.DATA, "the tokenizer's chat template does not render a "
                                              "conversation prefix as a prefix; cannot mask prompts")
        labels[start:len(upto)] = ids[start:len(upto)]
    labels[0] = IGNORE_INDEX
    return Example(ids, labels)


def plain_example(tokenizer: Any, prompt: str, completion: str, completion_only: bool) -> Example:
    """Raw prompt + completion + EOS, without a template (completion and text formats)."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
    if not prompt_ids and tokenizer.bos_token_id is not None:
        prompt_ids = [int(tokenizer.bos_token_id)]
    body = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        body.append(int(tokenizer.eos_token_id))
    ids = [int(i) for i in prompt_ids + body]
    labels = ([IGNORE_INDEX] * len(prompt_ids) if completion_only else list(prompt_ids)) + body
    labels[0] = IGNORE_INDEX
    return Example(ids, labels)


def tokenize_sample(tokenizer: Any, sample: Sample, completion_only: bool) -> Example:
    if sample.is_chat:
        return chat_example(tokenizer, sample.messages, completion_only)
    return plain_example(tokenizer, sample.prompt, sample.completion, completion_only)


def truncate(example: Example, max_len: int) -> tuple[Example | None, bool]:
    """Cut to max_len; (None, True) when nothing trainable is left after the cut."""
    if len(example) <= max_len:
        return example, False
    cut = Example(example.input_ids[:max_len], example.labels[:max_len])
    if all(label == IGNORE_INDEX for label in cut.labels):
        return None, True
    return cut, True


def tokenize_rows(tokenizer: Any, rows: Sequence[Row], fmt: DatasetFormat | str, max_len: int,
                  completion_only: bool, split: str) -> tuple[list[Example], SplitStats]:
    """Tokenize a split; fails (DATA) when it is empty or every row was truncated away."""
    stats = SplitStats(rows=len(rows))
    if not rows:
        raise TrainerError(ExitCode.DATA, f"{split} split is empty")
    examples: list[Example] = []
    for row in rows:
        example = tokenize_sample(tokenizer, to_sample(row, fmt), completion_only)
        kept, was_cut = truncate(example, max_len)
        stats.truncated += int(was_cut)
        if kept is None:
            stats.dropped_all_truncated += 1
            continue
        if all(label == IGNORE_INDEX for label in kept.labels):
            raise data_error(row, "row has no tokens to learn from")
        examples.append(kept)
        stats.tokens += len(kept)
        stats.label_tokens += sum(1 for label in kept.labels if label != IGNORE_INDEX)
    stats.examples = len(examples)
    if not examples:
        raise TrainerError(ExitCode.DATA, f"{split} split: all {len(rows)} rows were truncated to "
                                          f"nothing at maxSeqLength {max_len}; raise it")
    return examples, stats


def split_fraction(rows: Sequence[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, validation): a seeded shuffle holds `fraction` of the rows out (at least one)."""
    if len(rows) < 2:
        raise TrainerError(ExitCode.DATA, f"need at least 2 rows to hold out a validation split "
                                          f"(got {len(rows)})")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # noqa: S311 (a data split, not a secret)
    n_val = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    held = set(order[:n_val])
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


# --------------------------------------------------------------------------- packing


def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices per bin, each bin's total ≤ capacity, longest first.

    Items go into the fullest bin that still has room (a sorted list of free space keeps it
    O(n log n)), which leaves fewer, fuller rows than first-fit and so less padding.
    """
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[index]
        if size > capacity:
            raise ValueError(f"item {index} of length {size} exceeds capacity {capacity}")
        pos = bisect.bisect_left(free, (size, -1))
        if pos < len(free):
            space, b = free.pop(pos)
            bins[b].append(index)
            bisect.insort(free, (space - size, b))
        else:
            bins.append([index])
            bisect.insort(free, (capacity - size, len(bins) - 1))
    return bins


def pack(examples: Sequence[Example], capacity: int) -> list[Example]:
    """Concatenate examples into rows of ≤ capacity tokens, positions restarting per sample."""
    rows = []
    for members in pack_bfd([len(e) for e in examples], capacity):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in sorted(members):
            ids += examples[i].input_ids
            labels += examples[i].labels
            positions += range(len(examples[i]))
        rows.append(Example(ids, labels, positions))
    return rows


class ListDataset:
    """A map-style dataset over precomputed feature dicts (what Trainer's DataLoader wants)."""

    def __init__(self, examples: Sequence[Example]):
        self.features = [e.as_features() for e in examples]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


@dataclass
class TokenCounter:
    """Real (non-padding) tokens handed to the model; read by the progress reporter."""

    tokens: int = 0


class Collator:
    """Pads a micro-batch to its longest row.

    packed=True: no attention_mask, position_ids restart per sample (block-diagonal
    attention, see the module docstring); padding is a segment of its own without labels.
    packed=False: classic right padding with an attention mask.
    """

    def __init__(self, pad_id: int, packed: bool, counter: TokenCounter | None = None,
                 pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.packed = packed
        self.counter = counter if counter is not None else TokenCounter()
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        width = -(-longest // self.multiple) * self.multiple
        ids, labels, extra = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            self.counter.tokens += len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            if self.packed:
                extra.append(list(f["position_ids"]) + list(range(pad)))
            else:
                extra.append([1] * len(f["input_ids"]) + [0] * pad)
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        batch["position_ids" if self.packed else "attention_mask"] = torch.tensor(extra)
        return batch

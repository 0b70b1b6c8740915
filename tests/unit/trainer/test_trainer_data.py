"""Data: formats, masking, truncation, packing and the collator (tiny tokenizer, no model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_operator.api import DatasetFormat
from lora_operator.contract import ExitCode
from lora_trainer import data
from lora_trainer.errors import TrainerError

from .conftest import write_jsonl

CHAT = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]}
ALPACA = {"instruction": "Add", "input": "2 and 3", "output": "5"}
COMPLETION = {"prompt": "2+3=", "completion": "5"}
TEXT = {"text": "The quick brown fox."}


@pytest.mark.parametrize(("row", "fmt"), [(CHAT, DatasetFormat.CHAT), (ALPACA, DatasetFormat.ALPACA),
                                          (COMPLETION, DatasetFormat.COMPLETION), (TEXT, DatasetFormat.TEXT)])
def test_auto_detects_every_format(row: dict[str, Any], fmt: DatasetFormat) -> None:
    assert data.detect_format([data.Row(row, "f.jsonl", 1)]) == fmt


def test_undetectable_columns_name_file_and_line() -> None:
    with pytest.raises(TrainerError) as err:
        data.detect_format([data.Row({"foo": 1}, "f.jsonl", 3)])
    assert err.value.code == ExitCode.DATA and "f.jsonl:3" in err.value.message


def test_readers_jsonl_json_parquet(tmp_path: Path) -> None:
    rows = [ALPACA, ALPACA]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.json", "a.parquet"):
        read = data.read_rows(tmp_path / name)
        assert [r.data["output"] for r in read] == ["5", "5"]
        assert read[1].line == 2


def test_malformed_jsonl_line_fails_with_file_line_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CHAT) + "\n{not json\n")
    with pytest.raises(TrainerError) as err:
        data.read_rows(path)
    assert err.value.code == ExitCode.DATA
    assert "bad.jsonl:2" in err.value.message and "invalid JSON" in err.value.message


@pytest.mark.parametrize(("row", "reason"), [
    ({"messages": [{"role": "bot", "content": "x"}]}, "role must be one of"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": 3}]}, "content must be a string"),
])
def test_malformed_chat_rows(row: dict[str, Any], reason: str) -> None:
    with pytest.raises(TrainerError) as err:
        data.to_sample(data.Row(row, "c.jsonl", 7), DatasetFormat.CHAT)
    assert "c.jsonl:7" in err.value.message and reason in err.value.message


def test_alpaca_becomes_a_chat_with_input_appended() -> None:
    sample = data.to_sample(data.Row(ALPACA, "a", 1), "alpaca")
    assert sample.messages == (("user", "Add\n\n2 and 3"), ("assistant", "5"))


def _decoded_labels(tok: Any, example: data.Example) -> str:
    return str(tok.decode([t for t in example.labels if t != data.IGNORE_INDEX]))


def test_chat_completion_only_masks_everything_but_the_answer(tiny_tokenizer: Any) -> None:
    sample = data.to_sample(data.Row(CHAT, "c", 1), "chat")
    example = data.tokenize_sample(tiny_tokenizer, sample, completion_only=True)
    assert _decoded_labels(tiny_tokenizer, example) == "hi there<|im_end|>\n"
    full = data.tokenize_sample(tiny_tokenizer, sample, completion_only=False)
    assert full.input_ids == example.input_ids
    assert sum(t != data.IGNORE_INDEX for t in full.labels) == len(full) - 1


def test_multi_turn_chat_learns_every_assistant_turn(tiny_tokenizer: Any) -> None:
    row = {"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "one"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "two"}]}
    example = data.tokenize_sample(tiny_tokenizer, data.to_sample(data.Row(row, "c", 1), "chat"), True)
    assert _decoded_labels(tiny_tokenizer, example) == "one<|im_end|>\ntwo<|im_end|>\n"


def test_completion_format_masks_the_prompt(tiny_tokenizer: Any) -> None:
    example = data.tokenize_sample(tiny_tokenizer, data.to_sample(data.Row(COMPLETION, "c", 1),
                                                                   "completion"), True)
    assert _decoded_labels(tiny_tokenizer, example) == "5<|im_end|>"
    text = data.tokenize_sample(tiny_tokenizer, data.to_sample(data.Row(TEXT, "t", 1), "text"), True)
    assert text.labels[0] == data.IGNORE_INDEX
    assert all(t != data.IGNORE_INDEX for t in text.labels[1:])


def test_truncation_is_counted_and_all_truncated_fails(tiny_tokenizer: Any) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    rows = [data.Row(CHAT, "c", 1), data.Row(long, "c", 2)]
    examples, stats = data.tokenize_rows(tiny_tokenizer, rows, "chat", 64, True, "train")
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped_all_truncated) == (2, 1, 1, 1)
    assert len(examples) == 1
    with pytest.raises(TrainerError) as err:
        data.tokenize_rows(tiny_tokenizer, [data.Row(long, "c", 2)], "chat", 64, True, "train")
    assert err.value.code == ExitCode.DATA and "truncated" in err.value.message


def test_empty_split_fails_before_training(tiny_tokenizer: Any) -> None:
    with pytest.raises(TrainerError) as err:
        data.tokenize_rows(tiny_tokenizer, [], "chat", 64, True, "train")
    assert err.value.code == ExitCode.DATA


def test_split_fraction_is_seeded_and_disjoint() -> None:
    rows = [data.Row({"text": str(i)}, "t", i) for i in range(100)]
    train, val = data.split_fraction(rows, 0.1, seed=3)
    _, val2 = data.split_fraction(rows, 0.1, seed=3)
    assert [r.line for r in val] == [r.line for r in val2] and len(val) == 10
    assert {r.line for r in train} | {r.line for r in val} == set(range(100))
    assert not {r.line for r in train} & {r.line for r in val}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=80), st.integers(64, 200))
def test_bfd_packs_every_item_once_within_capacity(lengths: list[int], capacity: int) -> None:
    bins = data.pack_bfd(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Best fit never leaves two bins at most half full (the later one's items would have
    # fitted in the earlier), so bins ≤ 2·total/capacity + 1. (11/9·OPT + 1 holds too, but
    # OPT is not ceil(total/capacity): [26, 48, 48, 48, 48] at 73 needs 5 bins, not 3.)
    assert len(bins) <= 2 * sum(lengths) / capacity + 1
    assert sum(1 for b in bins if 2 * sum(lengths[i] for i in b) <= capacity) <= 1


def test_bfd_on_the_case_that_needs_every_bin() -> None:
    assert sorted(map(sorted, data.pack_bfd([26, 48, 48, 48, 48], 73))) == \
        [[0], [1], [2], [3], [4]]
    assert sorted(map(sorted, data.pack_bfd([40, 30, 30, 20, 10], 70))) == [[0, 1], [2, 3, 4]]


def test_pack_restarts_positions_and_collator_pads_a_segment() -> None:
    examples = [data.Example([1, 2, 3], [-100, 2, 3]), data.Example([4, 5], [-100, 5]),
                data.Example([6, 7, 8, 9], [-100, 7, 8, 9])]
    rows = data.pack(examples, capacity=6)
    assert [len(r) for r in rows] == [6, 3]  # best fit: the 2 joins the 4, the 3 stays alone
    assert rows[0].position_ids == [0, 1, 0, 1, 2, 3]
    counter = data.TokenCounter()
    batch = data.Collator(pad_id=0, packed=True, counter=counter)([r.as_features() for r in rows])
    assert "attention_mask" not in batch and counter.tokens == 9
    assert batch["position_ids"].tolist()[1] == [0, 1, 2, 0, 1, 2]  # padding: its own segment
    assert int((batch["labels"] == -100).sum()) == 3 + 3  # three sample starts + three pads
    padded = data.Collator(pad_id=0, packed=False)([e.as_features() for e in examples])
    assert padded["attention_mask"].sum() == 9


def test_packed_loss_equals_one_by_one_loss(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """No attention across samples: the packed row's loss is the mean over its samples."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_trainer.evaluate import held_out_loss

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    rows = [data.Row(CHAT, "c", 1), data.Row(ALPACA, "a", 2)]
    examples, _ = data.tokenize_rows(tiny_tokenizer, [rows[0]], "chat", 128, False, "x")
    examples += data.tokenize_rows(tiny_tokenizer, [rows[1]], "alpaca", 128, False, "x")[0]
    packed = data.pack(examples, capacity=256)
    assert len(packed) == 1
    pad = int(tiny_tokenizer.pad_token_id)
    one_by_one = [held_out_loss(model, [e], pad) for e in examples]
    counts = [sum(t != -100 for t in e.labels) for e in examples]
    expected = sum(loss * n for loss, n in zip(one_by_one, counts, strict=True)) / sum(counts)
    assert held_out_loss(model, packed, pad) == pytest.approx(expected, rel=1e-5)

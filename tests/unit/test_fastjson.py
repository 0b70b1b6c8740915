"""orjson for the operator's JSON (operator/reconcile/fastjson.py): kopf's watch streams
decode through it, and it answers as the standard library does."""

from __future__ import annotations

import inspect
import json

import pytest
from kopf._cogs.clients import api as kopf_api

from lora_operator.reconcile import fastjson

EVENT = {"type": "MODIFIED", "object": {
    "apiVersion": "lorajob.dev/v1alpha1", "kind": "LoRAJob",
    "metadata": {"name": "ünï-cödé", "resourceVersion": "123", "generation": 2,
                 "labels": {"a": "b"}, "annotations": {}},
    "spec": {"training": {"learningRate": 0.0002, "epochs": 3, "packing": True,
                          "maxSteps": None}},
    "status": {"conditions": [{"type": "Ready", "status": "False", "message": "x\ny\t\"z\""}],
               "cost": {"gpuSeconds": 12.5e3}}}}


def test_kopf_still_decodes_watch_lines_with_its_module_json() -> None:
    """The hook is kopf's `json.loads(line...)` in `stream`: if an upgrade moves it, fail."""
    assert "json.loads(line" in inspect.getsource(kopf_api.stream)


def test_install_routes_kopf_watch_decoding_through_orjson() -> None:
    seen: list[object] = []
    fastjson.install()
    fastjson.install(after=lambda e: seen.append(e) or e)  # replaces `after`, keeps one shim
    assert isinstance(kopf_api.json.loads, fastjson.WatchDecoder)
    assert kopf_api.json.dumps is json.dumps  # the rest is the standard library's
    line = json.dumps(EVENT).encode()
    assert kopf_api.json.loads(line.decode("utf-8")) == EVENT
    assert seen == [EVENT]
    fastjson.install()
    assert kopf_api.json.loads(line.decode("utf-8")) == EVENT and len(seen) == 1


def test_loads_matches_the_standard_library() -> None:
    text = json.dumps(EVENT)
    assert fastjson.loads(text) == json.loads(text)
    assert fastjson.loads(text.encode()) == json.loads(text)
    # The API server's integers are int64 (it decodes wider ones to float64 itself).
    assert fastjson.loads('{"n": 9223372036854775807}') == {"n": 9223372036854775807}
    with pytest.raises(ValueError, match="Expecting"):
        fastjson.loads("{not json")


def test_dumps_round_trips() -> None:
    assert json.loads(fastjson.dumps(EVENT)) == EVENT

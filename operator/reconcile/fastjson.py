"""JSON at the operator's volume: orjson for its own API calls and for kopf's watch streams.

Every watch event of every LoRAJob, Job and pod is one JSON document, and decoding them
with the standard library was a sixth of the operator's CPU in a thousand-job burst
(BENCHMARKS.md, profile of issue 14). kopf has no setting for its decoder: it calls
`json.loads` on each line of a watch stream (`kopf._cogs.clients.api.stream`), so
`install()` gives that one module a `json` namespace whose `loads` is orjson's and whose
other names are the standard library's. tests/unit/test_fastjson.py fails if kopf stops
decoding there, so a kopf upgrade cannot silently bypass it.

orjson accepts exactly RFC 8259 JSON, which is all the API server sends; anything it
refuses goes to the standard library's decoder, which keeps its old behaviour and errors.
One difference: orjson reads an integer wider than 64 bits as a float, and the API
server never sends one (it stores integers as int64 and wider numbers as float64).
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from typing import Any

import orjson


def loads(data: str | bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # the standard library's error message and position
        return json.loads(data)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON (orjson's default) for request bodies."""
    return orjson.dumps(obj)


class WatchDecoder:
    """kopf's watch-line decoder: `loads`, then `after` on the decoded event."""

    def __init__(self, after: Callable[[Any], Any] | None = None) -> None:
        self.after = after

    def __call__(self, data: str | bytes) -> Any:
        event = loads(data)
        return event if self.after is None else self.after(event)


def install(after: Callable[[Any], Any] | None = None) -> None:
    """Decode kopf's watch streams with `loads` and then `after` (installing again replaces
    `after`; the rest of kopf's `json` stays the standard library's)."""
    from kopf._cogs.clients import api as kopf_api

    current = getattr(kopf_api.json, "loads", None)  # type: ignore[attr-defined]
    if isinstance(current, WatchDecoder):
        current.after = after
        return
    shim = types.SimpleNamespace(**{name: getattr(json, name) for name in json.__all__})
    shim.loads = WatchDecoder(after)
    kopf_api.json = shim  # type: ignore[attr-defined,assignment]

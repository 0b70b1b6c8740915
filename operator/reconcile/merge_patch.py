"""The status patch, computed as one diff of the desired status against the current one.

Each writer of the LoRAJob status (the derivation, planning, an early failure) states the
whole status it wants and leaves the patch to this diff, instead of hand-picking keys: a
key it forgot to compare cannot cause a write every pass, and a key it forgot to null
cannot survive a re-plan. A JSON merge patch (RFC 7386) merges objects and replaces lists,
so objects are diffed key by key, a lost key becomes null, and lists (conditions) are
compared whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Obj = Mapping[str, Any]


def status_patch(current: Obj | None, desired: Obj) -> dict[str, Any]:
    """The merge patch that turns `current` into `desired` ({} when they are equal).

    Keys of the status itself: changed or new ones with their desired value, lost ones (or
    desired as None) as None; keys neither mentions are left alone. A nested object is diffed
    key by key; one that loses keys is being replaced (a re-plan) and is spelled out whole,
    nulls for the lost keys included, so the patch reads as the new object.
    """
    return _diff(current or {}, desired)


def _diff(current: Obj, desired: Obj) -> dict[str, Any]:
    out: dict[str, Any] = {k: None for k, v in current.items() if k not in desired and v is not None}
    for key, want in desired.items():
        have = current.get(key)
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            sub = _replacement(have, want) if set(have) - set(want) else _diff(have, want)
            if sub:
                out[key] = sub
        elif _plain(have) != _plain(want):  # absent and None are alike
            out[key] = _plain(want)
    return out


def _replacement(current: Obj, desired: Obj) -> dict[str, Any]:
    """`desired` whole, with a null for every key of `current` it lacks (nested too)."""
    out: dict[str, Any] = {k: None for k in current if k not in desired}
    for key, want in desired.items():
        have = current.get(key)
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            out[key] = _replacement(have, want)
        else:
            out[key] = _plain(want)
    return out


def _plain(value: Any) -> Any:
    """`value` as plain dicts and lists (bodies may hold read-only Mapping views)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value

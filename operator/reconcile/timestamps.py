"""Timestamps in the one form the API server writes them (RFC 3339, UTC, seconds).

Status times are compared as strings when deciding whether anything changed, so every
writer must stamp them alike; and a malformed time in an object someone else wrote reads
as "unknown", never as a crash in the reconcile loop.
"""

from __future__ import annotations

import datetime as dt


def now_rfc3339(now: dt.datetime | None = None) -> str:
    """`now` (default: the clock) as the API server writes times."""
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> dt.datetime | None:
    """An RFC 3339 time, or None when absent or malformed."""
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None

"""Per-key exponential backoff for reconciles that must be retried.

A reconcile that failed (API server error, storage not answering) is retried after
`base`, `2·base`, `4·base`, ... up to `cap` seconds, like controller-runtime's rate-limited
work queue; a success resets the key. A fixed interval either hammers a broken dependency
(thousands of jobs every 15 s) or reacts slowly to a blip; doubling does neither.
"""

from __future__ import annotations

from collections.abc import Hashable

BASE_SECONDS = 1.0
CAP_SECONDS = 300.0


class Backoff:
    """Delays per key; `next` returns the delay before the next try and counts the failure."""

    def __init__(self, base: float = BASE_SECONDS, cap: float = CAP_SECONDS) -> None:
        self.base, self.cap = base, cap
        self._failures: dict[Hashable, int] = {}

    def next(self, key: Hashable) -> float:
        """The delay before retrying `key` after one more failure."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        return min(self.cap, self.base * 2.0 ** min(n, 64))

    def reset(self, key: Hashable) -> None:
        """`key` succeeded: its next failure starts from `base` again."""
        self._failures.pop(key, None)

    def failures(self, key: Hashable) -> int:
        return self._failures.get(key, 0)

"""Pacing one connection's SENDs (PROTOCOL.md §12 `--publish-rate`): pure code, given `now`.

How this works: a token bucket of `burst` tokens refilled at `rate` a second, kept as one
number, the time at which the bucket would be empty if every action taken so far had drained
it (GCRA's "theoretical arrival time"). Unlike `ratelimit.RateLimiter`, which refuses (HTTP
429) and leaves its token in the bucket, a publisher is never refused: each `reserve` takes
its token at once and says when the action may happen, so a caller that waits until then gets
exactly `rate` a second however its clock rounds. No trio, no clock.
"""

from __future__ import annotations


class TokenBucket:
    """`rate` actions a second on average, `burst` at once; full at `now`."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self._interval = 1 / rate
        self._slack = (burst - 1) * self._interval  # how far ahead a burst may run
        self._empty_at = now

    def reserve(self, now: float) -> float:
        """Take the next token: the time the action may happen, `now` or later."""
        empty_at = max(self._empty_at, now)
        self._empty_at = empty_at + self._interval
        return max(now, empty_at - self._slack)

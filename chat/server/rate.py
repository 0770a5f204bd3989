"""Pacing one connection's SENDs (PROTOCOL.md §12 `--publish-rate`): pure code, given `now`.

How this works: a token bucket of `burst` tokens refilled at `rate` a second, kept as one
number, the time at which the bucket is full again (GCRA's "theoretical arrival time"): at
`t` it holds `burst - (full_at - t) * rate` tokens, so one is there from `full_at - (burst - 1)
/ rate` on. Unlike `ratelimit.RateLimiter`, which refuses (HTTP 429) and leaves its token in
the bucket, a publisher is never refused: each `reserve` takes its token at once and says when
the action may happen, so a caller that waits until then gets exactly `rate` a second, however
its clock rounds. No trio, no clock.
"""

from __future__ import annotations


class TokenBucket:
    """`rate` actions a second on average, `burst` at once; full at `now`."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self._interval = 1 / rate  # what one token adds to `_full_at`
        self._slack = (burst - 1) * self._interval  # how far ahead of it a burst may run
        self._full_at = now

    def reserve(self, now: float) -> float:
        """Take the next token: the time the action may happen, `now` or later."""
        full_at = max(self._full_at, now)  # a bucket fuller than full is full
        self._full_at = full_at + self._interval
        return max(now, full_at - self._slack)

"""Token buckets per key (PROTOCOL.md §12: token requests per identity): pure code, given `now`.

How this works: each key has a bucket of at most `burst` tokens that refills at `rate` tokens
a second; a request takes one token, or is refused with the time until one is there. A key
is stored as (tokens, when) only while its bucket may not be full: after burst/rate idle
seconds it is full again, which is what an absent key means. Keys are kept in the order
they were last used, so every take drops the idle ones at the front: memory holds only the
keys used in the last burst/rate seconds, whatever an attacker tries. No trio, no clock.
"""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    """`rate` requests per second per key on average, `burst` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._refill = burst / rate  # idle seconds after which any bucket is full
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """Take a token for `key` at `now`: 0.0 when allowed, else the seconds until one is
        there (nothing is taken then). A clock that steps back refills nothing."""
        self._forget_idle(now)
        tokens, then = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        if not wait:
            tokens -= 1
        self._buckets[key] = (tokens, now)  # at the end: the most recently used
        return wait

    def __len__(self) -> int:
        """How many keys are held (the others' buckets are full)."""
        return len(self._buckets)

    def _forget_idle(self, now: float) -> None:
        while self._buckets:
            _tokens, then = next(iter(self._buckets.values()))
            if then + self._refill > now:
                return
            self._buckets.popitem(last=False)

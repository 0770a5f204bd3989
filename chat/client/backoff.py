"""How long to wait before the next connection attempt: exponential backoff, full jitter.

Full jitter (sleep a uniform random time between 0 and the exponential ceiling) spreads
the clients a restarting server dropped all at once, instead of bringing them back in
synchronized waves ("Exponential Backoff And Jitter", AWS Architecture Blog, 2015).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_BASE = 0.2  # seconds: the first retry comes quickly, a blip costs little
DEFAULT_CAP = 10.0  # seconds: a long outage is still retried often enough to feel live
MAX_EXPONENT = 64  # 2**64 x any sane base is far past any cap; bounds the float math

Uniform = Callable[[float, float], float]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between connection attempts: `uniform(0, min(cap, base * 2**attempt))`."""

    base: float = DEFAULT_BASE
    cap: float = DEFAULT_CAP

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={self.base} cap={self.cap}")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry `attempt` (0 for the first retry)."""
        return min(self.cap, self.base * 2.0 ** min(max(attempt, 0), MAX_EXPONENT))

    def delay(self, attempt: int, uniform: Uniform = random.uniform) -> float:
        """A random wait before retry `attempt`, anywhere from 0 to `ceiling(attempt)`."""
        return uniform(0.0, self.ceiling(attempt))


DEFAULT_BACKOFF = Backoff()

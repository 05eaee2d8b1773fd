"""Retry policy: exponential backoff with full jitter, a cap, and a reset after success.

Full jitter (a uniform delay between 0 and the exponential bound) spreads a fleet of agents that lost
the gateway at the same moment, so they do not reconnect in lockstep when it comes back.
"""

from __future__ import annotations

import random
from typing import Callable


class Backoff:
    def __init__(
        self,
        base: float = 1.0,
        cap: float = 60.0,
        factor: float = 2.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if base <= 0 or cap < base or factor < 1:
            raise ValueError("backoff needs 0 < base <= cap and factor >= 1")
        self.base = base
        self.cap = cap
        self.factor = factor
        self._rng = rng
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """Failures since the last reset."""
        return self._attempt

    def bound(self) -> float:
        """The upper bound of the next delay (before jitter)."""
        # min() before the power would overflow only after ~1000 attempts; guard anyway.
        exp = min(self._attempt, 64)
        return min(self.cap, self.base * self.factor**exp)

    def next(self) -> float:
        """Delay before the next try; each call counts one more failure."""
        delay = self._rng() * self.bound()
        self._attempt += 1
        return delay

    def reset(self) -> None:
        self._attempt = 0


__all__ = ["Backoff"]

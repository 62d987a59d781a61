"""Jittered exponential backoff, one pure helper for every retry loop of the agents and the orchestrator.

Many agents usually start, lose their broker or wait for the orchestrator
together. Delays that only double would make them retry in lockstep, so each
delay is scaled by a random factor: the fleet spreads out on its own.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass


def backoff_delays(
    first: float,
    cap: float,
    *,
    factor: float = 2.0,
    jitter: float = 0.5,
    rng: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Endless delays in seconds: ``first``, then multiplied by ``factor`` up to ``cap``, each jittered.

    Each delay is the base delay times a random factor in ``[1 - jitter,
    1 + jitter]`` (``rng`` returns a float in [0, 1), as ``random.random``
    does; tests pass a seeded ``random.Random().random``). The cap bounds the
    base, so a delay never exceeds ``cap * (1 + jitter)`` nor falls below
    ``first * (1 - jitter)``.
    """
    if not (math.isfinite(first) and first > 0):
        raise ValueError(f"first must be a positive number of seconds, got {first!r}")
    if not (math.isfinite(cap) and cap >= first):
        raise ValueError(f"cap ({cap!r}) must be a number of seconds not below first ({first!r})")
    if not (math.isfinite(factor) and factor >= 1):
        raise ValueError(f"factor must be at least 1, got {factor!r}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter must be from 0 to 1, got {jitter!r}")
    return _delays(first, cap, factor, jitter, rng)


def _delays(base: float, cap: float, factor: float, jitter: float, rng: Callable[[], float]) -> Iterator[float]:
    """The generator behind :func:`backoff_delays`, apart so bad arguments fail at the call, not at ``next()``."""
    while True:
        yield base * (1 - jitter + 2 * jitter * rng())
        base = min(base * factor, cap)


@dataclass(frozen=True, slots=True)
class Backoff:
    """A retry loop's shape: ``first`` doubling up to ``cap``, each delay times 0.5-1.5."""

    first: float
    cap: float

    def delays(self) -> Iterator[float]:
        """A fresh sequence of delays (see :func:`backoff_delays`)."""
        return backoff_delays(self.first, self.cap)

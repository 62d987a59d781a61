"""The jittered backoff every retry loop uses (agents, orchestrator, embedded broker, notifications).

Pure: a seeded random source stands in for the randomness. That each loop
draws its delays from it is shown next to the loop's own tests (test_agent,
test_broker, test_dispatch).
"""

from __future__ import annotations

import itertools
import random

import pytest

from runtime_agent.backoff import backoff_delays


def test_backoff_without_jitter_doubles_up_to_the_cap() -> None:
    delays = backoff_delays(2.0, 60.0, jitter=0)
    assert list(itertools.islice(delays, 8)) == [2, 4, 8, 16, 32, 60, 60, 60]


def test_backoff_jitter_scales_each_delay_by_half_to_one_and_a_half() -> None:
    bases = [0.2 * 2**n for n in range(5)] + [5.0] * 195
    delays = itertools.islice(backoff_delays(0.2, 5.0, rng=random.Random(24).random), len(bases))
    ratios = [delay / base for delay, base in zip(delays, bases, strict=True)]
    assert all(0.5 <= ratio <= 1.5 for ratio in ratios), ratios
    # the whole band is used: a fleet spreads out
    assert min(ratios) < 0.6
    assert max(ratios) > 1.4


def test_backoff_rejects_a_cap_below_the_first_delay_at_the_call() -> None:
    with pytest.raises(ValueError, match="cap"):
        backoff_delays(2.0, 1.0)

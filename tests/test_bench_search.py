"""The ingest search's rules, on a fake generator and consumer that hold exactly what they are told to.

No broker and no timing: the fake consumer counts a step's pulses at once
when the step's rate is one it holds, and a fraction of them otherwise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from bench.load import RunReport
from bench.search import search


class FakeConsumer:
    """Counts what :class:`FakeLoad` hands it; idle (this process's PID) when asked."""

    name = "fake"

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.counted = 0

    def count(self) -> int:
        return self.counted

    def nudge(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakeLoad:
    """A generator whose consumer holds a step when ``holds(rate, window)``, and takes in 90 % of it when not."""

    def __init__(self, consumer: FakeConsumer, holds: Callable[[int, float], bool]) -> None:
        self.consumer, self.holds = consumer, holds
        self.steps: list[tuple[int, float]] = []

    def run(self, *, rate: int, count: int, offset: int = 0) -> RunReport:
        window = count / rate
        self.steps.append((rate, window))
        self.consumer.counted += count if self.holds(rate, window) else count * 9 // 10
        now = time.monotonic()
        return RunReport(rate, count, count, now - window, now)


def _search(holds: Callable[[int, float], bool], **kw: Any) -> tuple[int, list[tuple[int, float]]]:
    consumer = FakeConsumer()
    load = FakeLoad(consumer, holds)
    found = search(load, consumer, quick=False, window=30.0, quiet=0.1, **kw)  # type: ignore[arg-type]
    return found.best, load.steps


def test_search_finds_the_highest_rate_held_for_the_full_window_within_five_percent() -> None:
    best, _ = _search(lambda rate, window: rate <= 133_000)
    assert 133_000 * 0.95 <= best <= 133_000


def test_a_rate_that_failed_only_a_short_step_gets_the_full_window() -> None:
    """A 3 s step at 12,000/s failing by chance must not cap the result at 10,000/s."""
    best, steps = _search(
        lambda rate, window: rate < 12_000 or (rate == 12_000 and window == 30),
        ladder=[2_000, 4_000, 8_000, 12_000, 16_000],
    )
    assert (12_000, 30.0) in steps
    assert best == 12_000


def test_the_search_stops_below_a_full_window_failure() -> None:
    best, steps = _search(lambda rate, window: rate <= 11_000, ladder=[2_000, 4_000, 8_000, 12_000, 16_000])
    assert best == 11_000
    assert all(rate <= 12_000 for rate, window in steps if window == 30)

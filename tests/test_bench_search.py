"""The ingest search's rules, on a fake generator and consumer that hold exactly what they are told to.

No broker: the fake consumer counts a step's pulses at once when the
step's rate is one it holds, and a fraction of them otherwise. The only
waits are the search's own (settling and going idle after a failed step,
and the lag that cuts a stalled step short).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from bench.load import RunReport
from bench.search import search, step


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
    """A generator whose consumer holds a step when ``holds(rate, window)``, and takes in 90 % of it when not.

    With ``stalls``, a run never ends by itself and its consumer takes in
    nothing: only :meth:`halt` ends it.
    """

    def __init__(self, consumer: FakeConsumer, holds: Callable[[int, float], bool], *, stalls: bool = False) -> None:
        self.consumer, self.holds, self.stalls = consumer, holds, stalls
        self.steps: list[tuple[int, float]] = []
        self.halted = False
        self._report: RunReport | None = None

    def start(self, *, rate: int, count: int, offset: int = 0) -> None:
        window = count / rate
        self.steps.append((rate, window))
        if not self.stalls:
            self.consumer.counted += count if self.holds(rate, window) else count * 9 // 10
        now = time.monotonic()
        self._report = RunReport(rate, count, count, now - window, now)

    def halt(self) -> None:
        self.halted = True

    def finished(self, timeout: float = 0.0) -> bool:
        time.sleep(timeout if self.stalls else 0)
        return not self.stalls or self.halted

    def report(self, timeout: float) -> RunReport:
        assert self._report is not None
        return self._report


def _search(holds: Callable[[int, float], bool], **kw: Any) -> tuple[int, list[tuple[int, float]]]:
    consumer = FakeConsumer()
    load = FakeLoad(consumer, holds)
    found = search(load, consumer, quick=False, window=30.0, quiet=0.1, **kw)  # type: ignore[arg-type]
    return found.best, load.steps


def test_search_finds_the_highest_rate_held_for_the_full_window_within_five_percent() -> None:
    best, _ = _search(lambda rate, window: rate <= 133_000)
    assert 133_000 * 0.95 <= best <= 133_000


def test_low_rates_are_resolved_within_five_percent_too() -> None:
    """Whole thousands would settle at 8,000/s here: 10 % off, too coarse for a 0.9 ratio target."""
    best, _ = _search(lambda rate, window: rate <= 8_900, ladder=[2_000, 4_000, 8_000, 12_000, 16_000])
    assert 8_900 * 0.95 <= best <= 8_900


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


def test_a_step_whose_consumer_falls_far_behind_is_cut_short() -> None:
    consumer = FakeConsumer()
    load = FakeLoad(consumer, lambda rate, window: True, stalls=True)
    result = step(load, consumer, 10_000, 30.0, drain=0.1, quiet=0.1)  # type: ignore[arg-type]
    assert load.halted
    assert not result.held
    assert "behind" in result.why

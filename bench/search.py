"""The ingest search: the highest offered pulse rate a consumer holds losslessly for a whole window.

A step offers ``rate`` pulses per second for ``window`` seconds (exactly
``rate * window`` packets) and holds when (1) the generator really offered
at least 97 % of the rate (else the broker's input is the limit) and (2) the
consumer counted every one of them no later than ``drain`` seconds after the
last was sent. The broker never drops (``max_queued_messages 0``), so a
consumer that falls behind shows up as lag past ``drain``.

Coarse steps with a short window climb a ladder until the first failure,
bisect, then the best rate is confirmed with the full window (stepping down
10 % at a time if the confirmation fails).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .consumers import Consumer
from .load import LoadProcess

FULL_LADDER = [10_000, 20_000, 40_000, 60_000, 80_000, 100_000, 120_000, 140_000, 160_000, 200_000, 250_000, 300_000]
QUICK_LADDER = [25_000, 50_000, 100_000, 150_000, 200_000]


@dataclass
class Step:
    rate: int
    window: float
    sent: int
    received: int
    achieved_per_s: float
    drain_s: float
    held: bool
    why: str = ""


@dataclass
class SearchResult:
    consumer: str
    best: int
    """Highest rate held for the full window (0: none)."""
    steps: list[Step] = field(default_factory=list)

    def summary(self) -> str:
        return ", ".join(
            f"{s.rate / 1000:g}k/{s.window:g}s{'✓' if s.held else '✗'}{'' if s.held else '(' + s.why + ')'}"
            for s in self.steps
        )


def settle(consumer: Consumer, quiet: float, timeout: float = 90.0) -> None:
    """Wait until the consumer's count stops moving (a backlog drained)."""
    start = time.monotonic()
    last, since = consumer.count(), time.monotonic()
    while time.monotonic() - start < timeout:
        consumer.nudge()
        time.sleep(0.1)
        now_count = consumer.count()
        if now_count != last:
            last, since = now_count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def step(
    load: LoadProcess,
    consumer: Consumer,
    rate: int,
    window: float,
    *,
    drain: float,
    quiet: float,
    check: Callable[[], str] | None = None,
    offset: int = 0,
) -> Step:
    base = consumer.count()
    report = load.run(rate=rate, count=int(rate * window), offset=offset)
    end = time.monotonic()
    while consumer.count() - base < report.sent and time.monotonic() - end < drain:
        consumer.nudge()
        time.sleep(0.02)
    received = consumer.count() - base
    drain_s = time.monotonic() - end
    why = ""
    if report.achieved_per_s < 0.97 * rate:
        why = f"offered only {report.achieved_per_s / 1000:.0f}k/s"
    elif received != report.sent:
        why = f"{received}/{report.sent} in time"
    elif check is not None:
        why = check()
    result = Step(rate, window, report.sent, received, report.achieved_per_s, drain_s, not why, why)
    if received != report.sent:
        settle(consumer, quiet)
    return result


def search(
    load: LoadProcess,
    consumer: Consumer,
    *,
    quick: bool,
    window: float,
    quiet: float = 0.5,
    extra_drain: float = 0.5,
    check: Callable[[], str] | None = None,
    ladder: list[int] | None = None,
) -> SearchResult:
    ladder = ladder or (QUICK_LADDER if quick else FULL_LADDER)
    coarse = 1.0 if quick else 3.0
    result = SearchResult(consumer.name, 0)

    def run(rate: int, win: float) -> bool:
        s = step(load, consumer, rate, win, drain=0.5 + extra_drain + 0.05 * win, quiet=quiet, check=check)
        result.steps.append(s)
        return s.held

    good, bad = 0, 0
    for rate in ladder:
        if run(rate, coarse):
            good = rate
        else:
            bad = rate
            break
    for _ in range(0 if quick else 2):
        if not good or not bad or bad - good <= max(2_000, good // 20):
            break
        mid = (good + bad) // 2 // 1000 * 1000
        if run(mid, coarse):
            good = mid
        else:
            bad = mid
    candidate = good
    for attempt in range(7):
        if candidate <= 0:
            break
        if run(candidate, window):
            result.best = candidate
            break
        candidate = int(candidate * (0.9 if attempt < 2 else 0.7)) // 1000 * 1000
    return result

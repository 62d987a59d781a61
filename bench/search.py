"""The ingest search: the highest offered pulse rate a consumer holds losslessly for a whole window.

A step offers ``rate`` pulses per second for ``window`` seconds (exactly
``rate * window`` packets) and holds when (1) the generator really offered
at least 97 % of the rate (else the broker's input is the limit) and (2) the
consumer counted every one of them no later than ``drain`` seconds after the
last was sent. The broker never drops (``max_queued_messages 0``), so a
consumer that falls behind shows up as lag past ``drain``. A step whose
consumer falls more than twice ``drain`` behind is cut short: the rest of
its window would only pile up a backlog in the broker, and Mosquitto spends
about a quarter more CPU per message for a while after carrying one (see
``scenarios/ingest.py``), which would handicap the steps after. After a failed
step the next starts only once the consumer and the broker (``idle``: their
PIDs) have gone idle: a broker still working off the backlog, or a Python
one collecting the garbage it left, would fail the next step too.

Coarse steps with a short window climb a ladder until the first failure and
bisect; then the best rate is confirmed with the full window. A failed
confirmation says how far to step down: to what the consumer really took in
(``received`` over the time it had) or what the generator really offered,
never less than 10 % down; once a rate holds, the gap up to the lowest
failure is bisected with full windows while the budget lasts, so the result
is within about 5 % (or 1,000/s) of the sustainable rate rather than a
coarse step below. The search ends only at a full window's failure: a rate
that failed only a short step is given the full window before the search
settles below it (the embedded search once stopped at 10,000/s because a
3 s step at 12,000/s failed, where 12,000/s held 30 s when run alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .consumers import Consumer
from .harness import wait_idle
from .load import LoadProcess

FULL_LADDER = [10_000, 20_000, 40_000, 60_000, 80_000, 100_000, 120_000, 140_000, 160_000, 200_000, 250_000, 300_000]
QUICK_LADDER = [50_000, 150_000]
"""Quick runs check that every figure comes out (CI), in seconds: two rungs of one short window each."""


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
    seconds: float = 0.0
    """How long the generator really sent: the window, or less when the step was cut short."""


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


def wait_counted(consumer: Consumer, target: int, timeout: float) -> None:
    """Wait (at most ``timeout`` s) until the consumer has counted ``target``, nudging its buffered counts out."""
    deadline = time.monotonic() + timeout
    while consumer.count() < target and time.monotonic() < deadline:
        consumer.nudge()
        time.sleep(0.02)


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
    idle: Sequence[int] = (),
) -> Step:
    base = consumer.count()
    load.start(rate=rate, count=int(rate * window), offset=offset)
    t0 = time.monotonic()
    behind = 0.0
    while not load.finished(0.1):
        consumer.nudge()
        lag_s = (time.monotonic() - t0) - (consumer.count() - base) / rate
        if lag_s > 2 * drain and not behind:
            behind = lag_s
            load.halt()
    report = load.report(window * 3 + 30)
    end = time.monotonic()
    wait_counted(consumer, base + report.sent, drain)
    received = consumer.count() - base
    drain_s = time.monotonic() - end
    seconds = report.ended - report.started
    why = ""
    if behind:
        why = f"{behind:.1f} s behind; cut at {seconds:.0f} s"
    elif report.achieved_per_s < 0.97 * rate:
        why = f"offered only {report.achieved_per_s / 1000:.0f}k/s"
    elif received != report.sent:
        why = f"{received}/{report.sent} in time"
    elif check is not None:
        why = check()
    result = Step(rate, window, report.sent, received, report.achieved_per_s, drain_s, not why, why, seconds)
    if why:
        settle(consumer, quiet)
        for pid in (consumer.pid, *idle):
            wait_idle(pid, hold=quiet)
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
    idle: Sequence[int] = (),
) -> SearchResult:
    ladder = ladder or (QUICK_LADDER if quick else FULL_LADDER)
    coarse = window if quick else 3.0  # quick: the ladder's own steps are the result
    result = SearchResult(consumer.name, 0)

    def run_step(rate: int, win: float) -> Step:
        drain = 0.5 + extra_drain + 0.05 * win
        s = step(load, consumer, rate, win, drain=drain, quiet=quiet, check=check, idle=idle)
        result.steps.append(s)
        return s

    def run(rate: int, win: float) -> bool:
        return run_step(rate, win).held

    good, bad = 0, 0
    for rate in ladder:
        if run(rate, coarse):
            good = rate
        else:
            bad = rate
            break
    for _ in range(0 if quick else 2):
        if not good or not bad or bad - good <= max(2 * _grain(good), good // 20):
            break
        mid = _round((good + bad) // 2)
        if run(mid, coarse):
            good = mid
        else:
            bad = mid
    if quick:
        result.best = good
        return result
    # Confirm with the full window; step down by what a failure shows, then bisect up.
    lo, hi = 0, bad or good * 2
    hi_failed_full = False  # until then hi is where a short step failed (or a guess), which is noisy
    candidate = good
    for _ in range(6):
        if candidate <= lo:
            break
        s = run_step(candidate, window)
        if s.held:
            lo = result.best = candidate
            if hi - lo > max(_grain(lo), lo // 20):
                candidate = _round((lo + hi) // 2)
            elif not hi_failed_full:
                candidate = hi  # give the short step's failure the full window
            else:
                break
        else:
            hi, hi_failed_full = candidate, True
            candidate = _round(min(0.9 * candidate, _sustained(s)))
            if candidate <= lo:
                candidate = _round((lo + hi) // 2)
    return result


def _grain(rate: float) -> int:
    """The finest step between searched rates: 1,000/s, or 250/s below 20,000/s.

    A ratio target of 0.9 needs rates resolved to better than 10 %; whole
    thousands are 11 % at 9,000/s, where the embedded broker's figures lie.
    """
    return 1_000 if rate >= 20_000 else 250


def _round(rate: float) -> int:
    """A rate rounded down to its grain."""
    grain = _grain(rate)
    return int(rate) // grain * grain


def _sustained(s: Step) -> float:
    """The rate a failed step suggests is sustainable: what was really offered, or really taken in."""
    if s.achieved_per_s < 0.97 * s.rate:
        return 0.98 * s.achieved_per_s
    if s.received < s.sent:
        return 0.95 * s.received / (s.seconds + s.drain_s)
    return 0.9 * s.rate

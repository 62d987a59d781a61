"""``latency``: how late a dead verdict is, past the deadline, under load.

Runtimes have interval 2 s and grace 1 s (quick: 1 s and 0.5 s) and pulse
round-robin, so at a rate of half the ``ingest`` result (quick: 5,000/s)
there are rate x 2 of them. For each runtime that stops, deadline = the
generator's send time of its last pulse + interval + grace
(CLOCK_MONOTONIC is shared by every process on the machine), and lateness =
when the observer received its ``dead`` alert minus the deadline. A dead
alert for a runtime that never stopped is a false dead.

The pulses never pause, and 1 % of the runtimes stop at random moments
over a stop window, twice:

* **after start** (informational): from the first pulses of a just-started
  orchestrator whose runtimes are all ``unknown``. Their first pulses are a
  wave of unknown -> alive changes (one per runtime: flips to write,
  statuses to publish) and all their deadlines fall due together one
  window after the start; the first stops come one window in.
* **steady** (the targets): once that start-up work is done (every runtime
  alive, no flip waiting to be written, the status refresh finished), as
  an orchestrator runs for the rest of its life.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from ..context import Context
from ..harness import Result, StatsObserver, bench, start_ready
from ..load import LoadProcess, runtime_id

INTERVAL, GRACE = 2.0, 1.0
SETTLE_LIMIT = 300.0
"""Seconds the steady phase waits at most for the start-up work to be done."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


@dataclass(frozen=True)
class Pace:
    """How the runtimes pulse and when stops may fall."""

    rate: int
    interval: float
    grace: float
    window: float
    """Seconds over which a phase's runtimes stop."""
    tail: float
    """Seconds of pulses after the stop window: the last deadline and a margin."""


@dataclass
class Phase:
    """One stop window: ``deadlines`` maps the runtimes that stopped to their deadlines."""

    deadlines: dict[str, float]
    achieved_per_s: float
    """The rate the generator really offered."""
    offset: int
    """Where the round robin goes on in the next run (so every runtime keeps its interval)."""

    def lateness(self, first: dict[str, float]) -> list[tuple[float, float]]:
        """(ms late, deadline seconds after the phase's first deadline), sorted; verdicts missing are left out."""
        t0 = min(self.deadlines.values(), default=0.0)
        return sorted(((first[rid] - d) * 1000, d - t0) for rid, d in self.deadlines.items() if rid in first)


def stop_some(
    load: LoadProcess,
    pace: Pace,
    *,
    offset: int,
    lead: float,
    stopping: list[int],
    silent: list[int],
    rng: random.Random,
) -> Phase:
    """One run: every runtime pulses; ``stopping`` stop at random moments ``lead`` to ``lead + pace.window``
    seconds in; ``silent`` (stopped before) stay silent. A lead of at least an interval makes each
    stopping runtime's last pulse one of this run's, whose send times it reports."""
    stops = {i: lead + rng.uniform(0, pace.window) for i in stopping}
    stops.update(dict.fromkeys(silent, 0.0))
    count = int(pace.rate * (lead + pace.window + pace.tail))
    report = load.run(rate=pace.rate, count=count, offset=offset, stops=stops, batch=1000, tick=0.002)
    deadlines = {runtime_id(i): report.last_sent[i] + pace.interval + pace.grace for i in stopping}
    return Phase(deadlines, report.achieved_per_s, (offset + count) % load.n)


def settle(
    load: LoadProcess, observer: StatsObserver, *, rate: int, offset: int, silent: list[int], limit: float
) -> tuple[int, float]:
    """Keep pulsing (a second at a time) until the start-up work is done; (next offset, seconds it took)."""
    start = time.monotonic()
    live = load.n - len(silent)
    stops = dict.fromkeys(silent, 0.0)

    def done(o: StatsObserver) -> bool:
        s = o.stats
        return (
            o.stats_at > begun
            and s.get("states", {}).get("alive", 0) == live
            and s.get("pending_writes", 1) == 0
            and s.get("refresh_pending", 1) == 0
        )

    while time.monotonic() - start < limit:
        begun = time.monotonic()
        load.run(rate=rate, count=rate, offset=offset, stops=stops, batch=1000, tick=0.002)
        offset = (offset + rate) % load.n
        if observer.wait(done, 0.0):
            break
    return offset, time.monotonic() - start


def run(ctx: Context) -> Result:
    result = Result("latency")
    ingest = ctx.found.get("ingest", {}).get("pulses_per_s") or 0
    if ctx.quick:
        rate = 5_000
    else:
        rate = int(ingest // 2) if ingest else 50_000
        if not ingest:
            result.notes.append("ingest not run (or held nothing): 50,000/s assumed")
    interval, grace = (1.0, 0.5) if ctx.quick else (INTERVAL, GRACE)
    n = int(rate * interval)
    margin = 0.5 if ctx.quick else 1.0
    window = 0.5 if ctx.quick else 10.0
    pace = Pace(rate, interval, grace, window, tail=interval + grace + margin)
    rng = random.Random(42)
    picked = rng.sample(range(n), 2 * max(1, n // 100))
    first_stops, steady_stops = picked[: len(picked) // 2], picked[len(picked) // 2 :]
    with bench("latency") as b, LoadProcess(b.port, n) as load:
        observer = b.observer(alerts=True)
        start_ready(b, b.seed(n, interval=interval, grace=grace), observer)
        after_start = stop_some(
            load, pace, offset=0, lead=interval + grace + margin, stopping=first_stops, silent=[], rng=rng
        )
        offset, settled_s = settle(
            load, observer, rate=rate, offset=after_start.offset, silent=first_stops, limit=SETTLE_LIMIT
        )
        steady = stop_some(
            load, pace, offset=offset, lead=interval + margin, stopping=steady_stops, silent=first_stops, rng=rng
        )
        ids = after_start.deadlines.keys() | steady.deadlines.keys()
        observer.wait(lambda o: ids <= o.dead_ids, 15)
        time.sleep(0.5)
        alerts = observer.dead_alerts()
    first: dict[str, float] = {}
    for alert in alerts:
        first.setdefault(alert.id, alert.at)
    false_dead = len([rid for rid in first if rid not in ids])
    late = steady.lateness(first)
    lateness = [ms for ms, _ in late]
    missing = len(steady.deadlines) - len(lateness)
    p50 = percentile(lateness, 50) if lateness else float("nan")
    p99 = percentile(lateness, 99) if lateness else float("nan")
    worst = max(lateness) if lateness else float("nan")
    early = [ms for ms, _ in after_start.lateness(first)]
    early_missing = len(after_start.deadlines) - len(early)
    result.add("p50_ms", round(p50, 1), "informational", unit="ms")
    result.add("p99_ms", round(p99, 1), "≤ 100 ms", p99 <= 100, "ms")
    result.add("max_ms", round(worst, 1), "≤ 250 ms", worst <= 250, "ms")
    result.add("false_dead", false_dead, "0", false_dead == 0)
    result.add("verdicts_missing", missing + early_missing, "0", missing + early_missing == 0)
    result.add("after_start_p99_ms", round(percentile(early, 99), 1) if early else None, "informational", unit="ms")
    result.add("after_start_max_ms", round(max(early), 1) if early else None, "informational", unit="ms")
    result.extra.update(
        runtimes=n,
        rate_per_s=rate,
        achieved_per_s=round(steady.achieved_per_s),
        stopped=len(steady.deadlines),
        settled_s=round(settled_s, 1),
        min_ms=round(min(lateness), 1) if lateness else None,
        worst=[f"{ms:.0f} ms at +{at:.2f} s" for ms, at in reversed(late[-10:])],
        after_start_p50_ms=round(percentile(early, 50), 1) if early else None,
        after_start_worst=[f"{ms:.0f} ms at +{at:.2f} s" for ms, at in reversed(after_start.lateness(first)[-5:])],
    )
    result.notes.append(
        f"{n:,} runtimes (interval {interval:g} s, grace {grace:g} s) at {rate:,}/s; steady: {len(steady.deadlines)} "
        f"stopped over {window:g} s, {settled_s:.0f} s after the first phase; after start: "
        f"{len(after_start.deadlines)} stopped; {missing + early_missing} verdicts missing"
    )
    if settled_s >= SETTLE_LIMIT:
        result.notes.append(f"start-up work not done within {SETTLE_LIMIT:g} s: the steady phase began anyway")
    return result

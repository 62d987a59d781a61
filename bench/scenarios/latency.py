"""``latency``: how late a dead verdict is, past the deadline, under load.

Runtimes have interval 2 s and grace 1 s (quick: 1 s and 0.5 s) and pulse round-robin, so at a rate
of half the ``ingest`` result (quick: 5,000/s) there are rate x 2 of them.
After a warm-up, 1 % of them stop at random moments over a stop window. For
each, deadline = the generator's send time of its last pulse + interval +
grace (CLOCK_MONOTONIC is shared by every process on the machine), and
lateness = when the observer received its ``dead`` alert minus the deadline.
A dead alert for a runtime that never stopped is a false dead.
"""

from __future__ import annotations

import random
import time

from ..context import Context
from ..harness import Result, bench, start_ready
from ..load import LoadProcess, runtime_id

INTERVAL, GRACE = 2.0, 1.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


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
    warmup = interval + grace + margin
    stop_window = 0.5 if ctx.quick else 10.0
    total = warmup + stop_window + interval + grace + margin
    rng = random.Random(42)
    stopped = rng.sample(range(n), max(1, n // 100))
    stops = {i: warmup + rng.uniform(0, stop_window) for i in stopped}
    with bench("latency") as b, LoadProcess(b.port, n) as load:
        observer = b.observer(alerts=True)
        start_ready(b, b.seed(n, interval=interval, grace=grace), observer)
        report = load.run(rate=rate, count=int(rate * total), stops=stops, batch=1000, tick=0.002)
        ids = {runtime_id(i): i for i in stopped}
        observer.wait(lambda o: ids.keys() <= o.dead_ids, 15)
        time.sleep(0.5)
        alerts = observer.dead_alerts()
    first: dict[str, float] = {}
    for alert in alerts:
        first.setdefault(alert.id, alert.at)
    deadlines = {rid: report.last_sent[i] + interval + grace for rid, i in ids.items() if rid in first}
    t0 = min(deadlines.values(), default=0.0)
    late = sorted(((first[rid] - d) * 1000, d - t0) for rid, d in deadlines.items())  # (ms late, deadline at)
    lateness = [ms for ms, _ in late]
    worst_few = late[-10:]
    missing = len(ids) - len(lateness)
    false_dead = len([rid for rid in first if rid not in ids])
    p50 = percentile(lateness, 50) if lateness else float("nan")
    p99 = percentile(lateness, 99) if lateness else float("nan")
    worst = max(lateness) if lateness else float("nan")
    result.add("p50_ms", round(p50, 1), "informational", unit="ms")
    result.add("p99_ms", round(p99, 1), "≤ 100 ms", p99 <= 100, "ms")
    result.add("max_ms", round(worst, 1), "≤ 250 ms", worst <= 250, "ms")
    result.add("false_dead", false_dead, "0", false_dead == 0)
    result.extra.update(
        runtimes=n,
        rate_per_s=rate,
        achieved_per_s=round(report.achieved_per_s),
        stopped=len(ids),
        verdicts_missing=missing,
        min_ms=round(min(lateness), 1) if lateness else None,
        worst=[f"{ms:.0f} ms at +{at:.2f} s" for ms, at in reversed(worst_few)],
    )
    result.notes.append(
        f"{n:,} runtimes (interval {interval:g} s, grace {grace:g} s) at {rate:,}/s; {len(ids)} stopped over "
        f"{stop_window:g} s; {missing} verdicts missing; earliest {min(lateness) if lateness else 0:.1f} ms"
    )
    return result

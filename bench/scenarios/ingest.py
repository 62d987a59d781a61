"""``ingest``: the highest pulse rate the orchestrator holds losslessly, beside paho and mosquitto_sub.

The three searches run one after the other, each on a fresh Mosquitto of
the same configuration with a fresh generator. One Mosquitto for all three
handicapped whichever went later: after a search's overloaded steps (a
failed 30 s step at 213,000/s leaves over a million messages queued)
Mosquitto spent a quarter more CPU per message, 0.73 -> 0.90 of its core at
144,000/s to the same orchestrator (2026-11-29), and the orchestrator, last,
held 138,000/s in the full run against 165,000/s on a fresh broker in the
same hour.

The orchestrator's runtimes are registered with interval and grace 3600 s,
so the offered rate is free (round-robin over all IDs) and no runtime can
be due to die during a window; every runtime pulses once before the search
(the unknown -> alive wave) and the orchestrator settles. A step of the
orchestrator also fails on any dead verdict.

Beside each search, the CPU each process spends per pulse at one common rate
(``SPLIT_RATE``): Mosquitto, the consumer, and this bench process (which
counts mosquitto_sub's output lines), so a ratio can be read against where
the machine's two cores went.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..consumers import Consumer, MosquittoSub, OrchestratorCounter, PahoSubscriber
from ..context import Context
from ..harness import Bench, Orchestrator, Result, StatsObserver, bench, cpu_seconds, start_ready, wait_settled
from ..load import LoadProcess
from ..search import SearchResult, search, wait_counted

SPLIT_RATE = 100_000


def cpu_split(b: Bench, load: LoadProcess, consumer: Consumer, seconds: float) -> dict[str, float]:
    """µs of CPU per pulse of Mosquitto, the consumer and this process to carry ``SPLIT_RATE`` pulses/s."""
    pids = {"mosquitto": b.mosquitto.process.pid, "consumer": consumer.pid, "bench": os.getpid()}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    base = consumer.count()
    report = load.run(rate=SPLIT_RATE, count=int(SPLIT_RATE * seconds))
    wait_counted(consumer, base + report.sent, 30)  # until all were taken in
    return {name: round((cpu_seconds(pid) - before[name]) / report.sent * 1e6, 2) for name, pid in pids.items()}


def start_warm(ctx: Context, b: Bench, load: LoadProcess, n: int) -> tuple[Orchestrator, StatsObserver]:
    """An orchestrator with ``n`` runtimes (interval = grace = 3600 s), each pulsed once and settled.

    The unknown -> alive wave after the first pulses is start-up work, not ingest: it is done before measuring.
    """
    db = b.seed(n, interval=3600, grace=3600)
    observer = b.observer(alerts=True)
    orch, ready_s = start_ready(b, db, observer)
    ctx.say(f"orchestrator ready in {ready_s:.2f} s with {n:,} runtimes; warming up (one pulse each)")
    load.run(rate=min(50_000, n * 2), count=n)
    if not observer.wait(lambda o: o.stats.get("pulses", 0) >= n, 120):
        raise RuntimeError(f"warm-up pulses not all counted: {observer.stats}")
    wait_settled(orch.pid, observer, hold=ctx.idle_hold)
    return orch, observer


def orchestrator_search(
    ctx: Context, b: Bench, load: LoadProcess, n: int, window: float, splits: dict[str, dict[str, float]]
) -> SearchResult:
    orch, observer = start_warm(ctx, b, load, n)
    counter = OrchestratorCounter(observer, orch.pid)
    splits["orchestrator"] = cpu_split(b, load, counter, 0.5 if ctx.quick else 5.0)

    def check() -> str:
        dead = observer.stats.get("states", {}).get("dead", 0)
        alerts = len(observer.dead_alerts())
        if not orch.alive:
            return "orchestrator exited"
        return f"{dead} dead, {alerts} dead alerts" if dead or alerts else ""

    return search(load, counter, quick=ctx.quick, window=window, quiet=1.2, check=check, idle=[b.mosquitto.process.pid])


def bare_search(
    ctx: Context,
    make: Callable[[int], Consumer],
    n: int,
    window: float,
    split_s: float,
    splits: dict[str, dict[str, float]],
) -> SearchResult:
    """A bare subscriber's CPU split and search, on a Mosquitto and a generator of its own."""
    with bench("ingest-bare") as b, LoadProcess(b.port, n) as load:
        consumer = make(b.port)
        try:
            splits[consumer.name] = cpu_split(b, load, consumer, split_s)
            found = search(load, consumer, quick=ctx.quick, window=window, idle=[b.mosquitto.process.pid])
        finally:
            consumer.close()
    ctx.say(f"{found.consumer}: {found.best:,}/s ({found.summary()})")
    return found


def run(ctx: Context) -> Result:
    result = Result("ingest")
    n = 5_000 if ctx.quick else 100_000
    window = 0.5 if ctx.quick else 30.0
    split_s = 0.5 if ctx.quick else 5.0
    splits: dict[str, dict[str, float]] = {}
    # A fresh Mosquitto (and generator) per consumer: see the module's docstring.
    baseline = bare_search(ctx, PahoSubscriber, n, window, split_s, splits)
    ceiling = bare_search(ctx, MosquittoSub, n, window, split_s, splits)
    with bench("ingest-orchestrator") as b, LoadProcess(b.port, n) as load:
        orch = orchestrator_search(ctx, b, load, n, window, splits)
    ctx.say(f"orchestrator: {orch.best:,}/s ({orch.summary()})")
    ratio = orch.best / baseline.best if baseline.best else 0.0
    ceiling_ratio = orch.best / ceiling.best if ceiling.best else 0.0
    result.add("pulses_per_s", orch.best, f"held {window:g} s, 0 lost, 0 dead", orch.best > 0, "/s")
    result.add("baseline_per_s", baseline.best, "bare paho subscriber", unit="/s")
    result.add("ratio", round(ratio, 2), "≥ 2.0", ratio >= 2.0)
    result.add("ceiling_per_s", ceiling.best, "mosquitto_sub", unit="/s")
    result.add("ceiling_ratio", round(ceiling_ratio, 2), "≥ 0.8", ceiling_ratio >= 0.8)
    result.extra["runtimes"] = n
    result.extra["window_s"] = window
    result.extra["steps"] = {s.consumer: s.summary() for s in (orch, baseline, ceiling)}
    result.extra["cpu_us_per_pulse_at_100k"] = splits
    result.notes.append(f"{n:,} runtimes registered with interval = grace = 3600 s; window {window:g} s per rate")
    for s in (orch, baseline, ceiling):
        result.notes.append(f"{s.consumer} steps: {s.summary()}")
    for consumer, split in splits.items():
        shown = ", ".join(f"{k} {v:g}" for k, v in split.items())
        result.notes.append(
            f"CPU µs/pulse at {SPLIT_RATE:,}/s with {consumer}: {shown} (total {sum(split.values()):.2f})"
        )
    return result

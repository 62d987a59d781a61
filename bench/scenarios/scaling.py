"""``scaling``: orchestrator CPU per pulse at a fixed rate, by number of registered runtimes.

1,000 / 100,000 / 1,000,000 runtimes (quick 1,000 / 10,000),
seeded alive (as after a restart) with interval = grace = 3600 s so no one
dies, pulsing round-robin over all IDs at 20,000/s (quick 10,000/s) for 30 s
(quick 0.5 s) once start-up has settled (including the paced status refresh
after connecting: about 100 s for 1,000,000 runtimes). CPU = utime + stime
from /proc over the window (idle timers included), divided by the pulses
counted. The window holds six flushes (one every 5 s). Until last-seen
times went to the database once per window per runtime, each flush with
1,000,000 runtimes wrote 100,000 rows at about a microsecond a row, and a
10 s window held two or three of them depending on where it fell (growth
1.47 and 1.79 on the same code and host); now, with a window of an hour
and every runtime's first pulse stored before the seeded restart, they
write none.

The round robin goes in ID order, the order of the runtime table's key, so
the last-seen flush writes its rows in order whatever it does. A fleet's
pulses come in no order: the same window is then measured again on the same
orchestrator with the IDs in a fixed shuffled order (``shuffled``,
informational).
"""

from __future__ import annotations

from ..context import Context
from ..harness import Result, StatsObserver, bench, cpu_seconds, start_ready, wait_settled
from ..load import LoadProcess


def cpu_per_pulse(load: LoadProcess, observer: StatsObserver, pid: int, rate: int, window: float) -> float:
    """The orchestrator's CPU µs per pulse over ``window`` seconds of ``load`` at ``rate``."""
    load.run(rate=rate, count=min(load.n, rate))  # touch the path once before measuring
    before = observer.fresh_stats()
    cpu0 = cpu_seconds(pid)
    report = load.run(rate=rate, count=int(rate * window))
    target = before["pulses"] + report.sent
    observer.wait(lambda o: bool(o.stats.get("pulses", 0) >= target), 30)
    cpu1 = cpu_seconds(pid)
    after = observer.fresh_stats()
    pulses = int(after["pulses"] - before["pulses"])
    return round((cpu1 - cpu0) / max(1, pulses) * 1e6, 2)


def _growth(per: dict[str, float]) -> float:
    """µs per pulse at the largest size over the smallest."""
    values = list(per.values())
    return values[-1] / values[0] if values[0] else float("inf")


def run(ctx: Context) -> Result:
    result = Result("scaling")
    sizes = [1_000, 10_000] if ctx.quick else [1_000, 100_000, 1_000_000]
    rate = 10_000 if ctx.quick else 20_000
    window = 0.5 if ctx.quick else 30.0
    per: dict[str, float] = {}
    shuffled: dict[str, float] = {}
    for n in sizes:
        with bench(f"scaling-{n}") as b:
            observer = b.observer()
            orch, ready_s = start_ready(b, b.seed(n, interval=3600, grace=3600, alive=True), observer, timeout=600)
            settle_s = wait_settled(orch.pid, observer, hold=ctx.idle_hold)
            with LoadProcess(b.port, n, connections=1) as load:
                per[f"{n}"] = cpu_per_pulse(load, observer, orch.pid, rate, window)
            with LoadProcess(b.port, n, connections=1, shuffled=True) as load:
                shuffled[f"{n}"] = cpu_per_pulse(load, observer, orch.pid, rate, window)
            ctx.say(
                f"{n:,} runtimes: ready {ready_s:.1f} s, settled {settle_s:.1f} s, {per[str(n)]} µs/pulse "
                f"({shuffled[str(n)]} shuffled)"
            )
            result.notes.append(f"{n:,} runtimes: ready {ready_s:.1f} s, start-up settled after {settle_s:.1f} s more")
    growth = _growth(per)
    result.add("us_per_pulse", per, "flat", unit="µs")
    result.add("growth", round(growth, 2), "≤ 1.5", growth <= 1.5)
    result.add("shuffled_us_per_pulse", shuffled, "informational", unit="µs")
    result.add("shuffled_growth", round(_growth(shuffled), 2), "informational")
    result.extra.update(rate_per_s=rate, window_s=window)
    return result

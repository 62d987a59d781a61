"""``steady_writes``: database transactions per second while every runtime pulses normally.

100,000 runtimes (quick 10,000), interval 5 s (quick 1 s), grace = interval,
pulsing round-robin at n / interval per second; after a warm-up of one
interval plus the first flush, the stats counter ``db_transactions`` is read
at the start and end of a 20 s (quick 2 s) window (flush_interval 5 s).
"""

from __future__ import annotations

import time

from ..context import Context
from ..harness import Result, bench, start_ready
from ..load import LoadProcess


def run(ctx: Context) -> Result:
    result = Result("steady_writes")
    n = 10_000 if ctx.quick else 100_000
    interval = 1.0 if ctx.quick else 5.0
    window = 2.0 if ctx.quick else 20.0
    warmup = interval + (1.0 if ctx.quick else 6.0)
    rate = int(n / interval)
    with bench("steady") as b, LoadProcess(b.port, n, connections=1) as load:
        observer = b.observer(alerts=True)
        start_ready(b, b.seed(n, interval=interval, grace=interval), observer)
        load.start(rate=rate, count=int(rate * (warmup + window + (0.5 if ctx.quick else 2.0))))
        time.sleep(warmup)
        first = observer.fresh_stats()
        time.sleep(window)
        last = observer.fresh_stats()
        load.report(warmup + window + 60)
    span = last["uptime_s"] - first["uptime_s"]
    tx = last["db_transactions"] - first["db_transactions"]
    per_s = tx / span
    result.add("tx_per_s", round(per_s, 3), "≤ 1", per_s <= 1.0, "/s")
    result.extra.update(
        runtimes=n, rate_per_s=rate, window_s=round(span, 2), transactions=tx, dead=last["states"]["dead"]
    )
    result.notes.append(
        f"{n:,} runtimes at {rate:,} pulses/s (interval {interval:g} s): {tx} transactions in {span:.1f} s, "
        f"{last['states']['dead']} dead, {len(observer.dead_alerts())} dead alerts"
    )
    return result

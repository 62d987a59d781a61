"""``mass_death``: 10 % of the runtimes stop at the same moment.

100,000 runtimes (quick 10,000), interval 5 s, grace 1 s (quick 1 s, 0.5 s), pulsing
round-robin. After a warm-up, 10 % stop at once. Measured from the last of
their deadlines (the generator's send time of each one's last pulse +
interval + grace) until every verdict is (a) in the database (read-only
polling of the SQLite file), (b) on the status topics and (c) on the alert
topic, as an observer sees them. ``db_transactions`` is the stats counter's
delta from before the stop until all were dead.
"""

from __future__ import annotations

import random
import time

from ..context import Context
from ..harness import Result, bench, db_count, start_ready
from ..load import LoadProcess, runtime_id

INTERVAL, GRACE = 5.0, 1.0


def run(ctx: Context) -> Result:
    result = Result("mass_death")
    n = 10_000 if ctx.quick else 100_000
    interval, grace = (1.0, 0.5) if ctx.quick else (INTERVAL, GRACE)
    rate = int(n / interval)
    warmup = interval + grace + 1.0
    after = interval + grace + (1.5 if ctx.quick else 4.0)
    stopped = random.Random(7).sample(range(n), n // 10)
    with bench("mass_death") as b, LoadProcess(b.port, n) as load:
        observer = b.observer(alerts=True, status=True)
        db = b.seed(n, interval=interval, grace=grace)
        start_ready(b, db, observer)
        load.start(rate=rate, count=int(rate * (warmup + after)), stops=dict.fromkeys(stopped, warmup))
        time.sleep(warmup - 0.5)
        before = observer.fresh_stats()
        ids = {runtime_id(i) for i in stopped}
        k = len(ids)
        done: dict[str, float] = {}
        limit = time.monotonic() + interval + grace + 30
        while len(done) < 3 and time.monotonic() < limit:
            now = time.monotonic()
            if "db" not in done and db_count(db, "dead") >= k:
                done["db"] = now
            if "status" not in done and len(ids & observer.status_dead.keys()) >= k:
                done["status"] = now
            if "alerts" not in done and len({a.id for a in observer.dead_alerts()} & ids) >= k:
                done["alerts"] = now
            time.sleep(0.01)
        stats = observer.fresh_stats()
        report = load.report(after + 60)
    last_deadline = max(report.last_sent[i] for i in stopped) + interval + grace
    first_deadline = min(report.last_sent[i] for i in stopped) + interval + grace
    after_s = {key: round(t - last_deadline, 3) for key, t in done.items()}
    worst = max(after_s.values()) if len(after_s) == 3 else float("inf")
    tx = stats["db_transactions"] - before["db_transactions"]
    result.add("all_dead_after_s", worst, "≤ 1 s", worst <= 1.0, "s")
    result.add("db_transactions", tx, f"batched: ≤ {max(1, k // 10):,} (verdicts ÷ 10)", tx <= max(1, k // 10))
    result.extra.update(
        runtimes=n,
        stopped=k,
        rate_per_s=rate,
        db_after_s=after_s.get("db"),
        status_after_s=after_s.get("status"),
        alerts_after_s=after_s.get("alerts"),
        deadline_spread_s=round(last_deadline - first_deadline, 3),
        false_dead=stats["states"]["dead"] - k,
    )
    result.notes.append(
        f"{k:,} of {n:,} stopped at once (deadlines spread over {last_deadline - first_deadline:.2f} s); after the "
        f"last deadline: db {after_s.get('db')} s, status {after_s.get('status')} s, alerts {after_s.get('alerts')} s; "
        f"{tx} transactions; dead in stats {stats['states']['dead']}"
    )
    return result

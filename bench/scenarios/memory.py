"""``memory``: orchestrator RSS with 100,000 runtimes minus RSS with none, per runtime.

Each RSS (VmRSS) is read after start-up settled; with runtimes, after every one
of them pulsed once (the unknown -> alive wave) and the process went idle again.
"""

from __future__ import annotations

from ..context import Context
from ..harness import Result, bench, rss_bytes, start_ready, wait_idle, wait_settled
from ..load import LoadProcess


def run(ctx: Context) -> Result:
    result = Result("memory")
    n = 5_000 if ctx.quick else 100_000
    with bench("memory") as b:
        observer = b.observer()
        orch, _ = start_ready(b, b.seed(0, interval=60, grace=60, name="empty.db"), observer)
        wait_idle(orch.pid, hold=ctx.idle_hold)
        rss_empty = rss_bytes(orch.pid)
        orch.stop()
        orch, _ = start_ready(b, b.seed(n, interval=60, grace=60), observer)
        wait_idle(orch.pid, hold=ctx.idle_hold)
        rss_loaded = rss_bytes(orch.pid)
        base = observer.fresh_stats()["pulses"]
        with LoadProcess(b.port, n, connections=1) as load:
            load.run(rate=min(50_000, 5 * n), count=n)
        observer.wait(lambda o: o.stats.get("pulses", 0) >= base + n, 60)
        wait_settled(orch.pid, observer, hold=ctx.idle_hold)
        rss_full = rss_bytes(orch.pid)
        alive = observer.fresh_stats()["states"]["alive"]
        orch.stop()
    per = (rss_full - rss_empty) / n
    result.add("bytes_per_runtime", round(per), "≤ 1,000", per <= 1000, "B")
    result.extra.update(
        runtimes=n,
        rss_empty_bytes=rss_empty,
        rss_loaded_bytes=rss_loaded,
        rss_after_pulses_bytes=rss_full,
        loaded_bytes_per_runtime=round((rss_loaded - rss_empty) / n),
        alive=alive,
    )
    result.notes.append(
        f"RSS empty {rss_empty / 2**20:.1f} MiB, {n:,} loaded {rss_loaded / 2**20:.1f} MiB, "
        f"after one pulse each {rss_full / 2**20:.1f} MiB ({alive:,} alive)"
    )
    return result

"""``startup``: from process start until the orchestrator is subscribed and judging (its live ``online`` state).

Measured with 100,000 runtimes in SQLite (quick: 10,000) and, beside it, with none.
"""

from __future__ import annotations

from ..context import Context
from ..harness import Result, bench, start_ready


def run(ctx: Context) -> Result:
    result = Result("startup")
    n = 10_000 if ctx.quick else 100_000
    with bench("startup") as b:
        observer = b.observer()
        empty_db = b.seed(0, interval=5, grace=5, name="empty.db")
        orch, empty_s = start_ready(b, empty_db, observer)
        orch.stop()
        db = b.seed(n, interval=5, grace=5)
        orch, ready_s = start_ready(b, db, observer)
        orch.stop()
    result.add("ready_s", round(ready_s, 3), "≤ 3 s", ready_s <= 3.0, "s")
    result.extra["empty_ready_s"] = round(empty_s, 3)
    result.extra["runtimes"] = n
    result.notes.append(
        f"{n:,} runtimes: {ready_s:.2f} s; no runtimes: {empty_s:.2f} s (process start to live 'online' observed)"
    )
    return result

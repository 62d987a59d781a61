"""``registration``: a fleet registering at once, on a Mosquitto with its default limits.

Three phases, each with a fresh orchestrator and database:

* ``sqlite``: 100,000 (quick 5,000) retained QoS 1 interval requests at once
  (:func:`bench.fleet.registering`, 16 connections), nothing else;
* ``postgresql``: the same on PostgreSQL (a fresh database on
  ``HEARTBEAT_BENCH_PG``, default the server on 127.0.0.1:5432; the phase is
  reported as not run if none answers);
* ``under_load``: 5,000 (quick 1,000) at once while 50,000 (quick 5,000)
  registered runtimes pulse at 10,000/s (quick 2,000/s), on SQLite.

Each reports throughput (replies per second, from the first request sent to
the last reply), reply latency from when each request was sent (p50, p99,
max), and how many never got a reply within 30 s (lost) and how many the
database holds. Targets: none lost, every reply within 10 s.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..context import Context
from ..fleet import ReplyListener, fleet_ids, registering
from ..harness import Result, bench, start_ready
from ..load import LoadProcess
from ..processes import PG_ADMIN_DEFAULT, scratch_database

PG_ADMIN = os.environ.get("HEARTBEAT_BENCH_PG", PG_ADMIN_DEFAULT)
_WAIT = 30.0
"""Seconds a request may go unanswered before it counts as lost."""


@dataclass
class Phase:
    name: str
    requests: int
    replies: int
    per_s: float
    p50_s: float
    p99_s: float
    max_s: float
    stored: int

    @property
    def lost(self) -> int:
        return self.requests - self.replies


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("inf")


def _register(port: int, ids: list[str], listener: ReplyListener, name: str, stored: Callable[[], int]) -> Phase:
    """Send every request at once, wait for the replies, and measure."""
    started = time.monotonic()
    with registering(port, ids, interval=30, grace=30) as sent:
        listener.wait(ids, _WAIT)
    times = sorted(listener.replies[i][0] - sent[i] for i in ids if i in listener.replies)
    last = max((listener.replies[i][0] for i in ids if i in listener.replies), default=started)
    return Phase(
        name,
        len(ids),
        len(times),
        len(times) / max(1e-9, last - started),
        _quantile(times, 0.5),
        _quantile(times, 0.99),
        times[-1] if times else float("inf"),
        stored(),
    )


def _count_rows(db: str) -> int:
    from orchestrator.store import Store

    store = Store(db)
    try:
        store.open()
        return len(store.load())
    finally:
        store.close()


def _phase(ctx: Context, name: str, n: int, db: str | None = None, *, pulsing: int = 0, rate: float = 0) -> Phase:
    with bench(f"registration-{name}", broker_defaults=True) as b:
        observer = b.observer()
        path = b.seed(pulsing, interval=60, grace=60)
        url = db or f"sqlite:///{path}"
        start_ready(b, url, observer)
        listener = ReplyListener(b.port)
        b.on_close(listener.close)
        load = None
        if pulsing:
            load = LoadProcess(b.port, pulsing)
            b.on_close(load.close)
            load.start(rate=rate, count=int(rate * 120))
            time.sleep(3)  # pulses flowing before the fleet comes
        ctx.say(f"registration {name}: {n:,} at once" + (f", {pulsing:,} pulsing at {rate:,.0f}/s" if pulsing else ""))
        phase = _register(b.port, fleet_ids(n), listener, name, lambda: _count_rows(url) - pulsing)
        if load is not None:
            load.halt()
    return phase


def run(ctx: Context) -> Result:
    result = Result("registration")
    n = 5_000 if ctx.quick else 100_000
    phases = [_phase(ctx, "sqlite", n)]
    with contextlib.ExitStack() as stack:
        try:
            pg = stack.enter_context(scratch_database(PG_ADMIN, "hb_bench"))
        except Exception as exc:  # no psycopg2, or no server answers
            result.notes.append(f"postgresql: not run, no server at {PG_ADMIN} ({type(exc).__name__})")
        else:
            phases.append(_phase(ctx, "postgresql", n, pg))
    pulsing, rate = (5_000, 2_000.0) if ctx.quick else (50_000, 10_000.0)
    phases.append(_phase(ctx, "under_load", 1_000 if ctx.quick else 5_000, pulsing=pulsing, rate=rate))
    lost = sum(p.lost for p in phases)
    worst = max(p.max_s for p in phases)
    result.add("lost", lost, "0", lost == 0)
    if lost:  # a request never answered is not answered within 10 s, whatever the answered ones took
        result.add("max_reply_s", "never", "≤ 10 s", False)
    else:
        result.add("max_reply_s", round(worst, 3), "≤ 10 s", worst <= 10.0, "s")
    for p in phases:
        result.extra[p.name] = {
            "requests": p.requests,
            "replies": p.replies,
            "per_s": round(p.per_s),
            "p50_s": round(p.p50_s, 3),
            "p99_s": round(p.p99_s, 3),
            "max_s": round(p.max_s, 3),
            "stored": p.stored,
        }
        result.notes.append(
            f"{p.name}: {p.requests:,} at once, {p.replies:,} replies ({p.lost:,} lost), {p.per_s:,.0f}/s, "
            f"reply p50 {p.p50_s:.2f} s, p99 {p.p99_s:.2f} s, max {p.max_s:.2f} s; {p.stored:,} stored"
        )
    return result

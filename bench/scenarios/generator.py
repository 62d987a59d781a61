"""The load generator's own capacity, measured before anything relies on it.

* ``unpaced_per_s``: pulses per second written flat out into Mosquitto with no subscriber
  (the broker's input path is the limit, not the generator);
* ``cpu_at_100k``: the generator's CPU (fraction of one core) while pacing 100k pulses/s;
* ``end_to_end_per_s``: flat out with ``mosquitto_sub`` subscribed, counted until the last arrived.
"""

from __future__ import annotations

import time

from ..consumers import MosquittoSub
from ..context import Context
from ..harness import Result, bench, cpu_seconds, wait_idle
from ..load import LoadProcess


def run(ctx: Context) -> Result:
    result = Result("generator")
    n = 10_000 if ctx.quick else 100_000
    count = 300_000 if ctx.quick else 2_000_000
    with bench("generator") as b, LoadProcess(b.port, n) as load:
        report = load.run(rate=0, count=count)
        result.add("unpaced_per_s", round(report.achieved_per_s), "informational", unit="/s")
        pid = load.process.pid
        assert pid is not None
        cpu0 = cpu_seconds(pid)
        paced = load.run(rate=100_000, count=100_000 if ctx.quick else 500_000)
        cpu = (cpu_seconds(pid) - cpu0) / (paced.ended - paced.started)
        result.add("cpu_at_100k", round(cpu, 3), "< 0.25 core", cpu < 0.25, unit="core")
        result.extra["paced_100k_achieved_per_s"] = round(paced.achieved_per_s)
        # Unpaced, the generator's sockets take megabytes the broker has not read yet: let it read
        # them before subscribing, or the count below would include them.
        wait_idle(b.mosquitto.process.pid, hold=ctx.idle_hold, timeout=120)
        sub = MosquittoSub(b.port)
        try:
            base = sub.count()
            flat = load.run(rate=0, count=count // 2)
            deadline = time.monotonic() + 60
            while sub.count() - base < flat.sent and time.monotonic() < deadline:
                sub.nudge()
                time.sleep(0.02)
            got = sub.count() - base
            took = time.monotonic() - flat.started
            result.add("end_to_end_per_s", round(got / took), "informational", unit="/s")
            result.extra["end_to_end_lossless"] = got == flat.sent
        finally:
            sub.close()
    result.notes.append(
        f"generator: {n:,} pre-encoded 42-byte PUBLISH packets, {load.connections} TCP connections, "
        "batches of ≤1000 per sendall; unpaced_per_s is what it writes into its sockets, whose buffers "
        "hold far more than the broker reads meanwhile (end_to_end_per_s is through the broker)"
    )
    return result

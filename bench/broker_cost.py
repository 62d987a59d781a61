"""``python -m bench.broker_cost CONSUMER RATE [SECONDS]``: what Mosquitto spends carrying pulses to one consumer.

The ingest ceiling is Mosquitto's one thread, so what a consumer costs the
broker decides how far it can go. This offers ``RATE`` pulses/s for
``SECONDS`` to a Mosquitto of its own with one consumer (``orchestrator``
with 100,000 runtimes, ``mosquitto_sub`` or ``paho``) and prints, over the
middle of the run: Mosquitto's CPU per pulse, its read and write calls per
pulse (``/proc/PID/io``), and, from ``ss``, how many bytes each TCP segment
to the consumer carried and how many were sent again (the consumer's socket
dropped them). It is the tool behind the broker figures in
docs/performance.md; it asserts nothing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .consumers import Consumer, MosquittoSub, OrchestratorCounter, PahoSubscriber
from .context import Context
from .harness import Bench, bench, cpu_seconds, raise_nofile
from .load import LoadProcess
from .scenarios.ingest import start_warm
from .search import wait_counted

RUNTIMES = 100_000


@dataclass(frozen=True)
class Sample:
    cpu_s: float
    reads: int
    writes: int
    bytes_out: int
    segments_out: int
    bytes_retransmitted: int

    def __sub__(self, other: Sample) -> Sample:
        return Sample(*(getattr(self, f) - getattr(other, f) for f in self.__dataclass_fields__))


def _syscalls(pid: int) -> tuple[int, int]:
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["syscr"]), int(fields["syscw"])


def _busiest_connection(port: int) -> tuple[int, int, int]:
    """(bytes sent, data segments sent, bytes retransmitted) of the broker's connection that sent the most."""
    out = subprocess.run(["ss", "-tin", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    best = (0, 0, 0)
    for m in re.finditer(r"bytes_sent:(\d+)(.*?)data_segs_out:(\d+)", out):
        retrans = re.search(r"bytes_retrans:(\d+)", m.group(2))
        row = (int(m.group(1)), int(m.group(3)), int(retrans.group(1)) if retrans else 0)
        best = max(best, row)
    return best


def sample(b: Bench) -> Sample:
    pid = b.mosquitto.process.pid
    return Sample(cpu_seconds(pid), *_syscalls(pid), *_busiest_connection(b.port))


def _consumer(kind: str, b: Bench, load: LoadProcess) -> Consumer:
    if kind == "mosquitto_sub":
        return MosquittoSub(b.port)
    if kind == "paho":
        return PahoSubscriber(b.port)
    orch, observer = start_warm(Context(quick=False), b, load, RUNTIMES)
    return OrchestratorCounter(observer, orch.pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("consumer", choices=["orchestrator", "mosquitto_sub", "paho"])
    parser.add_argument("rate", type=int, help="pulses per second offered")
    parser.add_argument(
        "seconds", type=float, nargs="?", default=10.0, help="default 10; the first and last second are not counted"
    )
    args = parser.parse_args(argv)
    raise_nofile()
    with bench("broker-cost") as b, LoadProcess(b.port, RUNTIMES) as load:
        consumer = _consumer(args.consumer, b, load)
        try:
            base = consumer.count()
            load.start(rate=args.rate, count=int(args.rate * args.seconds))
            time.sleep(1.0)
            before, consumer_before, t0 = sample(b), cpu_seconds(consumer.pid), time.monotonic()
            time.sleep(max(0.5, args.seconds - 2.0))
            d, elapsed = sample(b) - before, time.monotonic() - t0
            consumer_cpu = cpu_seconds(consumer.pid) - consumer_before
            report = load.report(args.seconds * 3 + 30)
            wait_counted(consumer, base + report.sent, 30)
            missing = base + report.sent - consumer.count()
        finally:
            consumer.close()
    pulses = report.achieved_per_s * elapsed
    print(
        f"{args.consumer} at {args.rate:,}/s: offered {report.achieved_per_s:,.0f}/s, "
        f"{'all received' if missing == 0 else f'{missing:,} missing after 30 s'}\n"
        f"  Mosquitto: {d.cpu_s / elapsed:.2f} core, {d.cpu_s / pulses * 1e6:.2f} µs/pulse, "
        f"{d.reads / pulses:.2f} reads and {d.writes / pulses:.2f} writes per pulse\n"
        f"  to the consumer: {d.bytes_out / max(1, d.segments_out):.0f} bytes per TCP segment, "
        f"{d.bytes_retransmitted:,} bytes retransmitted\n"
        f"  consumer: {consumer_cpu / elapsed:.2f} core"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

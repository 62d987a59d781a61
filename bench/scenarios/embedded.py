"""``embedded``: the ingest search on the embedded amqtt broker, beside a bare paho subscriber on amqtt.

The orchestrator runs without ``--broker`` (``--listen 127.0.0.1:PORT``): it
starts the amqtt broker as its child process and, amqtt speaking MQTT 3.1.1
only, pulses ride its general client. Its count is read from its
``/metrics`` endpoint, as the baseline's is read in its own process: on
amqtt the stats topic would bring it late (see ``MetricsCounter``). The
baseline is a bare paho subscriber on the same broker process started
alone (``python -m orchestrator.broker``, the very command the orchestrator
runs). 100,000 runtimes (quick 5,000), interval = grace = 3600 s.
"""

from __future__ import annotations

import subprocess

from orchestrator.broker import broker_command, child_env, free_port, wait_for_port

from ..consumers import MetricsCounter, PahoSubscriber
from ..context import Context
from ..harness import Result, bench, child_pids, wait_settled
from ..load import LoadProcess
from ..processes import stop_process
from ..search import search

LADDER = [2_000, 4_000, 8_000, 12_000, 16_000, 24_000, 32_000, 48_000, 64_000]
QUICK_LADDER = [12_000]


def run(ctx: Context) -> Result:
    result = Result("embedded")
    n = 5_000 if ctx.quick else 100_000
    window = 0.5 if ctx.quick else 30.0
    ladder = QUICK_LADDER if ctx.quick else LADDER
    with bench("embedded") as b:
        port = free_port()
        broker = subprocess.Popen(  # it stops when its stdin closes
            broker_command("127.0.0.1", port),
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port)
            paho = PahoSubscriber(port)
            try:
                with LoadProcess(port, n) as load:
                    baseline = search(load, paho, quick=ctx.quick, window=window, ladder=ladder, idle=[broker.pid])
            finally:
                paho.close()
        finally:
            stop_process(broker)
        ctx.say(f"paho on amqtt: {baseline.best:,}/s ({baseline.summary()})")

        port, http = free_port(), free_port()
        orch = b.orchestrator(
            b.seed(n, interval=3600, grace=3600),
            broker=None,
            listen=f"127.0.0.1:{port}",
            extra={"http": f"127.0.0.1:{http}"},
        )
        wait_for_port(port, 120)
        observer = b.observer(port)
        observer.fresh_stats(120)
        with LoadProcess(port, n) as load:
            load.run(rate=min(20_000, 2 * n), count=n)
            observer.wait(lambda o: o.stats.get("pulses", 0) >= n, 120)
            wait_settled(orch.pid, observer, hold=ctx.idle_hold)

            def check() -> str:
                dead = observer.stats.get("states", {}).get("dead", 0)
                return f"{dead} dead" if dead else ""

            counter = MetricsCounter(f"http://127.0.0.1:{http}/metrics", orch.pid)  # not via the broker
            b.on_close(counter.close)
            found = search(
                load,
                counter,
                quick=ctx.quick,
                window=window,
                quiet=1.2,
                check=check,
                ladder=ladder,
                idle=child_pids(orch.pid),  # its amqtt broker
            )
        ctx.say(f"orchestrator on amqtt: {found.best:,}/s ({found.summary()})")
    ratio = found.best / baseline.best if baseline.best else 0.0
    result.add("pulses_per_s", found.best, f"held {window:g} s, 0 lost", found.best > 0, "/s")
    result.add("baseline_per_s", baseline.best, "bare paho on amqtt", unit="/s")
    result.add("ratio", round(ratio, 2), "≥ 0.9", ratio >= 0.9)
    result.extra.update(runtimes=n, window_s=window)
    result.notes.append(f"orchestrator steps: {found.summary()}")
    result.notes.append(f"paho steps: {baseline.summary()}")
    return result

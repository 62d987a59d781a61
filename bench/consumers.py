"""Pulse consumers the ingest search compares, each counting exactly what it received.

* :class:`OrchestratorCounter`: the orchestrator's own ``pulses`` counter (stats topic);
* :class:`MetricsCounter`: the same counter read over HTTP (``/metrics``), off the broker;
* :class:`PahoSubscriber`: a bare paho-mqtt 2.x subscriber (callback API v2) in a child
  process, counting in ``on_message``;
* :class:`MosquittoSub`: ``mosquitto_sub -F %t`` piped to a thread here that counts the
  pulse lines (its stdout is block-buffered, so after a run probe messages on a side
  topic push the last block out).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.sharedctypes
import shutil
import subprocess
import threading
import time
import urllib.request
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from .harness import StatsObserver
from .processes import TOPICS, stop_process

MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
PULSES = TOPICS.pulse_filter
_PROBE = "bench/flush/" + "x" * 100


class Consumer(Protocol):
    name: str
    pid: int
    """The process that does the consuming, for its CPU figures."""

    def count(self) -> int: ...

    def nudge(self) -> None:
        """Make buffered counts visible (called while waiting for the drain)."""

    def close(self) -> None: ...


class OrchestratorCounter:
    name = "orchestrator"

    def __init__(self, observer: StatsObserver, pid: int) -> None:
        self.observer = observer
        self.pid = pid

    def count(self) -> int:
        return int(self.observer.stats.get("pulses", 0))

    def nudge(self) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsCounter:
    """The orchestrator's ``pulses`` counter, polled from its ``/metrics`` endpoint every 50 ms.

    For a broker that queues every publish in one line (amqtt): the stats
    message waits behind the very pulse backlog it reports, so a count read
    from the stats topic arrives as late as the broker is behind, and the
    search saw twice the real lag (the embedded search cut the orchestrator's
    steps at half the backlog the paho baseline's were allowed).
    """

    name = "orchestrator"

    def __init__(self, url: str, pid: int) -> None:
        self.url = url
        self.pid = pid
        self._count = 0
        self._stop = threading.Event()
        self._poll()
        self._thread = threading.Thread(target=self._run, name="metrics-counter", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        with urllib.request.urlopen(self.url, timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "heartbeat_pulses_received_total":
                    self._count = int(sample.value)
                    return
        raise RuntimeError(f"no heartbeat_pulses_received_total in {self.url}")

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(OSError):  # a slow scrape: the next one tells
                self._poll()

    def count(self) -> int:
        return self._count

    def nudge(self) -> None:
        pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _paho_child(port: int, counter: Any, ready: Any, stop: Any) -> None:
    received = 0

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal received
        received += 1

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        client.subscribe(PULSES, qos=0)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-paho-{time.monotonic_ns()}")
    client.on_message = on_message
    client.on_connect = on_connect
    client.on_subscribe = lambda *a: ready.set()
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    deadline = time.monotonic() + 3600
    while not stop.is_set() and time.monotonic() < deadline:
        counter.value = received
        time.sleep(0.02)
    counter.value = received
    client.disconnect()
    client.loop_stop()


class PahoSubscriber:
    """A bare paho subscriber in its own process; its count is copied to shared memory every 20 ms."""

    name = "paho"

    def __init__(self, port: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._counter = ctx.Value("q", 0, lock=False)
        ready, self._stop = ctx.Event(), ctx.Event()
        self.process = ctx.Process(target=_paho_child, args=(port, self._counter, ready, self._stop), daemon=True)
        self.process.start()
        assert self.process.pid is not None
        self.pid = self.process.pid
        if not ready.wait(30):
            self.close()
            raise TimeoutError("paho subscriber did not subscribe")

    def count(self) -> int:
        return int(self._counter.value)

    def nudge(self) -> None:
        pass

    def close(self) -> None:
        self._stop.set()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class MosquittoSub:
    """``mosquitto_sub -t 'heartbeat/v1/runtimes/+/pulse' -F %t``, counted line by line here."""

    name = "mosquitto_sub"

    def __init__(self, port: int) -> None:
        self._pulses = 0
        self._probes = 0
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(port), "-t", PULSES, "-t", _PROBE, "-F", "%t"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-probe-{time.monotonic_ns()}")
        self._pub.connect("127.0.0.1", port)
        self._pub.loop_start()
        deadline = time.monotonic() + 15
        while self._probes == 0:  # subscribed once a probe comes back
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError("mosquitto_sub did not subscribe")
            self.nudge()
            time.sleep(0.1)

    def _read(self) -> None:
        assert self.process.stdout is not None
        tail = b""
        while True:
            chunk = self.process.stdout.read(1 << 16)
            if not chunk:
                return
            data = tail + chunk
            cut = data.rfind(b"\n") + 1
            whole, tail = data[:cut], data[cut:]
            pulses = whole.count(b"/pulse\n")
            probes = whole.count(b"\n") - pulses
            with self._lock:
                self._pulses += pulses
                self._probes += probes

    def count(self) -> int:
        return self._pulses

    def nudge(self) -> None:
        """Publish enough probe lines (> 4 KiB) to push mosquitto_sub's stdout buffer out."""
        for _ in range(48):
            self._pub.publish(_PROBE, b"", qos=0)

    def close(self) -> None:
        self._pub.disconnect()
        self._pub.loop_stop()
        stop_process(self.process, timeout=5)

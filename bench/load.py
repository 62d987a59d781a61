"""The load generator: pre-encoded MQTT 3.1.1 pulse packets written in batches over raw TCP, paced.

Each runtime's PUBLISH packet is encoded once into one contiguous buffer
(every packet has the same length, IDs are fixed width), so a batch of
consecutive runtimes is a slice of that buffer: sending costs a ``sendall``
per batch and no per-packet Python work. Runtimes pulse round-robin, so at a
rate of ``n / interval`` each one pulses exactly once per interval, evenly
spread. A runtime is "stopped" by rewriting its topic in place to one nobody
subscribes to (same length), so the buffer stays contiguous; the generator
counts exactly how many real pulses it sent and records, for every stopped
runtime, the monotonic time of the batch that carried its last pulse.

The generator runs in a child process (:class:`LoadProcess`) so it never
shares a core's time slice with the process that measures.
"""

from __future__ import annotations

import array
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from runtime_agent.protocol import Topics

TOPICS = Topics()
_LIVE = b"/runtimes/"
_VOID = b"/silenced/"  # same length: a stopped runtime's slot goes to a topic nobody reads


def runtime_id(index: int) -> str:
    """``rt-0000042``: fixed width, so every pulse packet has the same length (up to 10 million IDs)."""
    return f"rt-{index:07d}"


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def encode_publish(
    topic: str, payload: bytes = b"", *, qos: int = 0, retain: bool = False, packet_id: int = 1
) -> bytes:
    """An MQTT 3.1.1 PUBLISH packet."""
    body = _string(topic.encode()) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | (qos << 1) | int(retain)]) + _remaining_length(len(body)) + body


def encode_connect(
    client_id: str,
    *,
    keepalive: int = 0,
    will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:
    """An MQTT 3.1.1 CONNECT packet (clean session), optionally with a last will ``(topic, payload, qos, retain)``."""
    flags = 0x02
    payload = _string(client_id.encode())
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _string(topic.encode()) + _string(message)
    body = _string(b"MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload
    return b"\x10" + _remaining_length(len(body)) + body


def connect(port: int, client_id: str, *, timeout: float = 10.0) -> socket.socket:
    """A raw MQTT 3.1.1 connection to 127.0.0.1:port, CONNACK checked, no keepalive."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    sock.sendall(encode_connect(client_id))
    connack = b""
    while len(connack) < 4:
        chunk = sock.recv(4 - len(connack))
        if not chunk:
            raise ConnectionError("broker closed the connection before CONNACK")
        connack += chunk
    if connack[0] != 0x20 or connack[3] != 0:
        raise ConnectionError(f"broker refused the connection: {connack!r}")
    return sock


@dataclass
class RunReport:
    """What one paced run really did."""

    offered_per_s: float
    sent: int
    """Real pulses written (pulses of stopped runtimes excluded)."""
    packets: int
    """Every packet written, including the stopped runtimes' diverted ones."""
    started: float
    ended: float
    last_sent: dict[int, float] = field(default_factory=dict)
    """Stopped runtime index -> monotonic time of the batch that carried its last real pulse."""

    @property
    def achieved_per_s(self) -> float:
        return self.packets / max(1e-9, self.ended - self.started)


class _Generator:
    """Lives in the child: the sockets, the packet buffer and the paced loop."""

    def __init__(
        self,
        port: int,
        n: int,
        connections: int,
        shuffled: bool = False,
        halt: multiprocessing.synchronize.Event | None = None,
    ) -> None:
        self.n = n
        self.halt = halt
        """A multiprocessing Event: set, the run in progress stops after its current batch."""
        order = list(range(n))
        if shuffled:
            random.Random(n).shuffle(order)
        topics = [TOPICS.pulse(runtime_id(i)) for i in order]
        packets = [encode_publish(t) for t in topics]
        self.size = len(packets[0])
        assert all(len(p) == self.size for p in packets)
        self.buffer = bytearray(b"".join(packets))
        self.view = memoryview(self.buffer)
        self.topic_offset = packets[0].index(_LIVE)
        self.socks = [connect(port, f"bench-load-{i}-{time.monotonic_ns()}") for i in range(connections)]

    def _set_live(self, index: int, live: bool) -> None:
        at = index * self.size + self.topic_offset
        self.buffer[at : at + len(_LIVE)] = _LIVE if live else _VOID

    def run(
        self,
        *,
        rate: float,
        count: int,
        offset: int = 0,
        stops: dict[int, float] | None = None,
        batch: int = 1000,
        tick: float = 0.005,
        time_limit: float = 600.0,
    ) -> RunReport:
        """Send ``count`` packets round-robin from runtime ``offset``, at ``rate`` per second (0: flat out).

        ``stops`` maps a runtime index to when (seconds after the start) it stops pulsing for good.
        """
        n, size, view = self.n, self.size, self.view
        socks = self.socks
        pending_stops = sorted((at, index) for index, at in (stops or {}).items())
        track = bool(pending_stops)
        last_time = array.array("d", bytes(8 * n)) if track else None
        sent_before: dict[int, int] = {}
        last_real: dict[int, float] = {}
        burst = max(1, min(batch, int(rate * tick))) if rate else batch
        t0 = time.monotonic()
        packets = 0
        cursor = offset % n
        which = 0
        halt = self.halt
        while packets < count:
            now = time.monotonic()
            elapsed = now - t0
            if elapsed > time_limit or (halt is not None and halt.is_set()):
                break
            while pending_stops and pending_stops[0][0] <= elapsed:
                _, index = pending_stops.pop(0)
                self._set_live(index, False)
                sent_before[index] = _sends_of(index, packets, offset, n)
                if last_time is not None:
                    last_real[index] = last_time[index]
            if rate:
                due = min(count, int(elapsed * rate) + 1)
                if due - packets < burst and due < count:
                    next_at = (packets + burst) / rate
                    time.sleep(max(0.0, min(tick, next_at - elapsed)))
                    continue
                k = min(batch, due - packets)
            else:
                k = min(batch, count - packets)
            k = min(k, n - cursor)  # a batch never wraps around the buffer
            if last_time is not None:
                last_time[cursor : cursor + k] = array.array("d", [now]) * k
            socks[which].sendall(view[cursor * size : (cursor + k) * size])
            which = (which + 1) % len(socks)
            packets += k
            cursor = (cursor + k) % n
        ended = time.monotonic()
        voided = 0
        last_sent: dict[int, float] = {}
        for index, before in sent_before.items():
            voided += _sends_of(index, packets, offset, n) - before
            last_sent[index] = last_real[index]
            self._set_live(index, True)
        return RunReport(rate, packets - voided, packets, t0, ended, last_sent)

    def close(self) -> None:
        for sock in self.socks:
            try:
                sock.sendall(b"\xe0\x00")  # DISCONNECT
                sock.close()
            except OSError:
                pass


def _sends_of(index: int, upto: int, offset: int, n: int) -> int:
    """How many of the first ``upto`` packets (round-robin from ``offset``) were runtime ``index``'s."""
    first = (index - offset) % n
    return 0 if upto <= first else (upto - first - 1) // n + 1


def _child(
    conn: multiprocessing.connection.Connection,
    port: int,
    n: int,
    connections: int,
    shuffled: bool,
    halt: multiprocessing.synchronize.Event,
) -> None:
    try:
        generator = _Generator(port, n, connections, shuffled, halt)
    except Exception as exc:
        conn.send(("error", repr(exc)))
        return
    conn.send(("ready", generator.size))
    while True:
        command, kwargs = conn.recv()
        if command == "close":
            generator.close()
            conn.send(("closed", None))
            return
        try:
            conn.send(("report", generator.run(**kwargs)))
        except Exception as exc:
            conn.send(("error", repr(exc)))
            return


CONNECTIONS = 16
"""Connections the pulses are spread over, unless a scenario says otherwise.

Mosquitto 2.0 reads one packet per ready socket per turn of its event loop,
so the number of connections bounds what it takes in: with 2, at most two
pulses a turn, and it took in only 111,000-126,000 pulses/s while 0.3 of its
core stayed idle; with 16, all of 160,000/s at 0.71-0.80 core and all of
220,000/s (``python -m bench.broker_cost orchestrator RATE 10``, EPYC,
2026-11-29). A fleet has a connection per runtime, so few connections made
the generator, not the consumer, the bound (docs/performance.md)."""


class LoadProcess:
    """A generator child for ``n`` runtimes: ``run(...)`` as often as needed, then ``close()``.

    The round robin goes in ID order, or with ``shuffled`` in one fixed
    shuffled order, as a real fleet's pulses come; indices (``offset``,
    ``stops``, ``last_sent``) then count places in that order.
    """

    def __init__(self, port: int, n: int, *, connections: int = CONNECTIONS, shuffled: bool = False) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._halt = ctx.Event()
        self.process = ctx.Process(target=_child, args=(child, port, n, connections, shuffled, self._halt), daemon=True)
        self.process.start()
        self.n = n
        self.connections = connections
        kind, value = self._recv(120)
        if kind != "ready":
            raise RuntimeError(f"load generator failed to start: {value}")
        self.packet_size = int(value)

    def _recv(self, timeout: float) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.5):
            if not self.process.is_alive():
                raise RuntimeError(f"load generator died (exit code {self.process.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"load generator silent for {timeout} s")
        kind, value = self._conn.recv()
        return str(kind), value

    def start(self, **kwargs: Any) -> None:
        """Begin a run (see ``_Generator.run``); collect it with :meth:`report`."""
        self._halt.clear()
        self._conn.send(("run", kwargs))

    def halt(self) -> None:
        """Stop the run in progress early (after its current batch); its report says what was sent."""
        self._halt.set()

    def finished(self, timeout: float = 0.0) -> bool:
        """Whether the run's report is ready to collect (waiting up to ``timeout`` seconds)."""
        return bool(self._conn.poll(timeout))

    def report(self, timeout: float) -> RunReport:
        kind, value = self._recv(timeout)
        if kind != "report":
            raise RuntimeError(f"load generator failed: {value}")
        assert isinstance(value, RunReport)
        return value

    def run(self, timeout: float | None = None, **kwargs: Any) -> RunReport:
        self.start(**kwargs)
        rate = kwargs.get("rate") or 0
        expected = kwargs["count"] / rate if rate else 60.0
        return self.report(timeout or expected * 3 + 30)

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self._conn.send(("close", None))
                self._recv(10)
            except (OSError, TimeoutError, EOFError):
                pass
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def __enter__(self) -> LoadProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

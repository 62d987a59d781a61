"""Real processes and clients, shared by the benchmarks and the end-to-end tests (``tests/harness.py``).

Everything here starts real things (Mosquitto, ``python -m orchestrator``,
``python -m runtime_agent``, paho clients, a scratch PostgreSQL database) and
talks to them over loopback only. It does not import pytest, so that
``python -m bench`` runs without it; the tests add what is pytest's
(fixtures, skips) in ``tests/harness.py`` and ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from orchestrator.broker import child_env, wait_for_port
from runtime_agent import protocol

PREFIX = protocol.DEFAULT_PREFIX
TOPICS = protocol.Topics(PREFIX)
ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
"""The machine's PostgreSQL (trust auth) where scratch databases are made, unless an environment variable says."""


def process_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child Python process: ours, this checkout importable first, output unbuffered."""
    return {**child_env(), "PYTHONUNBUFFERED": "1", **(extra or {})}


def stop_process(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 20.0) -> bool:
    """Send ``sig`` (if it still runs) and wait up to ``timeout``, then SIGKILL; whether it stopped by itself."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        return False


# --- Mosquitto -------------------------------------------------------------------


@dataclass
class MosquittoBroker:
    """A Mosquitto process of our own; ``url`` is what ``--broker`` takes."""

    port: int
    process: subprocess.Popen[bytes]
    conf: Path

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.process)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each is held open until all are picked, so none is handed out twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def launch_mosquitto(
    directory: Path, conf_for: Callable[[list[int]], str], count: int = 1, *, ports: list[int] | None = None
) -> MosquittoBroker:
    """Mosquitto on ``conf_for(ports)``, listening on every port; ``MosquittoBroker.port`` is the first.

    Without ``ports`` it picks fresh ones, and picks again (three tries) when
    Mosquitto exits at start: another process on the machine can take a free
    port between our pick and Mosquitto's bind, which made a test fail at
    setup once in a few hundred runs.
    """
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise FileNotFoundError("mosquitto is not installed: `apt-get install mosquitto` (.ci/run does this)")
    tries = 1 if ports else 3
    for _ in range(tries):
        chosen = ports or free_ports(count)
        conf = directory / f"mosquitto-{chosen[0]}.conf"
        conf.write_text(conf_for(chosen))
        process = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if all(_listens(process, port) for port in chosen) and process.poll() is None:
            return MosquittoBroker(chosen[0], process, conf)  # listening, and not someone else on our port
        process.kill()
        process.wait(5)
    raise TimeoutError(f"Mosquitto did not listen on its ports after {tries} tries; see {directory}/*.log")


def _listens(process: subprocess.Popen[bytes], port: int, timeout: float = 10.0) -> bool:
    """Whether ``port`` accepts connections before ``process`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(TimeoutError):
            wait_for_port(port, timeout=0.5)
            return True
    return False


def start_mosquitto(directory: Path, port: int | None = None, extra: str = "") -> MosquittoBroker:
    """Plain anonymous Mosquitto on loopback, logging to ``mosquitto-PORT.log`` in ``directory``.

    Pass ``port`` to start one again where a stopped one was; ``extra`` is
    appended to the configuration.
    """

    def conf(ports: list[int]) -> str:
        return (
            f"listener {ports[0]} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
            f"log_dest file {directory}/mosquitto-{ports[0]}.log\nmax_keepalive 65535\n{extra}"
        )

    return launch_mosquitto(directory, conf, ports=[port] if port else None)


# --- PostgreSQL ------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A fresh, empty database (``PREFIX_<random>``) on the server of ``admin_url``: its URL; dropped afterwards.

    Raises ImportError without psycopg2, and psycopg2's error when the server
    does not answer within 5 s or refuses.
    """
    import psycopg2

    admin = psycopg2.connect(admin_url, connect_timeout=5)
    try:
        admin.autocommit = True
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
        finally:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


# --- MQTT clients ------------------------------------------------------------------------


class Subscriber:
    """A paho client on a thread of its own, subscribed at QoS 1 to :meth:`topics`; a subclass records messages.

    It reconnects and resubscribes by itself, so it survives a broker's
    restart; the constructor returns once the first SUBACK came. A subclass
    sets the state its callbacks use before calling ``super().__init__``: they
    run on paho's thread from then on, and record under ``self._cond``, which
    waiters wait on.

    ``mqtt5`` (Mosquitto; the embedded amqtt broker speaks only 3.1.1) asks
    for a Receive Maximum of 65,534: Mosquitto otherwise keeps 20 QoS 1
    messages in flight and 1,000 queued per client and drops the rest
    silently, and a subscriber starved of CPU then missed status documents
    (65,534: the codec omits 65,535, which Mosquitto reads as 20).
    """

    def __init__(self, port: int, *, mqtt5: bool = False, name: str = "observer") -> None:
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{name}-{os.getpid()}-{id(self)}",
            protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # typed int, takes seconds as float
        self._client.max_queued_messages_set(0)
        properties = None
        if mqtt5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.ReceiveMaximum = 65534
        self._client.connect_async("127.0.0.1", port, keepalive=60, properties=properties)
        self._client.loop_start()
        if not self._subscribed.wait(15):
            self.close()
            raise TimeoutError(f"{name} could not subscribe on port {port}")

    def topics(self) -> list[str]:
        """The filters to subscribe to (at QoS 1)."""
        return [f"{PREFIX}/#"]

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        client.subscribe([(topic, 1) for topic in self.topics()])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Record ``msg``, under ``self._cond``, and notify it (a subclass's)."""
        raise NotImplementedError

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@dataclass
class Received:
    topic: str
    payload: bytes
    retained: bool
    at: float
    """time.monotonic() when the observer received it."""

    def json(self) -> Any:
        return json.loads(self.payload)


class Observer(Subscriber):
    """A subscriber on the whole tree (or :meth:`topics`), recording every message with its arrival time."""

    def __init__(self, port: int, *, mqtt5: bool = False) -> None:
        self.messages: list[Received] = []
        super().__init__(port, mqtt5=mqtt5)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic()))
            self._cond.notify_all()

    def wait_for(self, match: Callable[[Received], bool], timeout: float, *, after: float = 0.0) -> Received:
        """The first message (received after ``after``) that matches; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if m.at >= after and match(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching message within {timeout} s")
                self._cond.wait(left)

    def alerts(
        self, runtime_id: str | None = None, event: str | None = None, *, after: float = 0.0
    ) -> list[dict[str, Any]]:
        with self._cond:
            found = [m.json() for m in self.messages if m.topic == TOPICS.alerts and m.at >= after]
        return [
            a for a in found if (runtime_id is None or a["id"] == runtime_id) and (event is None or a["event"] == event)
        ]

    def wait_alert(self, runtime_id: str, event: str, timeout: float, *, after: float = 0.0) -> Received:
        def match(m: Received) -> bool:
            if m.topic != TOPICS.alerts:
                return False
            alert = m.json()
            return bool(alert["id"] == runtime_id and alert["event"] == event)

        return self.wait_for(match, timeout, after=after)

    def wait_status(self, runtime_id: str, state: str, timeout: float, *, after: float = 0.0) -> Received:
        topic = TOPICS.status(runtime_id)
        return self.wait_for(
            lambda m: m.topic == topic and bool(m.payload) and m.json()["state"] == state, timeout, after=after
        )


def drop_connection(client: mqtt.Client) -> None:
    """Cut a paho client's TCP connection without DISCONNECT, as a killed process does (the broker sends the will)."""
    sock = client.socket()
    assert isinstance(sock, socket.socket)  # TLS too: an SSLSocket is one
    sock.shutdown(socket.SHUT_RDWR)
    client.loop_stop()


class Runtime:
    """A bare MQTT client acting as a runtime by hand, to send exactly what a test needs."""

    def __init__(
        self, port: int, runtime_id: str, *, mqtt5: bool = False, will_session: int | None = None, connection: int = 0
    ) -> None:
        self.runtime_id = runtime_id
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"rt-{runtime_id}-{os.getpid()}-{connection}"[:64],
            protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
        )
        if will_session is not None:
            self.client.will_set(TOPICS.state(runtime_id), protocol.encode_state("offline", will_session), 1, True)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False, **kw: Any) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain, **kw)
        if qos:
            info.wait_for_publish(5)

    def register(self, interval: float, grace: float | None = None) -> None:
        self.publish(TOPICS.interval(self.runtime_id), protocol.encode_interval(interval, grace), retain=True)

    def pulse(self, payload: bytes = b"") -> None:
        self.publish(TOPICS.pulse(self.runtime_id), payload, qos=0)

    def state(self, state: protocol.ConnectionState, session: int | None) -> None:
        self.publish(TOPICS.state(self.runtime_id), protocol.encode_state(state, session), retain=True)

    def drop(self) -> None:
        """Lose the connection without DISCONNECT, as a killed process does: the broker sends the will."""
        drop_connection(self.client)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- the orchestrator and agents -----------------------------------------------------------


class OrchestratorProcess:
    """``python -m orchestrator run ARGS`` as a separate process, its output appended to ``log_path``.

    ``env`` adds environment variables (e.g. LD_PRELOAD of libfaketime).
    """

    def __init__(self, args: list[str], log_path: Path, *, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        """time.monotonic() at :meth:`start`."""
        self._log: IO[bytes] | None = None

    def start(self) -> Self:
        self._log = self.log_path.open("ab")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "run", *self.args],
            stdout=self._log,
            stderr=self._log,
            env=process_env(self.env),
            cwd=self.log_path.parent,  # its note (heartbeat-orchestrator.json) stays beside its log
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log()[-chars:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Send ``sig``, wait for the exit code; one still running after ``timeout`` is killed: TimeoutError."""
        assert self.process is not None, "not started"
        try:
            if not stop_process(self.process, sig, timeout):
                raise TimeoutError(f"orchestrator did not stop within {timeout} s:\n{self.log_tail()}")
            return self.process.returncode
        finally:
            if self._log:
                self._log.close()


class AgentProcess:
    """``python -m runtime_agent`` as a user runs it; ``registered()`` waits for its confirmation line."""

    def __init__(
        self,
        runtime_id: str,
        interval: float,
        port: int,
        *extra: str,
        grace: float | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        args = ["--id", runtime_id, "--interval", str(interval), "--broker", f"mqtt://127.0.0.1:{port}", *extra]
        if grace is not None:
            args += ["--grace", str(grace)]
        self.runtime_id = runtime_id
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runtime_agent", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=process_env(env),
        )
        self.stdout: list[str] = []
        self._registered = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace")
            self.stdout.append(line)
            if "registered" in line:
                self._registered.set()

    def registered(self, timeout: float = 15) -> None:
        if not self._registered.wait(timeout):
            err = self.process.stderr.read().decode() if self.process.poll() is not None and self.process.stderr else ""
            raise TimeoutError(f"agent {self.runtime_id} did not register within {timeout} s: {self.stdout} {err}")

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 10) -> int:
        stop_process(self.process, timeout=timeout)
        return self.process.returncode

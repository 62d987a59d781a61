"""Real processes for end-to-end tests: orchestrator, agents, and an MQTT observer.

Everything here starts real things (``python -m orchestrator``, ``python -m
runtime_agent``, Mosquitto) and talks to them over loopback only.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from orchestrator.broker import free_port, wait_for_port
from runtime_agent import protocol


@dataclass
class MosquittoBroker:
    """A Mosquitto process of the test's own; ``url`` is what ``--broker`` takes."""

    port: int
    process: subprocess.Popen[bytes]
    conf: Path

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


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
        pytest.fail("mosquitto is not installed: `apt-get install mosquitto` (.ci/run does this)")
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
    """Plain anonymous Mosquitto on loopback; pass ``port`` to start one again where a stopped one was."""

    def conf(ports: list[int]) -> str:
        return (
            f"listener {ports[0]} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
            f"log_dest file {directory}/mosquitto-{ports[0]}.log\nmax_keepalive 65535\n{extra}"
        )

    return launch_mosquitto(directory, conf, ports=[port] if port else None)


PREFIX = protocol.DEFAULT_PREFIX
TOPICS = protocol.Topics(PREFIX)
ROOT = Path(__file__).resolve().parent.parent


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def drop_connection(client: mqtt.Client) -> None:
    """Cut a paho client's TCP connection without DISCONNECT, as a killed process does (the broker sends the will)."""
    sock = client.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)
    client.loop_stop()


@dataclass
class Received:
    topic: str
    payload: bytes
    retained: bool
    at: float
    """time.monotonic() when the observer received it."""

    def json(self) -> Any:
        return json.loads(self.payload)


class Observer:
    """A paho client subscribed to the whole tree, recording every message with its arrival time.

    It reconnects (and resubscribes) by itself, so it survives an embedded
    broker's restart.
    """

    def __init__(self, port: int, *, mqtt5: bool = False) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"observer-{os.getpid()}-{id(self)}",
            protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.1, 0.5)
        self._connected = threading.Event()
        properties = None
        if mqtt5:
            # Mosquitto keeps 20 QoS 1 messages in flight and 1,000 queued per client and drops the rest
            # silently; an observer starved of CPU then missed status documents. A large Receive
            # Maximum puts every one in flight (65,534: the codec omits 65,535, which Mosquitto reads as 20).
            properties = Properties(PacketTypes.CONNECT)
            properties.ReceiveMaximum = 65534
        self._client.connect_async("127.0.0.1", port, keepalive=30, properties=properties)
        self._client.loop_start()
        if not self._connected.wait(15):
            raise TimeoutError("observer could not connect")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        client.subscribe(f"{PREFIX}/#", qos=1)
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic()))
            self._cond.notify_all()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

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

    def state(self, state: str, session: int | None) -> None:
        self.publish(TOPICS.state(self.runtime_id), protocol.encode_state(state, session), retain=True)  # type: ignore[arg-type]

    def drop(self) -> None:
        """Lose the connection without DISCONNECT, as a killed process does: the broker sends the will."""
        drop_connection(self.client)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class OrchestratorProcess:
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] | None = None
    """Extra environment variables (e.g. LD_PRELOAD of libfaketime)."""
    _log: Any = field(default=None, repr=False)

    def start(self) -> OrchestratorProcess:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "run", *self.args],
            stdout=self._log,
            stderr=self._log,
            env=_env(self.env),
        )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(f"orchestrator did not stop within {timeout} s:\n{self.log()[-3000:]}") from None
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
            env=_env(env),
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
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)


class Deployment:
    """A broker (embedded in the orchestrator, or a Mosquitto of the test's own) plus a database URL."""

    def __init__(self, kind: str, tmp_path: Path, db_url: str) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.db_url = db_url
        self.mosquitto = start_mosquitto(tmp_path) if kind == "mosquitto" else None
        self.port = self.mosquitto.port if self.mosquitto else free_port()
        self.orchestrators: list[OrchestratorProcess] = []
        self.agents: list[AgentProcess] = []
        self.runtimes: list[Runtime] = []
        self._observer: Observer | None = None

    @classmethod
    @contextlib.contextmanager
    def running(cls, kind: str, tmp_path: Path, db_url: str, *extra: str) -> Iterator[Deployment]:
        """A deployment with its orchestrator (given ``extra`` arguments) started and ready; all stopped afterwards."""
        d = cls(kind, tmp_path, db_url)
        try:
            d.start_orchestrator(*extra)
            yield d
        finally:
            d.close()

    @property
    def mqtt5(self) -> bool:
        """Mosquitto speaks MQTT 5; the embedded amqtt broker only 3.1.1."""
        return self.kind == "mosquitto"

    @property
    def broker_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start_orchestrator(
        self, *extra: str, wait: bool = True, env: dict[str, str] | None = None, log_name: str = "orchestrator.log"
    ) -> OrchestratorProcess:
        args = ["--broker", self.broker_url] if self.mosquitto else ["--listen", f"127.0.0.1:{self.port}"]
        args += ["--db", self.db_url, "--log-level", "DEBUG", *extra]
        proc = OrchestratorProcess(args, self.tmp_path / log_name, env=env).start()
        self.orchestrators.append(proc)
        if wait:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: OrchestratorProcess, timeout: float = 20) -> None:
        """Ready means: the orchestrator's retained state says online, fresh from this process."""
        started = time.monotonic()
        wait_for_port(self.port, timeout)
        observer = self.observer
        try:
            observer.wait_for(
                lambda m: m.topic == TOPICS.orchestrator_state and m.json().get("state") == "online",
                timeout,
                after=started,
            )
        except TimeoutError:
            raise AssertionError(f"orchestrator not ready within {timeout} s:\n{proc.log()[-3000:]}") from None

    @property
    def observer(self) -> Observer:
        if self._observer is None:
            self._observer = Observer(self.port, mqtt5=self.mqtt5)
        return self._observer

    def agent(
        self,
        runtime_id: str,
        interval: float,
        *extra: str,
        grace: float | None = None,
        env: dict[str, str] | None = None,
    ) -> AgentProcess:
        agent = AgentProcess(runtime_id, interval, self.port, *extra, grace=grace, env=env)
        self.agents.append(agent)
        return agent

    def runtime(self, runtime_id: str, **kw: Any) -> Runtime:
        return self.runtime_via(self.port, runtime_id, **kw)

    def runtime_via(self, port: int, runtime_id: str, **kw: Any) -> Runtime:
        """A raw runtime connected to ``port`` (a proxy in front of the broker, say)."""
        rt = Runtime(port, runtime_id, **kw)
        self.runtimes.append(rt)
        return rt

    def status_json(self) -> list[dict[str, Any]]:
        out = subprocess.run(
            [sys.executable, "-m", "orchestrator", "status", "--db", self.db_url, "--json"],
            capture_output=True,
            env=_env(),
            timeout=30,
            check=True,
        )
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        for rt in self.runtimes:
            rt.close()
        if self._observer:
            self._observer.close()
        for proc in self.orchestrators:
            if proc.alive:
                proc.stop()
        if self.mosquitto:
            self.mosquitto.stop()


class PostgresServer:
    """A PostgreSQL 15 of the test's own (initdb + pg_ctl, as the ``postgres`` user), which a test may stop.

    The data directory is a temporary directory outside pytest's (root-only)
    tmp tree, on a free loopback port with trust authentication; never the
    machine's shared server.
    """

    BIN = Path("/usr/lib/postgresql/15/bin")

    def __init__(self) -> None:
        if not (self.BIN / "initdb").exists():
            pytest.skip("PostgreSQL 15 server binaries are not installed")
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="hb-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self._run(str(self.BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
            timeout=120,
        )

    def _ctl(self, *args: str) -> None:
        self._run(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-w", *args)

    def start(self) -> None:
        options = f"-k {self.dir} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-l", str(self.dir / "server.log"), "-o", options, "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._ctl("-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

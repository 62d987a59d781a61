"""Security of the real deployment: TLS, passwords, client certificates and the shipped ACL.

Every test runs against a Mosquitto of its own, configured from the shipped
``config/mosquitto/`` files (paths and ports templated), with a throwaway PKI
from :mod:`tests.pki` and password files made by ``mosquitto_passwd``.

A message that must *not* arrive is proved absent with a fence: the same
publisher then sends a message that is allowed, to the same subscriber; the
broker keeps one publisher's messages in order, so once the fence arrives,
the forged message would have arrived before it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from runtime_agent import Agent, AsyncAgent, ConnectError, protocol

from .harness import ROOT, MosquittoBroker, OrchestratorProcess, drop_connection, launch_mosquitto
from .pki import Authority, Pair

pytestmark = pytest.mark.e2e

SHIPPED = ROOT / "config" / "mosquitto"
TOPICS = protocol.Topics()
ORCHESTRATOR, ADMIN = "hb~orchestrator", "hb~admin"
PASSWORDS = {"rt-a": "pw-a", "rt-b": "pw-b", ORCHESTRATOR: "pw-orchestrator", ADMIN: "pw-admin"}
WAIT = 5.0
"""Longest wait for anything that should happen; refusals are asserted within it, so nothing hangs."""


# --- PKI and broker ----------------------------------------------------------


@dataclass
class Pki:
    ca: Authority
    server: Pair
    foreign: Authority
    clients: dict[str, Pair]
    foreign_client: Pair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority.create(directory, "heartbeat test CA")
    foreign = Authority.create(directory, "foreign CA")
    clients = {name: ca.client(name) for name in ("rt-a", "rt-b", ORCHESTRATOR, ADMIN)}
    return Pki(ca, ca.server(), foreign, clients, foreign.client("rt-b"))


@dataclass
class SecureBroker:
    """The shipped configuration, running: ``runtimes`` (password), ``certs`` (client certificate), ``staff``."""

    runtimes: int
    certs: int
    staff: int
    directory: Path
    process: MosquittoBroker

    def url(self, user: str, *, port: int | None = None, password: bool = True) -> str:
        port = port or (self.staff if user.startswith("hb~") else self.runtimes)
        secret = f":{PASSWORDS[user]}" if password else ""
        return f"mqtts://{user}{secret}@127.0.0.1:{port}"


def _passwd(path: Path, users: list[str]) -> None:
    exe = shutil.which("mosquitto_passwd")
    if exe is None:
        pytest.fail("mosquitto_passwd is missing: it ships with the mosquitto package (`apt-get install mosquitto`)")
    for i, user in enumerate(users):
        subprocess.run([exe, "-b", *(["-c"] if i == 0 else []), str(path), user, PASSWORDS[user]], check=True)


def _start(directory: Path, conf_for: Callable[[list[int]], str], count: int) -> MosquittoBroker:
    # Started as root, Mosquitto drops to the mosquitto user, which cannot read the test's 0700 directory.
    user = "user root\n" if os.geteuid() == 0 else ""
    return launch_mosquitto(
        directory,
        lambda ports: f"{user}{conf_for(ports)}\nlog_dest file {directory}/mosquitto.log\nlog_type all\n",
        count,
    )


def _install_pki(directory: Path, pki: Pki) -> None:
    shutil.copy(pki.ca.cert, directory / "ca.crt")
    shutil.copy(pki.ca.cert, directory / "clients-ca.crt")
    shutil.copy(pki.server.cert, directory / "server.crt")
    shutil.copy(pki.server.key, directory / "server.key")


def shipped_conf(directory: Path, ports: dict[str, int]) -> str:
    """The shipped mosquitto.conf with its paths and ports moved into the test; fails if they are not there."""
    text = (SHIPPED / "mosquitto.conf").read_text()
    replacements = {
        "/etc/mosquitto/heartbeat": str(directory),
        "persistence true": "persistence false",
        "persistence_location /var/lib/mosquitto/": "",
        "listener 8883": f"listener {ports['runtimes']} 127.0.0.1",
        "listener 8884": f"listener {ports['certs']} 127.0.0.1",
        "listener 8885": f"listener {ports['staff']} 127.0.0.1",
    }
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the shipped mosquitto.conf: update this test"
        text = text.replace(old, new)
    return text


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[SecureBroker]:
    """Mosquitto on the shipped mosquitto.conf and acl, with two runtimes, the orchestrator and an admin."""
    directory = tmp_path / "mosquitto"
    directory.mkdir()
    _install_pki(directory, pki)
    shutil.copy(SHIPPED / "acl", directory / "acl")
    _passwd(directory / "runtimes.passwd", ["rt-a", "rt-b"])
    _passwd(directory / "staff.passwd", [ORCHESTRATOR, ADMIN])
    ports: dict[str, int] = {}

    def conf(picked: list[int]) -> str:
        ports.update(zip(("runtimes", "certs", "staff"), picked, strict=True))
        return shipped_conf(directory, ports)

    process = _start(directory, conf, 3)
    try:
        yield SecureBroker(ports["runtimes"], ports["certs"], ports["staff"], directory, process)
    finally:
        process.stop()


# --- an MQTT client that reports exactly what the broker did ---------------------


class Client:
    """A paho client that waits for CONNACK (or its absence) and records what it receives."""

    def __init__(
        self,
        port: int,
        user: str | None = None,
        password: str | None = None,
        *,
        ca: Path | None = None,
        cert: Pair | None = None,
        tls: bool = True,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls:
            self.client.tls_set(
                ca_certs=str(ca) if ca else None,
                certfile=str(cert.cert) if cert else None,
                keyfile=str(cert.key) if cert else None,
            )
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.reason: Any = None
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._answered = threading.Event()
        self._closed = threading.Event()
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: (self._closed.set(), self._answered.set())
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        self._answered.wait(WAIT)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.reason = reason
        self._answered.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, bytes(message.payload)))
            self._cond.notify_all()

    @property
    def accepted(self) -> bool:
        return self.reason is not None and not self.reason.is_failure

    @property
    def disconnected(self) -> bool:
        return self._closed.is_set()

    def subscribe(self, *topics: str) -> Client:
        self._subscribed.clear()
        self.client.subscribe([(t, 1) for t in topics])
        assert self._subscribed.wait(WAIT), "no SUBACK"
        return self

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)

    def wait_for(self, topic: str) -> list[tuple[str, bytes]]:
        """Everything received up to and including the first message on ``topic``."""
        deadline = time.monotonic() + WAIT
        with self._cond:
            while not any(t == topic for t, _ in self.messages):
                left = deadline - time.monotonic()
                assert left > 0, f"nothing on {topic} within {WAIT} s; got {self.messages}"
                self._cond.wait(left)
            end = next(i for i, (t, _) in enumerate(self.messages) if t == topic)
            return self.messages[: end + 1]

    def drop(self) -> None:
        """Lose the connection without DISCONNECT, so the broker processes the will."""
        drop_connection(self.client)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Collects the test's clients and closes them afterwards."""
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def connect(made: list[Client], broker: SecureBroker, pki: Pki, user: str, **kw: Any) -> Client:
    port = broker.staff if user.startswith("hb~") else broker.runtimes
    c = Client(port, user, PASSWORDS[user], ca=pki.ca.cert, **kw)
    made.append(c)
    assert c.accepted, f"{user} was refused: {c.reason}"
    return c


def orchestrator_view(made: list[Client], broker: SecureBroker, pki: Pki) -> Client:
    """A subscriber with the orchestrator's rights, on the orchestrator's subscriptions."""
    return connect(made, broker, pki, ORCHESTRATOR).subscribe(*(t for t, _ in TOPICS.subscriptions()))


# --- refusals ----------------------------------------------------------------


def test_anonymous_client_is_refused(broker: SecureBroker, pki: Pki) -> None:
    c = Client(broker.runtimes, ca=pki.ca.cert)
    assert c.reason is not None
    assert c.reason.getName() == "Not authorized"


def test_wrong_password_is_refused(broker: SecureBroker, pki: Pki) -> None:
    c = Client(broker.runtimes, "rt-a", "wrong", ca=pki.ca.cert)
    assert c.reason is not None
    assert c.reason.getName() == "Not authorized"


def test_runtime_cannot_log_in_on_the_staff_listener(broker: SecureBroker, pki: Pki) -> None:
    c = Client(broker.staff, "rt-a", PASSWORDS["rt-a"], ca=pki.ca.cert)
    assert c.reason is not None
    assert c.reason.getName() == "Not authorized"


def test_plaintext_to_the_tls_port_gets_no_connack(broker: SecureBroker) -> None:
    c = Client(broker.runtimes, "rt-a", PASSWORDS["rt-a"], tls=False)
    assert c.reason is None
    assert c.disconnected


def test_server_certificate_from_a_foreign_ca_is_refused_by_the_client(broker: SecureBroker, pki: Pki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        Client(broker.runtimes, "rt-a", PASSWORDS["rt-a"], ca=pki.foreign.cert)


def test_client_certificate_from_a_foreign_ca_is_refused_by_the_broker(broker: SecureBroker, pki: Pki) -> None:
    try:
        c = Client(broker.certs, ca=pki.ca.cert, cert=pki.foreign_client)
    except (ssl.SSLError, OSError):
        return  # refused in the handshake
    assert not c.accepted  # or (TLS 1.3) refused right after it, before any CONNACK


def test_client_certificate_is_required_on_the_certificate_listener(broker: SecureBroker, pki: Pki) -> None:
    try:
        c = Client(broker.certs, ca=pki.ca.cert)
    except (ssl.SSLError, OSError):
        return
    assert not c.accepted


def test_client_certificate_cn_is_the_user_name(broker: SecureBroker, pki: Pki, clients: list[Client]) -> None:
    view = orchestrator_view(clients, broker, pki)
    c = Client(broker.certs, ca=pki.ca.cert, cert=pki.clients["rt-a"])
    clients.append(c)
    assert c.accepted
    c.publish(TOPICS.pulse("rt-a"), b"")
    assert view.wait_for(TOPICS.pulse("rt-a"))[-1] == (TOPICS.pulse("rt-a"), b"")


# --- the shipped ACL -----------------------------------------------------------

FORGERIES = {
    "pulse": (TOPICS.pulse("rt-b"), b"", False),
    "offline state": (TOPICS.state("rt-b"), protocol.encode_state("offline", 1), True),
    "deregistration": (TOPICS.interval("rt-b"), b"", True),
    "interval": (TOPICS.interval("rt-b"), protocol.encode_interval(60), True),
}


@pytest.mark.parametrize("kind", FORGERIES)
def test_runtime_cannot_publish_as_another(broker: SecureBroker, pki: Pki, clients: list[Client], kind: str) -> None:
    view = orchestrator_view(clients, broker, pki)
    a = connect(clients, broker, pki, "rt-a")
    topic, payload, retain = FORGERIES[kind]
    a.publish(topic, payload, retain=retain)
    a.publish(TOPICS.pulse("rt-a"), b"fence")
    assert [t for t, _ in view.wait_for(TOPICS.pulse("rt-a"))] == [TOPICS.pulse("rt-a")]


def test_runtime_cannot_leave_a_will_for_another(broker: SecureBroker, pki: Pki, clients: list[Client]) -> None:
    view = orchestrator_view(clients, broker, pki)
    connect(clients, broker, pki, "rt-a", will=(TOPICS.state("rt-b"), protocol.encode_state("offline", 1))).drop()
    fence = connect(clients, broker, pki, "rt-a")
    fence.publish(TOPICS.pulse("rt-a"), b"fence")
    assert [t for t, _ in view.wait_for(TOPICS.pulse("rt-a"))] == [TOPICS.pulse("rt-a")]


def test_runtime_cannot_take_over_another_runtimes_client_id(
    broker: SecureBroker, pki: Pki, clients: list[Client]
) -> None:
    """A takeover would disconnect B and fire B's own will: a false death. The broker renames A instead."""
    view = orchestrator_view(clients, broker, pki)
    b = connect(clients, broker, pki, "rt-b", client_id="hb-agent-rt-b", will=(TOPICS.state("rt-b"), b"will of B"))
    a = connect(clients, broker, pki, "rt-a", client_id="hb-agent-rt-b")
    a.publish(TOPICS.pulse("rt-a"), b"fence")
    assert [t for t, _ in view.wait_for(TOPICS.pulse("rt-a"))] == [TOPICS.pulse("rt-a")]
    assert not b.disconnected


def test_runtime_cannot_read_another_runtimes_replies(broker: SecureBroker, pki: Pki, clients: list[Client]) -> None:
    a = connect(clients, broker, pki, "rt-a").subscribe(TOPICS.reply("rt-b"), TOPICS.reply("rt-a"))
    orchestrator = connect(clients, broker, pki, ORCHESTRATOR)
    orchestrator.publish(TOPICS.reply("rt-b"), protocol.encode_reply_ok("rt-b", None))
    orchestrator.publish(TOPICS.reply("rt-a"), protocol.encode_reply_ok("rt-a", None))
    assert [t for t, _ in a.wait_for(TOPICS.reply("rt-a"))] == [TOPICS.reply("rt-a")]


@pytest.mark.parametrize("topic", [TOPICS.alerts, TOPICS.status("rt-b"), TOPICS.orchestrator_state])
def test_runtime_cannot_forge_what_administrators_read(
    broker: SecureBroker, pki: Pki, clients: list[Client], topic: str
) -> None:
    admin = connect(clients, broker, pki, ADMIN).subscribe(topic, TOPICS.orchestrator_stats)
    a = connect(clients, broker, pki, "rt-a")
    a.publish(topic, b'{"forged": true}')
    orchestrator = connect(clients, broker, pki, ORCHESTRATOR)
    orchestrator.publish(TOPICS.orchestrator_stats, b"fence")  # after A's publish was acknowledged
    assert [t for t, _ in admin.wait_for(TOPICS.orchestrator_stats)] == [TOPICS.orchestrator_stats]


@pytest.mark.parametrize("topic", [TOPICS.alerts, TOPICS.status("rt-b"), TOPICS.orchestrator_state])
def test_administrator_reads_what_the_orchestrator_publishes(
    broker: SecureBroker, pki: Pki, clients: list[Client], topic: str
) -> None:
    admin = connect(clients, broker, pki, ADMIN).subscribe(topic)
    connect(clients, broker, pki, ORCHESTRATOR).publish(topic, b"{}")
    assert admin.wait_for(topic) == [(topic, b"{}")]


def test_administrator_cannot_pulse_for_a_runtime(broker: SecureBroker, pki: Pki, clients: list[Client]) -> None:
    view = orchestrator_view(clients, broker, pki)
    admin = connect(clients, broker, pki, ADMIN)
    admin.publish(TOPICS.pulse("rt-b"), b"")
    # The runtime patterns apply to every user, so this one is allowed; the "~" makes it an ID nobody accepts.
    admin.publish(TOPICS.pulse(ADMIN), b"fence")
    assert [t for t, _ in view.wait_for(TOPICS.pulse(ADMIN))] == [TOPICS.pulse(ADMIN)]
    assert not protocol.is_valid_id(ADMIN)


def test_administrator_cannot_read_pulses(broker: SecureBroker, pki: Pki, clients: list[Client]) -> None:
    admin = connect(clients, broker, pki, ADMIN).subscribe(TOPICS.pulse_filter, TOPICS.alerts)
    connect(clients, broker, pki, "rt-a").publish(TOPICS.pulse("rt-a"), b"")
    connect(clients, broker, pki, ORCHESTRATOR).publish(TOPICS.alerts, b"fence")
    assert [t for t, _ in admin.wait_for(TOPICS.alerts)] == [TOPICS.alerts]


def test_administrator_sends_commands_and_reads_the_answers(
    broker: SecureBroker, pki: Pki, clients: list[Client]
) -> None:
    view = orchestrator_view(clients, broker, pki)
    admin = connect(clients, broker, pki, ADMIN).subscribe(TOPICS.command_reply("r-1"))
    admin.publish(TOPICS.command, b'{"command": "silences", "request_id": "r-1"}')
    assert view.wait_for(TOPICS.command)[-1] == (TOPICS.command, b'{"command": "silences", "request_id": "r-1"}')
    connect(clients, broker, pki, ORCHESTRATOR).publish(TOPICS.command_reply("r-1"), b'{"ok": true}')
    assert admin.wait_for(TOPICS.command_reply("r-1")) == [(TOPICS.command_reply("r-1"), b'{"ok": true}')]


def test_runtime_cannot_send_commands_nor_read_their_answers(
    broker: SecureBroker, pki: Pki, clients: list[Client]
) -> None:
    view = orchestrator_view(clients, broker, pki)
    a = connect(clients, broker, pki, "rt-a").subscribe(TOPICS.command_reply("r-2"), TOPICS.reply("rt-a"))
    a.publish(TOPICS.command, b'{"command": "deregister", "id": "rt-b"}')
    a.publish(TOPICS.pulse("rt-a"), b"fence")
    assert [t for t, _ in view.wait_for(TOPICS.pulse("rt-a"))] == [TOPICS.pulse("rt-a")]
    orchestrator = connect(clients, broker, pki, ORCHESTRATOR)
    orchestrator.publish(TOPICS.command_reply("r-2"), b'{"ok": true}')
    orchestrator.publish(TOPICS.reply("rt-a"), b"fence")
    assert [t for t, _ in a.wait_for(TOPICS.reply("rt-a"))] == [TOPICS.reply("rt-a")]


def test_orchestrator_clears_a_deregistered_runtimes_retained_messages(
    broker: SecureBroker, pki: Pki, clients: list[Client]
) -> None:
    a = connect(clients, broker, pki, "rt-a")
    a.publish(TOPICS.interval("rt-a"), protocol.encode_interval(5.0), retain=True)
    a.publish(TOPICS.state("rt-a"), protocol.encode_state("online", 1), retain=True)
    orchestrator = connect(clients, broker, pki, ORCHESTRATOR)
    orchestrator.publish(TOPICS.interval("rt-a"), b"", retain=True)
    orchestrator.publish(TOPICS.state("rt-a"), b"", retain=True)
    fresh = connect(clients, broker, pki, ORCHESTRATOR)
    fresh.subscribe(TOPICS.interval("rt-a"), TOPICS.state("rt-a"), TOPICS.orchestrator_stats)
    orchestrator.publish(TOPICS.orchestrator_stats, b"fence")  # retained copies would come first, after SUBACK
    assert fresh.wait_for(TOPICS.orchestrator_stats) == [(TOPICS.orchestrator_stats, b"fence")]


# --- orchestrator and agents end to end ------------------------------------------


def _orchestrator(tmp_path: Path, broker_url: str, **options: str) -> OrchestratorProcess:
    config = tmp_path / "orchestrator.yaml"
    lines = [f"broker: {broker_url}", f"db: sqlite:///{tmp_path / 'heartbeat.db'}", "log_level: DEBUG"]
    lines += [f"{k}: {v}" for k, v in options.items()]
    config.write_text("\n".join(lines) + "\n")
    return OrchestratorProcess(["--config", str(config)], tmp_path / "orchestrator.log").start()


def _wait_online(admin: Client, orchestrator: OrchestratorProcess) -> None:
    try:
        admin.wait_for(TOPICS.orchestrator_state)
    except AssertionError:
        raise AssertionError(f"orchestrator not online:\n{orchestrator.log()[-3000:]}") from None


def test_orchestrator_and_agent_with_passwords(
    broker: SecureBroker, pki: Pki, clients: list[Client], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEARTBEAT_BROKER_PASSWORD", PASSWORDS[ORCHESTRATOR])  # not in the URL: ps shows URLs
    admin = connect(clients, broker, pki, ADMIN).subscribe(TOPICS.orchestrator_state, TOPICS.status("rt-a"))
    orchestrator = _orchestrator(tmp_path, broker.url(ORCHESTRATOR, password=False), tls_ca=str(pki.ca.cert))
    try:
        _wait_online(admin, orchestrator)
        with Agent("rt-a", interval=0.2, broker=broker.url("rt-a"), tls_ca=str(pki.ca.cert), timeout=WAIT) as agent:
            assert agent.registered
            assert b'"alive"' in admin.wait_for(TOPICS.status("rt-a"))[-1][1]
    finally:
        orchestrator.stop()
    assert "Traceback" not in orchestrator.log()


def test_orchestrator_and_agent_with_client_certificates(tmp_path: Path, pki: Pki, clients: list[Client]) -> None:
    """Certificates only, both orchestrator connections included (the lean connection has its own SSLContext)."""
    directory = tmp_path / "mosquitto"
    directory.mkdir()
    _install_pki(directory, pki)
    process = _start(
        directory,
        lambda ports: (
            f"allow_anonymous false\nacl_file {SHIPPED / 'acl'}\npersistence false\n"
            f"listener {ports[0]} 127.0.0.1\ncafile {directory}/ca.crt\ncertfile {directory}/server.crt\n"
            f"keyfile {directory}/server.key\nrequire_certificate true\nuse_identity_as_username true\n"
        ),
        1,
    )
    port = process.port
    orchestrator = None
    try:
        admin = Client(port, ca=pki.ca.cert, cert=pki.clients[ADMIN])
        clients.append(admin)
        admin.subscribe(TOPICS.orchestrator_state, TOPICS.status("rt-a"))
        cert = pki.clients[ORCHESTRATOR]
        orchestrator = _orchestrator(
            tmp_path,
            f"mqtts://127.0.0.1:{port}",
            tls_ca=str(pki.ca.cert),
            tls_cert=str(cert.cert),
            tls_key=str(cert.key),
        )
        _wait_online(admin, orchestrator)
        rt = pki.clients["rt-a"]
        with Agent(
            "rt-a",
            interval=0.2,
            broker=f"mqtts://127.0.0.1:{port}",
            tls_ca=str(pki.ca.cert),
            tls_cert=str(rt.cert),
            tls_key=str(rt.key),
            timeout=WAIT,
        ):
            assert b'"alive"' in admin.wait_for(TOPICS.status("rt-a"))[-1][1]
        assert "pulse connection" not in orchestrator.log()  # the lean reader connected and stayed
    finally:
        if orchestrator is not None:
            orchestrator.stop()
        process.stop()


def _refused_orchestrator_log(tmp_path: Path, broker: SecureBroker, url: str) -> str:
    """The log of an orchestrator the broker keeps refusing, once it has retried twice; it must still run."""
    orchestrator = _orchestrator(tmp_path, url, tls_ca=str(broker.directory / "ca.crt"))
    try:
        deadline = time.monotonic() + WAIT * 2
        while orchestrator.log().count("retrying in") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert orchestrator.alive
    finally:
        orchestrator.stop()
    return orchestrator.log()


def test_orchestrator_with_a_wrong_password_retries_with_a_clear_message(
    broker: SecureBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEARTBEAT_BROKER_PASSWORD", "wrong-secret")
    log = _refused_orchestrator_log(tmp_path, broker, broker.url(ORCHESTRATOR, password=False))
    assert "[code:135] Not authorized" in log, log[-2000:]
    assert log.count("retrying in") >= 2
    assert "Traceback" not in log
    assert "wrong-secret" not in log


def test_orchestrator_never_logs_a_password_from_the_url(broker: SecureBroker, tmp_path: Path) -> None:
    log = _refused_orchestrator_log(tmp_path, broker, f"mqtts://{ORCHESTRATOR}:wrong-secret@127.0.0.1:{broker.staff}")
    assert "wrong-secret" not in log


def _agent_cli(*args: str, password: str | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if password is not None:
        env["HEARTBEAT_BROKER_PASSWORD"] = password
    return subprocess.run(
        [sys.executable, "-m", "runtime_agent", "--interval", "1", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def test_agent_cli_exits_at_once_on_a_wrong_password(broker: SecureBroker, pki: Pki) -> None:
    started = time.monotonic()
    result = _agent_cli(
        "--id", "rt-a", "--broker", broker.url("rt-a", password=False), "--tls-ca", str(pki.ca.cert),
        "--timeout", "15",
        password="wrong",
    )  # fmt: skip
    assert result.returncode == 1
    assert time.monotonic() - started < 10  # well before --timeout: retrying cannot fix credentials
    assert "refused the connection: Not authorized" in result.stderr
    assert "check the user name and password" in result.stderr
    assert "Traceback" not in result.stderr


def test_agent_cli_reports_a_foreign_ca(broker: SecureBroker, pki: Pki) -> None:
    result = _agent_cli(
        "--id", "rt-a", "--broker", broker.url("rt-a"), "--tls-ca", str(pki.foreign.cert), "--timeout", "1.5"
    )  # fmt: skip
    assert result.returncode == 1
    assert "certificate verify failed" in result.stderr
    assert "tls_ca" in result.stderr
    assert "Traceback" not in result.stderr


def test_agent_on_plaintext_to_a_tls_port_says_to_use_mqtts(broker: SecureBroker) -> None:
    agent = Agent(
        "rt-a", interval=1, broker=f"mqtt://rt-a:{PASSWORDS['rt-a']}@127.0.0.1:{broker.runtimes}", timeout=1.5
    )
    with pytest.raises(ConnectError, match=r"mqtts://"):
        agent.start()


def test_async_agent_fails_at_once_on_a_wrong_password(broker: SecureBroker, pki: Pki) -> None:
    agent = AsyncAgent(
        "rt-a",
        interval=1,
        broker=f"mqtts://rt-a:wrong@127.0.0.1:{broker.runtimes}",
        tls_ca=str(pki.ca.cert),
        timeout=15,
    )
    started = time.monotonic()
    with pytest.raises(ConnectError, match="check the user name and password"):
        asyncio.run(agent.start())
    assert time.monotonic() - started < 10


def test_agent_client_certificate_needs_its_key(pki: Pki) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        Agent("rt-a", interval=1, broker="mqtts://127.0.0.1:8883", tls_cert=str(pki.clients["rt-a"].cert))


def test_agent_missing_tls_file_is_a_bad_argument(tmp_path: Path) -> None:
    result = _agent_cli("--id", "rt-a", "--broker", "mqtts://127.0.0.1:8883", "--tls-ca", str(tmp_path / "no.pem"))
    assert result.returncode == 2
    assert "tls_ca: no such file" in result.stderr

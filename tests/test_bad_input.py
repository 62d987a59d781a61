"""Bad input on every subscribed topic: the orchestrator keeps running and state is unchanged.

Runs on both brokers against a real orchestrator process. Where a reply topic
exists (interval requests with a valid ID), the reply says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.config import Config
from orchestrator.service import Orchestrator
from runtime_agent import protocol

from .harness import TOPICS, Deployment, Runtime
from .test_service import UNREACHABLE_BROKER, running, until

pytestmark = pytest.mark.e2e

BAD_INTERVAL_PAYLOADS = {
    "malformed JSON": (b'{"interval": ', "not valid JSON"),
    "not an object": (b"[1, 2]", "must be a JSON object"),
    "string interval": (b'{"interval": "5"}', "must be a number"),
    "bool interval": (b'{"interval": true}', "must be a number"),
    "NaN": (b'{"interval": NaN}', "not valid JSON"),
    "negative": (b'{"interval": -5}', "between 0.1 and 86400"),
    "huge": (b'{"interval": 1e308}', "between 0.1 and 86400"),
    "unknown field": (b'{"interval": 5, "intervall": 6}', "unknown field"),
    "missing interval": (b'{"grace": 5}', "missing field"),
    "bad UTF-8": (b'{"interval": "\xff\xfe"}', "not valid UTF-8"),
    "1 MB": (b'{"interval": 5, "pad": "' + b"x" * 1_000_000 + b'"}', "exceeds"),
}

BAD_STATE_PAYLOADS = [
    b"",
    b"{",
    b'"online"',
    b'{"state": "zombie"}',
    b'{"state": 1}',
    b'{"state": "offline", "session": "abc"}',
    b"\xff\xfe",
    b'{"state": "offline", "pad": "' + b"x" * 1_000_000 + b'"}',
]

BAD_PULSE_PAYLOADS = [b"{", b"[]", b'{"seq": "one"}', b'{"session": -1}', b"\xff", b"x" * 1_000_000]

BAD_IDS = ["", "a b", "ünïcode", "x" * 129, "x" * 10_000, "semi;colon", "quote'--", "a/b"]


@pytest.fixture(params=["embedded", "mosquitto"])
def watched(request: pytest.FixtureRequest, tmp_path: Path, sqlite_url: str) -> Iterator[Deployment]:
    """An orchestrator watching two runtimes by hand: ``rt-alive`` (pulsing) and ``rt-dead`` (dead)."""
    d = Deployment(request.param, tmp_path, sqlite_url)
    try:
        d.start_orchestrator()
        dead = d.runtime("rt-dead")
        dead.register(0.5, 0.5)
        d.observer.wait_alert("rt-dead", "dead", 5)
        alive = d.runtime("rt-alive")
        alive.register(30.0, 30.0)
        d.observer.wait_status("rt-alive", "alive", 5)
        # The reply travels on another connection than the status and may come second: wait for it
        # too, so that no test below takes it for the answer to its own request.
        d.observer.wait_for(lambda m: m.topic == TOPICS.reply("rt-alive"), 5)
        yield d
    finally:
        d.close()


_BARRIER = "barrier-"
"""The IDs :func:`_barrier` registers, left out of :func:`_states`."""


def _states(d: Deployment) -> dict[str, tuple[str, float, float]]:
    rows = d.status_json()
    return {
        row["id"]: (row["state"], row["interval"], row["grace"]) for row in rows if not row["id"].startswith(_BARRIER)
    }


def _barrier(d: Deployment, sender: Runtime) -> None:
    """Return once the orchestrator has handled everything ``sender`` published before, and told of it.

    ``sender`` registers a fresh runtime. The broker delivers one client's
    messages in order, the intake reads them in order and the registrar
    takes requests in order: the reply proves every message before it was
    handled. Its first status is sent once the outbox has published every
    alert and status due before, on the same connection: a change the bad
    messages made would show first. (Not ``rt-alive``'s registration again:
    unchanged, it publishes no status.)
    """
    barrier = f"{_BARRIER}{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    sender.publish(TOPICS.interval(barrier), protocol.encode_interval(3600.0))
    reply = d.observer.wait_for(lambda m: m.topic == TOPICS.reply(barrier), 10, after=started)
    assert reply.json()["ok"] is True, reply.json()
    d.observer.wait_status(barrier, "alive", 10, after=started)


@pytest.mark.parametrize("case", sorted(BAD_INTERVAL_PAYLOADS))
def test_bad_interval_request_gets_a_reply_saying_why(watched: Deployment, case: str) -> None:
    payload, expected = BAD_INTERVAL_PAYLOADS[case]
    started = time.monotonic()
    watched.runtimes[1].publish(TOPICS.interval("rt-alive"), payload)
    reply = watched.observer.wait_for(lambda m: m.topic == TOPICS.reply("rt-alive"), 10, after=started).json()
    assert reply["ok"] is False
    assert expected in reply["error"]
    assert _states(watched)["rt-alive"] == ("alive", 30.0, 30.0)


def test_bad_state_messages_change_nothing(watched: Deployment) -> None:
    started = time.monotonic()
    for payload in BAD_STATE_PAYLOADS:
        watched.runtimes[1].publish(TOPICS.state("rt-alive"), payload)
        watched.runtimes[1].publish(TOPICS.state("rt-dead"), payload)
    _barrier(watched, watched.runtimes[1])
    assert watched.orchestrators[-1].alive
    assert watched.observer.alerts(after=started) == []
    assert _states(watched) == {"rt-alive": ("alive", 30.0, 30.0), "rt-dead": ("dead", 0.5, 0.5)}


def test_bad_pulses_do_not_revive_a_dead_runtime(watched: Deployment) -> None:
    started = time.monotonic()
    for payload in BAD_PULSE_PAYLOADS:
        watched.runtimes[0].publish(TOPICS.pulse("rt-dead"), payload, qos=1)
    _barrier(watched, watched.runtimes[0])
    assert watched.orchestrators[-1].alive
    assert watched.observer.alerts("rt-dead", after=started) == []
    assert _states(watched)["rt-dead"][0] == "dead"


def test_bad_ids_on_every_topic_are_rejected_and_counted(watched: Deployment) -> None:
    started = time.monotonic()
    sender = watched.runtime("sender")
    for bad in BAD_IDS:
        prefix = f"{TOPICS.prefix}/runtimes/{bad}"
        sender.publish(f"{prefix}/interval", b'{"interval": 1}')
        sender.publish(f"{prefix}/state", b'{"state": "online"}')
        sender.publish(f"{prefix}/pulse", b"", qos=0)
    _barrier(watched, sender)
    assert watched.orchestrators[-1].alive
    assert watched.observer.alerts(after=started) == []
    assert set(_states(watched)) == {"rt-alive", "rt-dead"}
    orchestrator = watched.orchestrators[-1]
    assert orchestrator.stop() == 0
    assert {"bad_id", "unregistered"} <= set(_stop_line_rejections(orchestrator.log()))


def _stop_line_rejections(log: str) -> dict[str, int]:
    """The rejections on an orchestrator's last stop line, which must read ``rejected: reason=n ...``."""
    line = [line for line in log.splitlines() if "stopped; pulses received" in line][-1]
    found = re.search(r"; pulses received \d+, rejected: ((?:\w+=\d+ )*\w+=\d+)$", line)
    assert found, line  # it printed a Python dict: {'rejected.bad_id': 8, ...}
    return {reason: int(n) for reason, n in (pair.split("=") for pair in found[1].split())}


def test_a_bad_runtime_id_is_named_once_in_a_plain_log_line(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A bad ID's line read "rejected interval request: invalid runtime id 'x y': use 1-128 characters of
    A-Z a-z 0-9 . _ - :: 'x y'": the protocol's error, then the ID once more. The stop line shows the counts."""
    caplog.set_level(logging.INFO, logger="orchestrator")
    orchestrator = Orchestrator(Config(db=sqlite_url, broker=UNREACHABLE_BROKER))
    runtimes = f"{TOPICS.prefix}/runtimes"

    async def scenario() -> None:
        async with running(orchestrator):
            orchestrator.intake.receive(f"{runtimes}/a b/pulse", b"", False)
            orchestrator.intake.receive(f"{runtimes}/c d/state", protocol.encode_state("online", 1), False)
            orchestrator.intake.receive(f"{runtimes}/x y/interval", protocol.encode_interval(5.0), False)
            await until(lambda: orchestrator.stats["rejected.bad_id"] == 1)

    asyncio.run(asyncio.wait_for(scenario(), 20))
    messages = [record.getMessage() for record in caplog.records]
    assert [m for m in messages if m.startswith("rejected ")] == [
        "rejected pulse: bad runtime id 'a b' (logged once per ID)",
        "rejected state: bad runtime id 'c d' (logged once per ID)",
        "rejected interval request: bad runtime id 'x y' (logged once per ID)",
    ]
    assert _stop_line_rejections("\n".join(messages)) == {"bad_id": 1, "unregistered": 2}


def _raw_publish(port: int, topic: str, payload: bytes) -> None:
    """Send CONNECT + PUBLISH by hand: client libraries refuse wildcard topic names, attackers do not."""

    def packet(kind: int, body: bytes) -> bytes:
        size, encoded = len(body), b""
        while True:
            digit, size = size % 128, size // 128
            encoded += bytes([digit | (0x80 if size else 0)])
            if not size:
                return bytes([kind]) + encoded + body

    def string(s: bytes) -> bytes:
        return struct.pack("!H", len(s)) + s

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(packet(0x10, string(b"MQTT") + b"\x04\x02\x00\x1e" + string(b"wildcard-attacker")))
        sock.recv(4)
        sock.sendall(packet(0x30, string(topic.encode()) + payload))
        # The barrier: a broker reads a connection's packets in order, so a PINGRESP means it went past the
        # PUBLISH (routed or dropped it), and closing the connection means it refused it. amqtt refuses a
        # wildcard topic by no longer reading the connection at all: silence for 0.5 s counts as that.
        sock.sendall(b"\xc0\x00")
        sock.settimeout(0.5)
        received = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while b"\xd0\x00" not in received and (chunk := sock.recv(65536)):
                received += chunk  # amqtt first sends a new client every retained message, subscribed or not


@pytest.mark.parametrize("wildcard", ["+", "#", "a+b"])
def test_wildcards_in_ids_never_reach_state(watched: Deployment, wildcard: str) -> None:
    started = time.monotonic()
    for kind, payload in (("interval", b'{"interval": 1}'), ("state", b'{"state": "offline"}'), ("pulse", b"")):
        _raw_publish(watched.port, f"{TOPICS.prefix}/runtimes/{wildcard}/{kind}", payload)
    _barrier(watched, watched.runtimes[1])  # routed after the raw publishes, which the broker has handled
    assert watched.orchestrators[-1].alive
    assert watched.observer.alerts(after=started) == []
    assert set(_states(watched)) == {"rt-alive", "rt-dead"}


def test_still_serving_after_a_barrage(watched: Deployment) -> None:
    sender = watched.runtime("barrage")
    for payload in BAD_PULSE_PAYLOADS + BAD_STATE_PAYLOADS:
        sender.publish(TOPICS.interval("rt-new"), payload)
        sender.publish(TOPICS.pulse("rt-alive"), payload, qos=0)
    started = time.monotonic()
    agent = watched.agent("rt-after", 1.0)
    agent.registered()
    watched.observer.wait_status("rt-after", "alive", 5, after=started)

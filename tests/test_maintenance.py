"""Maintenance end to end: silences and deregistration through the command topic and the CLI.

A real orchestrator process on the test's own Mosquitto, real agents, a real
webhook receiver; commands are sent as a user sends them (``python -m
orchestrator silence ...``) or, to test the protocol itself, by hand.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from orchestrator.config import Config
from orchestrator.service import Orchestrator
from orchestrator.store import FlipRow, Store

from .harness import TOPICS, Deployment, process_env
from .test_service import UNREACHABLE_BROKER, running, until
from .webhook import Hook

pytestmark = pytest.mark.e2e

INTERVAL = 0.5
QUIET = 1.5
"""Seconds to wait for a notice that must not come (the webhook gets a real one within about 0.2 s)."""


@pytest.fixture
def site(tmp_path: Path, sqlite_url: str, hook: Hook) -> Iterator[Deployment]:
    """An orchestrator on the test's own Mosquitto, notifying the webhook, publishing its counters often."""
    config = tmp_path / "orchestrator.yaml"
    config.write_text(f"notify:\n  - url: {hook.url}\nstats_interval: 0.2\n")
    with Deployment.running("mosquitto", tmp_path, sqlite_url, "--config", str(config)) as d:
        d.config = config  # type: ignore[attr-defined]
        yield d


def orchestrator_cli(d: Deployment, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``heartbeat-orchestrator ARGS --broker <the test's broker>`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args, "--broker", d.broker_url],
        capture_output=True,
        text=True,
        env=process_env(),
        timeout=timeout,
    )


def ok(d: Deployment, *args: str) -> str:
    done = orchestrator_cli(d, *args)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout


def dead_notices(hook: Hook, runtime_id: str) -> list[dict[str, Any]]:
    return [b for _, b in hook.received if b.get("event") == "dead" and b.get("id") == runtime_id]


def restart(d: Deployment) -> None:
    assert d.orchestrators[-1].stop() == 0
    d.start_orchestrator("--config", str(d.config), log_name="orchestrator-2.log")  # type: ignore[attr-defined]


# --- silences -------------------------------------------------------------------------


def test_a_silenced_runtime_is_told_dead_but_notified_only_once_unsilenced(site: Deployment, hook: Hook) -> None:
    agent = site.agent("db-1", INTERVAL)
    agent.registered()
    out = ok(site, "silence", "db-*", "--for", "1h", "--reason", "patching")
    assert "silenced db-* until" in out
    assert "matching 1 registered runtime" in out
    assert "patching" in out

    killed = time.monotonic()
    agent.signal(signal.SIGKILL)
    site.observer.wait_status("db-1", "dead", 10, after=killed)  # the truth is still told ...
    site.observer.wait_alert("db-1", "dead", 5, after=killed)  # ... on the machine feed too
    time.sleep(QUIET)
    assert dead_notices(hook, "db-1") == []  # ... but nobody is woken

    out = ok(site, "unsilence", "db-*")
    assert "lifted the silence on db-*" in out
    _, notice = hook.wait(lambda b: b.get("event") == "dead" and b.get("id") == "db-1", 10)
    assert "silence on 'db-*' lifted" in notice["reason"]
    time.sleep(QUIET)
    assert dead_notices(hook, "db-1") == [notice]  # exactly one
    assert ok(site, "silences").strip() == "no silences"


def test_a_runtime_that_recovers_under_a_silence_is_not_announced_when_it_expires(site: Deployment, hook: Hook) -> None:
    agent = site.agent("rt-flaky", INTERVAL)
    agent.registered()
    second = None
    with Commander(site) as commander:
        reply = commander.send({"command": "silence", "target": "rt-flaky", "for": 2})
        assert reply["ok"], reply
        silenced = time.monotonic()
        agent.signal(signal.SIGKILL)
        site.observer.wait_status("rt-flaky", "dead", 5, after=silenced)
        second = site.agent("rt-flaky", INTERVAL)
        second.registered()
        site.observer.wait_status("rt-flaky", "alive", 5, after=silenced)
        assert time.monotonic() - silenced < 2, "recovered too late for this test: the machine is too slow"
    hook.wait(lambda b: b.get("event") == "silence_ended", 10)
    time.sleep(QUIET)
    assert dead_notices(hook, "rt-flaky") == []
    assert [b["event"] for _, b in hook.received if b.get("id") == "rt-flaky"] == ["silence_ended"]


def test_silences_survive_an_orchestrator_restart(site: Deployment, hook: Hook) -> None:
    agent = site.agent("web-1", INTERVAL)
    agent.registered()
    ok(site, "silence", "web-1", "--for", "15m")
    restart(site)

    listed = json.loads(ok(site, "silences", "--json"))
    assert [(s["target"], s["matches"]) for s in listed["silences"]] == [("web-1", 1)]
    killed = time.monotonic()
    agent.signal(signal.SIGKILL)
    site.observer.wait_status("web-1", "dead", 15, after=killed)
    time.sleep(QUIET)
    assert dead_notices(hook, "web-1") == []


# --- deregistration -----------------------------------------------------------------------


def test_deregister_forgets_the_runtime_and_every_retained_trace_of_it(site: Deployment, hook: Hook) -> None:
    agent = site.agent("rt-gone", INTERVAL)
    agent.registered()
    keep = site.agent("rt-kept", INTERVAL)
    keep.registered()
    agent.signal(signal.SIGKILL)
    site.observer.wait_status("rt-gone", "dead", 10)

    out = ok(site, "deregister", "rt-gone")
    assert "deregistered rt-gone" in out
    assert [s["id"] for s in site.status_json()] == ["rt-kept"]
    assert retained(site, "rt-gone") == {}
    assert set(retained(site, "rt-kept")) == {
        TOPICS.status("rt-kept"),
        TOPICS.interval("rt-kept"),
        TOPICS.state("rt-kept"),
    }

    restart(site)
    assert [s["id"] for s in site.status_json()] == ["rt-kept"]
    assert retained(site, "rt-gone") == {}
    again = orchestrator_cli(site, "deregister", "rt-gone")
    assert again.returncode == 1
    assert "rt-gone is not registered" in again.stderr
    log = site.orchestrators[0].log()
    assert "malformed_json" not in log  # the echo of our own clears is not mistaken for a bad state message
    assert "Traceback" not in log + site.orchestrators[1].log()


def retained(d: Deployment, runtime_id: str) -> dict[str, bytes]:
    """What a fresh subscriber gets at once on the runtime's retained topics (a fence proves the end)."""
    topics = [TOPICS.status(runtime_id), TOPICS.interval(runtime_id), TOPICS.state(runtime_id)]
    fence = f"test/fence/{uuid.uuid4().hex}"
    got: dict[str, bytes] = {}
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fresh-{uuid.uuid4().hex[:8]}")

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == fence:
            done.set()
        elif message.retain:
            got[message.topic] = bytes(message.payload)

    client.on_message = on_message
    client.on_subscribe = lambda client, *args: client.publish(fence, b"", qos=1)
    client.on_connect = lambda client, *args: client.subscribe([(t, 1) for t in [*topics, fence]])
    client.connect("127.0.0.1", d.port)
    client.loop_start()
    try:
        assert done.wait(10), "no fence"
    finally:
        client.disconnect()
        client.loop_stop()
    return got


# --- the protocol by hand: bad commands, replies ---------------------------------------------


class Commander:
    """An MQTT 5 client sending raw commands and collecting the replies."""

    def __init__(self, d: Deployment) -> None:
        self.replies: list[tuple[str, bytes | None, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"admin-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", d.port)
        self.client.loop_start()
        self.client.subscribe([(f"{TOPICS.command}/reply/+", 1), (f"{TOPICS.prefix}/replies/#", 1)])
        assert subscribed.wait(10)

    def __enter__(self) -> Commander:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        with self._cond:
            self.replies.append((message.topic, correlation, json.loads(message.payload)))
            self._cond.notify_all()

    def publish(self, payload: bytes, properties: Properties | None = None, *, retain: bool = False) -> None:
        self.client.publish(TOPICS.command, payload, qos=1, properties=properties, retain=retain).wait_for_publish(5)

    def send(self, command: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """Send with a fresh request_id and wait for its reply."""
        request_id = f"t-{uuid.uuid4().hex[:12]}"
        self.publish(json.dumps({**command, "request_id": request_id}).encode())
        return self.wait(lambda topic, _: topic == TOPICS.command_reply(request_id), timeout)

    def wait(self, match: Any, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for topic, correlation, body in self.replies:
                    if match(topic, correlation):
                        return body
                left = deadline - time.monotonic()
                assert left > 0, f"no matching reply within {timeout} s: {self.replies}"
                self._cond.wait(left)


def stats(d: Deployment, after: float) -> dict[str, Any]:
    message = d.observer.wait_for(lambda m: m.topic == TOPICS.orchestrator_stats, 10, after=after)
    return message.json()  # type: ignore[no-any-return]


BAD_COMMANDS = [
    ({"command": "reboot"}, "unknown_command", "unknown command 'reboot'"),
    ({"command": "silence", "target": "db/#", "for": 60}, "bad_target", "invalid target"),
    ({"command": "silence", "target": "db-*", "for": 0}, "out_of_range", "'for' must be between 1 and"),
    ({"command": "silence", "target": "db-*", "for": 60, "until": 5}, "unknown_field", "'until'"),
    ({"command": "deregister"}, "missing_field", "missing field 'id'"),
]


def test_bad_commands_are_answered_with_their_error_and_counted(site: Deployment) -> None:
    before = stats(site, time.monotonic())["rejected"]
    with Commander(site) as commander:
        for command, _, error in BAD_COMMANDS:
            reply = commander.send(command)
            assert reply["ok"] is False
            assert error in reply["error"]
        # Not JSON at all: no request_id to answer on, but an MQTT 5 Response Topic works.
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = f"{TOPICS.prefix}/replies/admin-1"
        props.CorrelationData = b"c-1"
        commander.publish(b"{not json", props)
        reply = commander.wait(lambda topic, correlation: correlation == b"c-1")
        assert reply == {"ok": False, "command": None, "error": "payload is not valid JSON"}
        # A Response Topic aimed at what administrators trust is not used (and counted).
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = TOPICS.status("rt-forged")
        commander.publish(json.dumps({"command": "silences"}).encode(), props)
        # A retained command is not run again at every resubscribe: its retained copy is ignored.
        commander.publish(json.dumps({"command": "silence", "target": "x", "for": 60}).encode(), retain=True)
        commander.client.publish(TOPICS.command, b"", qos=1, retain=True).wait_for_publish(5)
        # ... and the orchestrator still works.
        reply = commander.send({"command": "unsilence", "target": "nothing-*"})
        assert reply == {
            "ok": False,
            "command": "unsilence",
            "request_id": reply["request_id"],
            "error": "no silence on 'nothing-*'",
        }
        reply = commander.send({"command": "silences"})
        assert reply["ok"] is True
    assert not any(m.topic == TOPICS.status("rt-forged") for m in site.observer.messages)
    checked = time.monotonic()
    after = stats(site, checked)["rejected"]
    expected = {reason for _, reason, _ in BAD_COMMANDS} | {"malformed_json", "response_topic"}
    for reason in expected:
        assert after.get(reason, 0) > before.get(reason, 0), (reason, before, after)
    assert site.orchestrators[0].alive
    assert "Traceback" not in site.orchestrators[0].log()


def test_a_command_answer_comes_on_the_response_topic_with_its_correlation(site: Deployment) -> None:
    with Commander(site) as commander:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = f"{TOPICS.prefix}/replies/admin-2"
        props.CorrelationData = b"\x00\x01"
        commander.publish(json.dumps({"command": "silence", "target": "q-?", "for": 90}).encode(), props)
        reply = commander.wait(lambda topic, correlation: correlation == b"\x00\x01")
    assert reply["ok"] is True
    assert reply["target"] == "q-?"
    assert reply["matches"] == 0
    assert reply["until"].endswith("Z")


# --- in process: the service's command handling, without a broker ------------------------------


def test_commands_are_routed_to_the_commander_not_rejected_as_foreign(sqlite_url: str) -> None:
    orchestrator = Orchestrator(Config(db=sqlite_url, broker=UNREACHABLE_BROKER))

    async def scenario() -> None:
        async with running(orchestrator):
            orchestrator.intake.receive(TOPICS.command, b'{"command": "reboot"}', False)
            orchestrator.intake.receive(TOPICS.command, b'{"command": "silences"}', True)  # a retained copy: ignored
            orchestrator.intake.receive(TOPICS.command, b'{"command": "silence", "target": "db-*", "for": 60}', False)
            await until(lambda: orchestrator.dispatcher.silences.get("db-*") is not None)

    asyncio.run(asyncio.wait_for(scenario(), 20))
    rejected = {k: v for k, v in orchestrator.stats.items() if k.startswith("rejected")}
    assert rejected == {"rejected.unknown_command": 1, "rejected.retained_command": 1}
    store = Store(sqlite_url)
    store.open()
    try:
        [(pattern, until_, reason)] = store.silences()
    finally:
        store.close()
    assert (pattern, reason) == ("db-*", None)
    assert 55 < until_ - time.time() <= 60


def test_stored_silences_are_loaded_at_start_and_hold_the_dead_they_cover(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    store.open()
    try:
        now = time.time()
        store.register([("db-1", 1.0, 1.0), ("db-2", 1.0, 1.0), ("web-1", 1.0, 1.0)], now)
        store.record(
            [
                FlipRow("db-1", "unknown", "dead", "dead", "connection lost", now, None),
                FlipRow("web-1", "unknown", "dead", "dead", "connection lost", now, None),
            ],
            {},
        )
        store.save_silence("db-*", now + 600, "patching")
        store.save_silence("old", now - 1, None)
    finally:
        store.close()
    orchestrator = Orchestrator(Config(db=sqlite_url, broker=UNREACHABLE_BROKER))

    async def scenario() -> None:
        async with running(orchestrator):
            await until(lambda: len(orchestrator.dispatcher.silences) > 0)

    asyncio.run(asyncio.wait_for(scenario(), 20))
    assert [(e.pattern, e.reason) for e in orchestrator.dispatcher.silences.entries()] == [("db-*", "patching")]
    assert set(orchestrator.dispatcher._held) == {"db-1"}  # dead and silenced: announced if still dead at the end
    store = Store(sqlite_url)
    store.open()
    try:
        assert [row[0] for row in store.silences()] == ["db-*"]  # the expired one was deleted at start
    finally:
        store.close()

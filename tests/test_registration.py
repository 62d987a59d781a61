"""Registration at fleet scale: thousands of interval requests at once, none lost, none held back.

Real processes: Mosquitto with its default limits (20 QoS 1 messages in
flight and 1,000 queued per client, beyond which it drops them silently),
the embedded broker, SQLite and PostgreSQL. The fleet is :mod:`bench.fleet`:
retained QoS 1 requests over raw connections, and a listener that times
every reply.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.fleet import ReplyListener, fleet_ids, registering
from orchestrator.broker import free_port
from runtime_agent import protocol

from .harness import TOPICS, Deployment, Received, Runtime
from .test_web import metric_samples

pytestmark = pytest.mark.e2e

_FLEET = 5_000
_WITHIN = 10.0
"""Seconds within which every request of a fleet starting at once must be answered (an agent's default wait)."""


def _assert_a_fleet_is_confirmed(d: Deployment, n: int, *, v5: bool) -> None:
    """``n`` runtimes send their requests at once: every one is answered ok within the wait, and stored."""
    listener = ReplyListener(d.port, v5=v5)
    ids = fleet_ids(n)
    try:
        with registering(d.port, ids, interval=30, grace=30):
            missing = listener.wait(ids, _WITHIN)
    finally:
        listener.close()
    assert not missing, f"{len(missing)} of {len(ids)} requests got no reply within {_WITHIN} s"
    assert not listener.errors, f"refused: {list(listener.errors.items())[:5]}"
    stored = {row["id"] for row in d.status_json()}
    assert set(ids) <= stored, f"{len(set(ids) - stored)} confirmed registrations are not in the database"


@pytest.fixture
def quiet_mosquitto_deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """An orchestrator on the test's own Mosquitto (default limits), on SQLite or PostgreSQL, logging at INFO."""
    db_url = request.getfixturevalue(request.param)
    with Deployment.running("mosquitto", tmp_path, db_url, "--log-level", "INFO") as d:
        yield d


@pytest.mark.parametrize("quiet_mosquitto_deployment", ["sqlite_url", "pg_url"], indirect=True)
def test_a_fleet_registering_at_once_on_mosquitto_is_confirmed_within_its_wait(
    quiet_mosquitto_deployment: Deployment,
) -> None:
    _assert_a_fleet_is_confirmed(quiet_mosquitto_deployment, _FLEET, v5=True)


def test_a_fleet_registering_at_once_on_the_embedded_broker_is_confirmed_within_its_wait(
    tmp_path: Path, sqlite_url: str
) -> None:
    with Deployment.running("embedded", tmp_path, sqlite_url, "--log-level", "INFO") as d:
        _assert_a_fleet_is_confirmed(d, 2_000, v5=False)


# --- self-healing ----------------------------------------------------------------------------


def _site(tmp_path: Path, sqlite_url: str, settings: str) -> Deployment:
    """An orchestrator on the test's own Mosquitto with these YAML settings, its stats every 0.2 s."""
    config = tmp_path / "site.yaml"
    config.write_text(f"stats_interval: 0.2\n{settings}")
    d = Deployment("mosquitto", tmp_path, sqlite_url)
    try:
        d.start_orchestrator("--config", str(config))
    except BaseException:
        d.close()
        raise
    return d


def _reply(d: Deployment, runtime_id: str, after: float) -> Received:
    return d.observer.wait_for(lambda m: m.topic == TOPICS.reply(runtime_id), 10, after=after)


def _metrics(http_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        return metric_samples(response.read().decode())


@pytest.fixture
def healed_runtime(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[Deployment, Runtime, int]]:
    """``heal-1`` was refused (the site was full) and its retained request sits on the broker; then room was made.

    Nothing sends the orchestrator that request again: only its pulses can get it registered.
    """
    http_port = free_port()
    d = _site(tmp_path, sqlite_url, f"max_runtimes: 1\nhttp: 127.0.0.1:{http_port}\n")
    try:
        first, healing = d.runtime("first"), d.runtime("heal-1")
        started = time.monotonic()
        first.register(1, 1)
        assert json.loads(_reply(d, "first", started).payload)["ok"] is True
        healing.register(1, 1)  # retained, as agents publish it
        assert json.loads(_reply(d, "heal-1", started).payload)["ok"] is False
        first.publish(TOPICS.interval("first"), b"", retain=True)  # deregistered: there is room now
        d.observer.wait_for(lambda m: m.topic == TOPICS.reply("first") and b"deregistered" in m.payload, 10)
        yield d, healing, http_port
    finally:
        d.close()


def test_a_runtime_whose_registration_was_missed_is_registered_when_it_pulses(
    healed_runtime: tuple[Deployment, Runtime, int],
) -> None:
    d, healing, _ = healed_runtime
    for _ in range(3):
        healing.pulse()
    d.observer.wait_status("heal-1", "unknown", 10)
    healing.pulse()
    d.observer.wait_status("heal-1", "alive", 10)


def test_a_healed_runtime_is_told_it_is_registered(healed_runtime: tuple[Deployment, Runtime, int]) -> None:
    """Its retained request got it registered: a reply now spares it waiting for its next re-send."""
    d, healing, _ = healed_runtime
    pulsed = time.monotonic()
    healing.pulse()
    assert json.loads(_reply(d, "heal-1", pulsed).payload)["ok"] is True


def test_a_healed_runtime_is_watched_like_any_other(healed_runtime: tuple[Deployment, Runtime, int]) -> None:
    d, healing, _ = healed_runtime
    healing.pulse()
    d.observer.wait_status("heal-1", "unknown", 10)
    healing.pulse()
    alive = d.observer.wait_status("heal-1", "alive", 10)
    d.observer.wait_alert("heal-1", "dead", 10, after=alive.at)  # silent from here on: interval 1 + grace 1


def test_healing_is_counted_in_metrics_and_stats(healed_runtime: tuple[Deployment, Runtime, int]) -> None:
    d, healing, http_port = healed_runtime
    healing.pulse()
    d.observer.wait_status("heal-1", "unknown", 10)
    stats = d.observer.wait_for(
        lambda m: m.topic == TOPICS.orchestrator_stats and m.json()["registration"]["healed"] == 1, 10
    ).json()
    assert stats["registration"]["rejected"] == 1
    assert stats["unregistered_pulses"] >= 1
    samples = _metrics(http_port)
    outcome = {
        name: samples[("heartbeat_registrations_total", (("outcome", name),))]
        for name in ("received", "confirmed", "rejected", "healed")
    }
    assert outcome == {"received": 4, "confirmed": 3, "rejected": 1, "healed": 1}
    assert samples[("heartbeat_registration_fetches_total", ())] == 1
    assert samples[("heartbeat_unregistered_pulses_total", ())] >= 1


def test_a_pulse_from_an_id_with_no_registration_anywhere_is_counted_not_registered(
    tmp_path: Path, sqlite_url: str
) -> None:
    d = _site(tmp_path, sqlite_url, "")
    try:
        d.runtime("stray-1").pulse()
        stats = d.observer.wait_for(
            lambda m: m.topic == TOPICS.orchestrator_stats and m.json()["registration"]["fetched"] >= 1, 10
        ).json()
        assert stats["unregistered_pulses"] >= 1
        assert stats["registration"]["healed"] == 0
        assert "stray-1" not in {row["id"] for row in d.status_json()}
    finally:
        d.close()


def test_a_refused_retained_request_fetched_again_is_not_counted_twice(tmp_path: Path, sqlite_url: str) -> None:
    """The broker keeps a refused retained request; the runtime's pulses fetch it again, and it is refused again."""
    d = _site(tmp_path, sqlite_url, "")
    try:
        bad = d.runtime("bad-1")
        bad.publish(TOPICS.interval("bad-1"), b'{"interval": "often"}', retain=True)
        bad.pulse()
        stats = d.observer.wait_for(
            lambda m: m.topic == TOPICS.orchestrator_stats and m.json()["registration"]["fetched_refused"] == 1, 10
        ).json()
        assert stats["rejected"].get("bad_value", 0) + stats["rejected"].get("bad_type", 0) == 1
        assert stats["registration"]["rejected"] == 1
    finally:
        d.close()


def test_an_interval_request_with_a_response_topic_is_answered_there_with_its_correlation(
    mosquitto_deployment: Deployment,
) -> None:
    """Requests come on the lean connection (MQTT 5): the reply still carries the request's Correlation Data."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    response_topic = f"{protocol.DEFAULT_PREFIX}/replies/rr-1"
    answers: list[mqtt.MQTTMessage] = []
    answered, subscribed = threading.Event(), threading.Event()
    requester = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rr-requester", protocol=mqtt.MQTTv5)
    requester.on_message = lambda client, userdata, message: (answers.append(message), answered.set())
    requester.on_subscribe = lambda *args: subscribed.set()
    requester.connect("127.0.0.1", mosquitto_deployment.port)
    requester.loop_start()
    try:
        requester.subscribe(response_topic, qos=1)
        assert subscribed.wait(10)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = response_topic
        props.CorrelationData = b"corr-7"
        requester.publish(TOPICS.interval("rr-1"), protocol.encode_interval(5), qos=1, properties=props)
        assert answered.wait(10)
    finally:
        requester.loop_stop()
        requester.disconnect()
    assert json.loads(answers[0].payload)["ok"] is True
    assert answers[0].properties.CorrelationData == b"corr-7"


# --- one status per registration -------------------------------------------------------------


def _statuses_since(d: Deployment, sender: Runtime, runtime_id: str, after: float) -> list[dict[str, Any]]:
    """The statuses of ``runtime_id`` published since ``after``, once every status due before is out.

    The barrier: a fresh runtime registered through ``sender``, whose
    request the registrar takes after the ones before it. Its first status
    waits in the paced queue behind every status queued before and is sent
    once the outbox has published what it had due: when it arrives, so has
    every status of the registrations before it, on the same connection.
    """
    barrier = f"barrier-{uuid.uuid4().hex[:8]}"
    sent = time.monotonic()
    sender.publish(TOPICS.interval(barrier), protocol.encode_interval(30.0))
    d.observer.wait_status(barrier, "alive", 10, after=sent)
    topic = TOPICS.status(runtime_id)
    return [m.json() for m in list(d.observer.messages) if m.topic == topic and m.at >= after and m.payload]


def test_a_registration_publishes_its_status_once(deployment: Deployment) -> None:
    """A birth and a request, as an agent sends them: one status (it was two when the birth revived it)."""
    rt = deployment.runtime("once-1")
    started = time.monotonic()
    rt.state("online", 1)
    rt.register(30.0, 30.0)
    assert json.loads(_reply(deployment, "once-1", started).payload)["ok"] is True
    statuses = _statuses_since(deployment, rt, "once-1", started)
    assert [(s["state"], s["interval"]) for s in statuses] == [("alive", 30.0)]


def test_a_new_interval_publishes_the_status_once(deployment: Deployment) -> None:
    rt = deployment.runtime("once-2")
    rt.register(30.0, 30.0)
    deployment.observer.wait_status("once-2", "alive", 10)
    started = time.monotonic()
    rt.register(20.0, 20.0)
    assert json.loads(_reply(deployment, "once-2", started).payload)["ok"] is True
    statuses = _statuses_since(deployment, rt, "once-2", started)
    assert [(s["state"], s["interval"], s["grace"]) for s in statuses] == [("alive", 20.0, 20.0)]


@pytest.mark.parametrize("end", ["stopped", "dead"])
def test_an_agent_started_again_publishes_its_status_once(deployment: Deployment, end: str) -> None:
    """Its birth revives it, and that status goes out with the alert; its request, unchanged, adds none.

    The request published the status once more: two per registration for an
    agent restarted after a stop or a crash.
    """
    before = deployment.runtime("once-3", will_session=1)
    before.state("online", 1)
    before.register(30.0, 30.0)
    deployment.observer.wait_status("once-3", "alive", 10)
    ended = time.monotonic()
    if end == "stopped":
        before.state("stopped", 1)
    else:
        before.drop()  # the broker sends its will
    deployment.observer.wait_status("once-3", end, 10, after=ended)
    again = deployment.runtime("once-3", connection=1)
    started = time.monotonic()
    again.state("online", 2)
    deployment.observer.wait_status("once-3", "alive", 10, after=started)  # not in the same round as the request's
    again.register(30.0, 30.0)
    assert json.loads(_reply(deployment, "once-3", started).payload)["ok"] is True
    statuses = _statuses_since(deployment, again, "once-3", started)
    assert [(s["state"], s["reason"]) for s in statuses] == [("alive", "connected")]


def test_the_embedded_broker_stops_without_warning_of_what_nobody_can_receive(tmp_path: Path, sqlite_url: str) -> None:
    """amqtt warned "1 messages not broadcasted", twice, as it stopped with runtimes still connected."""
    with Deployment.running("embedded", tmp_path, sqlite_url) as d:
        rt = d.runtime("connected-1", will_session=1)
        rt.state("online", 1)
        rt.register(30.0, 30.0)
        d.observer.wait_status("connected-1", "alive", 10)
        orchestrator = d.orchestrators[-1]
        assert orchestrator.stop() == 0
    log = orchestrator.log()
    assert "embedded MQTT broker stopped" in log  # logged once the broker's process has exited
    assert "not broadcasted" not in log, log[-2000:]


def test_a_runtime_that_never_ran_is_stopped_without_an_alert(tmp_path: Path, sqlite_url: str) -> None:
    """An agent whose start failed left its retained request and ``stopped``; a later orchestrator
    registers it from them: ``stopped`` quietly, no alert about something nobody saw running."""
    d = Deployment("mosquitto", tmp_path, sqlite_url)
    try:
        left = d.runtime("rt-never-ran")
        left.register(1.0, 1.0)
        left.state("stopped", 7)
        left.close()
        started = time.monotonic()
        d.start_orchestrator()
        status = d.observer.wait_status("rt-never-ran", "stopped", 10, after=started).json()
        assert (status["reason"], status["last_seen"]) == ("stopped before it ever ran", None)
        witness = d.runtime("rt-witness")  # a barrier: its dead alert follows any alert given before it
        witness.register(0.5, 0.5)
        d.observer.wait_alert("rt-witness", "dead", 10, after=started)
        assert d.observer.alerts("rt-never-ran", after=started) == []
    finally:
        d.close()

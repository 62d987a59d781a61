"""End to end, with real processes, on the embedded amqtt broker and on a Mosquitto of the test's own.

Each test runs twice (``[embedded]`` and ``[mosquitto]``): the orchestrator is
``python -m orchestrator run``, agents are ``python -m runtime_agent``, and
an observer subscribed to ``heartbeat/v1/#`` sees what an administrator or a
dashboard would.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from runtime_agent import protocol

from .harness import TOPICS, Deployment

pytestmark = pytest.mark.e2e

INTERVAL = 0.5
RECONNECT_GRACE = 3.0
"""Grace of agents that must ride out an orchestrator restart (with the embedded broker, a broker restart)."""
GRACE = 0.5
Measure = Callable[[str, float, str], None]


def _state_of(d: Deployment, runtime_id: str) -> str:
    rows = {row["id"]: row for row in d.status_json()}
    return str(rows[runtime_id]["state"])


def _silent_for(d: Deployment, witness: str, window: float) -> None:
    """Return once ``window`` seconds have passed AND the orchestrator has judged every deadline up to then.

    The barrier instead of a sleep: ``witness``, registered now with an
    interval + grace of ``window`` and silent, is declared dead once its
    deadline passes. The watch judges every runtime due by then in the same
    pass or an earlier one, and the statuses of a batch go out after all its
    alerts: a dead alert for anyone due by then has arrived before the
    witness's dead status that follows its alert.
    """
    started = time.monotonic()
    rt = d.runtime(witness)
    rt.register(window / 2, window / 2)
    alert = d.observer.wait_alert(witness, "dead", window + 5, after=started)
    d.observer.wait_status(witness, "dead", 5, after=alert.at)


def test_registration_is_confirmed_and_stored(deployment: Deployment) -> None:
    started = time.monotonic()
    agent = deployment.agent("rt-reg", INTERVAL)
    agent.registered()
    reply = deployment.observer.wait_for(lambda m: m.topic == TOPICS.reply("rt-reg"), 5, after=started).json()
    assert reply == {"ok": True, "id": "rt-reg", "interval": INTERVAL, "grace": INTERVAL}
    deployment.observer.wait_status("rt-reg", "alive", 5, after=started)
    assert _state_of(deployment, "rt-reg") == "alive"


def test_bad_interval_gets_an_error_reply(deployment: Deployment) -> None:
    rt = deployment.runtime("rt-bad-interval")
    started = time.monotonic()
    rt.publish(TOPICS.interval("rt-bad-interval"), b'{"interval": 0.01}')
    reply = deployment.observer.wait_for(lambda m: m.topic == TOPICS.reply("rt-bad-interval"), 5, after=started).json()
    assert reply["ok"] is False
    assert "interval must be between 0.1 and 86400" in reply["error"]
    assert all(row["id"] != "rt-bad-interval" for row in deployment.status_json())


def test_agent_refuses_a_bad_interval_with_the_orchestrators_reason(deployment: Deployment) -> None:
    """The agent validates locally first; --grace 0 is out of range and says so."""
    agent = deployment.agent("rt-bad-grace", INTERVAL, grace=0)
    assert agent.process.wait(15) == 2
    assert agent.process.stderr is not None
    assert "grace must be between 0.1 and 86400" in agent.process.stderr.read().decode()


def test_bad_id_is_rejected_with_a_reply_on_the_response_topic(mosquitto_deployment: Deployment) -> None:
    """A bad ID never builds a topic: the reply goes to the MQTT 5 Response Topic.

    Mosquitto only: the embedded amqtt broker speaks MQTT 3.1.1, which has no
    Response Topic, so there a bad ID can only be logged and counted.
    """
    deployment = mosquitto_deployment
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    rt = deployment.runtime("helper", mqtt5=True)
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = f"{protocol.DEFAULT_PREFIX}/replies/helper"
    props.CorrelationData = b"req-1"
    started = time.monotonic()
    rt.publish(f"{protocol.DEFAULT_PREFIX}/runtimes/bad id!/interval", b'{"interval": 1}', properties=props)
    reply = deployment.observer.wait_for(lambda m: m.topic == props.ResponseTopic, 5, after=started)
    assert reply.json()["ok"] is False
    assert "invalid runtime id" in reply.json()["error"]


def test_a_response_topic_aimed_at_the_alerts_gets_no_reply(mosquitto_deployment: Deployment) -> None:
    """The orchestrator may write alerts and statuses; a request must not borrow that right."""
    deployment = mosquitto_deployment
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    rt = deployment.runtime("rt-forger", mqtt5=True)
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = TOPICS.alerts
    started = time.monotonic()
    rt.publish(TOPICS.interval("rt-forger"), protocol.encode_interval(INTERVAL), properties=props)
    deployment.observer.wait_for(lambda m: m.topic == TOPICS.reply("rt-forger"), 5, after=started)
    # The barrier: a second request whose Response Topic is allowed. The replies of one batch are all
    # sent before the next batch's, on one connection: a reply on the alert topic would arrive first.
    allowed = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    allowed.ResponseTopic = f"{protocol.DEFAULT_PREFIX}/replies/rt-forger"
    rt.publish(TOPICS.interval("rt-forger"), protocol.encode_interval(INTERVAL), properties=allowed)
    deployment.observer.wait_for(lambda m: m.topic == allowed.ResponseTopic, 5, after=started)
    assert [m for m in deployment.observer.messages if m.topic == TOPICS.alerts and m.at >= started] == []


def test_agent_with_a_bad_id_fails_before_connecting(deployment: Deployment) -> None:
    agent = deployment.agent("bad id!", INTERVAL)
    assert agent.process.wait(15) == 2
    assert agent.process.stderr is not None
    assert "invalid runtime id" in agent.process.stderr.read().decode()


def test_pulses_keep_a_runtime_alive(deployment: Deployment) -> None:
    started = time.monotonic()
    agent = deployment.agent("rt-steady", INTERVAL)
    agent.registered()
    _silent_for(deployment, "rt-steady-watched", 6 * (INTERVAL + GRACE))
    assert deployment.observer.alerts("rt-steady", after=started) == []
    assert _state_of(deployment, "rt-steady") == "alive"


def test_sigkill_gives_dead_via_the_will_well_before_the_deadline(deployment: Deployment, measure: Measure) -> None:
    interval = 3.0  # long, so the will path and the deadline path cannot be confused
    agent = deployment.agent("rt-killed", interval)
    agent.registered()
    time.sleep(0.3)
    killed = time.monotonic()
    agent.signal(signal.SIGKILL)
    alert = deployment.observer.wait_alert("rt-killed", "dead", 2 * interval, after=killed)
    elapsed = alert.at - killed
    measure(f"SIGKILL to dead alert ({deployment.kind})", elapsed, "s")
    assert alert.json()["reason"] == "connection lost"
    assert elapsed < interval / 2


def test_connected_but_silent_runtime_is_dead_within_interval_plus_grace(
    deployment: Deployment, measure: Measure
) -> None:
    rt = deployment.runtime("rt-silent")
    started = time.monotonic()
    rt.register(INTERVAL, GRACE)
    deployment.observer.wait_status("rt-silent", "alive", 5, after=started)
    for _ in range(3):
        rt.pulse()
        time.sleep(INTERVAL / 2)
    rt.pulse()
    last_pulse = time.monotonic()
    alert = deployment.observer.wait_alert("rt-silent", "dead", INTERVAL + GRACE + 2, after=last_pulse)
    silence = alert.at - last_pulse
    measure(f"last pulse to dead alert, interval+grace={INTERVAL + GRACE} ({deployment.kind})", silence, "s")
    assert INTERVAL + GRACE - 0.05 <= silence <= INTERVAL + GRACE + 0.5
    assert alert.json()["reason"].startswith("no pulse for")


def test_graceful_stop_gives_stopped_and_no_dead_alert(deployment: Deployment) -> None:
    agent = deployment.agent("rt-stop", INTERVAL)
    agent.registered()
    started = time.monotonic()
    assert agent.stop() == 0
    deployment.observer.wait_alert("rt-stop", "stopped", 5, after=started)
    _silent_for(deployment, "rt-stop-watched", INTERVAL + GRACE)  # past the deadline rt-stop had
    assert deployment.observer.alerts("rt-stop", "dead", after=started) == []
    assert _state_of(deployment, "rt-stop") == "stopped"


def test_pulsing_again_gives_recovered(deployment: Deployment) -> None:
    rt = deployment.runtime("rt-back")
    started = time.monotonic()
    rt.register(INTERVAL, GRACE)
    rt.pulse()
    deployment.observer.wait_alert("rt-back", "dead", 5, after=started)
    revived = time.monotonic()
    rt.pulse()
    alert = deployment.observer.wait_alert("rt-back", "recovered", 5, after=revived)
    assert alert.json()["reason"] == "pulse received"
    deployment.observer.wait_status("rt-back", "alive", 5, after=revived)


def test_unregistered_pulses_are_dropped_and_logged_once(deployment: Deployment) -> None:
    rt = deployment.runtime("rt-stranger")
    for _ in range(20):
        rt.pulse()
    # The barrier: a request from the same client, read after the pulses; its (error) reply means they were.
    started = time.monotonic()
    rt.publish(TOPICS.interval("rt-stranger-barrier"), b'{"interval": 0.01}')
    deployment.observer.wait_for(lambda m: m.topic == TOPICS.reply("rt-stranger-barrier"), 5, after=started)
    log = deployment.orchestrators[-1].log()
    assert log.count("pulse from unregistered runtime") == 1
    assert all(row["id"] != "rt-stranger" for row in deployment.status_json())


def test_orchestrator_restart_loses_no_state_and_raises_no_false_alert(deployment: Deployment) -> None:
    """No alert for runtimes back within their grace of the restart.

    With the embedded broker, a restart also restarts the broker, and the agents
    reconnect with backoff (0.2, 0.4, 0.8 s...); on a loaded machine that took
    longer than a 0.5 s grace. Their grace (3 s) covers it, as it must in any deployment.

    ``rt-back`` falls silent 2 s before the restart and pulses again only
    after the deadline its stored last pulse gives (last pulse + interval +
    grace), yet within interval + grace of the restart: a restarted
    orchestrator watches every runtime for a full interval + grace from its
    own start before it judges it, instead of judging time it did not watch.
    """
    back_grace = 5.0
    agents = [deployment.agent(f"rt-keep-{i}", INTERVAL, grace=RECONNECT_GRACE) for i in range(3)]
    for agent in agents:
        agent.registered()
    back = deployment.runtime("rt-back")
    back.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # the embedded broker restarts too
    back.register(INTERVAL, back_grace)
    deployment.observer.wait_status("rt-back", "alive", 5)
    dead = deployment.runtime("rt-was-dead")
    dead.register(INTERVAL, GRACE)
    deployment.observer.wait_alert("rt-was-dead", "dead", 5)
    back.pulse()  # its last pulse before the restart
    last_pulse = time.monotonic()
    time.sleep(1.5)  # let a last-seen flush happen
    before = {row["id"]: row for row in deployment.status_json()}
    time.sleep(max(0.0, last_pulse + 2.0 - time.monotonic()))

    restarted = time.monotonic()
    assert deployment.orchestrators[-1].stop() == 0
    deployment.start_orchestrator()
    ready = deployment.observer.wait_for(
        lambda m: m.topic == TOPICS.orchestrator_state and m.json().get("state") == "online", 5, after=restarted
    ).at
    # Past the deadline of its stored last pulse, within its grace of the restart (0.75 s to spare).
    back_at = min(last_pulse + INTERVAL + back_grace + 0.5, ready + INTERVAL + back_grace - 0.75)
    end = max(restarted, ready) + INTERVAL + RECONNECT_GRACE + 1.0
    time.sleep(max(0.0, back_at - time.monotonic()))
    while True:  # rt-back pulses again, until the agents' window after the restart has passed
        back.pulse()
        if time.monotonic() >= max(end, back_at + INTERVAL):
            break
        time.sleep(INTERVAL / 2)

    assert deployment.observer.alerts(after=restarted) == []
    # Statuses are published again after a restart (the embedded broker lost its retained copies).
    deployment.observer.wait_status("rt-was-dead", "dead", 5, after=restarted)
    after = {row["id"]: row for row in deployment.status_json()}
    assert set(after) == set(before)
    assert {rid: row["state"] for rid, row in after.items()} == {
        **{f"rt-keep-{i}": "alive" for i in range(3)},
        "rt-back": "alive",
        "rt-was-dead": "dead",
    }
    assert after["rt-was-dead"]["since"] == before["rt-was-dead"]["since"]


def test_sigterm_stops_cleanly(deployment: Deployment) -> None:
    assert deployment.orchestrators[-1].stop(signal.SIGTERM) == 0
    assert "stopped; pulses received" in deployment.orchestrators[-1].log()


def test_sigterm_publishes_offline_orchestrator_state(mosquitto_deployment: Deployment) -> None:
    started = time.monotonic()
    assert mosquitto_deployment.orchestrators[-1].stop(signal.SIGTERM) == 0
    state = mosquitto_deployment.observer.wait_for(lambda m: m.topic == TOPICS.orchestrator_state, 5, after=started)
    assert state.json() == {"state": "offline"}


def test_postgresql_registration_death_and_restart(pg_deployment: Deployment) -> None:
    d = pg_deployment
    agent = d.agent("rt-pg", INTERVAL)
    agent.registered()
    killed = time.monotonic()
    agent.signal(signal.SIGKILL)
    d.observer.wait_alert("rt-pg", "dead", 5, after=killed)
    deadline = time.monotonic() + 5  # the alert may go out before its flip is stored (db_timeout)
    while _state_of(d, "rt-pg") != "dead" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _state_of(d, "rt-pg") == "dead"
    restarted = time.monotonic()
    assert d.orchestrators[-1].stop() == 0
    d.start_orchestrator()
    time.sleep(2 * (INTERVAL + GRACE))
    assert d.observer.alerts(after=restarted) == []
    assert _state_of(d, "rt-pg") == "dead"

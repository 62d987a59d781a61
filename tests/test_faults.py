"""Faults the orchestrator must survive without crying wolf (real processes, paused and resumed by PID)."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime_agent import protocol

from .harness import TOPICS, Deployment
from .proxy import BlackholeProxy

pytestmark = pytest.mark.e2e

INTERVAL = 1.0


@pytest.fixture(params=["embedded", "mosquitto"])
def pulsing(request: pytest.FixtureRequest, tmp_path: Path, sqlite_url: str) -> Iterator[Deployment]:
    """An orchestrator watching three agents that pulse every second (grace 1 s)."""
    d = Deployment(request.param, tmp_path, sqlite_url)
    try:
        d.start_orchestrator()
        for i in range(3):
            d.agent(f"rt-pulsing-{i}", INTERVAL)
        for agent in d.agents:
            agent.registered()
        yield d
    finally:
        d.close()


def test_a_paused_orchestrator_does_not_declare_pulsing_runtimes_dead(
    pulsing: Deployment, measure: Callable[[str, float, str], None]
) -> None:
    """SIGSTOP for 2 x (interval + grace), then SIGCONT: it notices its own stall and restarts the window.

    The pulsing runtimes' pulses of the pause are read before any verdict (the
    echo comes back behind them), so they stay alive. What only the restarted
    window shows is ``rt-quiet``: silent since just before the pause, its
    deadline fell inside it. Judged on waking, it would be dead at once; the
    orchestrator does not judge time it did not watch, so it is dead one full
    interval + grace after the stall. Its dead status is also the barrier: the
    watch has judged everyone due by then, and the statuses of a batch follow
    all its alerts, so a false dead alert would be in.
    """
    d = pulsing
    orchestrator = d.orchestrators[-1]
    assert orchestrator.process is not None
    quiet = d.runtime("rt-quiet")
    registered = time.monotonic()
    quiet.register(INTERVAL)  # a registration is a sign of life: alive now, silent from here on
    d.observer.wait_status("rt-quiet", "alive", 5, after=registered)
    paused = time.monotonic()
    orchestrator.process.send_signal(signal.SIGSTOP)
    time.sleep(2 * (INTERVAL + INTERVAL))  # rt-quiet's deadline falls in the middle of the pause
    orchestrator.process.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    alert = d.observer.wait_alert("rt-quiet", "dead", 2 * (INTERVAL + INTERVAL) + 5, after=paused)
    d.observer.wait_status("rt-quiet", "dead", 5, after=alert.at)  # sent after every alert of its batch
    measure(f"SIGCONT to the silent runtime declared dead ({d.kind})", alert.at - resumed, "s")
    assert alert.at - resumed >= INTERVAL + INTERVAL - 0.5, "judged on waking, not a full window after the stall"
    assert alert.at - resumed <= INTERVAL + INTERVAL + 1.5, "a real death still follows the restarted window"
    for i in range(3):
        assert d.observer.alerts(f"rt-pulsing-{i}", "dead", after=paused) == []
        d.observer.wait_status(f"rt-pulsing-{i}", "alive", 5)
    assert "stalled for" in orchestrator.log()


def test_a_late_will_from_a_previous_connection_leaves_the_runtime_alive(deployment: Deployment) -> None:
    """The will names its session; the runtime reconnected with a newer one, so the old will is stale."""
    old = deployment.runtime("rt-late", will_session=1, connection=1)
    old.state("online", 1)
    old.register(INTERVAL)
    old.pulse()
    deployment.observer.wait_status("rt-late", "alive", 5)
    new = deployment.runtime("rt-late", will_session=2, connection=2)
    new.state("online", 2)
    new.pulse()
    time.sleep(0.2)
    dropped = time.monotonic()
    old.drop()  # the broker now publishes the old connection's will: {"state": "offline", "session": 1}
    deployment.observer.wait_for(
        lambda m: m.topic.endswith("/rt-late/state") and m.json().get("session") == 1 and m.at >= dropped, 5
    )
    for _ in range(4):
        new.pulse()
        time.sleep(INTERVAL / 2)
    assert deployment.observer.alerts("rt-late", after=dropped) == []
    new.drop()  # the current connection's own will does count
    alert = deployment.observer.wait_alert("rt-late", "dead", 5, after=dropped)
    assert alert.json()["reason"] == "connection lost"


def test_pulses_on_the_interval_with_ten_percent_jitter_raise_no_alert(deployment: Deployment) -> None:
    rt = deployment.runtime("rt-jitter")
    interval = 0.5
    rt.register(interval)
    rt.pulse()
    started = time.monotonic()
    rng = random.Random(12)
    for _ in range(40):
        time.sleep(interval * rng.uniform(0.9, 1.1))
        rt.pulse()
    assert deployment.observer.alerts("rt-jitter", after=started) == []


def test_a_half_open_link_to_the_broker_raises_no_false_alert(
    tmp_path: Path, sqlite_url: str, measure: Callable[[str, float, str], None]
) -> None:
    """The orchestrator's link goes silent (a proxy drops every byte) for 3 x (interval + grace).

    It cannot tell that from every runtime dying at once, except by the echo it
    sends itself before any verdict. Pulsing runtimes must never be declared
    dead; the one that really died meanwhile is reported after the link returns.
    """
    d = Deployment("mosquitto", tmp_path, sqlite_url)
    proxy = BlackholeProxy(d.port)
    config = tmp_path / "orchestrator.yaml"
    config.write_text("reconnect_max: 1.0\necho_timeout: 1.0\n")
    try:
        d.start_orchestrator("--broker", f"mqtt://127.0.0.1:{proxy.port}", "--config", str(config))
        agents = [d.agent(f"rt-steady-{i}", INTERVAL) for i in range(3)]
        for agent in agents:
            agent.registered()
        doomed = d.runtime("rt-doomed")
        doomed.register(INTERVAL)
        doomed.pulse()
        d.observer.wait_status("rt-doomed", "alive", 5)

        cut = time.monotonic()
        proxy.blackhole()
        doomed.close()  # really dies while nobody can see it
        time.sleep(3 * (INTERVAL + INTERVAL))
        proxy.restore()
        restored = time.monotonic()

        alert = d.observer.wait_alert("rt-doomed", "dead", 30, after=cut)
        measure("link restored to the real death reported", alert.at - restored, "s")
        time.sleep(2 * INTERVAL)
        assert [a["id"] for a in d.observer.alerts(event="dead", after=cut)] == ["rt-doomed"]
        assert "no echo from the broker" in d.orchestrators[-1].log()
    finally:
        d.close()
        proxy.close()


def test_two_agents_with_one_id_raise_one_conflict_and_no_flapping(deployment: Deployment) -> None:
    """Same ID, same MQTT client ID: the broker hands the connection back and forth, wills included."""
    first = deployment.agent("rt-twin", INTERVAL)
    first.registered()
    started = time.monotonic()
    second = deployment.agent("rt-twin", INTERVAL)
    conflict = deployment.observer.wait_alert("rt-twin", "conflict", 15, after=started)
    assert "two connections claim" in conflict.json()["reason"]
    time.sleep(4 * (INTERVAL + INTERVAL))
    alerts = [a["event"] for a in deployment.observer.alerts("rt-twin", after=started)]
    assert alerts == ["conflict"]
    first.signal(signal.SIGKILL)  # one claimant dies, the other goes on: still alive
    killed = time.monotonic()
    time.sleep(3 * (INTERVAL + INTERVAL))
    assert deployment.observer.alerts("rt-twin", event="dead", after=killed) == []
    second.signal(signal.SIGKILL)  # now nobody pulses: dead by the deadline, wills ignored or not
    deployment.observer.wait_alert("rt-twin", "dead", 3 * (INTERVAL + INTERVAL) + 2, after=killed)


def test_a_will_is_ignored_while_two_connections_claim_one_id(deployment: Deployment) -> None:
    """Two connections claim ``rt-claimed``: one conflict alert; then the one that announced itself last drops.

    Its will names the newest session, so only the conflict says it is no
    proof of death: the other claimant is still pulsing. Applied, the will
    would give ``dead``, and the other's next pulse ``recovered``: the flapping
    a conflict must not cause. The barrier: ``rt-bystander``'s will, sent right
    after, is applied (dead) by the same watch after every will before it.
    """
    first = deployment.runtime("rt-claimed", will_session=1, connection=1)
    first.state("online", 1)
    first.register(INTERVAL)
    first.pulse(protocol.encode_pulse(session=1))
    deployment.observer.wait_status("rt-claimed", "alive", 5)
    bystander = deployment.runtime("rt-bystander", will_session=9)
    bystander.state("online", 9)
    bystander.register(30.0)
    deployment.observer.wait_status("rt-bystander", "alive", 5)

    started = time.monotonic()
    second = deployment.runtime("rt-claimed", will_session=2, connection=2)
    second.state("online", 2)  # a live birth of another session: one sign
    first.pulse(protocol.encode_pulse(session=1))  # pulses of a session that is not the newest: two more
    first.pulse(protocol.encode_pulse(session=1))
    deployment.observer.wait_alert("rt-claimed", "conflict", 5, after=started)
    first.state("online", 1)  # the first claimant announces itself again: its session is the newest
    second.pulse(protocol.encode_pulse(session=2))
    deployment.observer.wait_for(
        lambda m: m.topic == TOPICS.state("rt-claimed") and m.json() == {"state": "online", "session": 1},
        5,
        after=started,
    )

    dropped = time.monotonic()
    first.drop()  # the broker sends its will, {"state": "offline", "session": 1}
    deployment.observer.wait_for(
        lambda m: m.topic == TOPICS.state("rt-claimed") and m.json().get("state") == "offline", 5, after=dropped
    )
    bystander.drop()
    for _ in range(2):  # the other claimant goes on pulsing
        second.pulse(protocol.encode_pulse(session=2))
        time.sleep(INTERVAL / 4)
    alert = deployment.observer.wait_alert("rt-bystander", "dead", 5, after=dropped)
    deployment.observer.wait_status("rt-bystander", "dead", 5, after=alert.at)
    assert [a["event"] for a in deployment.observer.alerts("rt-claimed", after=started)] == ["conflict"]


def test_a_runtime_behind_a_half_open_link_is_dead_by_its_deadline_not_its_keepalive(
    mosquitto_deployment: Deployment, measure: Callable[[str, float, str], None]
) -> None:
    """The runtime's own link goes silent: the broker would notice only after 1.5 x keepalive (45 s here).

    The deadline does not wait for that: dead within interval + grace of the last pulse that got through.
    """
    d = mosquitto_deployment
    proxy = BlackholeProxy(d.port)
    try:
        rt = d.runtime_via(proxy.port, "rt-half-open", will_session=1)
        rt.state("online", 1)
        rt.register(INTERVAL)
        d.observer.wait_status("rt-half-open", "alive", 5)
        for _ in range(3):
            rt.pulse()
            time.sleep(INTERVAL / 2)
        d.observer.wait_for(lambda m: m.topic.endswith("/rt-half-open/pulse"), 5, after=time.monotonic() - 1)
        proxy.blackhole()
        cut = time.monotonic()
        for _ in range(6):  # it keeps pulsing into the void
            rt.pulse()
            time.sleep(INTERVAL / 2)
        alert = d.observer.wait_alert("rt-half-open", "dead", 10, after=cut)
        # The deadline runs from the last pulse that got through (one in flight at the cut may still have).
        pulses = [m.at for m in list(d.observer.messages) if m.topic.endswith("/rt-half-open/pulse")]
        last = max(at for at in pulses if at < alert.at)
        lateness = alert.at - (last + INTERVAL + INTERVAL)
        measure("half-open runtime: dead after its deadline by", lateness, "s")
        assert lateness < 0.5
        assert "no pulse for" in alert.json()["reason"]
    finally:
        proxy.close()

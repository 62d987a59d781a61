"""Restarting the orchestrator on the embedded broker (which restarts with it) raises no false alert.

The agents are the library's own, with their default reconnect backoff
(0.5 s doubling to 5 s, each times 0.5-1.5): after a restart they come back
up to 7.5 s after the broker, and the first window waits for them
(``reconnect_allowance``). A runtime that died while the orchestrator was down
is still reported, within that allowance plus its interval and grace.

HEARTBEAT_RESTARTS=20,5 runs the issue's full 20 SIGTERM and 5 SIGKILL
restarts (about 5 minutes); the default (6 and 2) keeps CI short.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from orchestrator.broker import BrokerStartError, broker_command, check_bindable, child_env, free_port, wait_for_port
from orchestrator.config import Config
from runtime_agent import Agent

from .harness import TOPICS, Deployment

AGENTS = 50
INTERVAL = 1.0  # the agents' grace is the orchestrator's default: the interval
ALLOWANCE = Config().reconnect_allowance
OUTAGE = 3.0
"""Seconds between a stop and the next start: the agents' waits have grown to 2-4 s by then, so some come
back more than interval + grace after ready (without the allowance, false dead verdicts)."""
SLACK = 1.5
"""Seconds a verdict may come after its deadline on this busy test machine (an echo, the watch's wake-up)."""


def restarts() -> list[int]:
    """The signals of the restarts: SIGTERM and SIGKILL interleaved, SIGKILL among the first few."""
    terms, kills = (int(n) for n in os.environ.get("HEARTBEAT_RESTARTS", "6,2").split(","))
    plan = [signal.SIGTERM] * terms
    for i in range(kills):
        plan.insert(1 + i * max(1, len(plan) // kills), signal.SIGKILL)
    return [int(s) for s in plan]


@pytest.fixture
def fleet(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[Deployment, list[Agent]]]:
    """An orchestrator on its embedded broker, watching 50 library agents at interval 1."""
    with Deployment.running("embedded", tmp_path, sqlite_url) as d:
        agents = [Agent(f"rt-{i:02d}", interval=INTERVAL, broker=d.broker_url, timeout=15) for i in range(AGENTS)]
        try:
            for agent in agents:
                agent.start()
            for agent in agents:
                agent.wait_registered(15)
            yield d, agents
        finally:
            for agent in agents:
                agent.stop()


def judged_a_full_window(d: Deployment, witness: str, ready: float) -> None:
    """Return once the watch has judged the whole first window after ``ready`` (a barrier, not a sleep).

    ``witness`` registers now (a live request: alive from now) and stays
    silent; its deadline is the end of that window. Its dead alert comes in
    the pass that judges everyone due by then.
    """
    rt = d.runtime(witness)
    rt.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
    rt.register(INTERVAL, INTERVAL)
    timeout = ALLOWANCE + 2 * INTERVAL + 15
    try:
        d.observer.wait_alert(witness, "dead", timeout, after=ready)
    except TimeoutError:
        raise AssertionError(f"{witness} never declared dead:\n{d.orchestrators[-1].log_tail(6000)}") from None
    rt.close()


def dead_flips(db_url: str) -> list[tuple[str, float]]:
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as db:
        return list(db.execute("SELECT runtime_id, at FROM flip WHERE event = 'dead' ORDER BY at"))


@pytest.mark.timeout(900)  # each restart takes about 12 s: the window waits for the agents' reconnects
def test_restarts_on_the_embedded_broker_raise_no_false_alert_and_miss_no_death(
    fleet: tuple[Deployment, list[Agent]], sqlite_url: str
) -> None:
    d, agents = fleet
    victim = d.agent("rt-victim", INTERVAL)
    victim.registered()
    plan = restarts()
    victim_round = len(plan) // 2
    victim_dead_after_ready: float | None = None
    for number, sig in enumerate(plan):
        stopped = time.monotonic()
        d.orchestrators[-1].stop(sig)
        if number == victim_round:
            victim.process.kill()  # dies while nobody watches: no will either (the broker is gone too)
            victim.process.wait(10)
        time.sleep(OUTAGE)  # the agents' backoff grows meanwhile, as behind a supervisor's restart delay
        proc = d.start_orchestrator()
        ready = d.observer.wait_for(
            lambda m: m.topic == TOPICS.orchestrator_state and m.json().get("state") == "online", 20, after=stopped
        ).at
        judged_a_full_window(d, f"rt-witness-{number}", ready)
        if number == victim_round:
            dead = d.observer.wait_alert("rt-victim", "dead", 5, after=ready)
            victim_dead_after_ready = dead.at - ready
        false = [rid for rid, _ in dead_flips(sqlite_url) if not rid.startswith(("rt-witness-", "rt-victim"))]
        assert false == [], f"false dead verdicts after restart {number + 1} ({signal.Signals(sig).name}): {false}"
        assert all(agent.connected for agent in agents), proc.log_tail()

    expected = {f"rt-witness-{n}" for n in range(len(plan))} | {"rt-victim"}
    assert [a for a in d.observer.alerts() if a["id"] not in expected] == []
    assert victim_dead_after_ready is not None
    print(f"{len(plan)} restarts, no false verdict; victim declared dead {victim_dead_after_ready:.2f} s after ready")
    assert victim_dead_after_ready <= ALLOWANCE + 2 * INTERVAL + SLACK


@pytest.fixture
def embedded_broker_process() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """An embedded broker's own process, as an orchestrator starts it (it stops when its stdin closes)."""
    port = free_port()
    process = subprocess.Popen(
        broker_command("127.0.0.1", port), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=child_env()
    )
    try:
        wait_for_port(port, 20)
        yield process, port
    finally:
        process.kill()
        process.wait(10)


def test_a_restart_right_after_sigkill_waits_for_the_old_embedded_broker_to_let_go(
    embedded_broker_process: tuple[subprocess.Popen[bytes], int],
) -> None:
    """The killed orchestrator's broker child still holds the port for a moment: start waits, not fails."""
    process, port = embedded_broker_process
    assert process.stdin is not None
    process.stdin.close()  # what the kernel does when its orchestrator is killed
    check_bindable("127.0.0.1", port)
    assert process.wait(5) == 0


def test_a_port_held_by_a_running_embedded_broker_is_named_as_such(
    embedded_broker_process: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = embedded_broker_process
    with pytest.raises(BrokerStartError, match=rf"another heartbeat orchestrator \(pid {process.pid}\)"):
        check_bindable("127.0.0.1", port, wait_for_ours=0.3)


def test_the_embedded_broker_exits_promptly_when_its_orchestrator_is_gone_though_clients_reconnect(
    embedded_broker_process: tuple[subprocess.Popen[bytes], int],
) -> None:
    """amqtt's shutdown waited for ever while agents kept reconnecting: the orphan then held the port for good."""
    process, port = embedded_broker_process
    clients = []
    for i in range(AGENTS):
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"reconnecting-{i}")
        client.reconnect_delay_set(0.05, 0.1)  # type: ignore[arg-type]
        client.will_set(f"test/will/{i}", b"offline", qos=1, retain=True)
        client.connect("127.0.0.1", port)
        client.loop_start()
        clients.append(client)
    try:
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(5) == 0
    finally:
        for client in clients:
            client.loop_stop()

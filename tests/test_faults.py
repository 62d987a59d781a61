"""Faults the orchestrator must survive without crying wolf (real processes, paused and resumed by PID)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Deployment

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


def test_a_paused_orchestrator_does_not_declare_pulsing_runtimes_dead(pulsing: Deployment) -> None:
    """SIGSTOP for 2 x (interval + grace), then SIGCONT: it notices its own stall instead of judging."""
    orchestrator = pulsing.orchestrators[-1]
    assert orchestrator.process is not None
    paused = time.monotonic()
    orchestrator.process.send_signal(signal.SIGSTOP)
    time.sleep(2 * (INTERVAL + INTERVAL))
    orchestrator.process.send_signal(signal.SIGCONT)
    time.sleep(3 * INTERVAL)
    assert pulsing.observer.alerts(event="dead", after=paused) == []
    for i in range(3):
        pulsing.observer.wait_status(f"rt-pulsing-{i}", "alive", 5)
    assert "stalled for" in orchestrator.log()

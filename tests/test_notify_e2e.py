"""Notifications end to end: a real orchestrator, real agents, a real HTTP server on loopback."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.store import Store

from .harness import Deployment
from .webhook import Hook

pytestmark = pytest.mark.e2e

INTERVAL = 1.0


def test_a_killed_agent_reaches_the_webhook_and_its_flip_is_marked_notified(
    tmp_path: Path, sqlite_url: str, hook: Hook, measure: Callable[[str, float, str], None]
) -> None:
    with Deployment.running("mosquitto", tmp_path, sqlite_url, "--notify", hook.url) as d:
        agent = d.agent("rt-hooked", INTERVAL)
        agent.registered()
        killed = time.monotonic()
        agent.signal(signal.SIGKILL)
        at, body = hook.wait(lambda b: b.get("event") == "dead" and b.get("id") == "rt-hooked", 10)
        measure("SIGKILL to webhook receipt", at - killed, "s")
        assert body["reason"] == "connection lost"
        store = Store(sqlite_url)
        store.open()
        try:
            deadline = time.monotonic() + 10
            while (flip := store.history("rt-hooked")[0]).event != "dead" or not _notified(store, flip.at):
                assert time.monotonic() < deadline, "the dead flip was never marked notified"
                time.sleep(0.1)
        finally:
            store.close()
    assert [b for _, b in hook.received if b.get("event") == "dead"] == [body]  # once, not again


def _notified(store: Store, at: float) -> bool:
    from orchestrator.store import Flip

    row = Flip.get_or_none((Flip.runtime_id == "rt-hooked") & (Flip.at == at))
    return row is not None and row.notified_at is not None


def test_many_deaths_at_once_reach_people_as_one_outage_and_the_alert_topic_in_full(
    tmp_path: Path, sqlite_url: str, hook: Hook
) -> None:
    config = tmp_path / "storm.yaml"
    config.write_text(f"notify:\n  - url: {hook.url}\nstorm_count: 3\nstorm_window: 5\n")
    with Deployment.running("mosquitto", tmp_path, sqlite_url, "--config", str(config)) as d:
        ids = [f"rt-storm-{i}" for i in range(8)]
        runtimes = [d.runtime(rid, will_session=1, connection=1) for rid in ids]
        for rt in runtimes:
            rt.state("online", 1)
            rt.register(30.0)
        for rid in ids:
            d.observer.wait_status(rid, "alive", 10)
        dropped = time.monotonic()
        for rt in runtimes:  # all at once, as when their host dies (Runtime.drop() would wait per client)
            sock = rt.client.socket()
            assert sock is not None
            sock.shutdown(socket.SHUT_RDWR)
        for rt in runtimes:
            rt.client.loop_stop()
        _, outage = hook.wait(lambda b: b.get("event") == "outage", 10)
        for rid in ids:
            d.observer.wait_alert(rid, "dead", 10, after=dropped)
        time.sleep(1.0)
    events = [b["event"] for _, b in hook.received]
    assert events.count("outage") == 1
    assert events.count("dead") <= 3, events  # at most the storm limit went out one by one
    assert outage["count"] == len(ids)

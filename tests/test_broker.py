"""The embedded broker: amqtt in a child process that starts, serves, restarts and stops with the orchestrator."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from orchestrator.broker import EmbeddedBroker, child_env, free_port


def round_trip(port: int, timeout: float = 10.0) -> bool:
    """Whether a message published on the broker at ``port`` comes back to a subscriber (MQTT 3.1.1)."""
    got = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_message = lambda *_: got.set()
    client.on_subscribe = lambda c, *_: c.publish("probe/x", b"1", qos=1)
    client.on_connect = lambda c, *_: c.subscribe("probe/#", qos=1)
    try:
        client.connect("127.0.0.1", port)
    except OSError:
        return False
    client.loop_start()
    try:
        return got.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()


def gone(pid: int, within: float = 10.0) -> bool:
    """Whether process ``pid`` has exited (or become a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def with_broker(check: Callable[[EmbeddedBroker], Awaitable[None]]) -> None:
    """Run ``check`` against a running embedded broker on a free loopback port."""

    async def run() -> None:
        async with EmbeddedBroker("127.0.0.1", free_port()) as broker:
            await check(broker)

    asyncio.run(run())


def test_the_broker_runs_in_a_process_of_its_own() -> None:
    async def check(broker: EmbeddedBroker) -> None:
        assert broker.pid is not None
        assert broker.pid != os.getpid()

    with_broker(check)


def test_the_broker_carries_messages() -> None:
    async def check(broker: EmbeddedBroker) -> None:
        assert await asyncio.to_thread(round_trip, broker.port)

    with_broker(check)


def test_leaving_the_context_stops_the_broker_process() -> None:
    pids: list[int | None] = []

    async def check(broker: EmbeddedBroker) -> None:
        pids.append(broker.pid)

    with_broker(check)
    assert pids[0] is not None
    assert gone(pids[0], within=0.1)


def test_a_broker_that_dies_is_started_again() -> None:
    async def check(broker: EmbeddedBroker) -> None:
        first = broker.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        async with asyncio.timeout(30):
            while broker.pid in (None, first):  # noqa: ASYNC110 - the supervisor offers no event
                await asyncio.sleep(0.05)
        assert await asyncio.to_thread(round_trip, broker.port)

    with_broker(check)


def test_ctrl_c_leaves_the_broker_to_be_stopped_by_the_orchestrator() -> None:
    async def check(broker: EmbeddedBroker) -> None:
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGINT)
        assert not await asyncio.to_thread(gone, broker.pid, 0.5)
        assert await asyncio.to_thread(round_trip, broker.port)

    with_broker(check)


OWNER = """
import asyncio, sys
from orchestrator.broker import EmbeddedBroker
async def main():
    async with EmbeddedBroker("127.0.0.1", int(sys.argv[1])) as broker:
        print(broker.pid, flush=True)
        await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_the_broker_does_not_outlive_an_orchestrator_killed_with_sigkill() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(free_port())], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    try:
        assert owner.stdout is not None
        child = int(owner.stdout.readline())
        owner.kill()
        owner.wait(10)
        assert gone(child)
    finally:
        owner.kill()
        owner.wait(10)


def test_a_broker_that_cannot_start_again_retries_after_jittered_delays(caplog: pytest.LogCaptureFixture) -> None:
    """The supervisor, with its port taken, retries on the jittered backoff every retry loop uses."""
    caplog.set_level(logging.ERROR, logger="orchestrator.broker")

    def delays() -> list[float]:
        found = (
            re.search(r"cannot start the embedded.*; retrying in (\S+) s$", r.getMessage()) for r in caplog.records
        )
        return [float(match[1]) for match in found if match]

    async def run() -> None:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            # The supervisor alone, as after its broker died: __aenter__ would refuse a port in use.
            broker = EmbeddedBroker("127.0.0.1", squatter.getsockname()[1], start_timeout=20)
            supervisor = asyncio.create_task(broker._supervise())
            try:
                async with asyncio.timeout(30):
                    while len(delays()) < 2:  # noqa: ASYNC110 - the log offers no event
                        await asyncio.sleep(0.05)
            finally:
                supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await supervisor

    asyncio.run(run())
    first, second = delays()[:2]
    assert 0.25 <= first <= 0.75  # 0.5 s, times 0.5-1.5
    assert 0.5 <= second <= 1.5  # doubled
    assert (first, second) != (0.5, 1.0)

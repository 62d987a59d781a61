"""The embedded broker: amqtt in a child process that starts, serves, restarts and stops with the orchestrator."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker
from paho.mqtt.enums import CallbackAPIVersion

from orchestrator.amqtt_retained import HOOK, OwnSubscriptionsBroker, holds
from orchestrator.broker import EmbeddedBroker, child_env, free_port
from runtime_agent import protocol

from .harness import TOPICS


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


# --- retained messages: only for the client's own subscriptions (issue 20) ----------------------


class Client:
    """A paho MQTT 3.1.1 client on a thread of its own that records ``(topic, payload, retain)`` of what it gets."""

    def __init__(self, port: int, client_id: str, *, clean_session: bool = True) -> None:
        self.received: list[tuple[str, bytes, bool]] = []
        self.session_present = False
        self._cond = threading.Condition()
        self._acked: set[int] = set()
        self._connected = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session, protocol=mqtt.MQTTv311
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise TimeoutError(f"{client_id} got no CONNACK from port {port}")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.session_present = bool(flags.session_present)
        self._connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any = None) -> None:
        with self._cond:
            self._acked.add(mid)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def wait(self, done: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        with self._cond:
            assert self._cond.wait_for(done, timeout), f"{what} within {timeout} s; received {self.received}"

    def subscribe(self, *filters: str) -> None:
        """Subscribe at QoS 1 and return after the SUBACK."""
        _, mid = self._client.subscribe([(f, 1) for f in filters])
        self.wait(lambda: mid in self._acked, f"no SUBACK for {filters}")

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def barrier(self, topic: str) -> list[tuple[str, bytes, bool]]:
        """Everything received before a marker published now on ``topic`` (which this client subscribes to) came back.

        The broker sends a client its retained messages before it reads the
        client's next packet, so once the marker is back, none is still on its way.
        """
        marker = f"marker-{uuid.uuid4().hex}".encode()
        self.publish(topic, marker)
        self.wait(lambda: any(payload == marker for _, payload, _ in self.received), "the marker did not come back")
        with self._cond:
            return self.received[: [payload for _, payload, _ in self.received].index(marker)]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _status(runtime_id: str) -> bytes:
    return protocol.encode_status(
        runtime_id, state="dead", interval=1.0, grace=1.0, last_seen=None, since=1.0, reason="connection lost"
    )


@contextlib.contextmanager
def retained_statuses(port: int) -> Iterator[Client]:
    """Retained statuses of ``rt-1`` and ``rt-2``, and a client subscribed to ``{p}/status/+`` until the end.

    That client (a dashboard, an observer) is what amqtt as released replayed
    to every client that connected: the retained messages of every filter
    any client holds. It returns once the broker has stored both (it
    retains a message before it sends it on, and this client got both).
    """
    with Client(port, "status-watcher") as watcher:
        watcher.subscribe(TOPICS.status_filter)
        for runtime_id in ("rt-1", "rt-2"):
            watcher.publish(TOPICS.status(runtime_id), _status(runtime_id), retain=True)
        watcher.wait(lambda: len(watcher.received) == 2, "the watcher did not get both statuses")
        yield watcher


LEAK = (
    "the embedded broker sent a client retained messages its own subscriptions do not match: amqtt's replay "
    f"after CONNECT no longer goes through the hook orchestrator/amqtt_retained.py guards ({HOOK})?"
)


def test_a_client_gets_no_retained_message_that_its_own_subscriptions_do_not_match() -> None:
    def scenario(port: int) -> None:
        with retained_statuses(port), Client(port, "alerts-only") as client:
            client.subscribe(TOPICS.alerts)
            assert client.barrier(TOPICS.alerts) == [], LEAK

    async def check(broker: EmbeddedBroker) -> None:
        await asyncio.to_thread(scenario, broker.port)

    with_broker(check)


def test_a_new_subscription_gets_the_retained_messages_it_matches_and_only_those() -> None:
    def scenario(port: int) -> None:
        with retained_statuses(port), Client(port, "rt-1-watcher") as client:
            client.subscribe(TOPICS.status("rt-1"))
            got = client.barrier(TOPICS.status("rt-1"))
        assert got != [], (
            f"a new subscription got no retained message: does amqtt now call {HOOK} before it records the "
            "subscription? orchestrator/amqtt_retained.py's guard needs it recorded first"
        )
        assert got == [(TOPICS.status("rt-1"), _status("rt-1"), True)], LEAK

    async def check(broker: EmbeddedBroker) -> None:
        await asyncio.to_thread(scenario, broker.port)

    with_broker(check)


def test_a_persistent_session_that_reconnects_gets_the_retained_messages_of_its_own_subscriptions_only() -> None:
    topic = TOPICS.status("rt-1")

    def scenario(port: int) -> None:
        with retained_statuses(port):
            # amqtt forgets an anonymous session within a second of its disconnect (every session is
            # anonymous on the embedded broker): try again until the reconnect finds the session.
            for _ in range(10):
                with Client(port, "persistent", clean_session=False) as first:
                    first.subscribe(topic)
                with Client(port, "persistent", clean_session=False) as again:
                    if not again.session_present:
                        continue
                    # amqtt replays after CONNECT, before it reads the client's next packet: what came before
                    # this SUBACK is the replay. Not a marker: when it handles the old connection's disconnect
                    # after the reconnect (a take-over), amqtt holds live messages for a session it thinks offline.
                    again.subscribe("test/nothing-retained")
                    got = again.received[:]
                assert got != [], f"a persistent session's reconnect got no retained message (through {HOOK})"
                assert got == [(topic, _status("rt-1"), True)], LEAK
                return
            pytest.fail("amqtt never kept the session across a reconnect, in 10 tries")

    async def check(broker: EmbeddedBroker) -> None:
        await asyncio.to_thread(scenario, broker.port)

    with_broker(check)


def test_amqtt_still_has_the_method_the_retained_patch_overrides() -> None:
    """The patch overrides a private amqtt method: renamed or re-shaped, it would silently do nothing."""
    hook = getattr(Broker, HOOK, None)
    assert callable(hook), (
        f"amqtt {importlib.metadata.version('amqtt')} has no Broker.{HOOK}: orchestrator/amqtt_retained.py "
        "overrides nothing, so clients may get other clients' retained messages again (issue 20); see how this "
        "amqtt replays retained messages after CONNECT and SUBSCRIBE, and adapt or drop the patch"
    )
    assert list(inspect.signature(hook).parameters) == ["self", "subscription", "session"], (
        f"amqtt's Broker.{HOOK} takes other arguments now: adapt orchestrator/amqtt_retained.py"
    )
    assert HOOK in vars(OwnSubscriptionsBroker)


class _RecordingBroker(OwnSubscriptionsBroker):
    """Records, for each call of the hook, the filter and whether the session held it at that moment."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.calls: list[tuple[str, bool]] = []

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
        self.calls.append((subscription[0], holds(self, session, subscription[0])))
        await super()._publish_retained_messages_for_subscription(subscription, session)


def test_amqtt_records_a_subscription_before_it_sends_the_retained_messages_for_it() -> None:
    """The patch sends retained messages only for filters the session holds, so SUBSCRIBE must record it first."""

    async def run() -> None:
        port = free_port()
        broker = _RecordingBroker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
        )
        await broker.start()
        try:

            def subscribe() -> None:
                with Client(port, "recorded") as client:
                    client.subscribe("probe/a")
                    client.barrier("probe/a")  # the broker calls the hook before it reads the marker

            await asyncio.to_thread(subscribe)
        finally:
            await broker.shutdown()
        assert broker.calls, f"amqtt no longer calls {HOOK} on SUBSCRIBE: adapt orchestrator/amqtt_retained.py"
        assert broker.calls == [("probe/a", True)], (
            f"amqtt now calls {HOOK} before it records the subscription, so orchestrator/amqtt_retained.py "
            f"withholds a new subscription's retained messages: {broker.calls}"
        )

    asyncio.run(run())

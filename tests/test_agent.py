"""The runtime agent against a real Mosquitto and a fake orchestrator.

There is no orchestrator in these tests: ``FakeOrchestrator`` is a plain
paho client on the test's own broker that answers interval requests (ok or
error, or not at all, as a lost request or a late orchestrator would) and
records every request, state message and pulse, so each test can check
exactly what an orchestrator would see.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from orchestrator.broker import free_port
from runtime_agent import Agent, AsyncAgent, ConnectError, RegistrationRejected, RegistrationTimeout, protocol
from runtime_agent.backoff import backoff_delays
from runtime_agent.shared import RETRY_FIRST, RETRY_MAX, AgentSettings, default_client_id, next_pulse_at

from .harness import MosquittoBroker, start_mosquitto

TOPICS = protocol.Topics()
ROOT = Path(__file__).resolve().parent.parent
INTERVAL = 0.2


# --- a fake orchestrator -----------------------------------------------------


@dataclass(frozen=True)
class Seen:
    kind: str
    """``interval``, ``state`` or ``pulse``."""
    runtime_id: str
    payload: bytes
    at: float
    """time.monotonic() at receipt."""

    @property
    def state(self) -> protocol.StateMessage:
        return protocol.decode_state(self.payload)

    @property
    def pulse(self) -> protocol.Pulse:
        return protocol.decode_pulse(self.payload)


class FakeOrchestrator:
    """Answers interval requests with ok (or ``error``, if given) and records what runtimes publish.

    The first ``ignore`` requests of each runtime get no answer, as if the
    request or its reply were lost. It reconnects and resubscribes by itself,
    so it survives a broker restart.
    """

    def __init__(
        self,
        port: int,
        *,
        error: str | None = None,
        ignore: int = 0,
        reply: Callable[[str, protocol.IntervalRequest], bytes] | None = None,
    ) -> None:
        self.error = error
        self.ignore = ignore
        self.reply = reply
        """Builds each ok reply, if given (another orchestrator's wording, say)."""
        self.seen: list[Seen] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fake-orchestrator-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311
        )
        self._client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port, keepalive=10)
        self._client.loop_start()
        if not self._subscribed.wait(5):
            raise TimeoutError("the fake orchestrator could not subscribe")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(TOPICS.subscriptions())

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        parsed = TOPICS.parse(message.topic)
        if parsed is None:
            return
        kind, rid = parsed
        payload = bytes(message.payload)
        with self._cond:
            self.seen.append(Seen(kind, rid, payload, time.monotonic()))
            self._cond.notify_all()
        if kind == "interval" and payload and len(self.requests(rid)) > self.ignore:
            request = protocol.decode_interval(payload)
            if self.reply is not None:
                reply = self.reply(rid, request)
            elif self.error is None:
                reply = protocol.encode_reply_ok(rid, request)
            else:
                reply = protocol.encode_reply_error(rid, self.error)
            client.publish(TOPICS.reply(rid), reply, qos=1)

    def wait_for(self, predicate: Callable[[Seen], bool], timeout: float = 5.0) -> Seen:
        """The first message (seen so far or arriving within ``timeout``) that matches."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for seen in self.seen:
                    if predicate(seen):
                        return seen
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching message within {timeout} s; seen: {self.seen}")
                self._cond.wait(remaining)

    async def await_for(self, predicate: Callable[[Seen], bool], within: float = 5.0) -> Seen:
        """``wait_for`` for async tests: polls, so the event loop (and the agent on it) keeps running."""
        deadline = time.monotonic() + within
        while True:
            with self._cond:
                found = next((seen for seen in self.seen if predicate(seen)), None)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching message within {within} s; seen: {self.seen}")
            await asyncio.sleep(0.02)

    def of(self, kind: str, runtime_id: str) -> list[Seen]:
        with self._cond:
            return [seen for seen in self.seen if seen.kind == kind and seen.runtime_id == runtime_id]

    def states(self, runtime_id: str) -> list[protocol.StateMessage]:
        return [seen.state for seen in self.of("state", runtime_id)]

    def pulses(self, runtime_id: str) -> list[Seen]:
        return self.of("pulse", runtime_id)

    def requests(self, runtime_id: str) -> list[Seen]:
        return self.of("interval", runtime_id)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def state_is(state: str, runtime_id: str, session: int | None = None) -> Callable[[Seen], bool]:
    def match(seen: Seen) -> bool:
        if seen.kind != "state" or seen.runtime_id != runtime_id:
            return False
        message = seen.state
        return message.state == state and (session is None or message.session == session)

    return match


def pulse_of(runtime_id: str, session: int | None = None) -> Callable[[Seen], bool]:
    def match(seen: Seen) -> bool:
        return (
            seen.kind == "pulse"
            and seen.runtime_id == runtime_id
            and (session is None or seen.pulse.session == session)
        )

    return match


def retained(port: int, topic: str, timeout: float = 3.0) -> bytes | None:
    """The message the broker retains on ``topic``, read by a fresh subscriber; None if there is none."""
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"reader-{uuid.uuid4().hex[:8]}")

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.retain:
            got.append(bytes(message.payload))
            done.set()

    client.on_connect = lambda client, *args: client.subscribe(topic, qos=1)
    client.on_subscribe = lambda *args: threading.Timer(0.5, done.set).start()
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0] if got else None


def runtime_id() -> str:
    return f"rt-{uuid.uuid4().hex[:8]}"


def none_within(fake: FakeOrchestrator, predicate: Callable[[Seen], bool], seconds: float) -> bool:
    """True if nothing matching arrives within ``seconds``: for what must not happen, given how late it could be."""
    try:
        fake.wait_for(predicate, seconds)
    except AssertionError:
        return True
    return False


LATE: dict[str, Any] = {"timeout": 0.2, "retry_first": 0.3, "retry_max": 5.0}
"""Agent options for a reply that comes only after start() returned: start gives up waiting after 0.2 s,
while the 3rd request leaves at least 0.3 * 0.5 + 0.6 * 0.5 = 0.45 s after the first."""
NEVER = 1_000_000
"""``ignore`` for a fake orchestrator that answers no request."""


def logged_delays(caplog: pytest.LogCaptureFixture, url: str) -> list[float]:
    """The reconnect delays the agent on ``url`` logged (``... retrying in 0.123 s``), in order."""
    delays = []
    for record in list(caplog.records):  # a copy: the agents' threads may still be logging
        message = record.getMessage()
        found = re.search(r"(?:retrying|reconnecting) in (\S+) s$", message)
        if found and f"{url} " in message:
            delays.append(float(found[1]))
    return delays


def assert_apart(caplog: pytest.LogCaptureFixture, urls: list[str]) -> None:
    """The first three retry delays the two agents logged are jittered, and not the same sequence."""
    first, second = (logged_delays(caplog, url)[:3] for url in urls)
    assert len(first) == len(second) == 3, caplog.text
    assert_jittered(first, 0.1, 0.4)
    assert_jittered(second, 0.1, 0.4)
    assert first != second


def assert_jittered(delays: list[float], first: float, cap: float) -> None:
    """Each delay is 0.5-1.5 times ``first`` doubling up to ``cap`` (logged to 3 digits), and not exactly that."""
    bases = [min(first * 2**n, cap) for n in range(len(delays))]
    for delay, base in zip(delays, bases, strict=True):
        assert 0.5 * base - 0.001 <= delay <= 1.5 * base + 0.001, (delays, bases)
    assert delays != bases


def assert_backoff_gaps(requests: list[Seen]) -> None:
    """The gaps between requests double from LATE's 0.3 s, each times 0.5-1.5 (with 50-100 ms for delivery)."""
    gaps = [b.at - a.at for a, b in itertools.pairwise(requests)]
    for n, gap in enumerate(gaps):
        base = LATE["retry_first"] * 2**n
        assert 0.5 * base - 0.05 < gap < 1.5 * base + 0.1, gaps


# --- fixtures ----------------------------------------------------------------


@pytest.fixture
def orchestrator(mosquitto: MosquittoBroker) -> Iterator[FakeOrchestrator]:
    """A fake orchestrator on the test's broker that accepts every interval."""
    fake = FakeOrchestrator(mosquitto.port)
    yield fake
    fake.close()


@pytest.fixture
def rejecting_orchestrator(mosquitto: MosquittoBroker) -> Iterator[FakeOrchestrator]:
    """A fake orchestrator that answers every interval request with an error."""
    fake = FakeOrchestrator(mosquitto.port, error="interval below this deployment's minimum of 1 s")
    yield fake
    fake.close()


@pytest.fixture
def make_orchestrator(mosquitto: MosquittoBroker) -> Iterator[Callable[..., FakeOrchestrator]]:
    """Builds fake orchestrators with the given options (``error``, ``ignore``) on the test's broker."""
    fakes: list[FakeOrchestrator] = []

    def make(**options: Any) -> FakeOrchestrator:
        fake = FakeOrchestrator(mosquitto.port, **options)
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.close()


@pytest.fixture
def make_agent(mosquitto: MosquittoBroker) -> Iterator[Callable[..., Agent]]:
    """Builds thread agents on the test's broker (not started); stops them all afterwards."""
    agents: list[Agent] = []

    def make(rid: str | None = None, **options: Any) -> Agent:
        options.setdefault("interval", INTERVAL)
        options.setdefault("broker", mosquitto.url)
        options.setdefault("timeout", 5.0)
        agent = Agent(rid or runtime_id(), **options)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.stop()


@pytest.fixture
def started_agent(make_agent: Callable[..., Agent], orchestrator: FakeOrchestrator) -> Agent:
    """A thread agent registered with the fake orchestrator and pulsing every 0.2 s."""
    agent = make_agent()
    agent.start()
    return agent


class AgentProcess:
    """``python -m runtime_agent`` as users run it (or ``entry`` instead); stdout lines are collected as they come."""

    def __init__(self, args: list[str], log: Path, entry: Sequence[str] = ("-m", "runtime_agent")) -> None:
        self._log = log.open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        self.process = subprocess.Popen(
            [sys.executable, *entry, *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self._registered = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self.log_path = log

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if " registered " in line:
                self._registered.set()

    def wait_registered(self, timeout: float = 10.0) -> str:
        if not self._registered.wait(timeout):
            raise AssertionError(f"agent did not register: {self.lines} {self.stderr()}")
        return self.lines[0]

    def stderr(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_stderr_line(self, text: str, timeout: float = 10.0) -> str:
        """The first stderr line containing ``text``, polling the log file until it comes."""
        deadline = time.monotonic() + timeout
        while (line := next((ln for ln in self.stderr().splitlines() if text in ln), None)) is None:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"no stderr line with {text!r}: {self.stderr()}")
            time.sleep(0.02)
        return line

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._log.close()


@pytest.fixture
def run_cli(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Starts ``python -m runtime_agent`` with the given arguments; kills leftovers afterwards."""
    processes: list[AgentProcess] = []

    def run(*args: str, entry: Sequence[str] = ("-m", "runtime_agent")) -> AgentProcess:
        process = AgentProcess(list(args), tmp_path / f"agent-{len(processes)}.log", entry)
        processes.append(process)
        return process

    yield run
    for process in processes:
        process.close()


# --- pure helpers ------------------------------------------------------------


def test_pulse_schedule_does_not_drift() -> None:
    assert next_pulse_at(10.0, 0.5, 10.1) == 10.5


def test_late_pulse_goes_out_once_instead_of_a_burst() -> None:
    assert next_pulse_at(10.0, 0.5, 12.3) == 12.3


def test_default_client_id_fits_64_characters_and_keeps_long_ids_apart() -> None:
    assert default_client_id("web-1") == "hb-agent-web-1"
    long_a, long_b = "a" * 120 + "x", "a" * 120 + "y"
    assert len(default_client_id(long_a)) == 64
    assert default_client_id(long_a) != default_client_id(long_b)


def test_default_resend_schedule_stays_far_below_the_orchestrators_rate_limit() -> None:
    """At the shortest jitter, the first request and its re-sends: at most 6 in any minute (the limit is 30)."""
    delays = backoff_delays(RETRY_FIRST, RETRY_MAX, rng=lambda: 0.0)
    sent = [0.0, *itertools.accumulate(itertools.islice(delays, 40))]
    assert max(sum(1 for t in sent if start <= t < start + 60) for start in sent) == 6


@pytest.mark.parametrize(
    ("interval", "grace", "applied"),
    [
        (2.0, 3.0, "interval 2 s, grace 3 s"),
        (2.5, None, "interval 2.5 s, grace 2.5 s"),  # the orchestrator's default grace is the interval
        ("2", "x", "interval 1 s, grace 1 s"),  # no numbers: what was asked (it raised ValueError)
    ],
)
def test_what_was_applied_reads_the_same_from_any_reply(interval: Any, grace: Any, applied: str) -> None:
    settings = AgentSettings.build("web-1", interval=1, broker="mqtt://127.0.0.1:1")
    assert settings.applied(protocol.Reply(ok=True, id="web-1", interval=interval, grace=grace)) == applied


@pytest.mark.parametrize(
    "options",
    [
        {"interval": 0.01},
        {"interval": float("nan")},
        {"interval": 1, "grace": -1},
        {"interval": 1, "timeout": 0},
        {"interval": 1, "retry_first": 0},
        {"interval": 1, "retry_first": 2, "retry_max": 1},
    ],
)
def test_bad_options_raise_value_error_before_any_network_io(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"must (not )?be"):
        Agent("web-1", broker="mqtt://127.0.0.1:1", **options)


def test_bad_id_raises_protocol_error_before_any_network_io() -> None:
    with pytest.raises(protocol.ProtocolError, match="invalid runtime id"):
        Agent("no spaces allowed", interval=1, broker="mqtt://127.0.0.1:1")


def test_bad_broker_url_raises_value_error() -> None:
    with pytest.raises(ValueError, match="invalid broker URL"):
        Agent("web-1", interval=1, broker="http://127.0.0.1")


# --- the thread agent ----------------------------------------------------------


@pytest.mark.timeout(20)
def test_start_announces_online_with_the_agents_session(started_agent: Agent, orchestrator: FakeOrchestrator) -> None:
    assert started_agent.session is not None
    orchestrator.wait_for(state_is("online", started_agent.runtime_id, started_agent.session))


@pytest.mark.timeout(20)
def test_start_leaves_the_interval_request_retained(
    make_agent: Callable[..., Agent], mosquitto: MosquittoBroker, orchestrator: FakeOrchestrator
) -> None:
    agent = make_agent(interval=0.5, grace=1.5)
    agent.start()
    payload = retained(mosquitto.port, TOPICS.interval(agent.runtime_id))
    assert payload is not None
    assert protocol.decode_interval(payload) == protocol.IntervalRequest(0.5, 1.5)


@pytest.mark.timeout(20)
def test_start_returns_registered_with_the_orchestrators_reply(started_agent: Agent) -> None:
    assert started_agent.registered
    assert started_agent.connected
    assert started_agent.reply is not None
    assert (started_agent.reply.ok, started_agent.reply.interval) == (True, INTERVAL)


@pytest.mark.timeout(20)
def test_pulses_arrive_every_interval_with_increasing_seq(started_agent: Agent, orchestrator: FakeOrchestrator) -> None:
    rid = started_agent.runtime_id
    orchestrator.wait_for(lambda seen: pulse_of(rid)(seen) and seen.pulse.seq == 7)
    pulses = orchestrator.pulses(rid)[:8]
    assert [p.pulse.seq for p in pulses] == list(range(8))
    assert {p.pulse.session for p in pulses} == {started_agent.session}
    gaps = [b.at - a.at for a, b in itertools.pairwise(pulses)]
    assert 0.8 * INTERVAL < sum(gaps) / len(gaps) < 1.3 * INTERVAL, gaps
    assert all(0.02 < gap < 3 * INTERVAL for gap in gaps), gaps
    assert started_agent.pulses_sent >= 8


@pytest.mark.timeout(20)
def test_rejection_raises_registration_rejected_with_the_error_text(
    make_agent: Callable[..., Agent], rejecting_orchestrator: FakeOrchestrator
) -> None:
    agent = make_agent()
    with pytest.raises(RegistrationRejected) as caught:
        agent.start()
    assert caught.value.error == "interval below this deployment's minimum of 1 s"
    assert not agent.connected


@pytest.mark.timeout(20)
def test_without_orchestrator_start_returns_after_timeout_still_connected(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(timeout=1.0)
    began = time.monotonic()
    agent.start()
    assert 1.0 <= time.monotonic() - began < 2.5
    assert (agent.connected, agent.registered) == (True, False)


@pytest.mark.timeout(20)
def test_without_orchestrator_start_warns_that_it_keeps_trying(
    make_agent: Callable[..., Agent], caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent(timeout=0.5)
    agent.start()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"no reply to the interval request for {agent.runtime_id!r} within 0.5 s on {agent.broker} "
        "(prefix 'heartbeat/v1'); still waiting (re-sending with backoff) and pulsing meanwhile"
    ]


@pytest.mark.timeout(20)
def test_wait_registered_without_a_reply_raises_registration_timeout(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(timeout=0.5)
    agent.start()
    with pytest.raises(RegistrationTimeout, match="orchestrator running"):
        agent.wait_registered(0.3)


@pytest.mark.timeout(20)
def test_wait_registered_returns_the_reply_of_a_registered_agent(started_agent: Agent) -> None:
    assert started_agent.wait_registered(0) == started_agent.reply


@pytest.mark.timeout(20)
def test_unanswered_request_is_resent_with_growing_gaps_until_answered(
    make_agent: Callable[..., Agent], make_orchestrator: Callable[..., FakeOrchestrator]
) -> None:
    fake = make_orchestrator(ignore=2)  # answers the 3rd request
    agent = make_agent(**LATE)
    agent.start()
    returned, registered_at_return = time.monotonic(), agent.registered
    reply = agent.wait_registered(5)
    requests = fake.requests(agent.runtime_id)
    assert (registered_at_return, agent.registered, reply.ok) == (False, True, True)
    assert len(requests) == 3
    assert requests[2].at > returned
    assert_backoff_gaps(requests)


@pytest.mark.timeout(20)
def test_late_confirmation_is_logged_with_the_time_it_took(
    make_agent: Callable[..., Agent],
    make_orchestrator: Callable[..., FakeOrchestrator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="runtime_agent")
    make_orchestrator(ignore=2)
    agent = make_agent(**LATE)
    agent.start()
    agent.wait_registered(5)
    lines = [r.getMessage() for r in caplog.records if " registered " in r.getMessage()]
    assert len(lines) == 1, lines
    prefix = f"runtime {agent.runtime_id} registered (interval {INTERVAL:g} s, grace {INTERVAL:g} s) after "
    assert lines[0].startswith(prefix), lines
    assert 0.2 <= float(lines[0].removeprefix(prefix).removesuffix(" s")) < 5


@pytest.mark.timeout(20)
def test_pulses_go_out_before_the_confirmation(
    make_agent: Callable[..., Agent], make_orchestrator: Callable[..., FakeOrchestrator]
) -> None:
    fake = make_orchestrator(ignore=NEVER)
    agent = make_agent(**LATE)
    agent.start()
    fake.wait_for(pulse_of(agent.runtime_id, agent.session))
    assert agent.reply is None


@pytest.mark.timeout(20)
def test_rejection_after_start_stops_the_resends(
    make_agent: Callable[..., Agent], make_orchestrator: Callable[..., FakeOrchestrator]
) -> None:
    fake = make_orchestrator(ignore=2, error="interval below this deployment's minimum of 1 s")
    agent = make_agent(**LATE)
    agent.start()
    with pytest.raises(RegistrationRejected, match="minimum of 1 s"):
        agent.wait_registered(5)
    rid, third = agent.runtime_id, fake.requests(agent.runtime_id)[-1]
    # The 4th request would have left within 1.2 * 1.5 = 1.8 s of the 3rd.
    assert none_within(fake, lambda seen: seen.kind == "interval" and seen.runtime_id == rid and seen.at > third.at, 2)


@pytest.mark.timeout(20)
def test_rejection_after_start_withholds_pulses(
    make_agent: Callable[..., Agent], make_orchestrator: Callable[..., FakeOrchestrator]
) -> None:
    fake = make_orchestrator(ignore=2, error="interval below this deployment's minimum of 1 s")
    agent = make_agent(**LATE)
    agent.start()
    with pytest.raises(RegistrationRejected):
        agent.wait_registered(5)
    rejected = time.monotonic()
    assert fake.pulses(agent.runtime_id)  # it pulsed while waiting
    # A pulse already on its way (50 ms) may still land; none may leave after the rejection.
    assert none_within(fake, lambda seen: pulse_of(agent.runtime_id)(seen) and seen.at > rejected + 0.05, 5 * INTERVAL)


@pytest.mark.timeout(20)
def test_unreachable_broker_raises_connect_error_naming_the_url() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    agent = Agent(runtime_id(), interval=INTERVAL, broker=url, timeout=1.0, reconnect_min=0.1)
    began = time.monotonic()
    with pytest.raises(ConnectError, match=url):
        agent.start()
    assert time.monotonic() - began < 2.5


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["thread", "async"])
def test_an_unreachable_broker_is_tried_for_as_long_as_the_error_says(kind: str) -> None:
    """It said "within 3 s" after 1.6 s: it gave up as soon as the next delay would pass the deadline.

    With the default delays (0.5 s doubling, times 0.5-1.5) it used to give up
    after 0.25-1.5 s of a 1.5 s timeout, whatever the jitter drew.
    """
    url = f"mqtt://127.0.0.1:{free_port()}"
    options: dict[str, Any] = {"interval": INTERVAL, "broker": url, "timeout": 1.5}
    if kind == "thread":
        start = Agent(runtime_id(), **options).start
    else:
        agent = AsyncAgent(runtime_id(), **options)
        start = lambda: asyncio.run(agent.start())  # noqa: E731
    began = time.monotonic()
    with pytest.raises(ConnectError, match=rf"^cannot connect to the broker at {url} within 1\.5 s: "):
        start()
    took = time.monotonic() - began
    assert 1.5 <= took < 2.5, took


RECONNECT: dict[str, float] = {"reconnect_min": 0.1, "reconnect_max": 0.4}
"""Reconnect options short enough to see three jittered delays within a second or so."""


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["thread", "async"])
def test_agents_started_together_retry_their_first_connection_apart(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two agents that cannot reach their broker yet (as in a container starting) do not retry in lockstep."""
    caplog.set_level(logging.INFO, logger="runtime_agent")
    urls = [f"mqtt://127.0.0.1:{free_port()}" for _ in range(2)]
    options: dict[str, Any] = {"interval": INTERVAL, "timeout": 2.0, **RECONNECT}
    if kind == "thread":
        errors: list[BaseException] = []

        def start(url: str) -> None:
            try:
                Agent(runtime_id(), broker=url, **options).start()
            except ConnectError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(url,)) for url in urls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(errors) == 2
    else:

        async def start_both() -> list[BaseException | None]:
            starts = (AsyncAgent(runtime_id(), broker=url, **options).start() for url in urls)
            return await asyncio.gather(*starts, return_exceptions=True)

        assert all(isinstance(result, ConnectError) for result in asyncio.run(start_both()))
    assert_apart(caplog, urls)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["thread", "async"])
def test_agents_that_lost_the_broker_together_reconnect_apart(
    kind: str, mosquitto: MosquittoBroker, orchestrator: FakeOrchestrator, caplog: pytest.LogCaptureFixture
) -> None:
    """After a broker goes down, each agent retries on a jittered sequence that starts afresh at reconnect_min."""
    caplog.set_level(logging.DEBUG, logger="runtime_agent")
    # Two user names tell the agents apart in the log (the test's Mosquitto takes any).
    urls = [f"mqtt://{user}@127.0.0.1:{mosquitto.port}" for user in ("a", "b")]
    options: dict[str, Any] = {"interval": INTERVAL, "timeout": 5.0, **RECONNECT}

    def three_each() -> bool:
        return all(len(logged_delays(caplog, url)) >= 3 for url in urls)

    if kind == "thread":
        agents = [Agent(runtime_id(), broker=url, **options) for url in urls]
        try:
            for agent in agents:
                agent.start()
            mosquitto.stop()
            deadline = time.monotonic() + 10
            while not three_each() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            for agent in agents:
                agent.stop()
    else:

        async def scenario() -> None:
            agents = [AsyncAgent(runtime_id(), broker=url, **options) for url in urls]
            try:
                for agent in agents:
                    await agent.start()
                await asyncio.to_thread(mosquitto.stop)
                async with asyncio.timeout(10):
                    while not three_each():  # noqa: ASYNC110 - the log offers no event
                        await asyncio.sleep(0.05)
            finally:
                for agent in agents:
                    await agent.stop()

        asyncio.run(scenario())
    assert_apart(caplog, urls)


@pytest.mark.timeout(20)
def test_stop_leaves_stopped_retained_and_no_will(
    started_agent: Agent, orchestrator: FakeOrchestrator, mosquitto: MosquittoBroker
) -> None:
    rid, session = started_agent.runtime_id, started_agent.session
    started_agent.stop()
    payload = retained(mosquitto.port, TOPICS.state(rid))
    assert payload is not None
    assert protocol.decode_state(payload) == protocol.StateMessage("stopped", session)
    time.sleep(0.3)
    assert [state.state for state in orchestrator.states(rid)] == ["online", "stopped"]


@pytest.mark.timeout(20)
def test_stop_ends_the_pulses(started_agent: Agent, orchestrator: FakeOrchestrator) -> None:
    rid = started_agent.runtime_id
    orchestrator.wait_for(pulse_of(rid))
    started_agent.stop()
    count = len(orchestrator.pulses(rid))
    time.sleep(3 * INTERVAL)
    assert len(orchestrator.pulses(rid)) == count
    assert not started_agent.connected


@pytest.mark.timeout(20)
def test_stop_is_idempotent(started_agent: Agent, orchestrator: FakeOrchestrator) -> None:
    started_agent.stop()
    started_agent.stop()
    orchestrator.wait_for(state_is("stopped", started_agent.runtime_id, started_agent.session))
    time.sleep(0.2)  # room for a second, wrong "stopped" to arrive
    assert [state.state for state in orchestrator.states(started_agent.runtime_id)] == ["online", "stopped"]


@pytest.mark.timeout(20)
def test_context_manager_starts_and_stops(make_agent: Callable[..., Agent], orchestrator: FakeOrchestrator) -> None:
    with make_agent() as agent:
        assert agent.registered
    orchestrator.wait_for(state_is("stopped", agent.runtime_id, agent.session))


@pytest.mark.timeout(20)
def test_failing_check_withholds_pulses(make_agent: Callable[..., Agent], orchestrator: FakeOrchestrator) -> None:
    def broken() -> bool:
        raise RuntimeError("disk full")

    agent = make_agent(check=broken)
    agent.start()
    time.sleep(5 * INTERVAL)
    assert orchestrator.pulses(agent.runtime_id) == []
    assert agent.pulses_sent == 0


@pytest.mark.timeout(30)
def test_broker_restart_reconnects_with_a_new_session_and_registers_again(
    make_agent: Callable[..., Agent], orchestrator: FakeOrchestrator, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    agent = make_agent(reconnect_min=0.1, reconnect_max=0.5)
    agent.start()
    rid, first_session = agent.runtime_id, agent.session
    mosquitto.stop()
    restarted = start_mosquitto(tmp_path, port=mosquitto.port)
    try:
        online = orchestrator.wait_for(
            lambda seen: state_is("online", rid)(seen) and seen.state.session != first_session, timeout=10
        )
        new_session = online.state.session
        assert new_session == agent.session
        orchestrator.wait_for(pulse_of(rid, new_session), timeout=5)
        deadline = time.monotonic() + 5
        while not agent.registered and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.registered
        assert protocol.decode_interval(retained(restarted.port, TOPICS.interval(rid)) or b"") is not None
    finally:
        agent.stop()
        restarted.stop()


# --- the command line ------------------------------------------------------------


def cli_args(broker: MosquittoBroker, rid: str, *extra: str) -> list[str]:
    return ["--id", rid, "--interval", str(INTERVAL), "--broker", broker.url, "--timeout", "5", *extra]


@pytest.mark.timeout(30)
def test_cli_prints_one_registration_line(
    run_cli: Callable[..., AgentProcess], mosquitto: MosquittoBroker, orchestrator: FakeOrchestrator
) -> None:
    rid = runtime_id()
    line = run_cli(*cli_args(mosquitto, rid)).wait_registered()
    assert line == (
        f"heartbeat-agent: runtime {rid} registered (interval {INTERVAL:g} s, grace {INTERVAL:g} s) "
        f"on {mosquitto.url}; pulsing"
    )


@pytest.mark.timeout(30)
def test_cli_words_what_was_applied_as_its_log_line_does(
    run_cli: Callable[..., AgentProcess], mosquitto: MosquittoBroker, make_orchestrator: Callable[..., FakeOrchestrator]
) -> None:
    """One wording for the interval and grace: the stdout line and the log line had each their own, and told
    a reply without the grace apart ("grace default" in one, "grace 0.5 s" in the other)."""
    make_orchestrator(
        reply=lambda rid, request: json.dumps({"ok": True, "id": rid, "interval": request.interval}).encode()
    )
    rid = runtime_id()
    agent = run_cli(*cli_args(mosquitto, rid, "--grace", "0.5"))
    line = agent.wait_registered()
    logged = agent.wait_stderr_line(f"runtime {rid} registered on ")
    applied = f"interval {INTERVAL:g} s, grace 0.5 s"
    assert line == f"heartbeat-agent: runtime {rid} registered ({applied}) on {mosquitto.url}; pulsing"
    assert logged.endswith(f"runtime {rid} registered on {mosquitto.url} ({applied})"), logged


@pytest.mark.timeout(30)
def test_sigkill_makes_the_broker_publish_the_will_with_the_online_session(
    run_cli: Callable[..., AgentProcess], mosquitto: MosquittoBroker, orchestrator: FakeOrchestrator
) -> None:
    rid = runtime_id()
    agent = run_cli(*cli_args(mosquitto, rid))
    agent.wait_registered()
    session = orchestrator.wait_for(state_is("online", rid)).state.session
    agent.process.kill()
    orchestrator.wait_for(state_is("offline", rid, session), timeout=5)
    payload = retained(mosquitto.port, TOPICS.state(rid))
    assert payload is not None
    assert protocol.decode_state(payload) == protocol.StateMessage("offline", session)


@pytest.mark.timeout(30)
def test_will_follows_the_new_session_after_a_reconnect(
    run_cli: Callable[..., AgentProcess], mosquitto: MosquittoBroker, orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    rid = runtime_id()
    agent = run_cli(*cli_args(mosquitto, rid))
    agent.wait_registered()
    first = orchestrator.wait_for(state_is("online", rid)).state.session
    mosquitto.stop()
    restarted = start_mosquitto(tmp_path, port=mosquitto.port)
    try:
        online = orchestrator.wait_for(
            lambda seen: state_is("online", rid)(seen) and seen.state.session != first, timeout=10
        )
        agent.process.kill()
        orchestrator.wait_for(state_is("offline", rid, online.state.session), timeout=5)
    finally:
        restarted.stop()


@pytest.mark.timeout(30)
def test_cli_sigterm_publishes_stopped_and_exits_0(
    run_cli: Callable[..., AgentProcess], mosquitto: MosquittoBroker, orchestrator: FakeOrchestrator
) -> None:
    rid = runtime_id()
    agent = run_cli(*cli_args(mosquitto, rid))
    agent.wait_registered()
    session = orchestrator.wait_for(state_is("online", rid)).state.session
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(10) == 0
    orchestrator.wait_for(state_is("stopped", rid, session))
    time.sleep(0.3)
    assert [state.state for state in orchestrator.states(rid)] == ["online", "stopped"]


_SIGNAL_FROM_A_WORKER_THREAD = """
import signal, sys, threading, time
from runtime_agent import cli

def kill_from_a_worker_thread():
    while not any(t.name.startswith("runtime-agent-") for t in threading.enumerate()):
        time.sleep(0.01)
    time.sleep(0.5)  # main() is waiting for a signal by now
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

threading.Thread(target=kill_from_a_worker_thread, daemon=True).start()
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.timeout(30)
def test_cli_stops_on_a_sigterm_the_kernel_delivered_to_another_thread(
    run_cli: Callable[..., AgentProcess], mosquitto: MosquittoBroker, orchestrator: FakeOrchestrator
) -> None:
    """The kernel may hand a process's signal to any thread; the main thread must still stop the agent."""
    rid = runtime_id()
    agent = run_cli(*cli_args(mosquitto, rid), entry=("-c", _SIGNAL_FROM_A_WORKER_THREAD))
    assert agent.process.wait(15) == 0
    session = orchestrator.wait_for(state_is("online", rid)).state.session
    orchestrator.wait_for(state_is("stopped", rid, session))


@pytest.mark.timeout(30)
def test_cli_check_false_withholds_pulses(
    run_cli: Callable[..., AgentProcess], mosquitto: MosquittoBroker, orchestrator: FakeOrchestrator
) -> None:
    rid = runtime_id()
    run_cli(*cli_args(mosquitto, rid, "--check", "false")).wait_registered()
    time.sleep(5 * INTERVAL)
    assert orchestrator.pulses(rid) == []


@pytest.mark.timeout(30)
def test_cli_check_true_lets_pulses_through(
    run_cli: Callable[..., AgentProcess], mosquitto: MosquittoBroker, orchestrator: FakeOrchestrator
) -> None:
    rid = runtime_id()
    run_cli(*cli_args(mosquitto, rid, "--check", "true")).wait_registered()
    orchestrator.wait_for(lambda seen: pulse_of(rid)(seen) and seen.pulse.seq == 2)


@pytest.mark.timeout(30)
def test_cli_says_it_is_still_waiting_then_prints_the_registration_line(
    run_cli: Callable[..., AgentProcess], mosquitto: MosquittoBroker, make_orchestrator: Callable[..., FakeOrchestrator]
) -> None:
    make_orchestrator(ignore=1)  # answers the first re-send, 1-3 s after the request
    rid = runtime_id()
    agent = run_cli(*cli_args(mosquitto, rid, "--timeout", "0.5"))
    waiting = agent.wait_stderr_line("heartbeat-agent: no reply yet")
    stdout_then = list(agent.lines)
    assert waiting == (
        f"heartbeat-agent: no reply yet from the orchestrator for {rid}; still waiting "
        "(re-sending the interval request with backoff) and pulsing meanwhile"
    )
    assert "registered" not in waiting  # scripts wait for "registered" on stdout
    assert stdout_then == []
    assert agent.wait_registered() == (
        f"heartbeat-agent: runtime {rid} registered (interval {INTERVAL:g} s, grace {INTERVAL:g} s) "
        f"on {mosquitto.url}; pulsing"
    )


@pytest.mark.timeout(30)
def test_cli_exits_1_when_the_orchestrator_rejects_a_late_request(
    run_cli: Callable[..., AgentProcess], mosquitto: MosquittoBroker, make_orchestrator: Callable[..., FakeOrchestrator]
) -> None:
    make_orchestrator(ignore=1, error="interval below this deployment's minimum of 1 s")
    agent = run_cli(*cli_args(mosquitto, runtime_id(), "--timeout", "0.5"))
    assert agent.process.wait(10) == 1
    errors = [line for line in agent.stderr().splitlines() if line.startswith("heartbeat-agent: error:")]
    assert errors == [
        "heartbeat-agent: error: the orchestrator rejected the registration: "
        "interval below this deployment's minimum of 1 s"
    ]
    assert agent.lines == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--id", "bad id", "--interval", "1"], "invalid runtime id"),
        (["--id", "web-1", "--interval", "0"], "interval must be between"),
        (["--id", "web-1", "--interval", "1", "--broker", "localhost:1883"], "did you mean"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_error_line(
    run_cli: Callable[..., AgentProcess], args: list[str], message: str
) -> None:
    agent = run_cli(*args)
    assert agent.process.wait(10) == 2
    lines = agent.stderr().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("heartbeat-agent: error: ")
    assert message in lines[0]


# --- the asyncio agent -----------------------------------------------------------


@pytest.mark.timeout(20)
def test_async_start_announces_online_and_registers(mosquitto: MosquittoBroker, orchestrator: FakeOrchestrator) -> None:
    async def scenario() -> None:
        async with AsyncAgent(runtime_id(), interval=INTERVAL, broker=mosquitto.url, timeout=5) as agent:
            assert agent.registered
            assert agent.connected
            await orchestrator.await_for(state_is("online", agent.runtime_id, agent.session))
            payload = await asyncio.to_thread(retained, mosquitto.port, TOPICS.interval(agent.runtime_id))
            assert payload is not None
            assert protocol.decode_interval(payload) == protocol.IntervalRequest(INTERVAL, INTERVAL)

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_async_pulses_arrive_every_interval_with_increasing_seq(
    mosquitto: MosquittoBroker, orchestrator: FakeOrchestrator
) -> None:
    async def scenario() -> None:
        async with AsyncAgent(runtime_id(), interval=INTERVAL, broker=mosquitto.url, timeout=5) as agent:
            rid = agent.runtime_id
            await orchestrator.await_for(lambda seen: pulse_of(rid)(seen) and seen.pulse.seq == 5)
            pulses = orchestrator.pulses(rid)[:6]
            assert [p.pulse.seq for p in pulses] == list(range(6))
            assert {p.pulse.session for p in pulses} == {agent.session}
            gaps = [b.at - a.at for a, b in itertools.pairwise(pulses)]
            assert 0.8 * INTERVAL < sum(gaps) / len(gaps) < 1.3 * INTERVAL, gaps

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_async_stop_leaves_stopped_retained_and_no_will(
    mosquitto: MosquittoBroker, orchestrator: FakeOrchestrator
) -> None:
    agent = AsyncAgent(runtime_id(), interval=INTERVAL, broker=mosquitto.url, timeout=5)

    async def scenario() -> None:
        async with agent:
            pass
        await agent.stop()  # idempotent

    asyncio.run(scenario())
    payload = retained(mosquitto.port, TOPICS.state(agent.runtime_id))
    assert payload is not None
    assert protocol.decode_state(payload) == protocol.StateMessage("stopped", agent.session)
    time.sleep(0.3)
    assert [state.state for state in orchestrator.states(agent.runtime_id)] == ["online", "stopped"]


@pytest.mark.timeout(20)
def test_async_rejection_raises_registration_rejected(
    mosquitto: MosquittoBroker, rejecting_orchestrator: FakeOrchestrator
) -> None:
    async def scenario() -> None:
        async with AsyncAgent(runtime_id(), interval=INTERVAL, broker=mosquitto.url, timeout=5):
            pytest.fail("start should have raised")

    with pytest.raises(RegistrationRejected) as caught:
        asyncio.run(scenario())
    assert caught.value.error == "interval below this deployment's minimum of 1 s"


@pytest.mark.timeout(20)
def test_async_without_orchestrator_start_returns_after_timeout_still_connected(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> None:
        agent = AsyncAgent(runtime_id(), interval=INTERVAL, broker=mosquitto.url, timeout=1.0)
        began = time.monotonic()
        async with agent:
            assert 1.0 <= time.monotonic() - began < 2.5
            assert (agent.connected, agent.registered) == (True, False)

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_async_wait_registered_without_a_reply_raises_registration_timeout(mosquitto: MosquittoBroker) -> None:
    async def scenario() -> None:
        async with AsyncAgent(runtime_id(), interval=INTERVAL, broker=mosquitto.url, timeout=0.5) as agent:
            with pytest.raises(RegistrationTimeout, match="orchestrator running"):
                await agent.wait_registered(0.3)

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_async_unanswered_request_is_resent_until_answered(
    mosquitto: MosquittoBroker, make_orchestrator: Callable[..., FakeOrchestrator]
) -> None:
    fake = make_orchestrator(ignore=2)  # answers the 3rd request

    async def scenario() -> None:
        async with AsyncAgent(runtime_id(), interval=INTERVAL, broker=mosquitto.url, **LATE) as agent:
            returned, registered_at_return = time.monotonic(), agent.registered
            reply = await agent.wait_registered(5)
            requests = fake.requests(agent.runtime_id)
            assert (registered_at_return, agent.registered, reply.ok) == (False, True, True)
            assert len(requests) == 3
            assert requests[2].at > returned
            assert_backoff_gaps(requests)

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_async_pulses_go_out_before_the_confirmation(
    mosquitto: MosquittoBroker, make_orchestrator: Callable[..., FakeOrchestrator]
) -> None:
    fake = make_orchestrator(ignore=NEVER)

    async def scenario() -> None:
        async with AsyncAgent(runtime_id(), interval=INTERVAL, broker=mosquitto.url, **LATE) as agent:
            await fake.await_for(pulse_of(agent.runtime_id, agent.session))
            assert agent.reply is None

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_async_rejection_after_start_stops_the_resends(
    mosquitto: MosquittoBroker, make_orchestrator: Callable[..., FakeOrchestrator]
) -> None:
    fake = make_orchestrator(ignore=2, error="interval below this deployment's minimum of 1 s")

    async def scenario() -> None:
        async with AsyncAgent(runtime_id(), interval=INTERVAL, broker=mosquitto.url, **LATE) as agent:
            with pytest.raises(RegistrationRejected, match="minimum of 1 s"):
                await agent.wait_registered(5)
            rid, third = agent.runtime_id, fake.requests(agent.runtime_id)[-1]
            # The 4th request would have left within 1.2 * 1.5 = 1.8 s of the 3rd.
            later = lambda seen: seen.kind == "interval" and seen.runtime_id == rid and seen.at > third.at  # noqa: E731
            assert await asyncio.to_thread(none_within, fake, later, 2)

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_async_unreachable_broker_raises_connect_error() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    agent = AsyncAgent(runtime_id(), interval=INTERVAL, broker=url, timeout=1.0, reconnect_min=0.1)
    with pytest.raises(ConnectError, match=url):
        asyncio.run(agent.start())


@pytest.mark.timeout(30)
def test_async_broker_restart_reconnects_with_a_new_session(
    mosquitto: MosquittoBroker, orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    restarted: list[MosquittoBroker] = []

    async def scenario() -> None:
        agent = AsyncAgent(
            runtime_id(), interval=INTERVAL, broker=mosquitto.url, timeout=5, reconnect_min=0.1, reconnect_max=0.5
        )
        async with agent:
            rid, first_session = agent.runtime_id, agent.session
            await asyncio.to_thread(mosquitto.stop)
            restarted.append(await asyncio.to_thread(start_mosquitto, tmp_path, mosquitto.port))
            online = await orchestrator.await_for(
                lambda seen: state_is("online", rid)(seen) and seen.state.session != first_session, within=10
            )
            assert online.state.session == agent.session
            await orchestrator.await_for(pulse_of(rid, agent.session), within=5)

    try:
        asyncio.run(scenario())
    finally:
        for broker in restarted:
            broker.stop()

"""The intake: every message from the broker, routed. Pulses and state messages go to the detector at once.

This is the hot path: a pulse from the lean connection reaches
:meth:`Intake.on_pulse` and the detector with nothing in between. Interval
requests go to the registrar's queue and commands to the commander's; a live
will waits for the watch to prove the link. Bad input is counted and logged
once per ID (:mod:`orchestrator.rejections`); one bad message never stops a
stream.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import mqtt5
from paho.mqtt.properties import Properties

from runtime_agent import protocol
from runtime_agent.protocol import ProtocolError, Topics

from .config import Config
from .conflict import ConflictWatch
from .detector import Detector, NotRegistered, Transition
from .healing import RegistrationHealer
from .link import Echo
from .rejections import Rejections

log = logging.getLogger("orchestrator")

_CONFLICT_WINDOWS = 10
"""Signs of a shared ID count within this many intervals (+ grace); a conflict lasts as long."""
_MAX_BIRTHS = 10_000
"""Births remembered until their interval request comes (oldest dropped): random IDs must not grow memory."""

Response = tuple[str | None, bytes | None]
"""An MQTT 5 request's (Response Topic, Correlation Data), each None when absent or unusable."""


@dataclass(slots=True)
class Request:
    """An interval request (or, with an empty payload, a removal) as it came, for the registrar."""

    runtime_id: str
    payload: bytes
    retained: bool
    response_topic: str | None
    correlation: bytes | None


@dataclass(slots=True)
class CommandRequest:
    """A maintenance command as it came, for the commander."""

    payload: bytes
    retained: bool
    response_topic: str | None
    correlation: bytes | None


class Verdicts(Protocol):
    """Where transitions go (:class:`orchestrator.outbox.Outbox`)."""

    def emit(self, transition: Transition) -> None: ...


class Watch(Protocol):
    """What the intake asks of the watch (:class:`orchestrator.watch.Watch`)."""

    def will(self, runtime_id: str, received: float, session: int | None) -> None: ...


class Births:
    """A state that came before its runtime's registration, kept until the interval request that follows it.

    Two kinds: a live birth (its session, so a will of an older one is known
    as stale), and a stop, live or retained (an agent whose start failed
    leaves its request and ``stopped``; a broker may deliver the second
    first). Bounded, oldest dropped: random IDs must not grow memory.
    """

    def __init__(self) -> None:
        self._states: collections.OrderedDict[str, tuple[bool, int | None]] = collections.OrderedDict()

    def remember(self, runtime_id: str, session: int | None, *, stopped: bool = False) -> None:
        if session is None and not stopped:
            return
        self._states.pop(runtime_id, None)
        self._states[runtime_id] = (stopped, session)
        if len(self._states) > _MAX_BIRTHS:
            self._states.popitem(last=False)

    def take(self, runtime_id: str) -> tuple[bool, int | None] | None:
        """``(stopped, session)`` of the state kept for ``runtime_id``, if any (forgotten then)."""
        return self._states.pop(runtime_id, None)


@dataclass(frozen=True, slots=True)
class Common:
    """What every room of the input side is given (the intake, the registrar, the commander)."""

    topics: Topics
    detector: Detector
    reject: Rejections
    stats: collections.Counter[str]
    config: Config


class InputRoom:
    """A room of the input side: it reads messages of the topics, asks the detector, counts what it rejects."""

    def __init__(self, common: Common) -> None:
        self.topics = common.topics
        self.detector = common.detector
        self._reject = common.reject
        self.stats = common.stats
        self.max_payload = common.config.max_payload


class Intake(InputRoom):
    """Routes messages; owns the pulse count, sessions and conflicts of runtime IDs."""

    def __init__(
        self,
        common: Common,
        *,
        echo: Echo,
        verdicts: Verdicts,
        watch: Watch,
        requests: Callable[[Request], None],
        commands: Callable[[CommandRequest], None],
        our_clear: Callable[[str, float], bool],
        healer: RegistrationHealer,
        heal: Callable[[], None],
        conflicts: ConflictWatch,
        births: Births,
    ) -> None:
        super().__init__(common)
        self._echo = echo
        self._verdicts = verdicts
        self._watch = watch
        self._requests = requests
        self._commands = commands
        self._our_clear = our_clear
        self._healer = healer
        self._heal = heal
        self.conflicts = conflicts
        self.births = births
        self.pulses = 0
        """Pulses accepted (a plain int: it is bumped on the hot path)."""

    def receive(
        self,
        topic: str,
        payload: Any,
        retained: bool,
        properties: Properties | None = None,
        *,
        response: Response | None = None,
    ) -> None:
        """Route any message but a lean-path pulse, from either connection; one bad message never stops a stream.

        Pulses are decoded only when non-empty. ``response`` is the MQTT 5
        ``(Response Topic, Correlation Data)`` when the lean connection already
        has them, instead of paho's ``properties``.
        """
        try:
            if topic == self._echo.topic:
                self._echo.received(bytes(payload))
            else:
                self._route(topic, payload, retained, response or response_to(properties))
        except Exception:
            self.stats["errors"] += 1
            log.exception("unexpected error handling a message on %r", topic[:200])

    def _route(self, topic: str, payload: Any, retained: bool, response: Response) -> None:
        parsed = self.topics.parse(topic)
        if parsed is None:
            if topic == self.topics.command:
                self._command(payload, retained, response)
                return
            self._reject("foreign_topic", topic)
            return
        kind, runtime_id = parsed
        if not isinstance(payload, bytes | bytearray):
            payload = b"" if payload is None else str(payload).encode()
        now = time.monotonic()
        if kind == "pulse":
            self.on_pulse(runtime_id, bytes(payload), now)
            return
        if not payload and self._our_clear(topic, now):
            return  # the echo of our own clearing of a deregistered runtime's retained message
        if kind == "interval":
            response_topic, correlation = response
            self._requests(Request(runtime_id, bytes(payload), retained, response_topic, correlation))
            return
        if kind == "state":
            self._state(runtime_id, payload, retained, now)
            return
        self._reject("unknown_topic", topic)

    def _state(self, runtime_id: str, payload: bytes, retained: bool, now: float) -> None:
        """A birth (``online``), a will (``offline``) or a clean stop (``stopped``)."""
        try:
            message = protocol.decode_state(payload, limit=self.max_payload)
            if message.state == "online":
                transition = self.detector.online(runtime_id, now, message.session, live=not retained)
            elif message.state == "offline":
                transition = self._will(runtime_id, now, message.session, live=not retained)
            else:
                transition = self.detector.stopped(runtime_id, now, message.session)
            self.stats["state_messages"] += 1
        except NotRegistered:
            early = (message.state == "online" and not retained) or message.state == "stopped"
            if early and protocol.is_valid_id(runtime_id):  # came before the registration: kept for it
                self.births.remember(runtime_id, message.session, stopped=message.state == "stopped")
                return
            self._reject("unregistered", runtime_id, "state from unregistered runtime")
            return
        except ProtocolError as exc:
            self._reject(exc.reason, runtime_id, f"state: {exc}")
            return
        if transition is not None:
            self._verdicts.emit(transition)
        if self.detector.session_changes:
            self._weigh_session_changes(now)

    def _will(self, runtime_id: str, now: float, session: int | None, *, live: bool) -> Transition | None:
        """A live will is applied by the watch after an echo proves the link (see ``orchestrator.watch``).

        A broker going down sends every will at once, then drops us too: those
        wills say nothing about the runtimes, and the failed echo tells.
        """
        if not live:
            return self.detector.offline(runtime_id, now, session, live=False)
        view = self.detector.view(runtime_id)  # raises NotRegistered
        if self.conflicts.in_conflict(runtime_id, now, _CONFLICT_WINDOWS * (view.interval + view.grace)):
            self.stats["wills_ignored_in_conflict"] += 1
            return None  # the other claimant may be alive: silence decides
        self._watch.will(runtime_id, now, session)
        return None

    def _weigh_session_changes(self, now: float) -> None:
        """Session changes the detector saw are signs of two claimants of one ID; enough of them, a conflict."""
        changed, self.detector.session_changes = self.detector.session_changes, []
        for runtime_id in changed:
            view = self.detector.view(runtime_id)
            if self.conflicts.sign(runtime_id, now, _CONFLICT_WINDOWS * (view.interval + view.grace)):
                reason = "two connections claim this runtime ID (their sessions keep taking turns)"
                self.stats["conflicts"] += 1
                self._verdicts.emit(
                    Transition(runtime_id, view.state, view.state, now, view.last_seen, reason, "conflict")
                )

    def on_pulse(self, runtime_id: str, payload: bytes, now: float) -> None:
        """The hot path: one pulse, from either connection. Decodes only a non-empty payload."""
        session = None
        if payload:
            try:
                session = protocol.decode_pulse(payload, limit=self.max_payload).session
            except ProtocolError as exc:
                self._reject(exc.reason, runtime_id, f"pulse: {exc}")
                return
        try:
            transition = self.detector.pulse(runtime_id, now, session)
        except NotRegistered:
            self._reject("unregistered", runtime_id, "pulse from unregistered runtime")
            self.stats["unregistered_pulses"] += 1
            if protocol.is_valid_id(runtime_id) and self._healer.unregistered_pulse(runtime_id, now):
                self._heal()
            return
        self.pulses += 1
        if transition is not None:
            self._verdicts.emit(transition)
        if self.detector.session_changes:
            self._weigh_session_changes(now)

    def on_lean_message(self, topic: str, payload: bytes, now: float, retained: bool) -> None:
        """Messages from the lean connection: pulses, births and wills, and our own echoes."""
        if topic.endswith("/pulse"):
            self.on_pulse(self.topics.pulse_id(topic), payload, now)  # the hot path: nothing in between
        else:
            self.receive(topic, payload, retained)

    def on_lean_request(self, packet: mqtt5.PublishPacket, now: float) -> None:
        """A message from the lean connection with an MQTT 5 Response Topic (an interval request)."""
        response = (packet.response_topic, packet.correlation_data)
        self.receive(packet.topic, packet.payload, packet.retain, response=response)

    def _command(self, payload: Any, retained: bool, response: Response) -> None:
        if not isinstance(payload, bytes | bytearray):
            payload = b"" if payload is None else str(payload).encode()
        response_topic, correlation = response
        try:
            self._commands(CommandRequest(bytes(payload), retained, response_topic, correlation))
        except asyncio.QueueFull:
            self._reject("busy", "command:busy", "command: too many commands waiting")


def response_to(properties: Properties | None) -> Response:
    """The MQTT 5 Response Topic and Correlation Data of a request, if usable."""
    if properties is None:
        return None, None
    topic = getattr(properties, "ResponseTopic", None)
    correlation = getattr(properties, "CorrelationData", None)
    if not isinstance(topic, str) or not topic or len(topic) > 1024 or "+" in topic or "#" in topic:
        return None, None
    return topic, correlation if isinstance(correlation, bytes) else None

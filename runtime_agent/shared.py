"""What both agents share: validated settings, reply parsing, messages and the state they expose.

:class:`runtime_agent.Agent` (threads, paho) and
:class:`runtime_agent.AsyncAgent` (asyncio, aiomqtt) build the same
:class:`AgentSettings` and keep the same :class:`AgentState`, so both validate,
word their messages and decide what a reply means in one place.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import ssl
import time
from dataclasses import dataclass
from typing import Final, Required, TypedDict, Unpack

from . import protocol
from .backoff import Backoff
from .exceptions import RegistrationRejected
from .url import BrokerAddress, check_tls_files, parse_broker_url, with_env_password

log = logging.getLogger("runtime_agent")

DEFAULT_BROKER: Final = "mqtt://127.0.0.1:1883"
SESSION_LIMIT: Final = 2**53
"""Sessions stay below 2**53 so that JSON readers using doubles (JavaScript) read them exactly."""
MAX_CLIENT_ID: Final = 64
STOP_PUBLISH_TIMEOUT: Final = 5.0
"""Longest wait for the broker to acknowledge ``stopped``: stopping must not hang on a dead broker."""
RETRY_FIRST: Final = 2.0
"""Default seconds (before jitter) from an unanswered interval request to its first re-send."""
RETRY_MAX: Final = 60.0
"""Default cap of the re-send delay (before jitter); see :attr:`AgentSettings.resend`."""


class AgentOptions(TypedDict, total=False):
    """The keyword options both agents take, with their defaults; :meth:`AgentSettings.build` checks them."""

    interval: Required[float]
    """Seconds between pulses, and the interval the orchestrator is asked to watch."""
    grace: float | None
    """Seconds of lateness the orchestrator allows before it declares the runtime dead (None: its default)."""
    broker: str
    """``mqtt://`` or ``mqtts://`` URL (default ``mqtt://127.0.0.1:1883``); a password may come from
    ``HEARTBEAT_BROKER_PASSWORD`` instead of the URL."""
    prefix: str
    """Topic prefix shared with the orchestrator (default ``heartbeat/v1``)."""
    timeout: float
    """Seconds ``start()`` may take to connect and to wait for the reply (default 10)."""
    client_id: str | None
    """MQTT client ID (default ``hb-agent-{id}``, hashed to at most 64 characters)."""
    keepalive: int | None
    """MQTT keepalive in whole seconds (default: twice the interval, within 5-60)."""
    tls_ca: str | None
    """CA file for ``mqtts://`` (default: the system's CAs)."""
    tls_cert: str | None
    """Client certificate (PEM) for brokers that require one; needs ``tls_key``."""
    tls_key: str | None
    """Private key (PEM) of ``tls_cert``."""
    reconnect_min: float
    """First wait (before jitter) between connection attempts (default 0.5 s), doubling to ``reconnect_max``."""
    reconnect_max: float
    """Longest wait (before jitter) between connection attempts (default 5 s)."""
    retry_first: float
    """First wait (before jitter) before re-sending an unanswered interval request (default 2 s)."""
    retry_max: float
    """Longest wait (before jitter) between re-sent interval requests (default 60 s)."""


_OPTIONS: Final = AgentOptions.__required_keys__ | AgentOptions.__optional_keys__


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Validated agent options; built before any network I/O so mistakes fail fast."""

    runtime_id: str
    interval: float
    grace: float | None
    address: BrokerAddress
    topics: protocol.Topics
    timeout: float
    client_id: str
    keepalive: int
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None
    reconnect: Backoff
    """Waits between connection attempts; a fresh sequence after each successful connection.

    ``reconnect_min`` doubling up to ``reconnect_max``, each times 0.5-1.5: a
    broker restart drops every agent at once, and delays without jitter would
    bring them all back at the same instants, a reconnect storm at each step.
    """
    resend: Backoff
    """Waits between re-sends of an unanswered interval request, for one connection.

    By default 2 s doubling to a 60 s cap, each times 0.5-1.5 (so a fleet
    started together does not re-send in lockstep). Even at the shortest
    jitter that is at most 6 requests (the first included) in any minute of a
    connection, well within the orchestrator's default limit of 30 live
    requests per runtime ID per minute, beyond which it rejects them.
    """

    @classmethod
    def build(cls, runtime_id: str, **options: Unpack[AgentOptions]) -> AgentSettings:
        """Validate everything; raises ProtocolError (a ValueError), ValueError, or TypeError for an unknown option."""
        unknown = options.keys() - _OPTIONS
        if unknown:
            raise TypeError(
                f"unknown agent option {sorted(unknown)[0]!r}; the options are {', '.join(sorted(_OPTIONS))}"
            )
        if "interval" not in options:
            raise TypeError("the interval option is required (seconds between pulses)")
        runtime_id = protocol.check_id(runtime_id)
        interval = protocol.check_seconds("interval", options["interval"])
        grace = options.get("grace")
        grace = None if grace is None else protocol.check_seconds("grace", grace)
        address = with_env_password(parse_broker_url(options.get("broker", DEFAULT_BROKER)))
        topics = protocol.Topics(options.get("prefix", protocol.DEFAULT_PREFIX))
        timeout = _positive("timeout", options.get("timeout", 10.0))
        reconnect_min = _positive("reconnect_min", options.get("reconnect_min", 0.5))
        reconnect_max = _positive("reconnect_max", options.get("reconnect_max", 5.0))
        if reconnect_max < reconnect_min:
            raise ValueError(f"reconnect_max ({reconnect_max:g}) must not be below reconnect_min ({reconnect_min:g})")
        retry_first = _positive("retry_first", options.get("retry_first", RETRY_FIRST))
        retry_max = _positive("retry_max", options.get("retry_max", RETRY_MAX))
        if retry_max < retry_first:
            raise ValueError(f"retry_max ({retry_max:g}) must not be below retry_first ({retry_first:g})")
        keepalive = options.get("keepalive")
        if keepalive is None:
            keepalive = default_keepalive(interval)
        elif isinstance(keepalive, bool) or not isinstance(keepalive, int) or not 1 <= keepalive <= 65535:
            raise ValueError(f"keepalive must be a whole number of seconds from 1 to 65535, got {keepalive!r}")
        client_id = options.get("client_id")
        if client_id is None:
            client_id = default_client_id(runtime_id)
        elif not client_id:
            raise ValueError("client_id must not be empty")
        tls_ca, tls_cert, tls_key = options.get("tls_ca"), options.get("tls_cert"), options.get("tls_key")
        check_tls_files(address, tls_ca, tls_cert, tls_key)
        return cls(
            runtime_id=runtime_id,
            interval=interval,
            grace=grace,
            address=address,
            topics=topics,
            timeout=timeout,
            client_id=client_id,
            keepalive=keepalive,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            reconnect=Backoff(reconnect_min, reconnect_max),
            resend=Backoff(retry_first, retry_max),
        )

    @property
    def url(self) -> str:
        """The broker URL without password, for messages."""
        return self.address.url

    def no_reply_message(self, seconds: float) -> str:
        """Why :class:`RegistrationTimeout` was raised: no reply within ``seconds``."""
        return f"{self._no_reply(seconds)}; is the orchestrator running on that broker and prefix?"

    def still_waiting_message(self) -> str:
        """What ``start()`` logs when it returns without a reply: the agent goes on trying."""
        return f"{self._no_reply(self.timeout)}; still waiting (re-sending with backoff) and pulsing meanwhile"

    def _no_reply(self, seconds: float) -> str:
        return (
            f"no reply to the interval request for {self.runtime_id!r} within {seconds:g} s on "
            f"{self.url} (prefix {self.topics.prefix!r})"
        )

    def applied(self, reply: protocol.Reply | None) -> str:
        """``interval I s, grace G s``: what the orchestrator applied, in the one wording of every message.

        What was asked where the reply does not say it as a number; the
        orchestrator's default grace is the interval.
        """
        interval = _seconds_or(reply.interval if reply else None, self.interval)
        grace = _seconds_or(reply.grace if reply else None, interval if self.grace is None else self.grace)
        return f"interval {interval:g} s, grace {grace:g} s"

    def connect_message(self, error: object) -> str:
        hint = ""
        if isinstance(error, ssl.SSLCertVerificationError):
            hint = "; is the CA file (tls_ca) the one that signed the broker's certificate?"
        elif isinstance(error, ssl.SSLError) and self.address.tls:
            hint = "; does this port speak TLS? (mqtt:// is plaintext, mqtts:// is TLS)"
        return f"cannot connect to the broker at {self.url} within {self.timeout:g} s: {error}{hint}"

    def refusal_message(self, reason: object) -> str:
        """Why the broker said no, with what to check for the refusals that retrying cannot fix."""
        hint = ""
        if reason_value(reason) in AUTH_REFUSALS:
            hint = "; check the user name and password (or client certificate) and the broker's access control"
        return f"the broker at {self.url} refused the connection: {reason}{hint}"

    def start_failure_message(self, refusal: object | None, *, connack_seen: bool) -> str:
        """Why a start that got no reply failed: a refusal, no CONNACK at all, or no SUBACK."""
        if refusal is not None:
            return self.refusal_message(refusal)
        if not connack_seen:
            hint = (
                "does the broker require a client certificate it trusts (tls_cert)?"
                if self.address.tls
                else "if this port speaks TLS, use mqtts://"
            )
            return self.connect_message(f"the broker accepted TCP but sent no CONNACK ({hint})")
        return (
            f"the broker at {self.url} accepted the connection but did not acknowledge the subscription "
            f"to {self.topics.reply(self.runtime_id)} within {self.timeout:g} s"
        )

    def subscription_refused_message(self, reason: object) -> str:
        return (
            f"the broker at {self.url} refused the subscription to {self.topics.reply(self.runtime_id)} "
            f"({reason}); check its access control"
        )


AUTH_REFUSALS: Final = frozenset({133, 134, 135, 138, 140})
"""CONNACK reason codes that retrying cannot fix: client ID rejected, bad user name or password, not
authorised, banned, bad authentication method. (paho maps MQTT 3.1.1's 2, 4 and 5 onto 133-135.)"""


def reason_value(reason: object) -> int | None:
    """The numeric reason code of a paho ReasonCode, an int, or an aiomqtt MqttCodeError."""
    reason = getattr(reason, "rc", reason)
    value = getattr(reason, "value", reason)
    return value if isinstance(value, int) else None


def _seconds_or(value: object, fallback: float) -> float:
    """``value`` if it is a finite number of seconds (a reply is not validated), else ``fallback``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return fallback
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond any float
        return fallback
    return seconds if math.isfinite(seconds) else fallback


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def default_keepalive(interval: float) -> int:
    """MQTT keepalive for an interval: twice the interval, kept within 5-60 s.

    The broker declares a silent connection dead after 1.5 keepalives and
    then publishes the will; short intervals should get a prompt will, long
    ones should not have the agent ping more often than once a minute.
    """
    return max(5, min(60, int(interval * 2)))


def default_client_id(runtime_id: str) -> str:
    """``hb-agent-{id}``, at most 64 characters.

    Long IDs keep a readable prefix plus a hash of the whole ID rather than
    being cut, since two agents whose client IDs collide would keep knocking
    each other off the broker.
    """
    client_id = f"hb-agent-{runtime_id}"
    if len(client_id) <= MAX_CLIENT_ID:
        return client_id
    digest = hashlib.sha256(runtime_id.encode()).hexdigest()[:12]
    return f"{client_id[: MAX_CLIENT_ID - 13]}-{digest}"


def new_session() -> int:
    """A random session number for one connection, in [0, 2**53)."""
    return secrets.randbelow(SESSION_LIMIT)


def next_pulse_at(due: float, interval: float, now: float) -> float:
    """The next pulse time on a monotonic clock.

    On schedule, deadlines are ``due + interval`` so sleeping never
    accumulates drift. When late (a slow check, a stalled process), the
    missed pulses are dropped rather than sent in a burst: one pulse goes out
    now and the schedule continues from there.
    """
    return max(due + interval, now)


def parse_reply(settings: AgentSettings, payload: bytes, retained: bool) -> protocol.Reply | None:
    """Decode a reply meant for this agent, or log why it is ignored and return None.

    Retained replies are ignored: a reply answers a request made on this
    connection, and a retained one can only be a stale answer to an old one.
    """
    if retained:
        log.debug("ignoring a retained reply on %s", settings.topics.reply(settings.runtime_id))
        return None
    try:
        reply = protocol.decode_reply(payload)
    except protocol.ProtocolError as exc:
        log.warning("ignoring a malformed reply from the orchestrator: %s", exc)
        return None
    if reply.id is not None and reply.id != settings.runtime_id:
        log.warning("ignoring a reply for runtime %r on the topic of %r", reply.id, settings.runtime_id)
        return None
    if reply.deregistered:
        log.warning("ignoring a deregistration reply: this agent never deregisters")
        return None
    return reply


def rejection_text(reply: protocol.Reply) -> str:
    return reply.error if isinstance(reply.error, str) and reply.error else "no reason given"


class CheckLog:
    """Logs health-check results on changes only, so a failing check is not logged every interval."""

    def __init__(self, runtime_id: str) -> None:
        self._runtime_id = runtime_id
        self._ok = True

    def record(self, ok: bool, error: BaseException | None = None) -> bool:
        if ok and not self._ok:
            log.info("health check of %s passes again; pulsing", self._runtime_id)
        elif not ok and self._ok:
            if error is not None:
                log.warning("health check of %s raised %r; withholding pulses", self._runtime_id, error)
            else:
                log.warning("health check of %s failed; withholding pulses", self._runtime_id)
        self._ok = ok
        return ok


class AgentState:
    """The settings and read-only state both agents expose, in one place."""

    def __init__(self, settings: AgentSettings) -> None:
        self._settings = settings
        self._check_log = CheckLog(settings.runtime_id)
        self._session: int | None = None
        self._registered = False
        self._rejected = False
        self._reply: protocol.Reply | None = None
        self._pulses_sent = 0
        self._began = 0.0
        """time.monotonic() when start() began, for how long a late confirmation took."""
        self._returned = False
        """start() has returned: replies are reported in the log from now on, not by start()."""
        self._late = False
        """start() returned without a confirmation, and none has come since."""

    @property
    def runtime_id(self) -> str:
        return self._settings.runtime_id

    @property
    def broker(self) -> str:
        """The broker URL, without password."""
        return self._settings.url

    @property
    def interval(self) -> float:
        return self._settings.interval

    @property
    def registered(self) -> bool:
        """True while the orchestrator's latest reply on the current connection was ok."""
        return self._registered

    @property
    def session(self) -> int | None:
        """The session number of the current (or latest) connection."""
        return self._session

    @property
    def pulses_sent(self) -> int:
        return self._pulses_sent

    @property
    def reply(self) -> protocol.Reply | None:
        """The orchestrator's latest reply, with the interval and grace it applied."""
        return self._reply

    @property
    def applied(self) -> str:
        """``interval I s, grace G s``, as the orchestrator's latest reply has them (before one, as asked)."""
        return self._settings.applied(self._reply)

    # --- what replies mean, alike in both agents (the thread agent calls these under its lock) ---

    def _take_reply(self, reply: protocol.Reply) -> None:
        """Record a reply to this connection's request; once start() has returned, log what it means."""
        was_registered = self._registered
        self._reply = reply
        self._registered = reply.ok
        self._rejected = not reply.ok
        if not self._returned:
            return  # start() reports it, or raises
        settings = self._settings
        if reply.ok and self._late:
            self._late = False
            waited = time.monotonic() - self._began
            log.info("runtime %s registered (%s) after %.1f s", settings.runtime_id, settings.applied(reply), waited)
        elif reply.ok and not was_registered:
            log.info("runtime %s registered again (session %s)", settings.runtime_id, self._session)
        elif not reply.ok:
            log.error(
                "the orchestrator rejected the registration of %s: %s; withholding pulses",
                settings.runtime_id,
                rejection_text(reply),
            )

    def _confirmation(self) -> protocol.Reply | None:
        """The reply if the current connection is registered, None if undecided; raises if it was rejected."""
        reply = self._reply
        if self._rejected and reply is not None:
            raise RegistrationRejected(rejection_text(reply))
        return reply if self._registered else None

    def _finish_start(self) -> None:
        """End start() once the request is out: registered, or still waiting (then say so).

        A missing reply is not a failure: the orchestrator may be late, or
        starting, and the agent keeps re-sending and pulsing in the background.
        Raises :class:`RegistrationRejected` if the orchestrator said no.
        """
        reply = self._confirmation()
        self._returned = True
        settings = self._settings
        if reply is not None:
            log.info("runtime %s registered on %s (%s)", settings.runtime_id, settings.url, settings.applied(reply))
        else:
            self._late = True
            log.warning("%s", settings.still_waiting_message())

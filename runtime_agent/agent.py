"""The thread-based runtime agent, on paho-mqtt 2.x.

It registers a runtime with the orchestrator and then pulses until stopped.
paho's network thread does the I/O and the reconnecting; one more thread of
ours keeps the pulse schedule, so a slow ``check`` never stalls the network.

Each (re)connection gets a fresh session number. It is chosen in paho's
``on_pre_connect`` hook, which runs just before every CONNECT, so the will
(``offline`` with that session) always matches the ``online`` published on
the same connection, and the orchestrator can tell an old will from a new
birth.

The settings and small helpers shared with :mod:`runtime_agent.aio` live
here too, so both agents validate and behave the same way.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from . import protocol
from .exceptions import ConnectError, HeartbeatError, RegistrationRejected, RegistrationTimeout
from .url import BrokerAddress, check_tls_files, parse_broker_url, with_env_password

log = logging.getLogger("runtime_agent")

DEFAULT_BROKER: Final = "mqtt://127.0.0.1:1883"
SESSION_LIMIT: Final = 2**53
"""Sessions stay below 2**53 so that JSON readers using doubles (JavaScript) read them exactly."""
MAX_CLIENT_ID: Final = 64
STOP_PUBLISH_TIMEOUT: Final = 5.0
"""Longest wait for the broker to acknowledge ``stopped``: stopping must not hang on a dead broker."""


# --- shared by Agent and AsyncAgent -----------------------------------------


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
    reconnect_min: float
    reconnect_max: float

    @classmethod
    def build(
        cls,
        runtime_id: str,
        *,
        interval: float,
        grace: float | None,
        broker: str,
        prefix: str,
        timeout: float,
        client_id: str | None,
        keepalive: int | None,
        tls_ca: str | None,
        tls_cert: str | None,
        tls_key: str | None,
        reconnect_min: float,
        reconnect_max: float,
    ) -> AgentSettings:
        """Validate everything; raises ProtocolError (a ValueError) or ValueError."""
        runtime_id = protocol.check_id(runtime_id)
        interval = protocol.check_seconds("interval", interval)
        grace = None if grace is None else protocol.check_seconds("grace", grace)
        address = with_env_password(parse_broker_url(broker))
        topics = protocol.Topics(prefix)
        timeout = _positive("timeout", timeout)
        reconnect_min = _positive("reconnect_min", reconnect_min)
        reconnect_max = _positive("reconnect_max", reconnect_max)
        if reconnect_max < reconnect_min:
            raise ValueError(f"reconnect_max ({reconnect_max:g}) must not be below reconnect_min ({reconnect_min:g})")
        if keepalive is None:
            keepalive = default_keepalive(interval)
        elif isinstance(keepalive, bool) or not isinstance(keepalive, int) or not 1 <= keepalive <= 65535:
            raise ValueError(f"keepalive must be a whole number of seconds from 1 to 65535, got {keepalive!r}")
        if client_id is None:
            client_id = default_client_id(runtime_id)
        elif not client_id:
            raise ValueError("client_id must not be empty")
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
            reconnect_min=reconnect_min,
            reconnect_max=reconnect_max,
        )

    @property
    def url(self) -> str:
        """The broker URL without password, for messages."""
        return self.address.url

    def timeout_message(self) -> str:
        return (
            f"no reply to the interval request for {self.runtime_id!r} within {self.timeout:g} s on "
            f"{self.url} (prefix {self.topics.prefix!r}); is the orchestrator running on that broker and prefix?"
        )

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


AUTH_REFUSALS: Final = frozenset({133, 134, 135, 138, 140})
"""CONNACK reason codes that retrying cannot fix: client ID rejected, bad user name or password, not
authorised, banned, bad authentication method. (paho maps MQTT 3.1.1's 2, 4 and 5 onto 133-135.)"""


def reason_value(reason: object) -> int | None:
    """The numeric reason code of a paho ReasonCode, an int, or an aiomqtt MqttCodeError."""
    reason = getattr(reason, "rc", reason)
    value = getattr(reason, "value", reason)
    return value if isinstance(value, int) else None


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


# --- the thread agent --------------------------------------------------------

_paho_log = logging.getLogger("runtime_agent.mqtt")


def _log_paho(client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
    _paho_log.debug("%s", message)


_Phase = Literal["new", "starting", "running", "stopping", "stopped"]


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


class Agent(AgentState):
    """Registers a runtime with the orchestrator and pulses from a background thread.

    ``start()`` returns once the orchestrator accepted the interval, or
    raises :class:`ConnectError`, :class:`RegistrationTimeout` or
    :class:`RegistrationRejected` within ``timeout`` seconds. After that the
    agent pulses every ``interval`` seconds and reconnects on its own until
    ``stop()``. An agent starts once; use a new one to start again.

    ``check``, if given, is called before each pulse (in the pulse thread);
    the pulse is sent only if it returns True. Exceptions count as False.
    """

    def __init__(
        self,
        runtime_id: str,
        *,
        interval: float,
        grace: float | None = None,
        broker: str = DEFAULT_BROKER,
        prefix: str = protocol.DEFAULT_PREFIX,
        timeout: float = 10.0,
        client_id: str | None = None,
        keepalive: int | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        check: Callable[[], bool] | None = None,
        reconnect_min: float = 0.5,
        reconnect_max: float = 5.0,
    ) -> None:
        super().__init__(
            AgentSettings.build(
                runtime_id,
                interval=interval,
                grace=grace,
                broker=broker,
                prefix=prefix,
                timeout=timeout,
                client_id=client_id,
                keepalive=keepalive,
                tls_ca=tls_ca,
                tls_cert=tls_cert,
                tls_key=tls_key,
                reconnect_min=reconnect_min,
                reconnect_max=reconnect_max,
            )
        )
        self._check = check
        self._lock = threading.Lock()
        self._phase: _Phase = "new"
        self._client: mqtt.Client | None = None
        self._announced = False  # online and the interval went out on the current connection
        self._subscribe_mid: int | None = None
        self._connack_seen = False
        self._refusal: ReasonCode | None = None
        """The latest CONNACK refusal, so a start that times out can say why."""
        self._first: Future[protocol.Reply] = Future()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._pulser: threading.Thread | None = None

    # --- public API ----------------------------------------------------------

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and client.is_connected()

    def start(self) -> None:
        """Connect, register and start pulsing; raises a :class:`HeartbeatError` on failure.

        Takes at most ``timeout`` seconds in all (plus a short cleanup on
        failure). Unreachable brokers are retried with backoff until then,
        since in a container the broker often starts alongside the agent.
        """
        with self._lock:
            if self._phase != "new":
                raise RuntimeError("an Agent can be started only once; create a new one")
            self._phase = "starting"
        settings = self._settings
        deadline = time.monotonic() + settings.timeout
        client = self._make_client()
        self._client = client
        pulser = threading.Thread(target=self._pulse_loop, name=f"runtime-agent-{settings.runtime_id}", daemon=True)
        self._pulser = pulser
        try:
            self._connect(client, deadline)
            client.loop_start()
            reply = self._await_registration(deadline)
            with self._lock:
                if self._phase != "starting":
                    raise HeartbeatError("the agent was stopped while starting")
                self._phase = "running"
                pulser.start()
        except BaseException:
            self._stopping.set()
            self._shutdown(client)
            with self._lock:
                self._phase = "stopped"
            raise
        log.info(
            "runtime %s registered on %s (interval %g s, grace %s)",
            settings.runtime_id,
            settings.url,
            reply.interval if reply.interval is not None else settings.interval,
            reply.grace if reply.grace is not None else "default",
        )

    def stop(self) -> None:
        """Publish ``stopped``, wait for the broker to confirm it, then disconnect cleanly.

        A clean DISCONNECT makes the broker discard the will, so the last
        retained state is ``stopped`` rather than ``offline``. Idempotent;
        safe to call before ``start()`` or from another thread during it
        (``start()`` then fails with :class:`HeartbeatError`).
        """
        with self._lock:
            phase = self._phase
            if phase in ("starting", "running"):
                self._phase = "stopping"
        if phase == "starting":
            self._stopping.set()
            self._fail(HeartbeatError("the agent was stopped while starting"))
            return
        if phase != "running":
            return
        self._stopping.set()
        self._wake.set()
        if self._pulser is not None and self._pulser.is_alive():
            self._pulser.join()
        if self._client is not None:
            self._shutdown(self._client)
        with self._lock:
            self._phase = "stopped"
        log.info("runtime %s stopped", self._settings.runtime_id)

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- connection ----------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        settings = self._settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
            reconnect_on_failure=True,
        )
        # paho logs routine reconnect noise at ERROR; our own messages cover what matters.
        client.on_log = _log_paho
        # An exception escaping a callback would otherwise end paho's network thread.
        client.suppress_exceptions = True
        # paho annotates the delays as int but computes and sleeps with them as floats.
        client.reconnect_delay_set(settings.reconnect_min, settings.reconnect_max)  # type: ignore[arg-type]
        address = settings.address
        if address.username is not None:
            client.username_pw_set(address.username, address.password)
        if address.tls:
            client.tls_set(ca_certs=settings.tls_ca, certfile=settings.tls_cert, keyfile=settings.tls_key)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _connect(self, client: mqtt.Client, deadline: float) -> None:
        """Open the first connection, retrying refusals with backoff until the deadline.

        Done here rather than by paho's thread so the error (refused, DNS,
        TLS) can be reported; later reconnects are left to paho.
        """
        settings = self._settings
        delay = settings.reconnect_min
        # paho refuses to change this once a connection attempt was made, so set it once.
        client.connect_timeout = min(settings.timeout, 5.0)
        while True:
            if time.monotonic() >= deadline:
                raise ConnectError(settings.connect_message("timed out"))
            try:
                client.connect(settings.address.host, settings.address.port, settings.keepalive)
                return
            except OSError as exc:
                error: OSError = exc
            log.info("connecting to %s failed: %s; retrying in %g s", settings.url, error, delay)
            if time.monotonic() + delay >= deadline:
                raise ConnectError(settings.connect_message(error)) from error
            if self._stopping.wait(delay):
                raise HeartbeatError("the agent was stopped while starting")
            delay = min(delay * 2, settings.reconnect_max)

    def _await_registration(self, deadline: float) -> protocol.Reply:
        try:
            return self._first.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
        if self._refusal is not None:
            raise ConnectError(self._settings.refusal_message(self._refusal))
        if not self._connack_seen:
            hint = (
                "does the broker require a client certificate it trusts (tls_cert)?"
                if self._settings.address.tls
                else "if this port speaks TLS, use mqtts://"
            )
            raise ConnectError(self._settings.connect_message(f"the broker accepted TCP but sent no CONNACK ({hint})"))
        raise RegistrationTimeout(self._settings.timeout_message())

    def _succeed(self, reply: protocol.Reply) -> bool:
        """Settle ``start()`` as registered; False if it was already settled."""
        try:
            self._first.set_result(reply)
        except InvalidStateError:
            return False
        return True

    def _fail(self, error: BaseException) -> bool:
        """Settle ``start()`` as failed; False if it was already settled."""
        try:
            self._first.set_exception(error)
        except InvalidStateError:
            return False
        return True

    def _shutdown(self, client: mqtt.Client) -> None:
        """Publish ``stopped`` if this connection announced ``online``, then disconnect and end paho's thread."""
        with self._lock:
            announced, session = self._announced, self._session
        if announced and client.is_connected():
            topic = self._settings.topics.state(self._settings.runtime_id)
            info = client.publish(topic, protocol.encode_state("stopped", session), qos=1, retain=True)
            try:
                info.wait_for_publish(min(self._settings.timeout, STOP_PUBLISH_TIMEOUT))
                delivered = info.is_published()
            except (RuntimeError, ValueError) as exc:
                log.debug("publishing the stopped state failed: %s", exc)
                delivered = False
            if not delivered:
                log.warning("the broker did not confirm the stopped state; the will may report offline instead")
        client.disconnect()
        client.loop_stop()

    # --- paho callbacks (paho's network thread, or start() for the first CONNECT) ---

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        if self._stopping.is_set():
            # Keep the stopped message queued and the will of the session it belongs to.
            return
        session = new_session()
        # paho replays unacknowledged QoS 1 messages after reconnecting, i.e. after
        # our new ``online``; an old ``online`` would then overwrite the new one.
        client.drop_out_messages()
        settings = self._settings
        client.will_set(
            settings.topics.state(settings.runtime_id),
            protocol.encode_state("offline", session),
            qos=1,
            retain=True,
        )
        with self._lock:
            self._session = session
            self._announced = False
            self._registered = False
            self._rejected = False
            self._subscribe_mid = None

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        settings = self._settings
        if reason_code.is_failure:
            # paho reconnects with backoff by itself. A start fails at once only on a refusal
            # that retrying cannot fix (credentials, ACL); a busy broker gets until the timeout.
            self._refusal = reason_code
            message = settings.refusal_message(reason_code)
            if reason_value(reason_code) in AUTH_REFUSALS and self._fail(ConnectError(message)):
                return
            log.error("%s; retrying with backoff", message)
            return
        self._connack_seen = True
        log.info("connected to %s (session %s)", settings.url, self._session)
        if self._stopping.is_set():
            return
        result, mid = client.subscribe(settings.topics.reply(settings.runtime_id), qos=1)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("subscribing to the reply topic failed: %s", mqtt.error_string(result))
            return
        with self._lock:
            self._subscribe_mid = mid

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        settings = self._settings
        with self._lock:
            if mid != self._subscribe_mid:
                return
            session = self._session
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            error = ConnectError(
                f"the broker at {settings.url} refused the subscription to "
                f"{settings.topics.reply(settings.runtime_id)} ({refused[0]}); check its access control"
            )
            if not self._fail(error):
                log.error("%s", error)
            return
        # Subscribed first, so the orchestrator's reply cannot arrive before we listen.
        rid = settings.runtime_id
        client.publish(settings.topics.state(rid), protocol.encode_state("online", session), qos=1, retain=True)
        client.publish(
            settings.topics.interval(rid),
            protocol.encode_interval(settings.interval, settings.grace),
            qos=1,
            retain=True,
        )
        with self._lock:
            self._announced = True
        if self._phase == "running":
            # A reconnect: pulse now rather than up to an interval later.
            self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        settings = self._settings
        if message.topic != settings.topics.reply(settings.runtime_id):
            return
        reply = parse_reply(settings, bytes(message.payload), message.retain)
        if reply is None:
            return
        with self._lock:
            self._reply = reply
            self._registered = reply.ok
            self._rejected = not reply.ok
        if reply.ok:
            if not self._succeed(reply):
                log.info("runtime %s registered again (session %s)", settings.runtime_id, self._session)
        elif not self._fail(RegistrationRejected(rejection_text(reply))):
            log.error(
                "the orchestrator rejected the registration of %s: %s; withholding pulses",
                settings.runtime_id,
                rejection_text(reply),
            )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            self._registered = False
        if self._stopping.is_set():
            log.debug("disconnected from %s", self._settings.url)
        else:
            # MQTT 3.1.1 brokers send no reason: paho then reports "Unspecified error".
            why = "" if reason_code.value == 128 else f" ({reason_code})"
            log.warning("connection to %s lost%s; reconnecting", self._settings.url, why)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        log.debug("reconnecting to %s failed; retrying with backoff", self._settings.url)

    # --- pulses --------------------------------------------------------------

    def _pulse_loop(self) -> None:
        interval = self._settings.interval
        due = time.monotonic()
        while True:
            woken = self._wake.wait(max(0.0, due - time.monotonic()))
            if self._stopping.is_set():
                return
            if woken:
                self._wake.clear()
                due = time.monotonic()
            try:
                self._pulse_once()
            except Exception:
                log.exception("sending a pulse failed")
            due = next_pulse_at(due, interval, time.monotonic())

    def _pulse_once(self) -> None:
        if not self._ready() or not self._run_check() or not self._ready():
            return
        client = self._client
        assert client is not None
        settings = self._settings
        payload = protocol.encode_pulse(self._pulses_sent, self._session)
        info = client.publish(settings.topics.pulse(settings.runtime_id), payload, qos=0)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._pulses_sent += 1
        else:
            log.debug("pulse not sent: %s", mqtt.error_string(info.rc))

    def _ready(self) -> bool:
        """Pulse only on a connection that announced itself and was not rejected."""
        with self._lock:
            return self._announced and not self._rejected and self.connected

    def _run_check(self) -> bool:
        if self._check is None:
            return True
        try:
            return self._check_log.record(bool(self._check()))
        except Exception as exc:
            return self._check_log.record(False, exc)

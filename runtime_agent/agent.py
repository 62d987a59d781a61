"""The thread-based runtime agent, on paho-mqtt 2.x.

It registers a runtime with the orchestrator and then pulses until stopped.
paho's network thread does the I/O and the reconnecting; two more threads of
ours keep the pulse schedule and re-send an unanswered interval request, so a
slow ``check`` never stalls the network nor the registration.

Each (re)connection gets a fresh session number. It is chosen in paho's
``on_pre_connect`` hook, which runs just before every CONNECT, so the will
(``offline`` with that session) always matches the ``online`` published on
the same connection, and the orchestrator can tell an old will from a new
birth.

What both agents share (settings, reply handling, messages) is in
:mod:`runtime_agent.shared`, so both validate and behave the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Literal, Unpack

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from . import protocol
from .exceptions import ConnectError, HeartbeatError, RegistrationTimeout
from .shared import (
    AUTH_REFUSALS,
    STOP_PUBLISH_TIMEOUT,
    AgentOptions,
    AgentSettings,
    AgentState,
    new_session,
    next_pulse_at,
    parse_reply,
    reason_value,
)

log = logging.getLogger("runtime_agent")
_paho_log = logging.getLogger("runtime_agent.mqtt")


def _log_paho(client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
    _paho_log.debug("%s", message)


def paho_client(settings: AgentSettings) -> mqtt.Client:
    """A paho client set up from the settings (credentials, TLS, quiet logs), without callbacks or connection."""
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
    # The bounds only; ReconnectPacer sets each wait (paho annotates int but sleeps floats).
    client.reconnect_delay_set(settings.reconnect.first, settings.reconnect.cap)  # type: ignore[arg-type]
    address = settings.address
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set(ca_certs=settings.tls_ca, certfile=settings.tls_cert, keyfile=settings.tls_key)
    return client


def connect_first(client: mqtt.Client, settings: AgentSettings, deadline: float, stopping: threading.Event) -> None:
    """Open the first connection, retrying with jittered backoff until the deadline or ``stopping``.

    Done by ``start()`` rather than by paho's thread so the error (refused,
    DNS, TLS) can be reported; later reconnects are left to paho, paced by
    :meth:`ReconnectPacer`. The last wait is cut to the deadline and one more
    attempt made there: the error says "within ``timeout`` s", and giving up
    when the next delay would pass the deadline made that 1.6 s of 3.
    """
    delays = settings.reconnect.delays()  # jittered: agents started together do not retry together
    # paho refuses to change this once a connection attempt was made, so set it once.
    client.connect_timeout = min(settings.timeout, 5.0)
    while True:
        try:
            client.connect(settings.address.host, settings.address.port, settings.keepalive)
            return
        except OSError as exc:
            error: OSError = exc
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectError(settings.connect_message(error)) from error
        delay = min(next(delays), left)
        log.info("connecting to %s failed: %s; retrying in %.3g s", settings.url, error, delay)
        if stopping.wait(delay):
            raise HeartbeatError("the agent was stopped while starting")


def send_request(client: mqtt.Client, settings: AgentSettings) -> None:
    """Publish the interval request: QoS 1 and retained, so an orchestrator that starts later learns it too."""
    payload = protocol.encode_interval(settings.interval, settings.grace)
    client.publish(settings.topics.interval(settings.runtime_id), payload, qos=1, retain=True)


def publish_stopped(client: mqtt.Client, settings: AgentSettings, session: int | None) -> None:
    """Publish the retained ``stopped`` state and wait (boundedly) for the broker to confirm it."""
    topic = settings.topics.state(settings.runtime_id)
    info = client.publish(topic, protocol.encode_state("stopped", session), qos=1, retain=True)
    try:
        info.wait_for_publish(min(settings.timeout, STOP_PUBLISH_TIMEOUT))
        delivered = info.is_published()
    except (RuntimeError, ValueError) as exc:
        log.debug("publishing the stopped state failed: %s", exc)
        delivered = False
    if not delivered:
        log.warning("the broker did not confirm the stopped state; the will may report offline instead")


class ReconnectPacer:
    """Makes each of paho's waits before reconnecting the next delay of our jittered sequence.

    paho's own backoff doubles without jitter, so every agent a broker
    restart dropped would reconnect at the same instants. paho has no hook
    for the delay itself, but it calls on_disconnect (a lost or refused
    connection) or on_connect_fail (a failed attempt) before each wait, and a
    wait starts from the minimum set last: both call :meth:`pace`.
    """

    def __init__(self, settings: AgentSettings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._delays = settings.reconnect.delays()

    def restart(self) -> None:
        """A connection succeeded: the next outage starts from the shortest delay again."""
        with self._lock:
            self._delays = self._settings.reconnect.delays()

    def pace(self, client: mqtt.Client) -> float:
        """Set paho's next wait to our next delay; return it."""
        with self._lock:
            delay = next(self._delays)
        client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
        return delay


_Phase = Literal["new", "starting", "running", "stopping", "stopped"]


class Agent(AgentState):
    """Registers a runtime with the orchestrator and pulses from a background thread.

    ``start()`` connects and sends the interval request, pulsing from then
    on. It returns once the orchestrator confirmed the interval, or after
    ``timeout`` seconds without a reply (logging a warning: the agent keeps
    re-sending the request with backoff until a reply comes; see
    :meth:`wait_registered`). It raises :class:`ConnectError` if it could
    not connect within ``timeout`` and :class:`RegistrationRejected` if the
    orchestrator refused the interval. The agent then pulses every
    ``interval`` seconds and reconnects on its own until ``stop()``. An
    agent starts once; use a new one to start again.

    ``check``, if given, is called before each pulse (in the pulse thread);
    the pulse is sent only if it returns True. Exceptions count as False.
    ``retry_first`` and ``retry_max`` shape the re-sends (see
    :attr:`AgentSettings.resend`).
    """

    def __init__(
        self, runtime_id: str, *, check: Callable[[], bool] | None = None, **options: Unpack[AgentOptions]
    ) -> None:
        super().__init__(AgentSettings.build(runtime_id, **options))
        self._check = check
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        """Notified when the registration, the connection's announcement or stopping changes."""
        self._phase: _Phase = "new"
        self._client: mqtt.Client | None = None
        self._announced = False  # online and the interval went out on the current, live connection
        self._requested = False  # the interval request went out on some connection since start()
        self._subscribe_mid: int | None = None
        self._connack_seen = False
        self._refusal: ReasonCode | None = None
        """The latest CONNACK refusal, so a start that cannot connect can say why."""
        self._start_error: BaseException | None = None
        """A failure that ends start() at once (refused credentials or subscription, stop())."""
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._reconnects = ReconnectPacer(self._settings)

    # --- public API ----------------------------------------------------------

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and client.is_connected()

    def start(self) -> None:
        """Connect, send the interval request and start pulsing; see the class docstring for how it ends.

        Takes at most ``timeout`` seconds in all (plus a short cleanup on
        failure). Unreachable brokers are retried with backoff until then,
        since in a container the broker often starts alongside the agent.
        """
        with self._lock:
            if self._phase != "new":
                raise RuntimeError("an Agent can be started only once; create a new one")
            self._phase = "starting"
            self._began = time.monotonic()
        settings = self._settings
        deadline = self._began + settings.timeout
        client = self._make_client()
        self._client = client
        name = f"runtime-agent-{settings.runtime_id}"
        self._threads = [
            threading.Thread(target=self._pulse_loop, name=name, daemon=True),
            threading.Thread(target=self._resend_loop, name=f"{name}-resend", daemon=True),
        ]
        try:
            connect_first(client, settings, deadline, self._stopping)
            client.loop_start()
            for thread in self._threads:
                thread.start()
            self._await_start(deadline)
        except BaseException:
            self._halt()
            self._join_threads()
            self._shutdown(client)
            with self._lock:
                self._phase = "stopped"
            raise

    def wait_registered(self, timeout: float | None = None) -> protocol.Reply:
        """Block until the orchestrator confirmed the current connection's registration; return its reply.

        For programs that must know they are watched before going on, since
        ``start()`` returns after its timeout even without a reply. Raises
        :class:`RegistrationTimeout` after ``timeout`` seconds (None: wait
        as long as it takes), :class:`RegistrationRejected` if the
        orchestrator refused the interval, :class:`HeartbeatError` once the
        agent is stopped.
        """
        with self._changed:
            self._changed.wait_for(lambda: self._registered or self._rejected or self._stopping.is_set(), timeout)
            reply = self._confirmation()
            if reply is not None:
                return reply
            if self._stopping.is_set():
                raise HeartbeatError(f"the agent of {self._settings.runtime_id} is stopped")
        raise RegistrationTimeout(self._settings.no_reply_message(timeout or 0.0))

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
            self._fail(HeartbeatError("the agent was stopped while starting"))
            self._halt()
            return
        if phase != "running":
            return
        self._halt()
        self._join_threads()
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
        client = paho_client(self._settings)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _await_start(self, deadline: float) -> None:
        """Wait for a reply, a failure or the deadline; then end start() (see the class docstring)."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._registered or self._rejected or self._start_error is not None,
                timeout=max(0.0, deadline - time.monotonic()),
            )
            if self._start_error is not None:
                raise self._start_error
            if self._phase != "starting":
                raise HeartbeatError("the agent was stopped while starting")
            if self._requested:
                self._finish_start()  # raises on a rejection
                self._phase = "running"
                return
        raise ConnectError(self._settings.start_failure_message(self._refusal, connack_seen=self._connack_seen))

    def _fail(self, error: BaseException) -> bool:
        """End a waiting ``start()`` with ``error``; False if start() has already ended or failed."""
        with self._changed:
            if self._returned or self._start_error is not None:
                return False
            self._start_error = error
            self._changed.notify_all()
        return True

    def _halt(self) -> None:
        """Tell the pulse and re-send threads, and anyone waiting for the registration, that we stop."""
        self._stopping.set()
        self._wake.set()
        with self._changed:
            self._changed.notify_all()

    def _join_threads(self) -> None:
        for thread in self._threads:
            if thread.is_alive():
                thread.join()

    def _shutdown(self, client: mqtt.Client) -> None:
        """Publish ``stopped`` if this connection announced ``online``, then disconnect and end paho's thread."""
        with self._lock:
            announced, session = self._announced, self._session
        if announced and client.is_connected():
            publish_stopped(client, self._settings, session)
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
        with self._changed:
            self._session = session
            self._announced = False
            self._registered = False
            self._rejected = False
            self._subscribe_mid = None
            self._changed.notify_all()

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
        self._reconnects.restart()
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
            error = ConnectError(settings.subscription_refused_message(refused[0]))
            if not self._fail(error):
                log.error("%s", error)
            return
        # Subscribed first, so the orchestrator's reply cannot arrive before we listen.
        rid = settings.runtime_id
        client.publish(settings.topics.state(rid), protocol.encode_state("online", session), qos=1, retain=True)
        send_request(client, self._settings)
        with self._changed:
            self._announced = True
            self._requested = True
            self._changed.notify_all()  # the re-send thread starts this connection's backoff
        # Pulse now, before any reply: an orchestrator that has the retained request can register us on a pulse.
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        settings = self._settings
        if message.topic != settings.topics.reply(settings.runtime_id):
            return
        reply = parse_reply(settings, bytes(message.payload), message.retain)
        if reply is None:
            return
        with self._changed:
            self._take_reply(reply)
            self._changed.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._registered = False
            self._announced = False
            self._changed.notify_all()
        if self._stopping.is_set():
            log.debug("disconnected from %s", self._settings.url)
        else:
            delay = self._reconnects.pace(client)
            # MQTT 3.1.1 brokers send no reason: paho then reports "Unspecified error".
            why = "" if reason_code.value == 128 else f" ({reason_code})"
            log.warning("connection to %s lost%s; reconnecting in %.3g s", self._settings.url, why, delay)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        delay = self._reconnects.pace(client)
        log.debug("reconnecting to %s failed; retrying in %.3g s", self._settings.url, delay)

    # --- re-sending the interval request ---------------------------------------

    def _resend_loop(self) -> None:
        """Re-send the interval request with jittered backoff until a reply (either way) answers it.

        A reply may come late or never (a request lost in a broker's full
        queue, an orchestrator still starting). Each connection starts a fresh
        sequence, timed from its own first request (sent on subscribe); a
        rejection ends it, since the same request would be refused again.
        """
        session: int | None = None
        delays: Iterator[float] = iter(())
        due = 0.0
        while True:
            with self._changed:
                while True:
                    if self._stopping.is_set():
                        return
                    if not (self._announced and not self._registered and not self._rejected):
                        self._changed.wait()
                        continue
                    if self._session != session:
                        session, delays = self._session, self._settings.resend.delays()
                        due = time.monotonic() + next(delays)
                    remaining = due - time.monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
                due = time.monotonic() + next(delays)
                client = self._client
            if client is not None:
                log.debug("no reply yet for %s; re-sending the interval request", self._settings.runtime_id)
                send_request(client, self._settings)

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

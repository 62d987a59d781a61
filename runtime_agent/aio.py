"""The asyncio runtime agent, on aiomqtt 2.5.

Same protocol behaviour as :class:`runtime_agent.Agent`, for programs that
already run an event loop::

    async with AsyncAgent("worker-1", interval=5) as agent:
        ...  # pulses go out in the background until the block ends

aiomqtt takes the will in the client's constructor, so every connection
gets a new client (and with it a new session number and will). One task
owns the connection from start to stop; ``start()`` and ``stop()`` only
signal it, which keeps connect, reconnect and shutdown in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self, Unpack

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

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
_mqtt_log = logging.getLogger("runtime_agent.mqtt")


class AsyncAgent(AgentState):
    """Registers a runtime with the orchestrator and pulses from an asyncio task.

    ``await start()`` (or ``async with``) connects and sends the interval
    request, pulsing from then on. It returns once the orchestrator
    confirmed the interval, or after ``timeout`` seconds without a reply
    (logging a warning: the agent keeps re-sending the request with backoff
    until a reply comes; see :meth:`wait_registered`). It raises
    :class:`ConnectError` if it could not connect within ``timeout`` and
    :class:`RegistrationRejected` if the orchestrator refused the interval.
    The agent then pulses and reconnects on its own until ``stop()``.

    ``check`` may return a bool or an awaitable of one. It runs on the event
    loop, so a blocking check should hand its work to a thread itself
    (``asyncio.to_thread``).
    """

    def __init__(
        self,
        runtime_id: str,
        *,
        check: Callable[[], bool | Awaitable[bool]] | None = None,
        **options: Unpack[AgentOptions],
    ) -> None:
        super().__init__(AgentSettings.build(runtime_id, **options))
        self._check = check
        self._task: asyncio.Task[None] | None = None
        self._stop_requested: asyncio.Event | None = None
        self._connected = False
        self._changed = asyncio.Event()
        """Set (and replaced) whenever the registration or the connection changes; see :meth:`_until`."""

    # --- public API ----------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self) -> None:
        """Connect, send the interval request and start pulsing; see the class docstring for how it ends."""
        if self._task is not None:
            raise RuntimeError("an AsyncAgent can be started only once; create a new one")
        loop = asyncio.get_running_loop()
        self._began = time.monotonic()
        deadline = loop.time() + self._settings.timeout
        self._stop_requested = asyncio.Event()
        requested: asyncio.Future[None] = loop.create_future()
        task = loop.create_task(self._run(requested, deadline), name=f"runtime-agent-{self._settings.runtime_id}")
        self._task = task
        try:
            await requested  # connected, and the request is out
            await self._await_start(deadline)
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.wait([task])
            raise
        except BaseException:
            # The task is cleaning up after the failure it reported, or must stop after a rejection.
            self._request_stop()
            await asyncio.wait([task])
            raise

    # A timeout of its own, as Agent.wait_registered has: expiry raises RegistrationTimeout with its message.
    async def wait_registered(self, timeout: float | None = None) -> protocol.Reply:  # noqa: ASYNC109
        """Wait until the orchestrator confirmed the current connection's registration; return its reply.

        For programs that must know they are watched before going on, since
        ``start()`` returns after its timeout even without a reply. Raises
        :class:`RegistrationTimeout` after ``timeout`` seconds (None: wait
        as long as it takes), :class:`RegistrationRejected` if the
        orchestrator refused the interval, :class:`HeartbeatError` once the
        agent is stopped.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._until(lambda: self._registered or self._rejected or self._stopping())
        except TimeoutError:
            raise RegistrationTimeout(self._settings.no_reply_message(timeout or 0.0)) from None
        reply = self._confirmation()
        if reply is None:
            raise HeartbeatError(f"the agent of {self._settings.runtime_id} is stopped")
        return reply

    async def stop(self) -> None:
        """Publish ``stopped``, wait for the broker to confirm it, then disconnect cleanly. Idempotent."""
        task = self._task
        if task is None or task.done() or self._stop_requested is None:
            return
        self._request_stop()
        # Shielded: if our caller is cancelled, the shutdown still completes.
        await asyncio.shield(task)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- the connection task -------------------------------------------------

    async def _run(self, requested: asyncio.Future[None], deadline: float) -> None:
        """Connect, reconnect with jittered backoff, and serve each connection until stop is requested.

        ``requested`` is settled once the first interval request is out, or
        with the error that kept it from going out by ``deadline``.
        """
        settings = self._settings
        loop = asyncio.get_running_loop()
        delays = settings.reconnect.delays()  # jittered, so agents dropped together come back spread out
        outage = False  # a lost connection was reported: don't report each failed retry again
        try:
            while not self._stopping():
                first = not requested.done()
                session = new_session()
                client = self._make_client(session, deadline if first else None)
                try:
                    async with client:
                        delays = settings.reconnect.delays()
                        outage = False
                        await self._serve(client, session, requested)
                        return
                except MqttConnectError as exc:
                    # A start fails at once only on a refusal that retrying cannot fix (credentials, ACL).
                    message = settings.refusal_message(exc)
                    if first and (reason_value(exc) in AUTH_REFUSALS or loop.time() >= deadline):
                        _settle(requested, ConnectError(message))
                        return
                    delay = _until_deadline(next(delays), deadline if first else None)
                    log.error("%s; retrying in %.3g s", message, delay)
                except aiomqtt.MqttError as exc:
                    if first and loop.time() >= deadline:
                        _settle(requested, ConnectError(settings.connect_message(_tls_error(exc))))
                        return
                    delay = _until_deadline(next(delays), deadline if first else None)
                    level = logging.INFO if first else logging.DEBUG if outage else logging.WARNING
                    log.log(level, "connection to %s failed or lost: %s; retrying in %.3g s", settings.url, exc, delay)
                    outage = not first
                finally:
                    self._connected = False
                    self._registered = False
                    self._notify()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wait_stop(), delay)
        except Exception as exc:
            if not _settle(requested, exc):
                log.exception("the agent task of %s failed", settings.runtime_id)
        finally:
            _settle(requested, HeartbeatError("the agent was stopped while starting"))

    def _make_client(self, session: int, deadline: float | None) -> aiomqtt.Client:
        settings = self._settings
        address = settings.address
        timeout = settings.timeout
        if deadline is not None:
            timeout = max(0.1, deadline - asyncio.get_running_loop().time())
        will = aiomqtt.Will(
            settings.topics.state(settings.runtime_id),
            protocol.encode_state("offline", session),
            qos=1,
            retain=True,
        )
        client = aiomqtt.Client(
            address.host,
            address.port,
            username=address.username,
            password=address.password,
            identifier=settings.client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            will=will,
            clean_session=True,
            keepalive=settings.keepalive,
            timeout=timeout,
            tls_params=(
                aiomqtt.TLSParameters(ca_certs=settings.tls_ca, certfile=settings.tls_cert, keyfile=settings.tls_key)
                if address.tls
                else None
            ),
            logger=_mqtt_log,
        )
        # Bound the TCP connect too; aiomqtt exposes no option for it.
        client._client.connect_timeout = min(timeout, 5.0)
        return client

    async def _serve(self, client: aiomqtt.Client, session: int, requested: asyncio.Future[None]) -> None:
        """Announce this connection, then pulse and read replies until stop (returns) or loss (raises MqttError)."""
        settings = self._settings
        rid = settings.runtime_id
        self._session = session
        self._connected = True
        self._rejected = False
        log.info("connected to %s (session %s)", settings.url, session)
        if self._stopping():
            return
        # Subscribed first, so the orchestrator's reply cannot arrive before we listen.
        await client.subscribe(settings.topics.reply(rid), qos=1)
        await client.publish(settings.topics.state(rid), protocol.encode_state("online", session), qos=1, retain=True)
        await self._send_request(client)
        # The first client was built with what was left of the start timeout; from now on it is long-lived.
        client.timeout = settings.timeout
        _settle(requested)
        # Pulses start now, before any reply: an orchestrator that has the retained request can register us on one.
        tasks = [
            asyncio.create_task(self._read_replies(client)),
            asyncio.create_task(self._pulse_loop(client, session)),
            asyncio.create_task(self._wait_stop()),
        ]
        resender = asyncio.create_task(self._resend_loop(client))  # ends on a reply, not with the connection
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel_all([*tasks, resender])
        if tasks[2] in done:
            await self._publish_stopped(client, session)
            return
        for task in done:
            if (error := task.exception()) is not None:
                raise error
        raise aiomqtt.MqttError("the message stream ended")

    async def _await_start(self, deadline: float) -> None:
        """Wait for a reply until the deadline (loop time), then end start() (see the class docstring)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._until(lambda: self._registered or self._rejected or self._stopping())
        if self._stopping():
            raise HeartbeatError("the agent was stopped while starting")
        self._finish_start()  # raises on a rejection

    async def _send_request(self, client: aiomqtt.Client) -> None:
        """Publish the interval request: QoS 1 and retained, so an orchestrator that starts later learns it too."""
        settings = self._settings
        await client.publish(
            settings.topics.interval(settings.runtime_id),
            protocol.encode_interval(settings.interval, settings.grace),
            qos=1,
            retain=True,
        )

    async def _resend_loop(self, client: aiomqtt.Client) -> None:
        """Re-send this connection's interval request with jittered backoff until a reply (either way) answers it.

        A reply may come late or never (a request lost in a broker's full
        queue, an orchestrator still starting); a rejection ends the
        re-sends, since the same request would be refused again. The next
        connection starts a fresh sequence.
        """
        for delay in self._settings.resend.delays():
            await asyncio.sleep(delay)
            if self._registered or self._rejected:
                return
            log.debug("no reply yet for %s; re-sending the interval request", self._settings.runtime_id)
            try:
                await self._send_request(client)
            except aiomqtt.MqttError as exc:  # a lost connection is the reader's to notice
                log.debug("re-sending the interval request failed: %s", exc)

    async def _read_replies(self, client: aiomqtt.Client) -> None:
        """Handle the replies to this connection's requests; raises MqttError when the connection is lost."""
        settings = self._settings
        async for message in client.messages:
            if message.topic.value != settings.topics.reply(settings.runtime_id):
                continue
            payload = bytes(message.payload) if isinstance(message.payload, (bytes, bytearray)) else b""
            reply = parse_reply(settings, payload, message.retain)
            if reply is not None:
                self._take_reply(reply)
                self._notify()

    async def _until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, checking it again whenever the registration or connection changes."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        """Wake every :meth:`_until`; a fresh event makes the next wait block again."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _pulse_loop(self, client: aiomqtt.Client, session: int) -> None:
        """Pulse on a monotonic schedule from the start of this connection; never raises MqttError."""
        settings = self._settings
        topic = settings.topics.pulse(settings.runtime_id)
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not self._rejected and await self._run_check() and not self._rejected:
                try:
                    await client.publish(topic, protocol.encode_pulse(self._pulses_sent, session), qos=0)
                    self._pulses_sent += 1
                except aiomqtt.MqttError as exc:
                    log.debug("pulse not sent: %s", exc)
            due = next_pulse_at(due, settings.interval, loop.time())

    async def _run_check(self) -> bool:
        if self._check is None:
            return True
        try:
            result = self._check()
            if inspect.isawaitable(result):
                result = await result
            return self._check_log.record(bool(result))
        except Exception as exc:
            return self._check_log.record(False, exc)

    async def _publish_stopped(self, client: aiomqtt.Client, session: int) -> None:
        settings = self._settings
        try:
            await client.publish(
                settings.topics.state(settings.runtime_id),
                protocol.encode_state("stopped", session),
                qos=1,
                retain=True,
                timeout=min(settings.timeout, STOP_PUBLISH_TIMEOUT),
            )
        except aiomqtt.MqttError as exc:
            log.warning("the broker did not confirm the stopped state (%s); the will may report offline instead", exc)

    def _request_stop(self) -> None:
        assert self._stop_requested is not None
        self._stop_requested.set()
        self._notify()  # wait_registered() ends at once

    def _stopping(self) -> bool:
        return self._stop_requested is not None and self._stop_requested.is_set()

    async def _wait_stop(self) -> None:
        assert self._stop_requested is not None
        await self._stop_requested.wait()


def _until_deadline(delay: float, deadline: float | None) -> float:
    """``delay``, cut to what is left until ``deadline`` (loop time; None: no cut).

    A first connection is tried again at its deadline rather than given up
    when the next delay would pass it: the error says "within ``timeout``
    s", and giving up early made that 1.6 s of 3.
    """
    if deadline is None:
        return delay
    return max(0.0, min(delay, deadline - asyncio.get_running_loop().time()))


def _tls_error(exc: aiomqtt.MqttError) -> BaseException:
    """The SSL error behind an aiomqtt connect failure (it re-raises them as bare MqttError), for the hint."""
    context = exc.__context__
    return context if isinstance(context, ssl.SSLError) else exc


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait until they have ended, cancelling again any that swallowed it.

    Python 3.11's ``asyncio.wait_for``, inside aiomqtt's ``publish``, drops a
    cancellation that comes just as the publish completes; a pulse loop would
    then go on pulsing, and its connection would never close (seen when a
    stop fell on a pulse).
    """
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)


def _settle(started: asyncio.Future[None], error: BaseException | None = None) -> bool:
    """Decide the outcome of ``start()`` once; False if it was already decided (or cancelled)."""
    if started.done():
        return False
    if error is None:
        started.set_result(None)
    else:
        started.set_exception(error)
    return True

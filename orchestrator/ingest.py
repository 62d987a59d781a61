"""The lean connection: MQTT 5 framed by a Rust codec for the hot path, in and out.

Pulses are most of the traffic, and a general MQTT client spends several
microseconds per message on objects, callbacks and futures. This connection
subscribes to ``{prefix}/runtimes/+/pulse`` (and the orchestrator's own echo
topic) at QoS 0 and hands each topic and payload to a callback, framed by the
``mqtt5`` codec (Rust, sans-I/O) on a plain :class:`asyncio.Protocol`. One
monotonic reading is taken per chunk read from the socket: every pulse in it
arrived then.

It also carries the orchestrator's bulk output, status documents and alerts
(QoS 1): :meth:`LeanConnection.publish` encodes PUBLISH packets with the codec,
writes them in bursts within a bounded in-flight window, yields to the event
loop between bursts so pulses are never starved, and returns once the broker
has acknowledged (PUBACK) every one. A general client costs about 50 µs per
QoS 1 publish here (a paho message object, a future, a callback); this costs
a few. Nothing is retried on this connection: if it breaks, ``publish``
raises and the caller keeps the messages for the next connection.

Interval requests come this way too, at QoS 0 like pulses: a fleet starting
at once sends thousands in a second. On the general client (paho, one packet
per event-loop turn, a few recv calls each) 20,000 trickled in at 1,000 a
second while Mosquitto held the rest, and it drops QoS 1 messages for a
client beyond 20 in flight and 1,000 queued. At QoS 1 here, with the largest
Receive Maximum, 100,000 at once still lost 16,000-27,000: Mosquitto reads one
packet per socket per turn of its loop, so our PUBACKs were taken at a
sixteenth of the rate the fleet's sixteen connections published, and the
65,534 in flight filled up. At QoS 0 nothing waits for an acknowledgement:
the socket buffers and this reader's pace are the only limit (100,000 at
once: none lost). A request that carries an MQTT 5 Response Topic goes to
``request_sink`` with its packet, for the reply's properties.

Other control traffic (commands, replies on Response Topics, stats) stays on
the general client. Brokers that speak only MQTT 3.1.1 (the embedded amqtt)
get everything on that client instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Iterator

import mqtt5

log = logging.getLogger("orchestrator.ingest")

MessageSink = Callable[[str, bytes, float, bool], None]
"""Called as ``sink(topic, payload, now, retained)`` for every message, ``now`` on the monotonic clock.

``retained`` is True only for a retained copy delivered at subscribe (the
subscription does not keep the retain flag of live messages)."""

RequestSink = Callable[[mqtt5.PublishPacket, float], None]
"""Called as ``sink(packet, now)`` for every message that carries a Response Topic (a request to answer there)."""


Message = tuple[str, bytes, bool]
"""``(topic, payload, retain)``: one QoS 1 publish."""

_QOS1 = mqtt5.QoS.AT_LEAST_ONCE
_ACK_OK = mqtt5.PubAckReasonCode.SUCCESS
_ACK_NO_SUBSCRIBERS = mqtt5.PubAckReasonCode.NO_MATCHING_SUBSCRIBERS
_MAX_WINDOW = 1000
"""QoS 1 publishes in flight at most (fewer if the broker's Receive Maximum says so)."""
_BURST = 256
"""Publishes written before yielding to the event loop (pulses are read between bursts)."""


_FULL_READ = 262_144
"""What one read takes at most when the transport does not say (asyncio's ``max_size``, 256 KiB)."""
_COALESCE_DELAY = 0.025
"""After a read that emptied the socket (took less than a full read), the next waits this long (seconds).

Mosquitto writes each message as it routes it, so at 100,000 pulses/s a
read found two packets (90 bytes) on average: 48,000 wake-ups, epoll_wait
and recv calls a second, some 4 µs per pulse of the orchestrator's 5. Waiting
lets the packets gather, and a socket that is not read at once is cheaper
for Mosquitto to write to as well: once the wait outlasts our receive
window, the broker's writes queue and leave in larger segments. Mosquitto's
CPU per pulse at 100,000/s: 9.3-9.9 µs with 10 ms, 7.7-8.4 with 20-30 ms;
at 140,000/s, 51 bytes per segment with 10 ms (it fell behind), 158-201
with 25 ms (``python -m bench.broker_cost``, docs/performance.md). A pulse
is then stamped at most 25 ms late, which only ever makes a runtime look
alive 25 ms longer. Never while our own publishes await their PUBACKs, nor
while the watcher awaits its echo (:meth:`LeanConnection.eager`): those are
read at once. A full read means more is waiting: the next is not delayed."""


class LeanConnectionError(ConnectionError):
    """The pulse connection was refused or broke; the message says why."""


class _Batch:
    """One :meth:`LeanConnection.publish` call's publishes: done when all are written and acknowledged."""

    __slots__ = ("acked", "done", "refused", "sent", "written")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.sent = 0
        self.acked = 0
        self.refused = 0
        self.written = False


class _Protocol(asyncio.Protocol):
    def __init__(self, sink: MessageSink, request_sink: RequestSink | None = None) -> None:
        self.sink = sink
        self.request_sink = request_sink
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.connack: asyncio.Future[mqtt5.ConnAckPacket] = asyncio.get_running_loop().create_future()
        self.suback: asyncio.Future[mqtt5.SubAckPacket] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_received = time.monotonic()
        self.received = 0
        self.inflight: dict[int, _Batch] = {}
        """Packet ID -> the batch of each QoS 1 publish not yet acknowledged."""
        self.window = 1
        """How many may be in flight: the broker's Receive Maximum, capped (set at CONNACK)."""
        self.room: asyncio.Future[None] | None = None
        """A publisher waiting for the window to open."""
        self.last_id = 0
        self.eager = 0
        """While above 0, reads are not delayed (see :meth:`LeanConnection.eager`)."""
        self.full_read = _FULL_READ
        """The most one read returns: a read this big did not empty the socket."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.full_read = getattr(transport, "max_size", _FULL_READ)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.last_received = now
        buffer = self.buffer + data if self.buffer else data
        view = memoryview(buffer)
        end = len(buffer)
        pos = 0
        read = mqtt5.read
        publish = mqtt5.PublishPacket
        puback = mqtt5.PubAckPacket
        sink = self.sink
        count = 0
        try:
            while pos < end:
                try:
                    packet, size = read(view[pos:])
                except IndexError:
                    break  # an incomplete packet: wait for the rest
                pos += size
                if type(packet) is publish:
                    count += 1
                    if packet.response_topic is None:
                        sink(packet.topic, packet.payload, now, packet.retain)
                    else:
                        self._request(packet, now)
                elif type(packet) is puback:
                    self._acked(packet)
                else:
                    self._control(packet)
        except Exception as exc:  # a malformed packet: the stream cannot be trusted any more
            log.error("pulse connection: cannot decode the broker's stream (%s); reconnecting", exc)
            self.received += count
            self.buffer = b""
            if self.transport is not None:
                self.transport.abort()
            return
        finally:
            view.release()
        self.received += count
        self.buffer = buffer[pos:] if pos < end else b""
        if len(data) < self.full_read and not self.inflight and not self.eager and self.transport is not None:
            # The socket is empty: let it gather before the next read (see _COALESCE_DELAY).
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(_COALESCE_DELAY, self.resume_reading)

    def _request(self, packet: mqtt5.PublishPacket, now: float) -> None:
        """A message with a Response Topic: to ``request_sink`` whole (without one, it is dropped)."""
        if self.request_sink is None:
            return
        try:
            self.request_sink(packet, now)
        except Exception:  # one bad request must not cost the stream
            log.exception("pulse connection: handling a request on %r failed", packet.topic[:200])

    def resume_reading(self) -> None:
        """End a coalescing pause now (a timer does it otherwise); nothing if the connection is closing."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _acked(self, packet: mqtt5.PubAckPacket) -> None:
        batch = self.inflight.pop(packet.packet_id, None)
        if batch is None:
            return
        batch.acked += 1
        code = packet.reason_code
        if code != _ACK_OK and code != _ACK_NO_SUBSCRIBERS:  # refused (an ACL, a quota): retrying would not help
            batch.refused += 1
        if batch.written and batch.acked == batch.sent and not batch.done.done():
            batch.done.set_result(None)
        room = self.room
        if room is not None and len(self.inflight) < self.window:
            self.room = None
            if not room.done():
                room.set_result(None)

    def next_id(self) -> int:
        """A packet ID not in flight (1..65535, round-robin)."""
        pid = self.last_id
        inflight = self.inflight
        while True:
            pid = pid + 1 if pid < 65535 else 1
            if pid not in inflight:
                self.last_id = pid
                return pid

    def _control(self, packet: object) -> None:
        if isinstance(packet, mqtt5.ConnAckPacket):
            if not self.connack.done():
                self.connack.set_result(packet)
        elif isinstance(packet, mqtt5.SubAckPacket):
            if not self.suback.done():
                self.suback.set_result(packet)
        elif isinstance(packet, mqtt5.DisconnectPacket):
            log.warning("pulse connection: broker disconnected us (%s)", packet.reason_code.name)

    def connection_lost(self, exc: Exception | None) -> None:
        error = LeanConnectionError(f"connection closed: {exc or 'by the broker'}")
        for future in (self.connack, self.suback):
            if not future.done():
                future.set_exception(error)
        # Unacknowledged publishes fail: their callers keep the messages for the next connection.
        for batch in set(self.inflight.values()):
            if not batch.done.done():
                batch.done.set_exception(error)
                batch.done.exception()  # retrieved: a caller that gave up must not log it as unhandled
        self.inflight.clear()
        if self.room is not None and not self.room.done():
            self.room.set_exception(error)
            self.room.exception()
        self.room = None
        if not self.closed.done():
            self.closed.set_result(None)


class LeanConnection:
    """One connection's life: connect, subscribe, read until it breaks.

    ``async with LeanConnection(...) as reader: await reader.closed`` — the caller
    owns reconnecting, so it can stop judging while pulses cannot arrive.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        topic_filters: list[str],
        sink: MessageSink,
        client_id: str,
        request_sink: RequestSink | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive: int = 30,
        timeout: float = 10.0,
        max_inflight: int = _MAX_WINDOW,
    ) -> None:
        self._host, self._port, self._tls = host, port, tls
        self._filters = topic_filters
        self._sink = sink
        self._request_sink = request_sink
        self._client_id = client_id
        self._username = username
        self._password = password
        self._keepalive = keepalive
        self._timeout = timeout
        self._max_inflight = max_inflight
        self._protocol: _Protocol | None = None
        self._pinger: asyncio.Task[None] | None = None

    @property
    def received(self) -> int:
        return self._protocol.received if self._protocol else 0

    async def __aenter__(self) -> LeanConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self._sink, self._request_sink), self._host, self._port, ssl=self._tls
                )
                self._protocol = protocol
                assert protocol.transport is not None
                protocol.transport.write(
                    mqtt5.ConnectPacket(
                        self._client_id,
                        username=self._username,
                        password=None if self._password is None else self._password.encode(),
                        clean_start=True,
                        keep_alive=self._keepalive,
                    ).write()
                )
                connack = await protocol.connack
                if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
                    raise LeanConnectionError(f"broker refused the pulse connection: {connack.reason_code.name}")
                protocol.window = max(1, min(self._max_inflight, connack.receive_max or 65535))
                filters = [
                    mqtt5.TopicFilter(f, max_qos=mqtt5.QoS.AT_MOST_ONCE, retain_as_published=False)
                    for f in self._filters
                ]
                protocol.transport.write(mqtt5.SubscribePacket(1, filters).write())
                suback = await protocol.suback
                if suback.reason_codes != [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_MOST_ONCE] * len(filters):
                    raise LeanConnectionError(f"broker refused the pulse subscription: {suback.reason_codes}")
        except (OSError, TimeoutError) as exc:
            self._abort()
            raise LeanConnectionError(f"cannot open the pulse connection: {exc or 'timed out'}") from None
        except BaseException:
            self._abort()
            raise
        self._pinger = asyncio.create_task(self._ping())
        return self

    def _open(self) -> tuple[_Protocol, asyncio.Transport]:
        """The live connection's protocol and transport; raises :class:`LeanConnectionError` if it is closed."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None or protocol.transport.is_closing():
            raise LeanConnectionError("the pulse connection is closed")
        return protocol, protocol.transport

    async def publish(self, messages: Iterable[Message], *, burst: int = _BURST) -> int:
        """Publish every ``(topic, payload, retain)`` at QoS 1; return once the broker acknowledged all.

        ``messages`` is consumed lazily, so a generator encodes each payload
        just before it is sent. Packets are written ``burst`` at a time
        (fewer when the in-flight window is full), and the event loop runs
        between bursts. Returns how many the broker refused (a PUBACK reason
        code of 0x80 or more, e.g. not authorised; not retried). Raises
        :class:`LeanConnectionError` if the connection breaks first: the caller
        then still owns every message of the call.
        """
        protocol, transport = self._open()
        loop = asyncio.get_running_loop()
        batch = _Batch(loop.create_future())
        inflight = protocol.inflight
        encode = mqtt5.PublishPacket
        chunk: list[bytes] = []
        it = iter(messages)
        exhausted = False
        while not exhausted:
            room = min(burst, protocol.window - len(inflight))
            if room <= 0:
                protocol.room = waiter = protocol.room or loop.create_future()
                await waiter
                continue
            for topic, payload, retain in it:
                pid = protocol.next_id()
                chunk.append(encode(topic, payload, qos=_QOS1, retain=retain, packet_id=pid).write())
                inflight[pid] = batch
                batch.sent += 1
                if len(chunk) >= room:
                    break
            else:
                exhausted = True
            if chunk:
                if transport.is_closing():
                    raise LeanConnectionError("the pulse connection closed while publishing")
                transport.write(b"".join(chunk))
                chunk.clear()
                protocol.resume_reading()  # their PUBACKs are read at once, not after a coalescing pause
                if not exhausted:
                    await asyncio.sleep(0)  # let pulses in between bursts
        batch.written = True
        if batch.acked == batch.sent and not batch.done.done():
            batch.done.set_result(None)
        await batch.done
        if batch.refused:
            log.warning("the broker refused %d of %d status/alert publishes", batch.refused, batch.sent)
        return batch.refused

    async def send(self, messages: Iterable[Message], *, burst: int = _BURST) -> None:
        """Publish every ``(topic, payload, retain)`` at QoS 0: written in bursts, pulses read between them.

        Nothing is acknowledged, so nothing is waited for and no in-flight
        window applies (Mosquitto's is 20 for QoS 1). Raises
        :class:`LeanConnectionError` if the connection is or becomes closed.
        """
        _, transport = self._open()
        encode = mqtt5.PublishPacket
        chunk: list[bytes] = []
        for topic, payload, retain in messages:
            chunk.append(encode(topic, payload, retain=retain).write())
            if len(chunk) >= burst:
                transport.write(b"".join(chunk))
                chunk.clear()
                await asyncio.sleep(0)
                if transport.is_closing():
                    raise LeanConnectionError("the pulse connection closed while publishing")
        if chunk:
            transport.write(b"".join(chunk))

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Read at once, without the coalescing delay, while inside (the watcher awaits its echo)."""
        protocol = self._protocol
        if protocol is None:
            yield
            return
        protocol.eager += 1
        protocol.resume_reading()
        try:
            yield
        finally:
            protocol.eager -= 1

    @property
    def closed(self) -> asyncio.Future[None]:
        assert self._protocol is not None
        return self._protocol.closed

    async def _ping(self) -> None:
        """Keep the connection alive, and drop it if the broker stops answering."""
        protocol = self._protocol
        assert protocol is not None
        assert protocol.transport is not None
        ping = mqtt5.PingReqPacket().write()
        while True:
            await asyncio.sleep(self._keepalive / 2)
            if time.monotonic() - protocol.last_received > 1.5 * self._keepalive:
                log.warning("pulse connection: broker silent for %.0f s; reconnecting", 1.5 * self._keepalive)
                protocol.transport.abort()
                return
            protocol.transport.write(ping)

    def _abort(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.abort()

    async def __aexit__(self, *exc_info: object) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None and not protocol.transport.is_closing():
            protocol.transport.write(mqtt5.DisconnectPacket().write())
            protocol.transport.close()
            try:
                async with asyncio.timeout(2):
                    await protocol.closed
            except TimeoutError:
                protocol.transport.abort()

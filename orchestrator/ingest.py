"""The pulse reader: a lean, read-only MQTT 5 connection for the hot path.

Pulses are most of the traffic, and a general MQTT client spends several
microseconds per message on objects, callbacks and futures. This connection
does one thing: subscribe to ``{prefix}/runtimes/+/pulse`` (and the
orchestrator's own echo topic) at QoS 0 and hand each topic and payload to a
callback, framed by the ``mqtt5`` codec (Rust,
sans-I/O) on a plain :class:`asyncio.Protocol`. One monotonic reading is
taken per chunk read from the socket: every pulse in it arrived then.

Control traffic (interval requests, state messages, replies, status, alerts;
QoS 1) stays on the general client. Brokers that speak only MQTT 3.1.1 (the
embedded amqtt) get their pulses on that client instead.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

import mqtt5

log = logging.getLogger("orchestrator.ingest")

PulseSink = Callable[[str, bytes, float], None]
"""Called as ``sink(topic, payload, now)`` for every message, ``now`` on the monotonic clock."""


class PulseReaderError(ConnectionError):
    """The pulse connection was refused or broke; the message says why."""


class _Protocol(asyncio.Protocol):
    def __init__(self, sink: PulseSink) -> None:
        self.sink = sink
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.connack: asyncio.Future[mqtt5.ConnAckPacket] = asyncio.get_running_loop().create_future()
        self.suback: asyncio.Future[mqtt5.SubAckPacket] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_received = time.monotonic()
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.last_received = now
        buffer = self.buffer + data if self.buffer else data
        view = memoryview(buffer)
        end = len(buffer)
        pos = 0
        read = mqtt5.read
        publish = mqtt5.PublishPacket
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
                    sink(packet.topic, packet.payload, now)
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
        for future in (self.connack, self.suback):
            if not future.done():
                future.set_exception(PulseReaderError(f"connection closed: {exc or 'by the broker'}"))
        if not self.closed.done():
            self.closed.set_result(None)


class PulseReader:
    """One connection's life: connect, subscribe, read until it breaks.

    ``async with PulseReader(...) as reader: await reader.closed`` — the caller
    owns reconnecting, so it can stop judging while pulses cannot arrive.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        topic_filters: list[str],
        sink: PulseSink,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        keepalive: int = 30,
        timeout: float = 10.0,
    ) -> None:
        self._host, self._port, self._tls = host, port, tls
        self._filters = topic_filters
        self._sink = sink
        self._client_id = client_id
        self._username = username
        self._password = password
        self._keepalive = keepalive
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._pinger: asyncio.Task[None] | None = None

    @property
    def received(self) -> int:
        return self._protocol.received if self._protocol else 0

    async def __aenter__(self) -> PulseReader:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self._sink), self._host, self._port, ssl=self._tls
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
                    raise PulseReaderError(f"broker refused the pulse connection: {connack.reason_code.name}")
                filters = [
                    mqtt5.TopicFilter(f, max_qos=mqtt5.QoS.AT_MOST_ONCE, retain_as_published=False)
                    for f in self._filters
                ]
                protocol.transport.write(mqtt5.SubscribePacket(1, filters).write())
                suback = await protocol.suback
                if suback.reason_codes != [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_MOST_ONCE] * len(filters):
                    raise PulseReaderError(f"broker refused the pulse subscription: {suback.reason_codes}")
        except (OSError, TimeoutError) as exc:
            self._abort()
            raise PulseReaderError(f"cannot open the pulse connection: {exc or 'timed out'}") from None
        except BaseException:
            self._abort()
            raise
        self._pinger = asyncio.create_task(self._ping())
        return self

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

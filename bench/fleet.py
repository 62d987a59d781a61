"""A fleet registering at once: many interval requests over raw TCP, and a listener timing every reply.

A fleet that starts together (a data centre powering up, a deployment
rolling out) sends thousands of retained QoS 1 interval requests within a
second. :func:`registering` writes them, pre-encoded, over a few MQTT 3.1.1
connections (as many agents' worth of traffic as the broker takes, without
a paho client's per-message cost on our side); :class:`ReplyListener` is a
subscriber to every reply topic, on a socket with a large receive buffer so
the broker never drops a reply on our account. Used by the ``registration``
scenario and by ``tests/test_registration.py``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator

import mqtt5

from runtime_agent import protocol

from .load import connect, encode_connect, encode_publish

_QOS1 = mqtt5.QoS.AT_LEAST_ONCE


class ReplyListener:
    """Records, for every runtime, when its first reply arrived (monotonic) and whether it was ok.

    Runs a thread reading one MQTT 5 connection; ``close()`` stops it.
    """

    def __init__(
        self, port: int, prefix: str = protocol.DEFAULT_PREFIX, *, client_id: str = "fleet-replies", v5: bool = True
    ) -> None:
        self.replies: dict[str, tuple[float, bool]] = {}
        self.errors: dict[str, str] = {}
        """Runtime ID -> the error of its first refusal."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._v5 = v5
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Replies come at QoS 0, and Mosquitto drops QoS 0 messages for a client once 1,000 wait for its
        # socket: one listener takes a whole fleet's replies, so its socket must take a burst of them
        # while this thread waits for a core (SO_RCVBUFFORCE passes the system's cap, as root).
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 32 << 20)
        self._buffer = b""
        reply_filter = f"{prefix}/runtimes/+/interval/reply"
        if v5:
            # 65,534: the codec leaves 65,535 (the default) out, and Mosquitto then allows only 20 in flight.
            self._sock.sendall(mqtt5.ConnectPacket(client_id, clean_start=True, receive_max=65534).write())
            connack = self._next_packet()
            if not isinstance(connack, mqtt5.ConnAckPacket) or connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
                raise ConnectionError(f"the broker refused the reply listener: {connack!r}")
            self._sock.sendall(mqtt5.SubscribePacket(1, [mqtt5.TopicFilter(reply_filter, max_qos=_QOS1)]).write())
            suback = self._next_packet()
            if not isinstance(suback, mqtt5.SubAckPacket):
                raise ConnectionError(f"no SUBACK for the reply listener: {suback!r}")
        else:
            self._sock.sendall(encode_connect(client_id, keepalive=0) + _encode_subscribe_v311(reply_filter))
            self._await_suback_v311()
        self._sock.settimeout(0.2)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-replies", daemon=True)
        self._thread.start()

    def _await_suback_v311(self) -> None:
        """Read up to the SUBACK; what comes before it (amqtt sends every retained message first) is dropped."""
        while True:
            parsed = _read_v311(memoryview(self._buffer), 0)
            if parsed is None:
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the broker closed the reply listener's connection")
                self._buffer += chunk
                continue
            size = parsed[0]
            kind = self._buffer[0] >> 4
            if kind == 2 and self._buffer[3] != 0:
                raise ConnectionError(f"the broker refused the reply listener: {self._buffer[:4]!r}")
            self._buffer = self._buffer[size:]
            if kind == 9:
                return

    def _next_packet(self) -> mqtt5.Packet:
        while True:
            with contextlib.suppress(IndexError):
                packet, size = mqtt5.read(memoryview(self._buffer))
                self._buffer = self._buffer[size:]
                return packet
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the broker closed the reply listener's connection")
            self._buffer += chunk

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                chunk = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            now = time.monotonic()
            self._buffer += chunk
            acks: list[bytes] = []
            got: list[tuple[str, bytes]] = []
            pos = self._parse(got, acks)
            self._buffer = self._buffer[pos:]
            if acks:
                self._sock.sendall(b"".join(acks))
            self._record(got, now)

    def _parse(self, got: list[tuple[str, bytes]], acks: list[bytes]) -> int:
        """Take the whole packets in the buffer: publishes into ``got``, their PUBACKs into ``acks``; bytes used."""
        view = memoryview(self._buffer)
        pos = 0
        while pos < len(view):
            if self._v5:
                try:
                    packet, size = mqtt5.read(view[pos:])
                except IndexError:
                    break
                if isinstance(packet, mqtt5.PublishPacket):
                    got.append((packet.topic, bytes(packet.payload)))
                    if packet.packet_id is not None:
                        acks.append(mqtt5.PubAckPacket(packet.packet_id).write())
            else:
                parsed = _read_v311(view, pos)
                if parsed is None:
                    break
                size, publish, packet_id = parsed
                if publish is not None:
                    got.append(publish)
                if packet_id is not None:
                    acks.append(b"\x40\x02" + packet_id.to_bytes(2, "big"))
            pos += size
        return pos

    def _record(self, got: list[tuple[str, bytes]], now: float) -> None:
        with self._changed:
            for topic, payload in got:
                if not topic.endswith("/interval/reply"):
                    continue
                runtime_id = topic.rsplit("/", 3)[-3]
                if runtime_id in self.replies:
                    continue
                try:
                    reply = json.loads(payload)
                except ValueError:
                    continue
                ok = bool(reply.get("ok"))
                self.replies[runtime_id] = (now, ok)
                if not ok:
                    self.errors[runtime_id] = str(reply.get("error"))
            self._changed.notify_all()

    def wait(self, ids: Iterable[str], timeout: float) -> set[str]:
        """Wait until every one of ``ids`` has a reply, or ``timeout``; returns the IDs still without one."""
        missing = set(ids)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                missing.difference_update(self.replies)
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    return missing
                self._changed.wait(min(left, 0.5))

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            self._sock.sendall(mqtt5.DisconnectPacket().write())
        self._sock.close()


def _encode_subscribe_v311(topic_filter: str) -> bytes:
    body = b"\x00\x01" + len(topic_filter.encode()).to_bytes(2, "big") + topic_filter.encode() + b"\x01"
    return b"\x82" + bytes([len(body)]) + body


def _read_v311(view: memoryview, pos: int) -> tuple[int, tuple[str, bytes] | None, int | None] | None:
    """One MQTT 3.1.1 packet at ``pos``: (its size, (topic, payload) if a PUBLISH, packet ID to acknowledge).

    None if the packet is not all there yet.
    """
    length, multiplier, i = 0, 1, pos + 1
    while True:
        if i >= len(view):
            return None
        byte = view[i]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        i += 1
        if not byte & 0x80:
            break
    end = i + length
    if end > len(view):
        return None
    if view[pos] >> 4 != 3:  # not a PUBLISH
        return end - pos, None, None
    qos = (view[pos] >> 1) & 3
    topic_len = int.from_bytes(view[i : i + 2], "big")
    topic = bytes(view[i + 2 : i + 2 + topic_len]).decode()
    body = i + 2 + topic_len
    packet_id = int.from_bytes(view[body : body + 2], "big") if qos else None
    payload = bytes(view[body + (2 if qos else 0) : end])
    return end - pos, (topic, payload), packet_id


def fleet_ids(n: int, prefix: str = "reg") -> list[str]:
    return [f"{prefix}-{i:07d}" for i in range(n)]


@contextlib.contextmanager
def registering(
    port: int,
    ids: list[str],
    *,
    interval: float,
    grace: float | None = None,
    connections: int = 16,
    window: int = 20,
    prefix: str = protocol.DEFAULT_PREFIX,
) -> Iterator[dict[str, float]]:
    """Publish every runtime's retained QoS 1 interval request at once; yields ID -> monotonic time it was sent.

    The requests are split over ``connections`` MQTT 3.1.1 connections, one
    thread each, with at most ``window`` unacknowledged on each: Mosquitto
    takes no more than ``max_inflight_messages`` (20) unacknowledged QoS 1
    messages from a client and acknowledges, then drops, the rest (an agent
    sends one). Every request was taken by the broker when this yields; the
    connections stay open until the block ends, as agents stay connected
    (amqtt drops what a client published but it has not yet delivered when
    that client disconnects).
    """
    topics = protocol.Topics(prefix)
    payload = protocol.encode_interval(interval, grace)
    slices = [ids[i::connections] for i in range(connections)]
    sent: dict[str, float] = {}
    errors: list[BaseException] = []
    socks: list[socket.socket] = []

    def send(index: int, chunk: list[str]) -> None:
        try:
            sock = connect(port, f"fleet-{index}")
            socks.append(sock)
            packets = [
                encode_publish(topics.interval(rid), payload, qos=1, retain=True, packet_id=1 + j % 65535)
                for j, rid in enumerate(chunk)
            ]
            sent.update(zip(chunk, _send_windowed(sock, packets, window), strict=True))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i, chunk), daemon=True) for i, chunk in enumerate(slices)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        yield sent
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT: no will, a clean goodbye
            sock.close()


def _send_windowed(sock: socket.socket, packets: list[bytes], window: int, timeout: float = 60.0) -> list[float]:
    """Send QoS 1 PUBLISH packets with at most ``window`` unacknowledged; the monotonic time each was sent."""
    sock.settimeout(timeout)
    times: list[float] = []
    acked = 0
    buffer = b""
    while acked < len(packets):
        room = min(len(packets) - len(times), window - (len(times) - acked))
        if room > 0:
            now = time.monotonic()
            sock.sendall(b"".join(packets[len(times) : len(times) + room]))
            times.extend([now] * room)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the broker closed a fleet connection before acknowledging every request")
        buffer += chunk
        pos, acks = 0, []
        while (parsed := _read_v311(memoryview(buffer), pos)) is not None:
            size, _, packet_id = parsed
            if buffer[pos] >> 4 == 4:  # PUBACK
                acked += 1
            elif packet_id is not None:  # amqtt sends every retained message to every client: acknowledge it
                acks.append(b"\x40\x02" + packet_id.to_bytes(2, "big"))
            pos += size
        buffer = buffer[pos:]
        if acks:
            sock.sendall(b"".join(acks))
    return times

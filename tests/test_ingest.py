"""The lean connection's protocol on its own: framing and read coalescing, with a fake transport."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import mqtt5
import pytest

from orchestrator import ingest
from orchestrator.ingest import LeanConnection, _Batch, _Protocol


class FakeTransport(asyncio.Transport):
    """Records pause/resume; never closing. ``max_size``, if given, is set as asyncio's transports set it."""

    def __init__(self, max_size: int | None = None) -> None:
        super().__init__()
        self.reading = True
        self.pauses = 0
        if max_size is not None:
            self.max_size = max_size

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass


def pulse_packets(n: int) -> bytes:
    return b"".join(
        mqtt5.PublishPacket(f"heartbeat/v1/runtimes/rt-{i}/pulse", b"", qos=mqtt5.QoS.AT_MOST_ONCE).write()
        for i in range(n)
    )


def connected(transport: FakeTransport | None = None) -> tuple[_Protocol, FakeTransport, list[str]]:
    topics: list[str] = []
    protocol = _Protocol(lambda topic, payload, now, retained: topics.append(topic))
    transport = transport or FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport, topics


def test_every_packet_of_a_read_reaches_the_sink_in_order() -> None:
    async def check() -> None:
        protocol, _, topics = connected()
        protocol.data_received(pulse_packets(3))
        assert topics == [f"heartbeat/v1/runtimes/rt-{i}/pulse" for i in range(3)]

    asyncio.run(check())


def test_a_packet_split_across_reads_is_delivered_once_whole() -> None:
    async def check() -> None:
        protocol, _, topics = connected()
        data = pulse_packets(2)
        protocol.data_received(data[:10])
        protocol.data_received(data[10:])
        assert len(topics) == 2

    asyncio.run(check())


def test_a_small_read_pauses_reading_and_resumes_after_the_coalescing_delay() -> None:
    async def check() -> None:
        protocol, transport, _ = connected()
        protocol.data_received(pulse_packets(2))
        assert not transport.reading
        await asyncio.sleep(ingest._COALESCE_DELAY * 5)
        assert transport.reading

    asyncio.run(check())


def test_a_read_that_fills_the_transports_buffer_does_not_pause_reading() -> None:
    async def check() -> None:
        protocol, transport, topics = connected(FakeTransport(max_size=1024))
        data = pulse_packets(40)
        assert len(data) >= 1024
        protocol.data_received(data)
        assert (transport.pauses, len(topics)) == (0, 40)

    asyncio.run(check())


def test_a_read_of_almost_asyncios_whole_buffer_still_pauses_reading() -> None:
    async def check() -> None:
        protocol, transport, topics = connected()
        data = pulse_packets(6000)
        assert ingest._FULL_READ // 2 < len(data) < ingest._FULL_READ  # over the old 128 KiB rule, under a full read
        protocol.data_received(data)
        assert (transport.pauses, len(topics)) == (1, 6000)

    asyncio.run(check())


def publish_in_flight(protocol: _Protocol) -> None:
    protocol.inflight[1] = _Batch(asyncio.get_running_loop().create_future())


def reader_eager(protocol: _Protocol) -> None:
    protocol.eager = 1


@pytest.mark.parametrize("condition", [publish_in_flight, reader_eager])
def test_reading_is_not_paused_while_an_answer_is_awaited(condition: Callable[[_Protocol], None]) -> None:
    """Our publishes' PUBACKs and the watcher's echo are read at once."""

    async def check() -> None:
        protocol, transport, _ = connected()
        condition(protocol)
        protocol.data_received(pulse_packets(2))
        assert transport.pauses == 0

    asyncio.run(check())


def test_turning_eager_resumes_a_paused_read_at_once_and_pauses_again_after() -> None:
    async def check() -> None:
        protocol, transport, _ = connected()
        reader = LeanConnection(host="127.0.0.1", port=1, topic_filters=[], sink=protocol.sink, client_id="t")
        reader._protocol = protocol
        protocol.data_received(pulse_packets(2))
        assert not transport.reading
        with reader.eager():
            assert transport.reading
            protocol.data_received(pulse_packets(2))
            assert transport.reading
        protocol.data_received(pulse_packets(2))
        assert not transport.reading

    asyncio.run(check())


def test_publishing_resumes_a_paused_read_so_acknowledgements_come_at_once() -> None:
    async def check() -> None:
        protocol, transport, _ = connected()
        protocol.window = 20
        reader = LeanConnection(host="127.0.0.1", port=1, topic_filters=[], sink=protocol.sink, client_id="t")
        reader._protocol = protocol
        protocol.data_received(pulse_packets(2))
        assert not transport.reading
        sending = asyncio.create_task(reader.publish([("heartbeat/v1/alerts", b"{}", False)]))
        await asyncio.sleep(0)
        assert transport.reading
        sending.cancel()

    asyncio.run(check())

"""The shared-table fix for paho's Properties: smaller, and MQTT 5 properties still round-trip."""

from __future__ import annotations

import tracemalloc

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import orchestrator.service  # noqa: F401 - applies the fix


def test_properties_share_their_lookup_tables() -> None:
    a, b = Properties(PacketTypes.PUBLISH), Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    assert a.names is b.names
    assert a.properties is b.properties
    assert (a.packetType, b.packetType) == (PacketTypes.PUBLISH, PacketTypes.CONNECT)


def test_a_thousand_properties_cost_little_memory() -> None:
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    kept = [Properties(PacketTypes.PUBLISH) for _ in range(1000)]  # type: ignore[no-untyped-call]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    per_instance = sum(s.size_diff for s in after.compare_to(before, "filename")) / len(kept)
    assert per_instance < 1000, per_instance  # 5.7 kB each without the fix


def test_response_topic_and_correlation_data_round_trip() -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = "heartbeat/v1/replies/x"
    props.CorrelationData = b"req-1"
    packed = props.pack()  # type: ignore[no-untyped-call]
    decoded = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    decoded.unpack(packed)  # type: ignore[no-untyped-call]
    assert (decoded.ResponseTopic, decoded.CorrelationData) == ("heartbeat/v1/replies/x", b"req-1")

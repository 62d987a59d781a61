"""A memory fix for paho-mqtt's MQTT 5 ``Properties``, applied when the orchestrator is imported.

paho 2.x builds three constant lookup tables (property names, types, and
which packets may carry each) afresh in every ``Properties`` instance: about
5.7 kB and a few microseconds per received MQTT 5 message. A burst of control
messages waiting to be read then costs ~6 kB each (measured by the fuzz
tests: 60 MiB for 10,000 queued wills). The tables are only ever read, so
every instance can share one copy. Remove this once paho shares them itself.
"""

from __future__ import annotations

from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_template = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
_TABLES = (_template.types, _template.names, _template.properties)


def _init(self: Any, packetType: int) -> None:
    self.packetType = packetType
    self.types, self.names, self.properties = _TABLES


def apply() -> None:
    """Make every later ``Properties`` share the tables (idempotent)."""
    Properties.__init__ = _init  # type: ignore[method-assign]

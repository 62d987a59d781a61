"""The runtime agent: registers a runtime with the heartbeat orchestrator and pulses over MQTT.

``Agent`` runs in a background thread (paho-mqtt); ``AsyncAgent`` is the
asyncio equivalent (aiomqtt). Both follow the wire protocol in
:mod:`runtime_agent.protocol`.
"""

from __future__ import annotations

from .agent import Agent
from .aio import AsyncAgent
from .exceptions import ConnectError, HeartbeatError, RegistrationRejected, RegistrationTimeout

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AsyncAgent",
    "ConnectError",
    "HeartbeatError",
    "RegistrationRejected",
    "RegistrationTimeout",
    "__version__",
]

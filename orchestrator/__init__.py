"""heartbeat orchestrator: watches runtimes' heartbeats over MQTT."""

__version__ = "0.1.0"

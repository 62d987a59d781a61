"""heartbeat orchestrator: watches runtimes' heartbeats over MQTT.

Its dependencies are the ``orchestrator`` extra: an agent host installs the
agent alone (``pip install heartbeat-monitor``). Should one be missing, say
how to install them rather than fail on the first import deep inside.
"""

import importlib.util

__version__ = "0.1.0"

_NEEDS = ("yaml", "peewee", "amqtt", "mqtt5", "aiohttp", "prometheus_client", "apprise", "psycopg2")
_missing = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
if _missing:
    raise SystemExit(
        "the orchestrator needs its dependencies (missing: "
        + ", ".join(_missing)
        + "): pip install 'heartbeat-monitor[orchestrator]' (or, from a checkout, pip install '.[orchestrator]')"
    )

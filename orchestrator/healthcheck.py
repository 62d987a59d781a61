"""Container health check: is the orchestrator online, as the broker sees it?

The orchestrator publishes a retained ``{"state": "online"}`` on
``{prefix}/orchestrator/state`` once it is connected and serving, and its
will (or clean shutdown) replaces it with ``offline``. Reading that topic
checks the whole path that matters (process up, broker reachable, subscriptions
in place) rather than just that a process or a database file exists. Only
paho-mqtt, already a dependency, is used, so the image needs nothing extra.

Usage: ``python -m orchestrator.healthcheck --broker mqtt://mosquitto:1883``.
Exit status 0 means online; 1 means anything else, with one line saying why.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from runtime_agent.protocol import DEFAULT_PREFIX, ProtocolError, Topics, decode_state
from runtime_agent.url import parse_broker_url

DEFAULT_BROKER = "mqtt://mosquitto:1883"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.healthcheck",
        description="Exit 0 if the orchestrator's retained state on the broker is 'online', else 1.",
    )
    parser.add_argument(
        "--broker", default=DEFAULT_BROKER, metavar="URL", help=f"MQTT broker (default {DEFAULT_BROKER})"
    )
    parser.add_argument(
        "--prefix", default=DEFAULT_PREFIX, metavar="TOPIC", help=f"topic prefix (default {DEFAULT_PREFIX})"
    )
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S", help="give up after S seconds (default 5)")
    parser.add_argument("--tls-ca", metavar="FILE", help="CA file for mqtts:// brokers (default: the system store)")
    return parser


def check(
    broker: str, prefix: str = DEFAULT_PREFIX, timeout: float = 5.0, tls_ca: str | None = None
) -> tuple[bool, str]:
    """Return ``(healthy, why)``; never raises for an unreachable or misbehaving broker."""
    try:
        address = parse_broker_url(broker)
        topic = Topics(prefix).orchestrator_state
    except ValueError as exc:
        return False, str(exc)
    if not timeout > 0:
        return False, f"timeout must be positive, got {timeout:g}"

    outcome: list[tuple[bool, str]] = []  # the first verdict wins

    def on_connect(
        client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason: ReasonCode, properties: Any
    ) -> None:
        if reason.is_failure:
            outcome.append((False, f"broker {address} refused the connection: {reason}"))
            return
        client.subscribe(topic, qos=1)

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if outcome:
            return
        try:
            state = decode_state(bytes(message.payload)).state
        except ProtocolError as exc:
            outcome.append((False, f"unreadable payload on {topic}: {exc}"))
            return
        if state == "online":
            outcome.append((True, f"orchestrator online ({topic} on {address})"))
        else:
            outcome.append((False, f"orchestrator {state} ({topic} on {address})"))

    # A unique ID with a clean session: two checks never kick each other off,
    # and nothing lingers on the broker afterwards.
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"heartbeat-healthcheck-{uuid.uuid4().hex[:8]}")
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect_timeout = timeout
    if address.username is not None:
        client.username_pw_set(address.username, address.password)

    deadline = time.monotonic() + timeout
    try:
        if address.tls:
            client.tls_set(ca_certs=tls_ca)
        client.connect(address.host, address.port, keepalive=max(5, int(timeout) + 5))
        # A hand-driven loop rather than loop_start(): no thread to join, and
        # the deadline bounds every step.
        while not outcome:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, f"no retained state on {topic} from {address} within {timeout:g} s"
            rc = client.loop(timeout=min(0.1, left))
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not outcome:
                return False, f"lost the connection to {address}: {mqtt.error_string(rc)}"
    except OSError as exc:  # refused, unreachable, DNS failure, TLS (bad CA file, handshake), connect timeout
        return False, f"cannot connect to {address}: {exc}"
    finally:
        client.disconnect()
    return outcome[0]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    healthy, why = check(args.broker, args.prefix, args.timeout, args.tls_ca)
    print(why, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())

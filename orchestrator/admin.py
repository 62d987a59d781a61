"""``silence``, ``unsilence``, ``silences`` and ``deregister`` go over MQTT to the running orchestrator,
which alone changes its memory and database; its reply says what it did. ``alerts --follow`` connects
through :func:`mqtt_client` here too."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from runtime_agent import protocol
from runtime_agent.protocol import Topics
from runtime_agent.url import BrokerAddress

from .config import Config, ConfigError
from .terminal import duration, error

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``30s``, ``15m``, ``2h``, ``1d``, ``1.5h`` or plain seconds, within the protocol's 1 s to 366 days."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|min|h|d|)\s*", text.lower())
    if match is None:
        raise ConfigError(f"--for: a duration such as 30s, 15m, 2h, 1d or a number of seconds, got {text!r}")
    seconds = float(match[1]) * _UNITS[match[2]]
    if not protocol.MIN_SILENCE <= seconds <= protocol.MAX_SILENCE:
        raise ConfigError(f"--for: between 1 second and 366 days, got {text!r}")
    return seconds


class NoAnswer(Exception):
    """The command went out (or could not) and no orchestrator answered; the message says what is known."""


def send_command(config: Config, command: protocol.Command, *, timeout: float) -> dict[str, Any]:
    """Publish ``command`` on the command topic and wait for the orchestrator's reply (by its request ID)."""

    assert command.request_id is not None
    topics = Topics(config.prefix)
    reply_topic = topics.command_reply(command.request_id)
    client, address = mqtt_client(config, "heartbeat-cli")
    answered = threading.Event()
    refused: list[str] = []
    replies: list[bytes] = []
    orchestrator_state: list[str] = []

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if rc.is_failure:
            refused.append(f"the broker {address.url} refused the connection: {rc}")
            answered.set()
            return
        client.subscribe([(reply_topic, 1), (topics.orchestrator_state, 1)])

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any = None) -> None:
        if any(getattr(code, "is_failure", False) for code in codes):
            refused.append(f"the broker {address.url} refused the subscription to {reply_topic}")
        client.publish(topics.command, protocol.encode_command(command), qos=1)

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == reply_topic:
            replies.append(bytes(message.payload))
            answered.set()
        elif message.topic == topics.orchestrator_state:
            with contextlib.suppress(ValueError, AttributeError):
                orchestrator_state.append(str(json.loads(message.payload).get("state")))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    connect(client, address)
    client.loop_start()
    try:
        answered.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    if refused:
        raise NoAnswer("; ".join(refused))
    if not replies:
        state = orchestrator_state[-1] if orchestrator_state else None
        hint = (
            "the orchestrator says it is offline"
            if state == "offline"
            else "is it running, on this broker and prefix?"
            if state is None
            else "it says it is online: is this account allowed to publish commands (see config/mosquitto/acl)?"
        )
        raise NoAnswer(
            f"no orchestrator answered within {timeout:g} s on {address.url} (topic {topics.command}): {hint}"
        )
    try:
        return protocol.decode_command_reply(replies[0])
    except protocol.ProtocolError as exc:
        raise NoAnswer(f"the orchestrator's reply is not understood: {exc}") from None


def mqtt_client(config: Config, name: str) -> tuple[mqtt.Client, BrokerAddress]:
    """A paho client for the CLI's own connections, with the broker's credentials and TLS settings."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    address = config.client_address()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:8]}")
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set(ca_certs=config.tls_ca, certfile=config.tls_cert, keyfile=config.tls_key)
    return client, address


def connect(client: mqtt.Client, address: BrokerAddress) -> None:
    """Open the CLI client's connection; raises :class:`NoAnswer` saying why it could not."""
    try:
        client.connect(address.host, address.port, keepalive=30)
    except OSError as exc:
        raise NoAnswer(f"cannot reach the broker {address.url}: {exc.strerror or exc}") from None


def maintenance(config: Config, command: protocol.Command, *, timeout: float, as_json: bool) -> int:
    """Send one maintenance command, print its outcome; 0 if the orchestrator did it, 1 otherwise."""
    try:
        reply = send_command(config, command, timeout=timeout)
    except NoAnswer as exc:
        return error(exc)
    if as_json:
        print(json.dumps(reply, indent=2))
        return 0 if reply["ok"] else 1
    if not reply["ok"]:
        return error(reply["error"])
    print(format_reply(reply, now=time.time()))
    return 0


def format_reply(reply: dict[str, Any], *, now: float) -> str:
    """A successful reply, for people."""
    command = reply.get("command")
    if command == "silence":
        return _silence_line("silenced", reply, now)
    if command == "unsilence":
        return f"lifted the silence on {reply.get('target')}"
    if command == "deregister":
        return f"deregistered {reply.get('id')} (its retained status, interval request and state are cleared)"
    silences = reply.get("silences") or []
    if not silences:
        return "no silences"
    return "\n".join(_silence_line("", entry, now).lstrip() for entry in silences)


def _silence_line(verb: str, entry: dict[str, Any], now: float) -> str:
    until = entry.get("until")
    left = ""
    if isinstance(until, str):
        with contextlib.suppress(ValueError):
            left = f" ({duration(max(0.0, datetime.fromisoformat(until).timestamp() - now))} left)"
    matches = entry.get("matches")
    matching = "" if matches is None else f", matching {matches} registered runtime{'s' if matches != 1 else ''}"
    reason = f": {entry['reason']}" if entry.get("reason") else ""
    return f"{verb} {entry.get('target')} until {until}{left}{matching}{reason}"

"""``heartbeat-orchestrator``: a thin CLI that maps flags onto a Config and runs it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from runtime_agent import protocol
from runtime_agent.protocol import Topics, iso
from runtime_agent.url import BrokerAddress, parse_broker_url

from .broker import BrokerStartError
from .config import Config, ConfigError, load_config, parse_channels
from .store import FlipRow, RuntimeRow, Store, database_error

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

STATES = protocol.RUNTIME_STATES
COLORS = {"alive": "32", "dead": "1;31", "stopped": "33", "unknown": "2", "recovered": "32"}
"""ANSI SGR codes per state (and alert event)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heartbeat-orchestrator",
        description="Watch runtimes' heartbeats over MQTT; declare the silent ones dead and tell administrators.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the orchestrator (embedded broker and SQLite unless told otherwise)")
    run.add_argument("--config", metavar="FILE", help="YAML configuration (see config/orchestrator.example.yaml)")
    run.add_argument("--broker", metavar="URL", help="MQTT broker, mqtt://[user:pass@]host:port or mqtts://...")
    run.add_argument("--listen", metavar="HOST:PORT", help="embedded broker address (default 127.0.0.1:1883)")
    run.add_argument("--db", metavar="URL", help="database, sqlite:///PATH or postgresql://... (default heartbeat.db)")
    run.add_argument("--prefix", metavar="TOPIC", help="topic prefix (default heartbeat/v1)")
    run.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR")
    run.add_argument("--http", metavar="HOST:PORT", help="serve the dashboard, /metrics and /healthz there (off)")
    run.add_argument(
        "--notify",
        metavar="URL",
        action="append",
        help="also notify here (repeatable): http(s):// is a webhook, any other scheme an apprise URL",
    )

    status = sub.add_parser("status", help="print every runtime's state (from the database, or a running --http)")
    _database_options(status)
    status.add_argument("--json", action="store_true", help="print a JSON list (the status topic's objects)")
    status.add_argument("--http", metavar="URL", help="read a running orchestrator's memory (its --http address)")
    status.add_argument(
        "--watch", nargs="?", type=float, const=2.0, metavar="SECONDS", help="redraw every SECONDS (2) until Ctrl-C"
    )
    _color_option(status)

    alerts = sub.add_parser("alerts", help="print the recent alerts, or follow new ones as they are published")
    _database_options(alerts)
    alerts.add_argument("--follow", "-f", action="store_true", help="subscribe to the alert topic and print each")
    alerts.add_argument("--broker", metavar="URL", help="broker to follow (default: the config's, or its --listen)")
    alerts.add_argument("--prefix", metavar="TOPIC", help="topic prefix (default heartbeat/v1)")
    alerts.add_argument("--limit", type=int, default=20, metavar="N", help="how many recent alerts (default 20)")
    alerts.add_argument("--json", action="store_true", help="one JSON alert object per line, as on the topic")
    _color_option(alerts)

    history = sub.add_parser("history", help="one runtime's transitions, with how long each state lasted")
    history.add_argument("runtime_id", metavar="ID", help="the runtime's ID")
    _database_options(history)
    history.add_argument("--limit", type=int, default=20, metavar="N", help="how many recent transitions (20)")
    history.add_argument("--json", action="store_true", help="print a JSON list, oldest first")
    _color_option(history)

    silence = sub.add_parser("silence", help="hold back notices about a runtime (or a glob of them) for a while")
    silence.add_argument("target", metavar="ID|GLOB", help="a runtime ID, or a glob such as 'db-*' (quote it)")
    silence.add_argument(
        "--for", dest="duration", required=True, metavar="DURATION", help="how long: 30s, 15m, 2h, 1d or seconds"
    )
    silence.add_argument("--reason", metavar="TEXT", help="why (shown in the notice when the silence ends)")
    _command_options(silence)

    unsilence = sub.add_parser("unsilence", help="lift a silence now (runtimes still dead are announced once)")
    unsilence.add_argument("target", metavar="ID|GLOB", help="exactly the ID or glob that was silenced")
    _command_options(unsilence)

    silences = sub.add_parser("silences", help="list the silences in force")
    _command_options(silences)

    deregister = sub.add_parser("deregister", help="forget a runtime for good (its history is kept)")
    deregister.add_argument("runtime_id", metavar="ID", help="the runtime's ID")
    _command_options(deregister)

    demo = sub.add_parser("demo", help="a one-minute tour: embedded broker, orchestrator, three agents, one killed")
    demo.add_argument("--interval", type=float, default=1.0, metavar="S", help="the agents' interval (default 1 s)")
    return parser


def _command_options(parser: argparse.ArgumentParser) -> None:
    """How a maintenance command reaches the running orchestrator: over MQTT, on its command topic."""
    parser.add_argument("--config", metavar="FILE", help="YAML configuration to take the broker and prefix from")
    parser.add_argument("--broker", metavar="URL", help="MQTT broker (default mqtt://127.0.0.1:1883)")
    parser.add_argument("--prefix", metavar="TOPIC", help="topic prefix (default heartbeat/v1)")
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="how long to wait for the answer (10)"
    )
    parser.add_argument("--json", action="store_true", help="print the orchestrator's JSON reply as it is")


def _database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML configuration to take the database URL from")
    parser.add_argument("--db", metavar="URL", help="database URL (default sqlite:///heartbeat.db)")


def _color_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour states (auto: only on a terminal, and not when NO_COLOR is set)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            config = load_config(
                args.config,
                broker=args.broker,
                listen=args.listen,
                db=args.db,
                prefix=args.prefix,
                log_level=args.log_level,
                http=args.http,
            )
            if args.notify:  # added to the file's channels, not instead of them
                config = dataclasses.replace(config, notify=config.notify + parse_channels(args.notify))
            return run(config)
        if args.command == "status":
            config = load_config(args.config, db=args.db)
            if args.watch is not None and not 0.1 <= args.watch <= 86400:
                raise ConfigError("--watch: between 0.1 and 86400 seconds")
            color = use_color(args.color, sys.stdout)
            return status(config, as_json=args.json, http=args.http, watch=args.watch, color=color)
        if args.command == "alerts":
            config = load_config(args.config, db=args.db, broker=args.broker, prefix=args.prefix)
            color = use_color(args.color, sys.stdout)
            if args.follow:
                return follow_alerts(config, as_json=args.json, color=color)
            return recent_alerts(config, limit=_positive("--limit", args.limit), as_json=args.json, color=color)
        if args.command == "history":
            config = load_config(args.config, db=args.db)
            color = use_color(args.color, sys.stdout)
            return history(
                config, args.runtime_id, limit=_positive("--limit", args.limit), as_json=args.json, color=color
            )
        if args.command in ("silence", "unsilence", "silences", "deregister"):
            config = load_config(args.config, broker=args.broker, prefix=args.prefix)
            if not 0.1 <= args.timeout <= 3600:
                raise ConfigError("--timeout: between 0.1 and 3600 seconds")
            return maintenance(config, _maintenance_command(args), timeout=args.timeout, as_json=args.json)
        from .demo import demo

        return demo(interval=args.interval)
    except ConfigError as exc:
        print(f"heartbeat-orchestrator: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `status | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run(config: Config) -> int:
    """Run until SIGTERM or SIGINT, then stop cleanly (flush, publish ``offline``)."""
    from .service import Orchestrator

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Orchestrator(config).run(stop)

    try:
        asyncio.run(serve())
    except BrokerStartError as exc:
        print(f"heartbeat-orchestrator: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"heartbeat-orchestrator: error: {exc}", file=sys.stderr)
        return 1
    return 0


class ReadError(Exception):
    """The database or the orchestrator's web server could not be read; the message says which and why."""


def _error(message: object) -> int:
    print(f"heartbeat-orchestrator: error: {message}", file=sys.stderr)
    return 1


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"{name}: a positive number, got {value}")
    return value


def use_color(mode: str, stream: TextIO) -> bool:
    """``always``/``never`` as said; ``auto`` colours a terminal unless NO_COLOR is set (https://no-color.org)."""
    if mode != "auto":
        return mode == "always"
    return stream.isatty() and not os.environ.get("NO_COLOR")


def paint(text: str, key: str | None, color: bool) -> str:
    code = COLORS.get(key or "")
    return f"\x1b[{code}m{text}\x1b[0m" if color and code else text


class _Database:
    """The database, opened once and read again on each call (so ``--watch`` does not reconnect every frame)."""

    def __init__(self, config: Config) -> None:
        self.url = config.db
        self.store: Store | None = None

    def __enter__(self) -> _Database:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.store is not None:
            self.store.close()

    def read(self, fn: Callable[[Store], Any]) -> Any:
        try:
            if self.store is None:
                self.store = Store(self.url)
                self.store.open()
            return fn(self.store)
        except Exception as exc:
            raise ReadError(database_error("cannot read the database", self.url, exc)) from None


def fetch_statuses(url: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """``GET {url}/api/runtimes`` of a running orchestrator (``run --http``)."""
    base = url if "://" in url else f"http://{url}"
    endpoint = base.rstrip("/") + "/api/runtimes"
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout) as response:
            data = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ReadError(f"cannot read {endpoint}: {reason}") from None
    if not isinstance(data, list):
        raise ReadError(f"{endpoint} did not return a JSON list")
    return data


def _wall(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


def row_from_status(obj: dict[str, Any]) -> RuntimeRow:
    """A status object back into a row, for the table."""
    since = _wall(obj["since"])
    return RuntimeRow(
        obj["id"],
        obj["interval"],
        obj["grace"],
        obj["state"],
        0.0 if since is None else since,
        _wall(obj["last_seen"]),
        obj["reason"],
    )


def status(
    config: Config, *, as_json: bool, http: str | None = None, watch: float | None = None, color: bool = False
) -> int:
    with _Database(config) as db:

        def read() -> list[dict[str, Any]]:
            if http is not None:
                return fetch_statuses(http)
            rows: list[RuntimeRow] = db.read(lambda store: store.load())
            return [row.status() for row in rows]

        if watch is not None:
            return _watch(read, every=watch, as_json=as_json, color=color)
        try:
            statuses = read()
        except ReadError as exc:
            return _error(exc)
        print(_render_status(statuses, as_json=as_json, color=color))
        if http is None and not as_json and _stored_behind(statuses, time.time()):
            print(STORED_LAST_SEEN, file=sys.stderr)
    return 0


STORED_LAST_SEEN = (
    "note: a live runtime's last seen is stored about once a minute (last_seen_every), so it may be older than "
    "its interval; `status --http HOST:PORT` reads it live from the running orchestrator"
)


def _stored_behind(statuses: list[dict[str, Any]], now: float) -> bool:
    """Whether an alive runtime's stored last-seen is older than its window, which would look like a contradiction."""
    for obj in statuses:
        if obj["state"] == "alive" and obj["last_seen"] is not None:  # parses only these rows' times again
            last_seen = _wall(obj["last_seen"])
            if last_seen is not None and now - last_seen > obj["interval"] + obj["grace"]:
                return True
    return False


def _render_status(statuses: list[dict[str, Any]], *, as_json: bool, color: bool) -> str:
    if as_json:
        return json.dumps(statuses, indent=2)
    return format_table([row_from_status(obj) for obj in statuses], now=time.time(), color=color)


def _watch(read: Callable[[], list[dict[str, Any]]], *, every: float, as_json: bool, color: bool) -> int:
    """Redraw until Ctrl-C (exit 0). On a terminal each frame replaces the last; in a pipe frames follow each other."""
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            try:
                frame = _render_status(read(), as_json=as_json, color=color)
            except ReadError as exc:
                frame = f"error: {exc}"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"{clear}every {every:g} s, at {stamp} (Ctrl-C to stop)\n{frame}\n\n")
            sys.stdout.flush()
            time.sleep(every)
    except KeyboardInterrupt:
        return 0


# --- alerts ------------------------------------------------------------------------


def format_alert(alert: dict[str, Any], *, color: bool = False) -> str:
    """``2026-11-29T01:02:03Z  dead       worker-7  no pulse for 3.2 s``: one line per alert."""
    at = alert.get("at") or ""
    shown_at = f"{at[:19]}Z" if len(at) >= 19 else at
    event = str(alert.get("event"))
    return f"{shown_at}  {paint(event.ljust(9), event, color)}  {alert.get('id')}  {alert.get('reason') or ''}".rstrip()


def _alert_of(flip: FlipRow) -> dict[str, Any]:
    """A stored flip as the alert the orchestrator published for it."""
    return {
        "event": flip.event,
        "id": flip.runtime_id,
        "at": iso(flip.at),
        "last_seen": iso(flip.last_seen),
        "reason": flip.reason,
    }


def recent_alerts(config: Config, *, limit: int, as_json: bool, color: bool) -> int:
    """The last ``limit`` flips that raised an alert, oldest first, from the database."""
    from .store import Flip

    def query(store: Store) -> list[FlipRow]:
        fields = (Flip.runtime_id, Flip.old_state, Flip.new_state, Flip.event, Flip.reason, Flip.at, Flip.last_seen)
        rows = (
            Flip.select(*fields).where(Flip.event.is_null(False)).order_by(Flip.at.desc(), Flip.id.desc()).limit(limit)
        )
        return [FlipRow(*row) for row in rows.tuples().iterator()]

    with _Database(config) as db:
        try:
            flips: list[FlipRow] = db.read(query)
        except ReadError as exc:
            return _error(exc)
    for flip in reversed(flips):
        alert = _alert_of(flip)
        print(json.dumps(alert) if as_json else format_alert(alert, color=color))
    return 0


def follow_alerts(config: Config, *, as_json: bool, color: bool) -> int:
    """Subscribe to the alert topic and print each alert as it arrives, until Ctrl-C (exit 0)."""

    topic = Topics(config.prefix).alerts
    client, address = _mqtt_client(config, "heartbeat-alerts")
    client.reconnect_delay_set(1, 10)

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if rc.is_failure:
            print(f"heartbeat-orchestrator: broker {address.url} refused the connection: {rc}", file=sys.stderr)
            return
        client.subscribe(topic, qos=1)

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any = None) -> None:
        print(f"following {topic} on {address.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)

    def on_disconnect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        print(f"lost the broker {address.url} ({rc}); reconnecting", file=sys.stderr, flush=True)

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            alert = json.loads(message.payload)
            if not isinstance(alert, dict):
                raise ValueError("not an object")
        except ValueError:
            print(f"skipped a malformed alert: {bytes(message.payload)[:200]!r}", file=sys.stderr, flush=True)
            return
        print(json.dumps(alert) if as_json else format_alert(alert, color=color), flush=True)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    try:
        client.connect(address.host, address.port, keepalive=30)
    except OSError as exc:
        return _error(f"cannot reach the broker {address.url}: {exc.strerror or exc}")
    try:
        client.loop_forever(retry_first_connection=False)
    except KeyboardInterrupt:
        client.disconnect()
    return 0


# --- history -------------------------------------------------------------------------


def history_entries(flips: Sequence[FlipRow], *, now: float) -> list[dict[str, Any]]:
    """Flips (any order) oldest first, each with how long the state it entered lasted (the last one: until now)."""
    ordered = sorted(flips, key=lambda f: f.at)
    entries = []
    for i, flip in enumerate(ordered):
        current = i == len(ordered) - 1
        until = now if current else ordered[i + 1].at
        entries.append(
            {
                "at": iso(flip.at),
                "from": flip.old_state,
                "to": flip.new_state,
                "event": flip.event,
                "reason": flip.reason,
                "last_seen": iso(flip.last_seen),
                "duration": round(max(0.0, until - flip.at), 3),
                "current": current,
            }
        )
    return entries


def history(config: Config, runtime_id: str, *, limit: int, as_json: bool, color: bool) -> int:
    with _Database(config) as db:
        try:
            flips: list[FlipRow] = db.read(lambda store: store.history(runtime_id, limit))
        except ReadError as exc:
            return _error(exc)
    entries = history_entries(flips, now=time.time())
    if as_json:
        print(json.dumps(entries, indent=2))
    elif not entries:
        print(f"no transitions recorded for {runtime_id}", file=sys.stderr)
        return 1
    else:
        print(format_history(entries, color=color))
    return 0


def format_history(entries: Sequence[dict[str, Any]], *, color: bool = False) -> str:
    header = ("AT", "FROM", "TO", "FOR", "EVENT", "REASON")
    lines = [
        (
            f"{e['at'][:19]}Z",
            e["from"],
            e["to"],
            duration(e["duration"]) + (" (now)" if e["current"] else ""),
            e["event"] or "",
            e["reason"] or "",
        )
        for e in entries
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=False)]
    out = []
    for line in (header, *lines):
        cells = [x.ljust(w) for x, w in zip(line, widths, strict=True)]
        if line is not header:
            cells[2] = paint(line[2], line[2], color) + " " * (widths[2] - len(line[2]))
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def duration(seconds: float) -> str:
    """'3.2 s', '5 min', '1.5 h', '2.0 d'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def ago(then: float | None, now: float) -> str:
    """'3 s ago', '5 min ago', 'never'."""
    if then is None:
        return "never"
    delta = max(0.0, now - then)
    if delta < 60:
        return f"{delta:.0f} s ago"
    if delta < 3600:
        return f"{delta / 60:.0f} min ago"
    if delta < 86400:
        return f"{delta / 3600:.1f} h ago"
    return f"{delta / 86400:.1f} d ago"


def format_table(rows: Sequence[RuntimeRow], *, now: float, color: bool = False) -> str:
    """The status table; with ``color``, states are painted (padding stays outside the escape codes)."""
    header = ("ID", "STATE", "INTERVAL", "GRACE", "LAST SEEN", "SINCE", "REASON")
    lines = [
        (r.id, r.state, f"{r.interval:g} s", f"{r.grace:g} s", ago(r.last_seen, now), ago(r.since, now), r.reason or "")
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=False)]
    out = []
    for line in (header, *lines):
        cells = [str(x).ljust(w) for x, w in zip(line, widths, strict=True)]
        if line is not header:
            cells[1] = paint(line[1], line[1], color) + " " * (widths[1] - len(line[1]))
        out.append("  ".join(cells).rstrip())
    counts = Counter(r.state for r in rows)
    summary = ", ".join(paint(f"{counts[s]} {s}", s, color) for s in STATES if counts[s])
    out.append(f"{len(rows)} runtime{'s' if len(rows) != 1 else ''}" + (f": {summary}" if summary else ""))
    return "\n".join(out)


# --- maintenance: silence, unsilence, silences, deregister ------------------------------

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


def _maintenance_command(args: argparse.Namespace) -> protocol.Command:
    request_id = f"cli-{uuid.uuid4().hex}"
    if args.command == "silence":
        seconds = parse_duration(args.duration)
        command = protocol.Command("silence", request_id, target=args.target, seconds=seconds, reason=args.reason)
    elif args.command == "unsilence":
        command = protocol.Command("unsilence", request_id, target=args.target)
    elif args.command == "deregister":
        command = protocol.Command("deregister", request_id, id=args.runtime_id)
    else:
        command = protocol.Command("silences", request_id)
    try:  # the orchestrator checks too; checking here gives the error without a round trip
        protocol.decode_command(protocol.encode_command(command))
    except protocol.ProtocolError as exc:
        raise ConfigError(str(exc)) from None
    return command


class NoAnswer(Exception):
    """The command went out (or could not) and no orchestrator answered; the message says what is known."""


def send_command(config: Config, command: protocol.Command, *, timeout: float) -> dict[str, Any]:
    """Publish ``command`` on the command topic and wait for the orchestrator's reply (by its request ID)."""

    assert command.request_id is not None
    topics = Topics(config.prefix)
    reply_topic = topics.command_reply(command.request_id)
    client, address = _mqtt_client(config, "heartbeat-cli")
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
    try:
        client.connect(address.host, address.port, keepalive=30)
    except OSError as exc:
        raise NoAnswer(f"cannot reach the broker {address.url}: {exc.strerror or exc}") from None
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


def _mqtt_client(config: Config, name: str) -> tuple[mqtt.Client, BrokerAddress]:
    """A paho client for the CLI's own connections, with the broker's credentials and TLS settings."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    address = _broker_address(config)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:8]}")
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set(ca_certs=config.tls_ca, certfile=config.tls_cert, keyfile=config.tls_key)
    return client, address


def _broker_address(config: Config) -> BrokerAddress:
    if config.broker is not None:
        return config.broker_address(config.broker)
    host, port = config.listen_address
    return parse_broker_url(f"mqtt://{f'[{host}]' if ':' in host else host}:{port}")


def maintenance(config: Config, command: protocol.Command, *, timeout: float, as_json: bool) -> int:
    """Send one maintenance command, print its outcome; 0 if the orchestrator did it, 1 otherwise."""
    try:
        reply = send_command(config, command, timeout=timeout)
    except NoAnswer as exc:
        return _error(exc)
    if as_json:
        print(json.dumps(reply, indent=2))
        return 0 if reply["ok"] else 1
    if not reply["ok"]:
        return _error(reply["error"])
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

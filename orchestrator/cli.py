"""``heartbeat-orchestrator``: a thin CLI that maps flags onto a Config and runs it.

What the commands print lives in reports.py (reading) and admin.py (maintenance over MQTT).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from typing import TypeAlias

from runtime_agent import protocol

from .admin import maintenance, parse_duration
from .broker import BrokerStartError
from .config import Config, ConfigError, from_environment, load_config, parse_channels
from .discovery import discovered, left_note
from .reports import follow_alerts, history, recent_alerts, status
from .terminal import use_color


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heartbeat-orchestrator",
        description="Watch runtimes' heartbeats over MQTT; declare the silent ones dead and tell administrators.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _run_parser(sub)
    _reading_parsers(sub)
    _maintenance_parsers(sub)
    demo = sub.add_parser("demo", help="a one-minute tour: embedded broker, orchestrator, three agents, one killed")
    demo.add_argument("--interval", type=float, default=1.0, metavar="S", help="the agents' interval (default 1 s)")
    return parser


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _run_parser(sub: Subparsers) -> None:
    run = sub.add_parser(
        "run",
        help="run the orchestrator (embedded broker and SQLite unless told otherwise)",
        epilog="Flags win over HEARTBEAT_BROKER, _LISTEN, _DB, _PREFIX, _HTTP, _LOG_LEVEL, _TLS_CA, _TLS_CERT and "
        "_TLS_KEY, which win over --config (or $HEARTBEAT_CONFIG). While it runs, the orchestrator leaves "
        "heartbeat-orchestrator.json in its working directory, so the client commands run there find it.",
    )
    run.add_argument("--config", metavar="FILE", help="YAML configuration (see config/orchestrator.example.yaml)")
    run.add_argument("--broker", metavar="URL", help="MQTT broker, mqtt://[user:pass@]host:port or mqtts://...")
    run.add_argument("--listen", metavar="HOST:PORT", help="embedded broker address (default 127.0.0.1:1883)")
    run.add_argument("--db", metavar="URL", help="database: a file path, or postgresql://... (default heartbeat.db)")
    run.add_argument("--prefix", metavar="TOPIC", help="topic prefix (default heartbeat/v1)")
    run.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR")
    run.add_argument("--http", metavar="HOST:PORT", help="serve the dashboard, /metrics and /healthz there (off)")
    run.add_argument(
        "--notify",
        metavar="URL",
        action="append",
        help="also notify here (repeatable): http(s):// is a webhook, any other scheme an apprise URL",
    )


def _reading_parsers(sub: Subparsers) -> None:
    """The commands that read what the orchestrator knows: its database, its --http, its alert topic."""
    status = sub.add_parser(
        "status", help="print every runtime's state (from the database, or a running --http)", epilog=_FINDING
    )
    _database_options(status)
    status.add_argument("--json", action="store_true", help="print a JSON list (the status topic's objects)")
    status.add_argument("--http", metavar="URL", help="read a running orchestrator's memory (its --http address)")
    status.add_argument(
        "--watch", nargs="?", type=float, const=2.0, metavar="SECONDS", help="redraw every SECONDS (2) until Ctrl-C"
    )
    _color_option(status)

    alerts = sub.add_parser(
        "alerts", help="print the recent alerts, or follow new ones as they are published", epilog=_FINDING
    )
    _database_options(alerts)
    alerts.add_argument("--follow", "-f", action="store_true", help="subscribe to the alert topic and print each")
    _broker_options(alerts)
    alerts.add_argument("--limit", type=int, default=20, metavar="N", help="how many recent alerts (default 20)")
    alerts.add_argument("--json", action="store_true", help="one JSON alert object per line, as on the topic")
    _color_option(alerts)

    history = sub.add_parser(
        "history", help="one runtime's transitions, with how long each state lasted", epilog=_FINDING
    )
    history.add_argument("runtime_id", metavar="ID", help="the runtime's ID")
    _database_options(history)
    history.add_argument("--limit", type=int, default=20, metavar="N", help="how many recent transitions (20)")
    history.add_argument("--json", action="store_true", help="print a JSON list, oldest first")
    _color_option(history)


def _maintenance_parsers(sub: Subparsers) -> None:
    """The commands sent to the running orchestrator over MQTT."""
    silence = sub.add_parser(
        "silence", help="hold back notices about a runtime (or a glob of them) for a while", epilog=_FINDING
    )
    silence.add_argument("target", metavar="ID|GLOB", help="a runtime ID, or a glob such as 'db-*' (quote it)")
    silence.add_argument(
        "--for", dest="duration", required=True, metavar="DURATION", help="how long: 30s, 15m, 2h, 1d or seconds"
    )
    silence.add_argument("--reason", metavar="TEXT", help="why (shown in the notice when the silence ends)")
    _command_options(silence)

    unsilence = sub.add_parser(
        "unsilence", help="lift a silence now (runtimes still dead are announced once)", epilog=_FINDING
    )
    unsilence.add_argument("target", metavar="ID|GLOB", help="exactly the ID or glob that was silenced")
    _command_options(unsilence)

    silences = sub.add_parser("silences", help="list the silences in force", epilog=_FINDING)
    _command_options(silences)

    deregister = sub.add_parser("deregister", help="forget a runtime for good (its history is kept)", epilog=_FINDING)
    deregister.add_argument("runtime_id", metavar="ID", help="the runtime's ID")
    _command_options(deregister)


_FINDING = (
    "Without --broker/--listen/--prefix/--db, a command takes them from HEARTBEAT_* variables, then --config "
    "(or $HEARTBEAT_CONFIG), then the orchestrator running in this directory (its heartbeat-orchestrator.json)."
)


def _broker_options(parser: argparse.ArgumentParser) -> None:
    """Where a client command finds the running orchestrator's broker (see :data:`_FINDING`)."""
    parser.add_argument("--broker", metavar="URL", help="MQTT broker (default: found, else mqtt://127.0.0.1:1883)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="or the running orchestrator's embedded broker address")
    parser.add_argument("--prefix", metavar="TOPIC", help="topic prefix (default: found, else heartbeat/v1)")


def _command_options(parser: argparse.ArgumentParser) -> None:
    """How a maintenance command reaches the running orchestrator: over MQTT, on its command topic."""
    parser.add_argument("--config", metavar="FILE", help="YAML configuration to take the broker and prefix from")
    _broker_options(parser)
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="how long to wait for the answer (10)"
    )
    parser.add_argument("--json", action="store_true", help="print the orchestrator's JSON reply as it is")


def _database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML configuration to take the database URL from")
    parser.add_argument(
        "--db", metavar="URL", help="database: a file path or postgresql://... (default: found, else heartbeat.db)"
    )


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
            config = _config(
                args,
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
            config = _config(args, client=True, db=args.db)
            if args.watch is not None and not 0.1 <= args.watch <= 86400:
                raise ConfigError("--watch: between 0.1 and 86400 seconds")
            color = use_color(args.color, sys.stdout)
            return status(config, as_json=args.json, http=args.http, watch=args.watch, color=color)
        if args.command == "alerts":
            config = _config(args, client=True, db=args.db, broker=args.broker, listen=args.listen, prefix=args.prefix)
            color = use_color(args.color, sys.stdout)
            if args.follow:
                return follow_alerts(config, as_json=args.json, color=color)
            return recent_alerts(config, limit=_positive("--limit", args.limit), as_json=args.json, color=color)
        if args.command == "history":
            config = _config(args, client=True, db=args.db)
            color = use_color(args.color, sys.stdout)
            return history(
                config, args.runtime_id, limit=_positive("--limit", args.limit), as_json=args.json, color=color
            )
        if args.command in ("silence", "unsilence", "silences", "deregister"):
            config = _config(args, client=True, broker=args.broker, listen=args.listen, prefix=args.prefix)
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


def _config(args: argparse.Namespace, *, client: bool = False, **flags: str | None) -> Config:
    """Flags over ``HEARTBEAT_*`` variables over the file; a client also takes what it finds (see discovery.py)."""
    path, environment = from_environment(os.environ)
    found = discovered() if client else None
    given = {name: value for name, value in flags.items() if value is not None}
    return load_config(args.config or path, found=found, **{**environment, **given})


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
        with left_note(config):
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


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"{name}: a positive number, got {value}")
    return value


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

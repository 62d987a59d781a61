"""``heartbeat-orchestrator``: a thin CLI that maps flags onto a Config and runs it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence

from runtime_agent.protocol import status_dict

from .broker import BrokerStartError
from .config import Config, ConfigError, load_config
from .store import RuntimeRow, Store, redact_url


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

    status = sub.add_parser("status", help="print every runtime's state from the database")
    status.add_argument("--config", metavar="FILE", help="YAML configuration to take the database URL from")
    status.add_argument("--db", metavar="URL", help="database URL (default sqlite:///heartbeat.db)")
    status.add_argument("--json", action="store_true", help="print a JSON list (the status topic's objects)")

    demo = sub.add_parser("demo", help="a one-minute tour: embedded broker, orchestrator, three agents, one killed")
    demo.add_argument("--interval", type=float, default=1.0, metavar="S", help="the agents' interval (default 1 s)")
    return parser


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
            )
            return run(config)
        if args.command == "status":
            config = load_config(args.config, db=args.db)
            return status(config, as_json=args.json)
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


def status(config: Config, *, as_json: bool) -> int:
    store = Store(config.db)
    try:
        store.open()
        rows = store.load()
    except Exception as exc:
        error = str(exc).replace(config.db, redact_url(config.db))
        print(
            f"heartbeat-orchestrator: error: cannot read the database {redact_url(config.db)}: {error}", file=sys.stderr
        )
        return 1
    finally:
        store.close()
    if as_json:
        json.dump([_status(row) for row in rows], sys.stdout, indent=2)
        print()
    else:
        print(format_table(rows, now=time.time()))
    return 0


def _status(row: RuntimeRow) -> dict[str, object]:
    return status_dict(row.id, row.state, row.interval, row.grace, row.last_seen, row.since, row.reason)


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


def format_table(rows: Sequence[RuntimeRow], *, now: float) -> str:
    header = ("ID", "STATE", "INTERVAL", "GRACE", "LAST SEEN", "SINCE", "REASON")
    lines = [
        (r.id, r.state, f"{r.interval:g} s", f"{r.grace:g} s", ago(r.last_seen, now), ago(r.since, now), r.reason or "")
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=False)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in (header, *lines)]
    counts = Counter(r.state for r in rows)
    summary = ", ".join(f"{counts[s]} {s}" for s in ("alive", "dead", "stopped", "unknown") if counts[s])
    out.append(f"{len(rows)} runtime{'s' if len(rows) != 1 else ''}" + (f": {summary}" if summary else ""))
    return "\n".join(out)

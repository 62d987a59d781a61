"""``python -m bench``: run the scenarios, print a table (``--json``: one JSON object per line)."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import time
import traceback

from .context import Context
from .harness import Result, cleanup_templates, format_table, raise_nofile

SCENARIOS = [
    "generator",
    "ingest",
    "startup",
    "memory",
    "steady_writes",
    "latency",
    "mass_death",
    "scaling",
    "will_storm",
    "embedded",
    "registration",
]


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the heartbeat orchestrator at scale (own Mosquitto on a free loopback port, SQLite).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="reduced sizes and windows (under a minute; for checking that every figure comes out)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per scenario per line on stdout")
    parser.add_argument(
        "--scenario", action="append", choices=SCENARIOS, metavar="NAME", help=f"run only these: {', '.join(SCENARIOS)}"
    )
    args = parser.parse_args(argv)
    raise_nofile()
    signal.signal(signal.SIGTERM, _interrupted)  # clean up our own processes on SIGTERM too
    ctx = Context(quick=args.quick)
    chosen = [s for s in SCENARIOS if not args.scenario or s in args.scenario]
    results: list[Result] = []
    started = time.monotonic()
    try:
        for name in chosen:
            print(f"[{time.monotonic() - started:6.1f} s] {name} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            module = importlib.import_module(f"bench.scenarios.{name}")
            try:
                result: Result = module.run(ctx)
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                result = Result(name, error=f"{type(exc).__name__}: {exc}")
            result.seconds = time.monotonic() - t0
            results.append(result)
            ctx.found[name] = result.json()
            if args.json:
                print(json.dumps(result.json()), flush=True)
    finally:
        cleanup_templates()
    total = time.monotonic() - started
    table = format_table(results) + f"\n\ntotal {total:.1f} s ({'quick' if args.quick else 'full'} run)"
    print(table, file=sys.stderr if args.json else sys.stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

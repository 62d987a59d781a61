"""``heartbeat-agent``: run the thread agent for one runtime until SIGTERM or SIGINT.

A thin layer over :class:`runtime_agent.Agent`. Exit status: 0 after a
graceful stop, 1 when the agent could not connect or the orchestrator
rejected the interval before ever accepting it, 2 for bad arguments. A
broker that refuses the credentials (bad user name or password, not
authorised) ends the start at once with status 1; other connection failures
are retried until ``--timeout``. No reply from the orchestrator within
``--timeout`` is no failure: it says so on stderr and keeps re-sending the
request (and pulsing) until the reply comes. The password can come from
``HEARTBEAT_BROKER_PASSWORD`` instead of the URL, which ``ps`` shows.
Errors are one line on stderr; the single stdout line announces the
registration once the orchestrator confirmed it, so scripts and tests can
wait for it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from . import __version__, protocol
from .agent import Agent
from .exceptions import HeartbeatError, RegistrationRejected, RegistrationTimeout
from .shared import DEFAULT_BROKER

PROG = "heartbeat-agent"
log = logging.getLogger("runtime_agent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Register a runtime with the heartbeat orchestrator over MQTT and pulse until stopped.",
        epilog="With --broker mqtts://USER@host, the password is read from $HEARTBEAT_BROKER_PASSWORD "
        "(a password in the URL shows in process lists). See docs/security.md.",
    )
    parser.add_argument("--id", required=True, help="runtime ID: 1-128 characters of A-Z a-z 0-9 . _ - :")
    parser.add_argument("--interval", required=True, type=float, metavar="S", help="seconds between pulses")
    parser.add_argument(
        "--grace", type=float, metavar="S", help="extra seconds before the runtime counts as dead (default: interval)"
    )
    parser.add_argument(
        "--broker",
        default=DEFAULT_BROKER,
        metavar="URL",
        help=f"mqtt://[user[:password]@]host[:port] or mqtts://... (default: {DEFAULT_BROKER})",
    )
    parser.add_argument(
        "--prefix", default=protocol.DEFAULT_PREFIX, help=f"topic prefix (default: {protocol.DEFAULT_PREFIX})"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to connect (else exit 1) and to wait for the orchestrator's reply before saying that it "
        "is still waiting (default: 10)",
    )
    parser.add_argument(
        "--check",
        metavar="CMD",
        help="shell command run before each pulse; the pulse is sent only if it exits 0 (time limit: the interval)",
    )
    parser.add_argument("--tls-ca", metavar="FILE", help="CA certificate file for mqtts:// (default: system CAs)")
    parser.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="client certificate (PEM) for mqtts:// brokers that require one; needs --tls-key",
    )
    parser.add_argument("--tls-key", metavar="FILE", help="private key (PEM) of --tls-cert")
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level on stderr (default: INFO)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def shell_check(command: str, timeout: float) -> Callable[[], bool]:
    """A check that runs ``command`` through the shell and passes when it exits 0 within ``timeout``."""

    def check() -> bool:
        try:
            result = subprocess.run(
                command, shell=True, timeout=timeout, stdin=subprocess.DEVNULL, capture_output=True, check=False
            )
        except subprocess.TimeoutExpired:
            log.debug("check %r did not finish within %g s", command, timeout)
            return False
        if result.returncode != 0:
            log.debug("check %r exited %d: %s", command, result.returncode, result.stderr.decode(errors="replace"))
        return result.returncode == 0

    return check


_SIGNAL_POLL = 0.2
"""Seconds between the main thread's checks for SIGTERM/SIGINT while the agent runs."""


class _Interrupted(BaseException):
    """Raised by the signal handler to abandon a start that is still waiting."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        agent = Agent(
            args.id,
            interval=args.interval,
            grace=args.grace,
            broker=args.broker,
            prefix=args.prefix,
            timeout=args.timeout,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            check=shell_check(args.check, args.interval) if args.check else None,
        )
    except ValueError as exc:
        return _error(exc, 2)

    stop = threading.Event()
    starting = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if starting:
            raise _Interrupted(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            agent.start()
            starting = False
        except HeartbeatError as exc:
            return _error(exc, 1)
        except _Interrupted:
            log.info("interrupted while starting")
            agent.stop()  # the signal may have come just after start() returned
            return 0
        return _run(agent, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(agent: Agent, stop: threading.Event) -> int:
    """Announce the registration, now or when the late reply comes, and pulse until ``stop``.

    Exits 1 if the orchestrator rejects the interval before ever accepting
    it: the same request would be refused again, and a caller waiting for
    the stdout line should not wait forever.
    """
    waiting = not agent.registered
    if waiting:
        print(
            f"{PROG}: no reply yet from the orchestrator for {agent.runtime_id}; still waiting "
            "(re-sending the interval request with backoff) and pulsing meanwhile",
            file=sys.stderr,
            flush=True,
        )
    else:
        _announce(agent)
    # A signal that the kernel hands to another thread (paho's, the pulser's) runs its handler only once
    # the main thread runs Python again; blocked in a lock with no timeout, it would never stop.
    while not stop.wait(_SIGNAL_POLL):
        if not waiting:
            continue
        try:
            agent.wait_registered(0)
        except RegistrationTimeout:
            continue
        except RegistrationRejected as exc:
            agent.stop()
            return _error(exc, 1)
        _announce(agent)
        waiting = False
    agent.stop()
    return 0


def _announce(agent: Agent) -> None:
    """The one stdout line: what the orchestrator accepted, worded as the agent's log line words it."""
    print(f"{PROG}: runtime {agent.runtime_id} registered ({agent.applied}) on {agent.broker}; pulsing", flush=True)


def _error(error: BaseException, status: int) -> int:
    print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
    return status

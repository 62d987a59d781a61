"""The embedded amqtt broker: zero set-up for a first run or a small site."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from runtime_agent.backoff import backoff_delays

log = logging.getLogger("orchestrator.broker")


class BrokerStartError(RuntimeError):
    """The embedded broker could not start; the message says what to do instead."""


def check_bindable(host: str, port: int, *, wait_for_ours: float = 10.0) -> None:
    """Fail fast, with advice, if ``host:port`` is taken (amqtt would log a traceback).

    One exception: the embedded broker of an orchestrator killed a moment
    ago (SIGKILL, then a supervisor's restart) still holds the port while it
    notices that its stdin closed and stops. Its process is recognised by
    its command line, and waited for up to ``wait_for_ours`` seconds.
    """
    if _bind_error(host, port) is None:
        return
    ours = _embedded_broker_on(host, port)
    if ours is not None and wait_for_ours > 0:
        log.info("the embedded broker of a previous run (pid %d) still holds %s:%d; waiting for it", ours, host, port)
        deadline = time.monotonic() + wait_for_ours
        while time.monotonic() < deadline and _bind_error(host, port) is not None:
            time.sleep(0.05)
    error = _bind_error(host, port)
    if error is None:
        return
    if error.errno != errno.EADDRINUSE:
        raise BrokerStartError(f"cannot start the embedded MQTT broker on {host}:{port}: {error.strerror}")
    holder = (
        f"the embedded broker of another heartbeat orchestrator (pid {ours}) is running there"
        if ours is not None
        else "is another broker, e.g. Mosquitto, running there?"
    )
    raise BrokerStartError(
        f"cannot start the embedded MQTT broker on {host}:{port}: the address is already in use ({holder}). "
        f"Use it with --broker mqtt://{host}:{port}, or pick another port with --listen {host}:PORT."
    )


def _bind_error(host: str, port: int) -> OSError | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _embedded_broker_on(host: str, port: int) -> int | None:
    """The pid of an embedded broker process (``python -m orchestrator.broker HOST PORT``) on ``host:port``.

    Read from ``/proc`` (Linux); elsewhere None, and a taken port fails at once as before.
    """
    wanted = ["-m", "orchestrator.broker", host, str(port)]
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[1:5] == wanted:
            return pid
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (for the demo, tests and benchmarks)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts connections on ``host:port``; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


class EmbeddedBroker:
    """An amqtt broker in a child process of its own, as an async context manager.

    MQTT 3.1.1 only, anonymous, in memory (retained messages last as long as
    the orchestrator runs). Right for a first run and small sites; see the
    README for when to move to Mosquitto.

    A process of its own because amqtt is pure Python and takes most of a
    core at 10,000 messages/s: in the orchestrator's process, the broker and
    the orchestrator shared one core and held two thirds of what a bare
    client holds on the same broker (bench ``embedded``). The child never
    outlives the orchestrator: it stops when its stdin closes, which the
    kernel does for us even when the orchestrator is killed with SIGKILL,
    and it ignores SIGINT, so a Ctrl-C stops the orchestrator first and the
    broker after the orchestrator's last publishes.
    """

    def __init__(self, host: str, port: int, *, start_timeout: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self._process: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def __aenter__(self) -> EmbeddedBroker:
        check_bindable(self.host, self.port)
        self._process = await self._start()
        self._watch = asyncio.create_task(self._supervise(), name="embedded-broker")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        process, self._process = self._process, None
        if process is not None:
            await _stop(process)
            log.info("embedded MQTT broker stopped")

    async def _start(self) -> asyncio.subprocess.Process:
        """Start the broker process and wait for its ``ready`` line; BrokerStartError with its reason otherwise."""
        process = await asyncio.create_subprocess_exec(
            *broker_command(self.host, self.port),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=child_env(),
        )
        assert process.stdout is not None
        try:
            async with asyncio.timeout(self.start_timeout):
                line = (await process.stdout.readline()).decode(errors="replace").strip()
        except TimeoutError:
            line = f"error: not ready after {self.start_timeout:g} s"
        if line != _READY:
            await _stop(process)
            reason = line.removeprefix("error: ") or f"the broker process exited (code {process.returncode})"
            raise BrokerStartError(f"cannot start the embedded MQTT broker on {self.host}:{self.port}: {reason}")
        log.info("embedded MQTT broker (amqtt, pid %d) listening on %s", process.pid, self.url)
        return process

    async def _supervise(self) -> None:
        """Start the broker again if its process dies (the orchestrator reconnects and republishes).

        Failed starts are retried with the jittered backoff of every retry
        loop (:func:`runtime_agent.backoff.backoff_delays`), afresh after each
        successful start.
        """
        delays = backoff_delays(_RESTART_FIRST, _RESTART_MAX)
        while True:
            process = self._process
            if process is not None:
                code = await process.wait()
                log.error("the embedded MQTT broker exited (code %s): starting it again", code)
                self._process = None
            try:
                self._process = await self._start()
                delays = backoff_delays(_RESTART_FIRST, _RESTART_MAX)
            except BrokerStartError as exc:
                delay = next(delays)
                log.error("%s; retrying in %.3g s", exc, delay)
                await asyncio.sleep(delay)


# Seconds (before jitter) between attempts to start the embedded broker again: the first wait, and the cap.
_RESTART_FIRST = 0.5
_RESTART_MAX = 10.0


_READY = "ready"


def broker_command(host: str, port: int) -> list[str]:
    """The command that runs the embedded broker alone (the benchmark's baseline runs the same)."""
    return [sys.executable, "-m", "orchestrator.broker", host, str(port)]


def child_env() -> dict[str, str]:
    """The environment for the broker process: ours, with this copy of the package importable first."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root if not path else root + os.pathsep + path)


_STOP_WAIT = 5.0


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Close its stdin (it stops cleanly), then SIGKILL if it has not exited within ``_STOP_WAIT``."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        async with asyncio.timeout(_STOP_WAIT):
            await process.wait()
    except TimeoutError:
        log.warning("the embedded broker did not stop within %g s: killing it", _STOP_WAIT)
        process.kill()
        await process.wait()


async def serve(host: str, port: int) -> int:
    """Run amqtt on ``host:port`` until stdin closes or SIGTERM; print ``ready`` (or ``error: ...``) first."""
    from amqtt.errors import BrokerError  # imported here: only the embedded mode pays for amqtt

    from .amqtt_retained import OwnSubscriptionsBroker

    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Stopping, amqtt warns twice of the messages it had yet to pass on (the wills of the clients it drops):
    # this broker stops with the orchestrator and keeps nothing, so they have nobody left to reach.
    logging.getLogger("amqtt.broker").addFilter(lambda record: "messages not broadcasted" not in record.getMessage())
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    broker = OwnSubscriptionsBroker(  # amqtt, minus its replay of other clients' retained messages
        {
            "listeners": {"default": {"type": "tcp", "bind": bind, "max_connections": 0}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    try:
        await broker.start()
    except (BrokerError, OSError) as exc:
        print(f"error: {exc}", flush=True)
        return 2
    print(_READY, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def read_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096):  # closed: the orchestrator is gone or stopping
            stop.set()

    loop.add_reader(sys.stdin.fileno(), read_stdin)
    await stop.wait()
    try:
        async with asyncio.timeout(_SHUTDOWN_WAIT):
            await broker.shutdown()
    except TimeoutError:
        # amqtt's shutdown never ends while clients keep reconnecting (every agent does): the
        # orchestrator would wait for us, and an orphan of a killed one would hold the port for good.
        logging.getLogger("orchestrator.broker").debug("amqtt did not shut down within %g s", _SHUTDOWN_WAIT)
        sys.stdout.flush()
        os._exit(0)
    return 0


_SHUTDOWN_WAIT = 1.0
"""Seconds amqtt's own shutdown may take before the broker process just exits (it keeps nothing)."""


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.broker HOST PORT``: the embedded broker's own process."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m orchestrator.broker HOST PORT", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the orchestrator, which stops us after
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s embedded broker: %(message)s")
    return asyncio.run(serve(args[0], int(args[1])))


if __name__ == "__main__":
    sys.exit(main())

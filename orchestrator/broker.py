"""The embedded amqtt broker: zero set-up for a first run or a small site."""

from __future__ import annotations

import errno
import logging
import socket
import time
from types import TracebackType

log = logging.getLogger("orchestrator.broker")


class BrokerStartError(RuntimeError):
    """The embedded broker could not start; the message says what to do instead."""


def check_bindable(host: str, port: int) -> None:
    """Fail fast, with advice, if ``host:port`` is taken (amqtt would log a traceback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BrokerStartError(
                    f"cannot start the embedded MQTT broker on {host}:{port}: the address is already in use "
                    f"(is another broker, e.g. Mosquitto, running there?). Use it with "
                    f"--broker mqtt://{host}:{port}, or pick another port with --listen {host}:PORT."
                ) from None
            raise BrokerStartError(f"cannot start the embedded MQTT broker on {host}:{port}: {exc.strerror}") from None


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
    """An amqtt broker in this process, as an async context manager.

    MQTT 3.1.1 only, anonymous, in memory (retained messages last as long as
    the process). Right for a first run and small sites; see the README for
    when to move to Mosquitto.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._broker: object | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    async def __aenter__(self) -> EmbeddedBroker:
        check_bindable(self.host, self.port)
        from amqtt.broker import Broker  # imported here: only the embedded mode pays for it
        from amqtt.errors import BrokerError

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        bind = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": bind, "max_connections": 0}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
        )
        try:
            await broker.start()
        except BrokerError as exc:
            raise BrokerStartError(f"cannot start the embedded MQTT broker on {bind}: {exc}") from None
        self._broker = broker
        log.info("embedded MQTT broker (amqtt) listening on %s", self.url)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()  # type: ignore[attr-defined]
            log.info("embedded MQTT broker stopped")

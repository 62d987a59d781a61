"""A TCP proxy on loopback that can turn into a black hole, for network-fault tests."""

from __future__ import annotations

import contextlib
import socket
import threading

from orchestrator.broker import free_port


class BlackholeProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream``; ``blackhole()`` silently drops everything.

    While black-holed, connections stay open and new ones are accepted, but no
    byte gets through in either direction: the half-open link a client cannot
    tell from a quiet one. ``blackhole(direction="upstream")`` drops only what
    the client sends (its publishes vanish while it still receives), and
    ``"downstream"`` only what the broker sends. ``restore()`` closes the old
    connections (their streams lost bytes) and forwards new ones again.
    """

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._dropping: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self, direction: str = "both") -> None:
        """Drop bytes from now on: ``both`` ways, only ``upstream`` (client to broker) or ``downstream``."""
        if direction not in ("both", "upstream", "downstream"):
            raise ValueError(f"direction: both, upstream or downstream, got {direction!r}")
        self._dropping = frozenset(("upstream", "downstream") if direction == "both" else (direction,))

    def restore(self) -> None:
        with self._lock:
            old, self._sockets = self._sockets, []
            self._dropping = frozenset()
        for sock in old:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._closed = True
        self.restore()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            for a, b, direction in ((client, server, "upstream"), (server, client, "downstream")):
                threading.Thread(target=self._pump, args=(a, b, direction), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if direction not in self._dropping:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()

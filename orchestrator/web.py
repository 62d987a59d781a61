"""The orchestrator's web server: a live dashboard, JSON, Server-Sent Events, Prometheus metrics, a probe.

A thin adapter over a :class:`DashboardSource` (the running Orchestrator). Every
read comes from the orchestrator's memory, never the database, and nothing
here runs on the pulse hot path: the change feed is one dict store per
*transition*, and the feed is coalesced per runtime and sent at most
``1 / batch_interval`` times a second.

Routes:

* ``/`` the dashboard (``static/dashboard.html`` and its siblings under ``/static/``);
* ``GET /api/runtimes`` every runtime's status object (as ``status --json``);
* ``POST /api/runtimes/lookup`` ``{"ids": [...]}``: the status objects of those runtimes only,
  so the page refreshes the last-seen times of the rows it shows without fetching everything;
* ``/events`` Server-Sent Events: ``snapshot`` on connect, then ``update`` and ``counts``;
* ``/metrics`` Prometheus text (see :mod:`orchestrator.metrics`);
* ``/healthz`` 200 while the orchestrator is connected and judging, 503 otherwise;
* ``/favicon.svg`` and ``/favicon.ico`` the page's icon (browsers ask for ``/favicon.ico`` on their own,
  on the JSON pages too, and log a 404 when it is missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runtime_agent.protocol import iso

from .detector import Transition
from .metrics import MetricsSource, registry_for

log = logging.getLogger("orchestrator.web")

STATIC = Path(__file__).resolve().parent / "static"
MAX_LOOKUP = 2_000
"""Most IDs one lookup may ask for: the page asks for the rows it shows (500 at most)."""
FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    b'<rect width="32" height="32" rx="7" fill="#17803d"/>'
    b'<path d="M3 17h7l3-8 5 15 3-7h8" fill="none" stroke="#fff" stroke-width="3"'
    b' stroke-linecap="round" stroke-linejoin="round"/></svg>'
)
"""A pulse line on green, as SVG: kept here rather than as a file so no package-data list can leave it out."""


class DashboardSource(MetricsSource, Protocol):
    """What the web server needs from the orchestrator; all of it is read on the event loop."""

    listeners: list[Callable[[Transition], None]]
    """Called with every transition; the server appends its own (cheap) listener while it runs."""

    def runtimes(self) -> list[dict[str, Any]]:
        """Every runtime's status object (``protocol.status_dict``), ordered by ID."""
        ...

    def runtime(self, runtime_id: str) -> dict[str, Any] | None:
        """One runtime's status object; None once it is deregistered."""
        ...


class WebStartError(RuntimeError):
    """The server could not listen; the message says where and why, for the CLI to print."""


class _Client:
    """One ``/events`` connection: a bounded queue of encoded events; None ends it."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize)

    def send(self, data: bytes | None) -> None:
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            # Too slow to keep up: drop it. Its EventSource reconnects and starts over from a snapshot.
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)


def sse(event: str, data: Any) -> bytes:
    """One Server-Sent Event; compact JSON never contains a newline, so one ``data:`` line suffices."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class WebServer:
    """``async with WebServer(source, host, port):`` serves until the block ends."""

    def __init__(
        self,
        source: DashboardSource,
        host: str,
        port: int,
        *,
        batch_interval: float = 0.5,
        keepalive: float = 5.0,
        max_queue: int = 64,
    ) -> None:
        self.source = source
        self.host = host
        self.port = port
        self.batch_interval = batch_interval
        """Least time between two ``update`` events: changes in between are coalesced per runtime."""
        self.keepalive = keepalive
        """Seconds between ``counts`` events when nothing changes (keeps proxies and the page's totals fresh)."""
        self.max_queue = max_queue
        self._registry = registry_for(source)
        self._clients: set[_Client] = set()
        self._pending: dict[str, None] = {}
        self._wake = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._pump_task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/api/runtimes", self._api_runtimes)
        app.router.add_post("/api/runtimes/lookup", self._api_lookup)
        app.router.add_get("/events", self._events)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/favicon.svg", self._favicon)
        app.router.add_get("/favicon.ico", self._favicon)
        app.router.add_static("/static/", STATIC)
        return app

    async def __aenter__(self) -> WebServer:
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            where = f"{self.host}:{self.port}"
            if exc.errno == errno.EADDRINUSE:
                raise WebStartError(
                    f"cannot serve the dashboard on {where}: the address is already in use; "
                    f"pick another port with --http HOST:PORT"
                ) from None
            raise WebStartError(f"cannot serve the dashboard on {where}: {exc.strerror or exc}") from None
        self._runner = runner
        if self.port == 0:
            self.port = int(runner.addresses[0][1])
        self.source.listeners.append(self._on_transition)
        self._pump_task = asyncio.create_task(self._pump(), name="web-pump")
        log.info("dashboard on %s (metrics on %s/metrics)", self.url, self.url)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(ValueError):
            self.source.listeners.remove(self._on_transition)
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
        for client in list(self._clients):
            client.send(None)  # ends each /events handler, so the runner need not wait for them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- the change feed -----------------------------------------------------

    def _on_transition(self, transition: Transition) -> None:
        """Runs inside the orchestrator's ``_emit``: one dict store, nothing else."""
        if self._clients:
            self._pending[transition.runtime_id] = None
            self._wake.set()

    async def _pump(self) -> None:
        """Send what changed, coalesced per runtime, at most once per ``batch_interval``; counts always."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.keepalive):
                    await self._wake.wait()
            self._wake.clear()
            changed, self._pending = list(self._pending), {}
            if not self._clients:
                continue
            if changed:
                self._broadcast(sse("update", self._update(changed)))
            self._broadcast(sse("counts", self._counts()))
            await asyncio.sleep(self.batch_interval)

    def _update(self, changed: list[str]) -> dict[str, Any]:
        runtimes, removed = [], []
        for runtime_id in changed:
            status = self.source.runtime(runtime_id)
            if status is None:
                removed.append(runtime_id)
            else:
                runtimes.append(status)
        return {"now": iso(time.time()), "runtimes": runtimes, "removed": removed}

    def _counts(self) -> dict[str, Any]:
        counters = self.source.counters()
        return {
            "now": iso(time.time()),
            "total": counters.get("runtimes", 0),
            "states": counters.get("states", {}),
            "ready": self.source.is_ready(),
        }

    def _broadcast(self, data: bytes) -> None:
        for client in self._clients:
            client.send(data)

    # --- handlers ------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "dashboard.html", headers={"Cache-Control": "no-cache"})

    async def _favicon(self, request: web.Request) -> web.Response:
        """The page links ``/favicon.svg``; ``/favicon.ico``, asked for unbidden, gets the same rather than a 404."""
        return web.Response(
            body=FAVICON, content_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"}
        )

    async def _api_runtimes(self, request: web.Request) -> web.Response:
        return web.json_response(self.source.runtimes())

    async def _api_lookup(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            ids = body["ids"]
            if not isinstance(ids, list) or len(ids) > MAX_LOOKUP or not all(isinstance(i, str) for i in ids):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text=f'expected {{"ids": [at most {MAX_LOOKUP} runtime IDs]}}') from None
        found = (self.source.runtime(runtime_id) for runtime_id in ids)
        return web.json_response([status for status in found if status is not None])

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        client = _Client(self.max_queue)
        self._clients.add(client)
        try:
            snapshot = {**self._counts(), "runtimes": self.source.runtimes()}
            await response.write(b"retry: 2000\n" + sse("snapshot", snapshot))
            while (data := await client.queue.get()) is not None:
                await response.write(data)
        except ConnectionError:
            pass  # the page went away; the next write would tell us anyway
        finally:
            self._clients.discard(client)
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self._registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        ready = self.source.is_ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

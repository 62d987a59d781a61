"""The orchestrator process: thin I/O around the pure :mod:`orchestrator.detector`.

Tasks, each with one job:

* the consumer reads MQTT messages: pulses and state messages go straight to
  the detector; interval requests are queued for the registrar;
* the registrar validates requests, commits them to the database in batches,
  and only then updates the detector and replies;
* the watcher sleeps until the detector's next deadline and collects verdicts;
* the publisher commits each batch of transitions (waiting at most
  ``db_timeout``) and publishes status documents and alerts;
* the writer owns the database thread's write queue and retries on failure,
  so a slow or absent database never loses a transition or stalls a verdict.

Liveness is judged on ``time.monotonic()`` at receipt; wall-clock times are
derived from one anchor taken at start, for display and storage only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import aiomqtt
import mqtt5
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from runtime_agent import protocol
from runtime_agent.protocol import ProtocolError, Topics
from runtime_agent.url import parse_broker_url

from . import _paho
from .broker import EmbeddedBroker, check_bindable
from .config import Config
from .conflict import ConflictWatch
from .detector import Detector, NotRegistered, State, Transition
from .dispatch import Dispatcher, Route, build_routes, retry_policy, storm_policy
from .healing import RegistrationHealer
from .ingest import Message, PulseReader, PulseReaderError
from .metrics import LatencyHistogram
from .notify import MqttNotifier, Notice, NotifyError
from .silence import Silence, SilenceBook
from .store import FlipRow, RuntimeRow, Store, database_error, in_key_order, redact_url

log = logging.getLogger("orchestrator")
_paho.apply()  # paho's per-message MQTT 5 property tables, shared (see orchestrator/_paho.py)
T = TypeVar("T")
P = ParamSpec("P")

_MAX_LOGGED_IDS = 10_000
_REQUEST_BATCH = 1_000
_CONFLICT_WINDOWS = 10
"""Signs of a shared ID count within this many intervals (+ grace); a conflict lasts as long."""
_WRITE_BATCH = 1_000
"""Flips per transaction at most (those raising alerts are never split: they go first)."""
_WILL_GATHER = 0.05
"""Seconds the watcher waits after a will for the rest of its burst, before proving the link."""
_LOGGED_EVENTS = 20
"""Events logged a line each per batch of transitions; the rest are counted by kind of event."""
_SETTLE_BUDGET = 1_000
"""Stale deadlines the watcher re-arms per event-loop turn (1-7 ms of work, the database thread permitting)."""
_COMMAND_QUEUE = 1_000
"""Maintenance commands waiting to run; more are refused (``busy``): they are a person's, not a fleet's."""
_CLEAR_ECHO = 30.0
"""Seconds an empty message on a topic we cleared is taken for the echo of our own clear."""
_HEAL_GATHER = 0.2
"""Seconds the fetcher waits after the first unregistered pulse, so a burst of them makes one SUBSCRIBE."""
_HEAL_HOLD = 1.0
"""Seconds a fetch's connection waits for the retained copies (amqtt sends them from a task of its own)."""
_TALLY_PERIOD = 60.0
"""Pulses from unregistered runtimes are logged as one line per this many seconds."""


class WallClock:
    """Maps monotonic readings to wall-clock Unix seconds through one anchor taken at start.

    A wall-clock jump after start moves neither verdicts nor displayed times.
    """

    def __init__(self) -> None:
        self.mono0 = time.monotonic()
        self.offset = time.time() - self.mono0
        """Wall-clock minus monotonic seconds: one addition maps a whole batch (the last-seen flush)."""

    def wall(self, mono: float) -> float:
        return mono + self.offset

    def wall_or_none(self, mono: float | None) -> float | None:
        return None if mono is None else self.wall(mono)

    def mono(self, wall: float) -> float:
        return wall - self.offset


@dataclass(slots=True)
class _Request:
    runtime_id: str
    payload: bytes
    retained: bool
    response_topic: str | None
    correlation: bytes | None


@dataclass(slots=True)
class _CommandRequest:
    payload: bytes
    retained: bool
    response_topic: str | None
    correlation: bytes | None


class _CommandFailed(Exception):
    """A well-formed command that cannot be done (nothing to lift, not registered): the reply says why."""


class _FlipQueue:
    """Flips waiting for the writer, grouped by runtime, so a transaction takes O(its own size).

    Flips that raise an alert go first, whole runtimes at a time (a runtime's
    flips stay in order); the rest follow in order of arrival. With 278,000
    runtimes the unknown -> alive wave after a start is 278,000 flips, and
    splitting the whole queue at each 1,000-flip transaction took 13 % of the
    event loop while verdicts waited.
    """

    def __init__(self) -> None:
        self._by_runtime: dict[str, list[FlipRow]] = {}
        self._order: collections.deque[str] = collections.deque()
        """Runtime IDs in order of arrival; an ID whose flips were taken early is skipped when reached."""
        self._urgent: dict[str, None] = {}
        """IDs with a flip that raises an alert (an ordered set)."""
        self.alert_waiting = threading.Event()
        """Set while a flip that raises an alert waits: the database thread ends a flush transaction early."""
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def extend(self, flips: Iterable[FlipRow]) -> None:
        by_runtime, n = self._by_runtime, 0
        for f in flips:
            n += 1
            queued = by_runtime.get(f.runtime_id)
            if queued is None:
                by_runtime[f.runtime_id] = [f]
                self._order.append(f.runtime_id)
            else:
                queued.append(f)
            if f.event is not None:
                self._urgent[f.runtime_id] = None
        self._len += n
        if self._urgent:
            self.alert_waiting.set()

    def take(self, limit: int | None) -> list[FlipRow]:
        """The urgent runtimes' flips alone if there are any, else up to about ``limit`` (None: all).

        An alert waits for its flips' transaction: filled up with 1,000 flips
        of a start's wave it took 20-50 ms (more while the pulses kept the
        event loop busy) where the alert's own flips take a few.
        """
        by_runtime, order = self._by_runtime, self._order
        taken: list[FlipRow] = []
        for runtime_id in self._urgent:
            taken += by_runtime.pop(runtime_id, ())
        self._urgent.clear()
        self.alert_waiting.clear()  # any set from here on is for the next transaction
        if not taken:
            while order and (limit is None or len(taken) < limit):
                taken += by_runtime.pop(order.popleft(), ())
        self._len -= len(taken)
        return taken

    def put_back(self, flips: list[FlipRow]) -> None:
        """Return flips that were taken but not written, ahead of those queued since."""
        groups: dict[str, list[FlipRow]] = {}
        for f in flips:
            groups.setdefault(f.runtime_id, []).append(f)
        for runtime_id in reversed(groups):
            group, queued = groups[runtime_id], self._by_runtime.get(runtime_id)
            if queued is None:
                self._order.appendleft(runtime_id)
            self._by_runtime[runtime_id] = group if queued is None else group + queued
            if any(f.event is not None for f in group):
                self._urgent[runtime_id] = None
        self._len += len(flips)
        if self._urgent:
            self.alert_waiting.set()


class Orchestrator:
    """Watches every registered runtime; ``await run(stop)`` until ``stop`` is set."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        self.clock = WallClock()
        self.detector = Detector(now=time.monotonic(), seen_every=config.last_seen_every)
        self.store = Store(config.db)
        self.stats: collections.Counter[str] = collections.Counter()
        self.ready = asyncio.Event()
        """Set while subscribed and judging; tests and the demo wait on it."""
        self.broker_url: str | None = config.broker

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heartbeat-db")
        self._client: aiomqtt.Client | None = None
        self._mqtt5 = config.mqtt_version != "3.1.1" and config.broker is not None  # amqtt speaks 3.1.1
        self._probing_version = config.mqtt_version == "auto" and config.broker is not None
        self._requests: asyncio.Queue[_Request] = asyncio.Queue()
        self._replies: asyncio.Queue[list[tuple[_Request, bytes]]] = asyncio.Queue()
        """Each registration batch's replies, sent by ``_replier`` while the registrar goes on to the next batch."""
        self.healer = RegistrationHealer()
        self._heal_wake = asyncio.Event()
        self._outbox: list[Transition] = []
        self._unsent_alerts: list[FlipRow] = []
        self._notified_keys: set[tuple[str, float]] = set()
        """Flips every channel has: the writer marks them notified in the database."""
        self._status_due: set[str] = set()
        self._outbox_wake = asyncio.Event()
        self._publisher_idle = asyncio.Event()
        """Clear while the publisher has transitions to commit or notices to send: the refresher waits."""
        self._publisher_idle.set()
        self._rearm = asyncio.Event()
        self._sentinel_timer: asyncio.TimerHandle | None = None
        self._pending_flips = _FlipQueue()
        self._flip_waiters: list[asyncio.Future[set[str]]] = []
        self._flush_seen = False
        self._flush_all = False
        """Set by a clean stop: the next flush takes every last-seen time not yet stored, not just those due."""
        self._seen_taken: dict[str, float] = {}
        """The last-seen times (monotonic) the flush in progress took from the detector."""
        self._seen_backlog: Iterator[list[tuple[str, float]]] | None = None
        """What of them is still to be written; the flush gives way to alerts between chunks."""
        self._seen_done = False
        self._writer_wake = asyncio.Event()
        self._logged_ids: set[str] = set()
        self.pulses = 0
        """Pulses accepted (a plain int: it is bumped on the hot path)."""
        self._pulse_reader: PulseReader | None = None
        self._refresh: collections.deque[str] = collections.deque()
        self._refresh_queued: set[str] = set()
        """The IDs in ``_refresh``, so a runtime waits there once however often it changes."""
        self._refresh_wake = asyncio.Event()
        self._echo_topic = self.topics.echo(config.client_id)
        self._echo_seq = 0
        self._echo_waiters: dict[bytes, asyncio.Future[None]] = {}
        self._link_lost: asyncio.Future[None] | None = None
        """Set when the link fails its echo; the connection loop then reconnects."""
        self._early_sessions: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.conflicts = ConflictWatch()
        self._mqtt_log = logging.getLogger("orchestrator.mqtt").getChild(config.client_id)
        self._mqtt_log.addFilter(_QueueFull(self.stats))
        self._request_counts: dict[str, tuple[float, int]] = {}
        """Runtime -> (start of its current minute, interval requests in it), for the rate limit."""
        self._db_ok = True
        """False after a failed write until one succeeds: verdicts then go out without waiting for it."""
        self._pending_wills: list[tuple[str, float, int | None]] = []
        """Wills received (runtime, receipt time, session), applied once an echo proves the link."""
        self._downtime: tuple[float, float] | None = None
        """(last known alive, restarted) when the monitor was down long enough to miss a death."""
        self.listeners: list[Callable[[Transition], None]] = []
        """Called with every transition on the event loop (the dashboard's change feed); each must be quick."""
        self._commands: asyncio.Queue[_CommandRequest] = asyncio.Queue(maxsize=_COMMAND_QUEUE)
        """Maintenance commands from administrators, run one at a time by ``_commander``."""
        self._cleared: dict[str, float] = {}
        """Retained topics we just cleared (deregistration) -> until when their echo is ours to drop."""
        self.verdict_latency = LatencyHistogram()
        """Seconds from a runtime's deadline to its dead verdict, for ``/metrics``."""
        self._awaiting: dict[tuple[str, float], int] = {}
        """Flips being notified -> confirmations still missing (the alert topic, the dispatcher)."""
        # The alert topic carries every per-runtime event itself (the complete machine feed); the
        # dispatcher adds the people's channels, with storm control, reminders and silences, and
        # puts its own summaries on the alert topic too.
        summaries = Route(
            MqttNotifier(self._publish_alert_payload),
            frozenset({"outage", "outage_recovered", "reminder", "silence_ended"}),
            (),
            "mqtt",
        )
        self.dispatcher = Dispatcher(
            [*build_routes(config), summaries],
            storm=storm_policy(config),
            reminder_interval=config.reminder_interval,
            population=lambda: len(self.detector),
            state_of=self._state_of,
            on_delivered=lambda notice: self._confirm(notice.key),
            retry=retry_policy(config),
        )

    # --- life cycle ----------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Load the database, start the broker if embedded, and watch until ``stop``."""
        if self.config.broker is None:
            check_bindable(*self.config.listen_address)  # fail before touching the database
        try:
            await self._db(self.store.open)
            rows = await self._db(self.store.load)
        except Exception as exc:
            raise RuntimeError(database_error("cannot open the database", self.config.db, exc)) from exc
        for row in rows:
            self.detector.restore(
                row.id,
                interval=row.interval,
                grace=row.grace,
                state=State(row.state),
                since=self.clock.mono(row.since),
                last_seen=None if row.last_seen is None else self.clock.mono(row.last_seen),
                reason=row.reason,
            )
        log.info("loaded %d runtimes from %s", len(rows), redact_url(self.config.db))
        self._check_downtime(await self._db(self.store.alive_at), rows)
        await self._load_silences()
        del rows  # 100,000 rows would otherwise live as long as this frame (about 170 B each)
        # What is loaded lives as long as the process: keep it out of the collector's full passes, which
        # otherwise walk every runtime's objects (40-80 ms with 100,000, the event loop stopped meanwhile).
        gc.collect()
        gc.freeze()
        async with contextlib.AsyncExitStack() as stack:
            if self.config.broker is None:
                host, port = self.config.listen_address
                broker = await stack.enter_async_context(EmbeddedBroker(host, port))
                self.broker_url = broker.url
            if self.config.http_address is not None:
                from .web import WebServer  # imported here: only --http pays for aiohttp

                await stack.enter_async_context(WebServer(self, *self.config.http_address))
            workers = [
                asyncio.create_task(job(), name=job.__name__)
                for job in (
                    self._registrar,
                    self._replier,
                    self._healer,
                    self._watcher,
                    self._publisher,
                    self._refresher,
                    self._writer,
                    self._flusher,
                    self._stats_publisher,
                    self._redeliver,
                    self._commander,
                    self.dispatcher.run,
                )
            ]
            self._sentinel(time.monotonic())
            try:
                await self._connection_loop(stop)
            finally:
                if self._sentinel_timer is not None:
                    self._sentinel_timer.cancel()
                await self.dispatcher.aclose(drain=2.0)
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                await self._final_flush()
        self._executor.shutdown(wait=True)
        rejected = {k: v for k, v in self.stats.items() if k.startswith("rejected")}
        log.info("stopped; pulses received %d, rejected %s", self.pulses, rejected or "none")

    def _check_downtime(self, alive_at: float | None, rows: list[RuntimeRow]) -> None:
        """If the monitor was down long enough to miss a death, say so once, after connecting.

        Runtimes that died meanwhile are judged after the start-up window like
        any other; ones already dead before are not alerted again.
        """
        if alive_at is None or not rows:
            return
        down_for = time.time() - alive_at
        shortest = min(row.interval + row.grace for row in rows)
        if down_for <= shortest + self.config.flush_interval:  # alive_at is written every flush
            return
        log.warning("the monitor was down for about %.0f s (since its last record)", down_for)
        self._downtime = (alive_at, time.time())

    async def _connection_loop(self, stop: asyncio.Event) -> None:
        backoff = 0.2
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                try:
                    async with self._connect() as client:
                        backoff = 0.2
                        if await self._serve(client, stopper):
                            return
                except (aiomqtt.MqttError, PulseReaderError) as exc:
                    if self._client is not None or self.ready.is_set():
                        log.warning("lost the broker %s: %s", self.shown_broker, exc)
                    self._disconnected()
                    if self._probing_version:
                        # Never connected yet: a broker that refuses (or ignores) MQTT 5 gets 3.1.1 next.
                        self._mqtt5 = not self._mqtt5
                        if not self._mqtt5 and _unsupported_version(exc):
                            log.info("broker does not speak MQTT 5; using MQTT 3.1.1")
                            continue
                    log.warning("cannot reach the broker %s (%s); retrying in %.1f s", self.shown_broker, exc, backoff)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(backoff):
                            await asyncio.shield(stopper)
                    backoff = min(backoff * 2, self.config.reconnect_max)
        finally:
            stopper.cancel()

    @property
    def shown_broker(self) -> str:
        """The broker URL without its password, for logs."""
        return "" if self.broker_url is None else parse_broker_url(self.broker_url).url

    def _connect(self, *, fetcher: bool = False) -> aiomqtt.Client:
        """The general client; with ``fetcher``, a short-lived one of its own (no will) for retained fetches."""
        assert self.broker_url is not None
        address = self.config.broker_address(self.broker_url)
        tls = (
            aiomqtt.TLSParameters(
                ca_certs=self.config.tls_ca, certfile=self.config.tls_cert, keyfile=self.config.tls_key
            )
            if address.tls
            else None
        )
        client = aiomqtt.Client(
            address.host,
            address.port,
            username=address.username,
            password=address.password,
            identifier=f"{self.config.client_id}-fetch" if fetcher else self.config.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if self._mqtt5 else aiomqtt.ProtocolVersion.V311,
            will=None
            if fetcher
            else aiomqtt.Will(self.topics.orchestrator_state, protocol.encode_state("offline"), qos=1, retain=True),
            keepalive=self.config.keepalive,
            tls_params=tls,
            max_inflight_messages=1000,
            max_queued_incoming_messages=self.config.max_queued_messages,  # a flood must not exhaust memory
            logger=self._mqtt_log,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],  # no Nagle delay on echoes and alerts
            timeout=min(10.0, max(2.0, 2 * self.config.echo_timeout)),  # a half-open link must not stall reconnects
            properties=_connect_properties() if self._mqtt5 else None,
        )
        # aiomqtt logs a warning for every publish beyond 10 in flight; a batch of verdicts has thousands.
        client.pending_calls_threshold = 1_000_000
        return client

    async def _serve(self, client: aiomqtt.Client, stopper: asyncio.Task[Any]) -> bool:
        """Subscribe, judge and consume until the connection drops (False) or ``stop`` (True)."""
        lean = self._mqtt5 and self.config.pulse_connection == "auto"
        # Births and wills ride with the pulses: 10,000 wills at once arrive as fast as pulses do,
        # not 20 in flight at a time as QoS 1 deliveries to the general client.
        # Interval requests too: a fleet starting at once sends them as fast as pulses (orchestrator.ingest).
        lean_filters = [
            self.topics.pulse_filter,
            self.topics.state_filter,
            self.topics.interval_filter,
            self._echo_topic,
        ]
        subscriptions = [*self.topics.subscriptions(), (self._echo_topic, 0)]
        await client.subscribe([(t, q) for t, q in subscriptions if not (lean and t in lean_filters)])
        self._client = client
        self._probing_version = False
        self._link_lost = asyncio.get_running_loop().create_future()
        async with contextlib.AsyncExitStack() as stack:
            if lean:
                self._pulse_reader = await stack.enter_async_context(self._make_pulse_reader(lean_filters))
            return await self._judge(client, stopper)

    def _make_pulse_reader(self, topic_filters: list[str]) -> PulseReader:
        assert self.broker_url is not None
        address = self.config.broker_address(self.broker_url)
        tls = self.config.ssl_context() if address.tls else None
        return PulseReader(
            host=address.host,
            port=address.port,
            topic_filters=topic_filters,
            sink=self._on_lean_message,
            request_sink=self._on_lean_request,
            client_id=f"{self.config.client_id}-pulses",
            username=address.username,
            password=address.password,
            tls=tls,
            keepalive=self.config.keepalive,
        )

    async def _judge(self, client: aiomqtt.Client, stopper: asyncio.Task[Any]) -> bool:
        """With every link up: judge and consume until a link drops (raises) or ``stop`` (True)."""
        self.detector.resume(time.monotonic())
        self._refresh = collections.deque(self.detector.ids())  # the broker may have lost retained statuses
        self._refresh_queued = set(self._refresh)
        self._refresh_wake.set()
        self._rearm.set()
        self._outbox_wake.set()
        await client.publish(self.topics.orchestrator_state, protocol.encode_state("online"), qos=1, retain=True)
        if self._downtime is not None:
            since, back = self._downtime
            payload = protocol.encode_monitor_down(since=since, back=back, runtimes=len(self.detector))
            await client.publish(self.topics.alerts, payload, qos=1)
            reason = f"the orchestrator was not running for about {back - since:.0f} s"
            self.dispatcher.submit([Notice("monitor_down", None, back, None, reason, count=len(self.detector))])
            self._downtime = None
            self.stats["alerts"] += 1
        self.ready.set()
        log.info(
            "ready: watching %d runtimes on %s (MQTT %s, prefix %s)",
            len(self.detector),
            self.shown_broker,
            "5" if self._mqtt5 else "3.1.1",
            self.config.prefix,
        )
        consumer = asyncio.create_task(self._consume(client))
        assert self._link_lost is not None
        waits: set[asyncio.Future[Any]] = {consumer, stopper, self._link_lost}
        reader = self._pulse_reader
        if reader is not None:
            waits.add(reader.closed)
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if consumer not in done:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
        if stopper in done:
            await self._shutdown_publish(client)
            return True
        if consumer in done:
            consumer.result()  # raises the MqttError that ended it
            raise aiomqtt.MqttError("message stream ended")
        if self._link_lost in done:
            raise aiomqtt.MqttError("the broker stopped echoing")
        raise aiomqtt.MqttError("pulse connection lost")

    def _disconnected(self) -> None:
        self._client = None
        self._pulse_reader = None
        self.ready.clear()
        self.detector.suspend()

    async def _shutdown_publish(self, client: aiomqtt.Client) -> None:
        """Publish what is still due, then say ``offline``, before a clean disconnect."""
        try:
            async with asyncio.timeout(5):
                await self._commit_outbox()
                await self._publish_due(client)
                await client.publish(
                    self.topics.orchestrator_state, protocol.encode_state("offline"), qos=1, retain=True
                )
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("could not publish everything before stopping: %s", exc)
        self._disconnected()

    def rows(self) -> list[RuntimeRow]:
        """Every runtime as the detector sees it now, in the database's shape (wall-clock times)."""
        wall = self.clock.wall_or_none
        return sorted(
            (
                RuntimeRow(
                    v.runtime_id,
                    v.interval,
                    v.grace,
                    v.state.value,
                    self.clock.wall(v.since),
                    wall(v.last_seen),
                    v.reason,
                )
                for v in self.detector.views()
            ),
            key=lambda row: row.id,
        )

    # --- what the web server reads (orchestrator.web.DashboardSource) --------

    def runtimes(self) -> list[dict[str, Any]]:
        return [row.status() for row in self.rows()]

    def runtime(self, runtime_id: str) -> dict[str, Any] | None:
        if runtime_id not in self.detector:
            return None
        v = self.detector.view(runtime_id)
        last_seen, since = self.clock.wall_or_none(v.last_seen), self.clock.wall(v.since)
        return protocol.status_dict(runtime_id, v.state.value, v.interval, v.grace, last_seen, since, v.reason)

    def is_ready(self) -> bool:
        return self.ready.is_set()

    def notification_stats(self) -> Mapping[tuple[str, str], int]:
        """Notifications by ``(channel, outcome)``: sent, failed, retried, dropped."""
        return self.dispatcher.stats

    def outbox_backlog(self) -> int:
        """Transitions not yet stored, and notices not yet sent on every channel."""
        return len(self._outbox) + len(self._pending_flips) + len(self._awaiting)

    def _state_of(self, runtime_id: str) -> str | None:
        return self.detector.view(runtime_id).state.value if runtime_id in self.detector else None

    # --- consumer: the hot path ----------------------------------------------

    async def _consume(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self._receive(message.topic.value, message.payload, message.retain, message.properties)

    def _receive(
        self,
        topic: str,
        payload: Any,
        retained: bool,
        properties: Properties | None = None,
        *,
        response: tuple[str | None, bytes | None] | None = None,
    ) -> None:
        """Any message but a lean-path pulse, from either connection; one bad message never stops a stream."""
        try:
            if topic == self._echo_topic:
                self._on_echo(bytes(payload))
            else:
                self.handle(topic, payload, retained, properties, response=response)
        except Exception:
            self.stats["errors"] += 1
            log.exception("unexpected error handling a message on %r", topic[:200])

    def handle(
        self,
        topic: str,
        payload: Any,
        retained: bool,
        properties: Properties | None = None,
        *,
        response: tuple[str | None, bytes | None] | None = None,
    ) -> None:
        """Route one message. Pulses are decoded only when non-empty.

        ``response`` is the MQTT 5 ``(Response Topic, Correlation Data)`` when the
        lean reader already has them, instead of paho's ``properties``.
        """
        parsed = self.topics.parse(topic)
        if parsed is None:
            if topic == self.topics.command:
                self._on_command(payload, retained, properties)
                return
            self._reject("foreign_topic", topic)
            return
        kind, runtime_id = parsed
        if not isinstance(payload, bytes | bytearray):
            payload = b"" if payload is None else str(payload).encode()
        now = time.monotonic()
        if kind == "pulse":
            self.on_pulse(runtime_id, bytes(payload), now)
            return
        if not payload and self._cleared and self._our_clear(topic, now):
            return  # the echo of our own clearing of a deregistered runtime's retained message
        try:
            if kind == "state":
                message = protocol.decode_state(payload, limit=self.config.max_payload)
                if message.state == "online":
                    transition = self.detector.online(runtime_id, now, message.session, live=not retained)
                elif message.state == "offline":
                    transition = self._will(runtime_id, now, message.session, live=not retained)
                else:
                    transition = self.detector.stopped(runtime_id, now, message.session)
                self.stats["state_messages"] += 1
            elif kind == "interval":
                response_topic, correlation = response or _response_to(properties)
                self._requests.put_nowait(_Request(runtime_id, bytes(payload), retained, response_topic, correlation))
                return
            else:
                self._reject("unknown_topic", topic)
                return
        except NotRegistered:
            if kind == "state" and message.state == "online" and not retained and protocol.is_valid_id(runtime_id):
                self._remember_session(runtime_id, message.session)  # birth comes before registration
                return
            self._reject("unregistered", runtime_id, f"{kind} from unregistered runtime")
            return
        except ProtocolError as exc:
            self._reject(exc.reason, runtime_id, f"{kind}: {exc}")
            return
        if transition is not None:
            self._emit(transition)
        if self.detector.session_changes:
            self._weigh_session_changes(now)

    def _will(self, runtime_id: str, now: float, session: int | None, *, live: bool) -> Transition | None:
        """A live will is applied by the watcher after an echo proves the link (see ``_watcher``).

        A broker going down sends every will at once, then drops us too: those
        wills say nothing about the runtimes, and the failed echo tells.
        """
        if not live:
            return self.detector.offline(runtime_id, now, session, live=False)
        view = self.detector.view(runtime_id)  # raises NotRegistered
        if self.conflicts.in_conflict(runtime_id, now, _CONFLICT_WINDOWS * (view.interval + view.grace)):
            self.stats["wills_ignored_in_conflict"] += 1
            return None  # the other claimant may be alive: silence decides
        self._pending_wills.append((runtime_id, now, session))
        self._rearm.set()
        return None

    def _weigh_session_changes(self, now: float) -> None:
        """Session changes the detector saw are signs of two claimants of one ID; enough of them, a conflict."""
        changed, self.detector.session_changes = self.detector.session_changes, []
        for runtime_id in changed:
            view = self.detector.view(runtime_id)
            if self.conflicts.sign(runtime_id, now, _CONFLICT_WINDOWS * (view.interval + view.grace)):
                reason = "two connections claim this runtime ID (their sessions keep taking turns)"
                self.stats["conflicts"] += 1
                self._emit(Transition(runtime_id, view.state, view.state, now, view.last_seen, reason, "conflict"))

    def apply_wills(self) -> None:
        """Apply the wills received so far, as of their receipt: the link has just proved itself."""
        wills, self._pending_wills = self._pending_wills, []
        for runtime_id, received, session in wills:
            with contextlib.suppress(NotRegistered):  # deregistered meanwhile
                transition = self.detector.offline(runtime_id, received, session)
                if transition is not None:
                    self._emit(transition)

    def on_pulse(self, runtime_id: str, payload: bytes, now: float) -> None:
        """The hot path: one pulse, from either connection. Decodes only a non-empty payload."""
        session = None
        if payload:
            try:
                session = protocol.decode_pulse(payload, limit=self.config.max_payload).session
            except ProtocolError as exc:
                self._reject(exc.reason, runtime_id, f"pulse: {exc}")
                return
        try:
            transition = self.detector.pulse(runtime_id, now, session)
        except NotRegistered:
            self._reject("unregistered", runtime_id, "pulse from unregistered runtime")
            self.stats["unregistered_pulses"] += 1
            if protocol.is_valid_id(runtime_id) and self.healer.unregistered_pulse(runtime_id, now):
                self._heal_wake.set()
            return
        self.pulses += 1
        if transition is not None:
            self._emit(transition)
        if self.detector.session_changes:
            self._weigh_session_changes(now)

    def _on_lean_message(self, topic: str, payload: bytes, now: float, retained: bool) -> None:
        """Messages from the lean reader: pulses, births and wills, and our own echoes."""
        if topic.endswith("/pulse"):
            self.on_pulse(self.topics.pulse_id(topic), payload, now)  # the hot path: nothing in between
        else:
            self._receive(topic, payload, retained)

    def _on_lean_request(self, packet: mqtt5.PublishPacket, now: float) -> None:
        """A message from the lean reader with an MQTT 5 Response Topic (an interval request)."""
        response = (packet.response_topic, packet.correlation_data)
        self._receive(packet.topic, packet.payload, packet.retain, response=response)

    # --- echo: proving the link before a verdict -----------------------------

    def _on_echo(self, payload: bytes) -> None:
        waiter = self._echo_waiters.pop(payload, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _echo(self) -> float | None:
        """Publish to our own echo topic and wait for it on the connection that carries pulses.

        A silent runtime and a silent link look the same from here; a round
        trip through the broker tells them apart, so nobody is declared dead
        while the link itself is broken (even half-open). Returns the round
        trip in seconds, or None when no echo came back in time.
        """
        client = self._client
        if client is None:
            return None
        self._echo_seq += 1
        token = str(self._echo_seq).encode()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._echo_waiters[token] = waiter
        reader = self._pulse_reader
        sent = time.monotonic()
        try:
            with reader.eager() if reader is not None else contextlib.nullcontext():
                await client.publish(self._echo_topic, token, qos=0)
                async with asyncio.timeout(self.config.echo_timeout):
                    await waiter
        except (TimeoutError, aiomqtt.MqttError):
            return None
        finally:
            self._echo_waiters.pop(token, None)
        return time.monotonic() - sent

    def _remember_session(self, runtime_id: str, session: int | None) -> None:
        """Keep a birth's session until the interval request that follows it (bounded, oldest dropped)."""
        if session is None:
            return
        self._early_sessions.pop(runtime_id, None)
        self._early_sessions[runtime_id] = session
        if len(self._early_sessions) > _MAX_LOGGED_IDS:
            self._early_sessions.popitem(last=False)

    def _reject(self, reason: str, key: str, what: str | None = None) -> None:
        """Count a rejection; log it once per runtime ID (bounded), not once per message."""
        self.stats[f"rejected.{reason}"] += 1
        key = key[: protocol.MAX_ID_LENGTH + 1]  # remembered by a bounded prefix: topics may hold 64 kB IDs
        if key in self._logged_ids or len(self._logged_ids) >= _MAX_LOGGED_IDS:
            return
        self._logged_ids.add(key)
        log.warning("rejected %s: %s (logged once per ID)", (what or reason), _shown(key))

    def _emit(self, transition: Transition) -> None:
        self._outbox.append(transition)
        self._outbox_wake.set()
        for listener in self.listeners:
            try:
                listener(transition)
            except Exception:  # a listener must never break judging
                log.exception("transition listener failed")
        if transition.new is State.ALIVE:
            self._rearm.set()  # a revived runtime may now have the earliest deadline

    @staticmethod
    def _log_events(batch: list[Transition]) -> None:
        """A line per event, up to :data:`_LOGGED_EVENTS` a batch; past that, a count per kind of event.

        A will storm is 10,000 verdicts, and a line each held the event loop
        while their alerts waited: the bench's will storm took 1.37-1.49 s
        to its last alert with them, 1.13-1.27 s without. The history and
        the alert topic have every one.
        """
        events = [t for t in batch if t.event is not None]
        for t in events[:_LOGGED_EVENTS]:
            if t.event == "dead":
                log.warning("%s is dead: %s", t.runtime_id, t.reason)
            else:
                log.info("%s %s: %s", t.runtime_id, t.event, t.reason)
        more = collections.Counter(t.event for t in events[_LOGGED_EVENTS:])
        for event, n in more.items():
            level = logging.WARNING if event == "dead" else logging.INFO
            log.log(level, "... and %d more runtimes %s (each in its history and on the alert topic)", n, event)

    # --- registrar -------------------------------------------------------------

    async def _registrar(self) -> None:
        while True:
            batch = [await self._requests.get()]
            while len(batch) < _REQUEST_BATCH and not self._requests.empty():
                batch.append(self._requests.get_nowait())
            self.stats["registration.received"] += len(batch)
            replies: list[tuple[_Request, bytes]] = []
            try:
                await self._register_batch(batch, replies)
            except Exception:
                log.exception("registration batch failed")
            # Replies go after the whole batch is in the detector, and are sent by the replier while
            # this goes on to the next batch: awaited here, each batch's QoS 1 round trips (20 in
            # flight on Mosquitto's defaults) held back the next, 20,000 registrations took 9 s.
            if replies:
                self._replies.put_nowait(replies)

    async def _replier(self) -> None:
        """Send registration replies, as many as have queued up, in one go."""
        while True:
            replies = await self._replies.get()
            while not self._replies.empty():
                replies += self._replies.get_nowait()
            await self._send_replies(replies)

    async def _healer(self) -> None:
        """Fetch the retained registrations of runtimes that pulse unregistered (see orchestrator.healing).

        Also says, once a period, how many pulses came from unregistered
        runtimes: the warning per ID is logged once, this goes on.
        """
        next_tally = time.monotonic() + _TALLY_PERIOD
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_tally - time.monotonic())):
                    await self._heal_wake.wait()
            if time.monotonic() >= next_tally:
                next_tally = time.monotonic() + _TALLY_PERIOD
                self._log_tally()
            if not self._heal_wake.is_set():
                continue
            self._heal_wake.clear()
            await asyncio.sleep(_HEAL_GATHER)
            if self._client is None:  # cut off from the broker: try again once connected
                await asyncio.sleep(_HEAL_HOLD)
                self._heal_wake.set()
                continue
            ids = self.healer.take(time.monotonic())
            if not ids:
                continue
            self.stats["registration.fetched"] += len(ids)
            try:
                await self._fetch_retained([self.topics.interval(rid) for rid in ids])
            except aiomqtt.MqttError as exc:
                log.warning("could not fetch %d retained registrations: %s", len(ids), exc)
            if len(self.healer):
                self._heal_wake.set()

    async def _fetch_retained(self, topics: list[str]) -> None:
        """Subscribe to ``topics`` on a connection of its own, for a moment, and take the retained copies it gets.

        Not on the general client: there a live request arriving meanwhile
        would come twice (its subscription and ours), and be counted twice.
        """
        async with self._connect(fetcher=True) as fetcher:
            await fetcher.subscribe([(topic, 1) for topic in topics])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_HEAL_HOLD):
                    async for message in fetcher.messages:
                        if message.retain:  # a live message also reaches the general path: not twice
                            self._receive(message.topic.value, message.payload, True, message.properties)

    def _log_tally(self) -> None:
        tally = self.healer.tally()
        if tally is not None:
            log.warning(
                "%d pulses from %d unregistered runtimes in the last %.0f s (e.g. %s); "
                "registrations fetched from the broker so far: %d, of which registered: %d",
                tally.pulses,
                tally.runtimes,
                _TALLY_PERIOD,
                ", ".join(map(_shown, tally.examples)),
                self.healer.fetched,
                self.healer.healed,
            )

    async def _register_batch(self, batch: list[_Request], replies: list[tuple[_Request, bytes]]) -> None:
        """Store and apply a batch of interval requests; the replies they owe are appended to ``replies``."""
        accepted: list[tuple[_Request, protocol.IntervalRequest | None]] = []
        new_in_batch: set[str] = set()
        for req in batch:
            try:
                protocol.check_id(req.runtime_id)
                try:
                    interval = protocol.decode_interval(req.payload, limit=self.config.max_payload)
                except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
                    if isinstance(exc, ProtocolError):
                        raise
                    log.exception("unexpected error decoding an interval request")  # a codec bug: one request lost
                    raise ProtocolError("malformed", "the request could not be decoded") from exc
            except ProtocolError as exc:
                self._refuse(req, exc.reason, str(exc), replies)
                continue
            if req.retained and interval is not None and req.runtime_id in self.detector:
                view = self.detector.view(req.runtime_id)
                if (view.interval, view.grace) == (interval.interval, interval.grace):
                    continue  # the re-delivered copy of what the database already has
            refusal = self._over_limit(req, interval, new_in_batch)
            if refusal is not None:
                self._refuse(req, *refusal, replies)
                continue
            if interval is not None and req.runtime_id not in self.detector:
                new_in_batch.add(req.runtime_id)
            accepted.append((req, interval))
        if not accepted:
            return
        registrations = {r.runtime_id: (r.runtime_id, i.interval, i.grace) for r, i in accepted if i is not None}
        removals = [r.runtime_id for r, i in accepted if i is None]
        try:
            if registrations:
                await self._db(self.store.register, list(registrations.values()), time.time())
            if removals:
                await self._db(self.store.deregister, removals)
        except Exception as exc:
            self.stats["rejected.database"] += len(accepted)
            self.stats["registration.rejected"] += len(accepted)
            log.error("database refused %d registrations: %s", len(accepted), exc)
            for req, _ in accepted:
                if not req.retained:
                    error = "the orchestrator's database is unavailable; try again"
                    replies.append((req, protocol.encode_reply_error(req.runtime_id, error)))
            return
        self._apply_registrations(accepted, replies)

    def _refuse(self, req: _Request, reason: str, error: str, replies: list[tuple[_Request, bytes]]) -> None:
        """Count and log a refused request, and answer it if it was live."""
        if self._refetched(req):
            return
        self._reject(reason, req.runtime_id, f"interval request: {error}")
        self.stats["registration.rejected"] += 1
        if not req.retained:
            replies.append((req, protocol.encode_reply_error(_shown_id(req.runtime_id), error)))

    def _apply_registrations(
        self, accepted: list[tuple[_Request, protocol.IntervalRequest | None]], replies: list[tuple[_Request, bytes]]
    ) -> None:
        """Put stored registrations (None: a removal) into the detector; the replies they owe go to ``replies``."""
        now = time.monotonic()
        for req, interval in accepted:
            rid = req.runtime_id
            answer = not req.retained
            if interval is None:
                if self.detector.deregister(rid):
                    log.info("%s deregistered", rid)
                self.conflicts.forget(rid)
                self._status_due.add(rid)
            else:
                if req.retained and rid not in self.detector and self.healer.registered(rid, now):
                    # A retained copy gets no reply, but this runtime is pulsing: tell it now, not at its next re-send.
                    answer = True
                    self.stats["registration.healed"] += 1
                    log.info("%s registered from its retained request, fetched after it pulsed unregistered", rid)
                transition = self.detector.register(rid, interval.interval, interval.grace, now, live=not req.retained)
                session = self._early_sessions.pop(rid, None)
                if session is not None:
                    self.detector.online(rid, now, session, live=False)  # records the session only
                if transition is not None:
                    self._emit(transition)  # its status follows it
                else:
                    self._status_due.add(rid)
            if answer:
                self.stats["registrations"] += 1
                self.stats["registration.confirmed"] += 1
                replies.append((req, protocol.encode_reply_ok(rid, interval)))
        self._rearm.set()
        self._outbox_wake.set()

    def _refetched(self, req: _Request) -> bool:
        """A refused request that is the copy a fetch brought back: counted apart, not as a second rejection.

        The broker keeps a refused retained request, and the runtime's pulses
        make us fetch it again (once a minute at most): it was counted and
        logged when it came, and every fetch would count it once more.
        """
        if not (req.retained and self.healer.claim(req.runtime_id, time.monotonic())):
            return False
        self.stats["registration.fetched_refused"] += 1
        return True

    def _may_reply_on(self, topic: str, runtime_id: str) -> bool:
        """A Response Topic must not aim our rights elsewhere: outside our prefix, under
        ``{prefix}/replies/``, or in the requester's own subtree; never status, alerts or another runtime."""
        root = self.topics.prefix + "/"
        if not topic.startswith(root) or topic.startswith(root + "replies/"):
            return True
        if protocol.is_valid_id(runtime_id) and topic.startswith(
            self.topics.interval(runtime_id).rsplit("/", 1)[0] + "/"
        ):
            return True
        self._reject("response_topic", runtime_id, f"response topic {_shown(topic)} not allowed")
        return False

    def _over_limit(
        self, req: _Request, interval: protocol.IntervalRequest | None, new_in_batch: set[str]
    ) -> tuple[str, str] | None:
        """``(reason, error)`` if the request exceeds a limit: runtimes watched, or requests per ID per minute.

        Retained copies re-delivered at subscribe are not counted against the
        rate: they are the broker's doing, not the runtime's.
        """
        rid = req.runtime_id
        new = interval is not None and rid not in self.detector and rid not in new_in_batch
        if new and len(self.detector) + len(new_in_batch) >= self.config.max_runtimes:
            return "too_many_runtimes", f"the orchestrator already watches its maximum of {self.config.max_runtimes}"
        if req.retained:
            return None
        now = time.monotonic()
        start, count = self._request_counts.get(rid, (now, 0))
        if now - start >= 60.0:
            start, count = now, 0
        if count >= self.config.max_requests_per_minute:
            return "rate_limited", (
                f"too many interval requests for {rid}: at most {self.config.max_requests_per_minute} a minute"
            )
        if len(self._request_counts) >= 100_000:  # many IDs: drop the windows that are over
            self._request_counts = {k: v for k, v in self._request_counts.items() if now - v[0] < 60.0}
        self._request_counts[rid] = (start, count + 1)
        return None

    async def _send_replies(self, replies: list[tuple[_Request, bytes]]) -> None:
        """Publish each reply on its runtime's reply topic (and Response Topic, if it gave one), at QoS 0.

        QoS 0, because a reply matters only to an agent connected now, and an
        agent re-sends its request until it has one; QoS 1 would cost a
        round trip per 20 replies (Mosquitto's in-flight window), 10 s for a
        fleet of 100,000 registering at once. On the lean connection where
        there is one; Response Topics need properties, so they take the
        general client.
        """
        client = self._client
        if client is None:
            return
        plain = [(self.topics.reply(r.runtime_id), p, False) for r, p in replies if protocol.is_valid_id(r.runtime_id)]
        targeted = [
            (req, payload)
            for req, payload in replies
            if req.response_topic is not None and self._may_reply_on(req.response_topic, req.runtime_id)
        ]
        try:
            reader = self._pulse_reader
            if reader is not None:
                await reader.send(plain)
            else:
                await asyncio.gather(*(client.publish(topic, payload, qos=0) for topic, payload, _ in plain))
            await asyncio.gather(*(self._reply_on_response_topic(client, req, payload) for req, payload in targeted))
        except (aiomqtt.MqttError, PulseReaderError) as exc:
            log.warning("could not send %d registration replies: %s", len(replies), exc)
            return
        self.stats["registration.replies"] += len(replies)

    async def _reply_on_response_topic(self, client: aiomqtt.Client, req: _Request, payload: bytes) -> None:
        assert req.response_topic is not None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if req.correlation is not None:
            props.CorrelationData = req.correlation
        await client.publish(req.response_topic, payload, qos=0, properties=props)

    # --- watcher -------------------------------------------------------------

    def _sentinel(self, planned: float) -> None:
        """Notice this process stalling (paused, swapped, starved); runs every ``stall_threshold / 4``.

        Pulses that arrived during a stall are still unread, so a deadline that
        fell due meanwhile proves nothing: the watch starts afresh, as after a
        reconnect. A plain callback, not a task: once the loop runs again it
        fires in the same turn as the watcher's timer, before the watcher's
        next step can judge, whatever the watcher was doing when it stopped.
        """
        now = time.monotonic()
        late = now - planned
        if late > self.config.stall_threshold:
            self.stats["stalls"] += 1
            deadline = self.detector.next_deadline()
            if self.detector.suspended:
                log.warning("stalled for %.1f s while cut off from the broker (judging nobody anyway)", late)
            elif deadline is not None and deadline <= now:
                log.warning("stalled for %.1f s: restarting the watch instead of judging", late)
                self.detector.resume(now)
                self._rearm.set()
            else:
                log.warning("stalled for %.1f s; nothing fell due meanwhile", late)
        tick = self.config.stall_threshold / 4
        self._sentinel_timer = asyncio.get_running_loop().call_later(tick, self._sentinel, now + tick)

    async def _watcher(self) -> None:
        """Sleep until the next deadline (or until re-armed), then collect verdicts.

        Own stalls are :meth:`_sentinel`'s to notice.
        """
        while True:
            deadline = self.detector.next_deadline()
            delay = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._rearm.wait()
            self._rearm.clear()
            now = time.monotonic()
            if self.detector.suspended:
                # Cut off from the broker: whoever falls due is unknown, not dead (no alert).
                self._pending_wills.clear()
                for transition in self.detector.expire(now):
                    self._emit(transition)
                continue
            if self.detector.settle(now, _SETTLE_BUDGET):
                await asyncio.sleep(0)  # more to re-arm: go on once the event loop has read what came meanwhile
                continue
            if not self._pending_wills and not self.detector.overdue(now):
                continue
            if self._pending_wills:
                # A will rarely comes alone (a host, a switch, a broker): gather the burst into one batch,
                # so storm control sees one outage rather than a trickle.
                await asyncio.sleep(_WILL_GATHER)
            round_trip = await self._echo()
            if round_trip is None:
                self.stats["echo_timeouts"] += 1
                log.warning(
                    "no echo from the broker within %.1f s: the link is broken, judging nobody until it is back",
                    self.config.echo_timeout,
                )
                if self._pending_wills:
                    log.warning("ignoring %d wills received as the link failed", len(self._pending_wills))
                    self._pending_wills.clear()
                self.detector.suspend()
                if self._link_lost is not None and not self._link_lost.done():
                    self._link_lost.set_result(None)
                continue
            self.apply_wills()
            # A pulse takes about as long through the broker as our echo did: judge as of that long
            # ago, so a congested broker (pulses sent in time, delivered late) kills nobody.
            verdict_at = time.monotonic()
            for transition in self.detector.expire(verdict_at - round_trip):
                if transition.deadline is not None:
                    self.verdict_latency.observe(max(0.0, verdict_at - transition.deadline))
                self._emit(transition)

    # --- publisher -----------------------------------------------------------

    async def _publisher(self) -> None:
        while True:
            await self._outbox_wake.wait()
            self._outbox_wake.clear()
            self._publisher_idle.clear()
            try:
                await self._publish_round()
            finally:
                if not self._outbox_wake.is_set():
                    self._publisher_idle.set()

    async def _publish_round(self) -> None:
        """Commit the new transitions, then (if connected) publish what is due."""
        await self._commit_outbox()  # connected or not: the database is told at once
        client = self._client
        if client is None:
            return  # re-woken on connect
        try:
            await self._publish_due(client)
        except (aiomqtt.MqttError, PulseReaderError) as exc:
            log.warning("publishing paused, broker connection lost: %s", exc)

    async def _commit_outbox(self) -> None:
        """Write the new transitions (waiting at most ``db_timeout``) and queue their statuses and alerts.

        The write is a compare-and-set: a transition another orchestrator
        already recorded is not alerted twice. A slow database does not hold
        an alert back; it is then sent from memory.
        """
        batch, self._outbox = self._outbox, []
        if not batch:
            return
        self._log_events(batch)
        flips = self._submit_flips(batch)
        committed = self._flip_waiters[-1]
        lost: set[str] = set()
        # Known down: do not make every batch wait db_timeout in turn behind the one before.
        wait = self.config.db_timeout if self._db_ok else 0.0
        if any(f.event is not None for f in flips):  # else nothing to alert: no need to wait for the verdict
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow our own cancellation
                # when the write completes at that moment, and the publisher then never stops.
                async with asyncio.timeout(wait):
                    lost = await asyncio.shield(committed)
            except TimeoutError:
                log.warning("database slow: publishing %d transitions before it confirms them", len(batch))
        # A change that raises an alert is published with it; the rest (unknown -> alive after a
        # start, alive -> unknown on a lost link) waits in the refresher's paced queue: 100,000
        # statuses at once would hold up the pulses for as long as they take.
        urgent = self._status_due
        for t in batch:
            if t.event is not None:
                urgent.add(t.runtime_id)
            else:
                self._refresh_later(t.runtime_id)
        self._queue_alerts([f for f in flips if f.event is not None and f.runtime_id not in lost])
        if lost:
            self.stats["conflicts.recorded_elsewhere"] += len(lost)

    async def _publish_due(self, client: aiomqtt.Client) -> None:
        """Publish the alerts, then the statuses, that are due; mark the alerts notified."""
        due, self._status_due = self._status_due, set()
        alerts, self._unsent_alerts = self._unsent_alerts, []
        try:
            if alerts:
                await self._send(client, (self._alert_message(f) for f in alerts))
        except BaseException:
            # Not sent (already committed): keep it for the next connection, ahead of anything newer.
            self._unsent_alerts = alerts + self._unsent_alerts
            self._status_due |= due
            raise
        self.stats["alerts"] += len(alerts)
        for f in alerts:
            self._confirm(f.key)
        try:
            if due:
                await self._send(client, (self._status_message(rid) for rid in due))
        except BaseException:
            self._status_due |= due
            raise

    async def _send(self, client: aiomqtt.Client, messages: Iterable[Message]) -> None:
        """Publish at QoS 1 and return once the broker has every one; raises if the connection breaks first.

        On the lean connection when there is one (a few µs each, paced
        between pulses), else on the general client, 1,000 at a time.
        """
        reader = self._pulse_reader
        if reader is not None:
            await reader.publish(messages)
            return
        publishes = [client.publish(topic, payload, qos=1, retain=retain) for topic, payload, retain in messages]
        try:
            for start in range(0, len(publishes), 1000):
                await asyncio.gather(*publishes[start : start + 1000])
        except BaseException:
            for coro in publishes:  # those never started must not warn that they were never awaited
                if asyncio.iscoroutine(coro):
                    coro.close()
            raise

    def _queue_alerts(self, flips: list[FlipRow]) -> None:
        """Send these flips' notices: on the alert topic (with the statuses) and through the dispatcher."""
        if not flips:
            return
        for f in flips:
            self._awaiting[f.key] = 2
        self._unsent_alerts += flips
        self.dispatcher.submit(
            Notice(f.event or "", f.runtime_id, f.at, f.last_seen, f.reason, key=f.key) for f in flips
        )

    def _confirm(self, key: object) -> None:
        """One more channel has this flip's notice; once all have it the database marks it notified."""
        if not isinstance(key, tuple) or key not in self._awaiting:
            return
        self._awaiting[key] -= 1
        if self._awaiting[key] <= 0:
            del self._awaiting[key]
            self._notified_keys.add(key)
            self._writer_wake.set()

    async def _publish_alert_payload(self, payload: bytes) -> None:
        """The dispatcher's summaries on the alert topic (MqttNotifier)."""
        client = self._client
        if client is None:
            raise NotifyError("not connected to the broker", retryable=True)
        await client.publish(self.topics.alerts, payload, qos=1)

    async def _redeliver(self) -> None:
        """Send the notices owed from before: flips committed but never notified (a crash, a lost link).

        Runs at start and every ``outbox_interval``; only flips whose lease
        ran out are taken, so notices another live orchestrator is sending
        are left to it.
        """
        while True:
            client = self._client
            if client is not None and self.ready.is_set():
                try:
                    owed = await self._db(self.store.claim_unnotified, time.time(), lease=self.config.outbox_lease)
                except Exception as exc:
                    log.warning("cannot read the outbox: %s", exc)
                    owed = []
                owed = [f for f in owed if f.key not in self._awaiting]  # ours, still on their way
                if owed:
                    log.info("sending %d notices owed from before", len(owed))
                    self._queue_alerts(owed)
                    self._outbox_wake.set()
            await asyncio.sleep(self.config.outbox_interval)

    async def _refresher(self) -> None:
        """Republish every retained status after a (re)connect, paced so verdicts and pulses come first.

        A broker that restarted without persistence (the embedded one always)
        has lost them; 100,000 at once would starve the event loop for seconds.
        """
        batch_size, pause = 500, 0.05  # at most 10,000 a second
        while True:
            await self._refresh_wake.wait()
            # Verdicts first: a burst of them (a mass death during the refresh after a start) must not
            # share the broker's in-flight window, the event loop and the observers' links with it.
            await self._publisher_idle.wait()
            client = self._client
            if client is None or not self._refresh:
                self._refresh_wake.clear()
                continue
            batch = [self._refresh.popleft() for _ in range(min(batch_size, len(self._refresh)))]
            if self._refresh:
                self._refresh_queued.difference_update(batch)
            else:
                self._refresh_queued = set()  # a set never shrinks: drop the one that held them all
            try:
                await self._send(client, (self._status_message(rid) for rid in batch))
            except (aiomqtt.MqttError, PulseReaderError):
                for rid in reversed(batch):
                    if rid not in self._refresh_queued:
                        self._refresh_queued.add(rid)
                        self._refresh.appendleft(rid)
                self._refresh_wake.clear()  # woken again on the next connect
                continue
            await asyncio.sleep(pause)

    def _refresh_later(self, runtime_id: str) -> None:
        """Queue a runtime's status for the refresher (paced), unless it is queued already."""
        if runtime_id not in self._refresh_queued:
            self._refresh_queued.add(runtime_id)
            self._refresh.append(runtime_id)
            self._refresh_wake.set()

    def _status_message(self, runtime_id: str) -> Message:
        """The retained status of a runtime as it is now (an empty payload clears a deregistered one's)."""
        topic = self.topics.status(runtime_id)
        if runtime_id not in self.detector:
            return topic, b"", True
        view = self.detector.view(runtime_id)
        payload = protocol.encode_status(
            runtime_id,
            state=view.state.value,
            interval=view.interval,
            grace=view.grace,
            last_seen=self.clock.wall_or_none(view.last_seen),
            since=self.clock.wall(view.since),
            reason=view.reason,
        )
        return topic, payload, True

    def _alert_message(self, f: FlipRow) -> Message:
        assert f.event is not None
        payload = protocol.encode_alert(f.event, f.runtime_id, at=f.at, last_seen=f.last_seen, reason=f.reason)
        return self.topics.alerts, payload, False

    # --- writer: the database thread's queue --------------------------------

    def _submit_flips(self, batch: list[Transition]) -> list[FlipRow]:
        """Queue the transitions for the writer; the newest waiter in ``_flip_waiters`` is theirs."""
        wall = self.clock.wall
        flips = [
            FlipRow(
                t.runtime_id,
                t.old.value,
                t.new.value,
                t.event,
                t.reason,
                wall(t.at),
                self.clock.wall_or_none(t.last_seen),
            )
            for t in batch
        ]
        self._pending_flips.extend(flips)
        future: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        self._flip_waiters.append(future)
        self._writer_wake.set()
        return flips

    def counters(self) -> dict[str, Any]:
        """What the orchestrator has done so far, for the stats topic and the shutdown log."""
        return {
            "runtimes": len(self.detector),
            "states": {state.value: n for state, n in self.detector.counts.items()},
            "pulses": self.pulses,
            "rejected": {k.removeprefix("rejected."): v for k, v in self.stats.items() if k.startswith("rejected.")},
            "dropped": {k.removeprefix("dropped."): v for k, v in self.stats.items() if k.startswith("dropped.")},
            "alerts": self.stats["alerts"],
            "registrations": self.stats["registrations"],
            "registration": {
                what: self.stats[f"registration.{what}"]
                for what in ("received", "confirmed", "rejected", "healed", "fetched", "fetched_refused", "replies")
            },
            "unregistered_pulses": self.stats["unregistered_pulses"],
            "db_transactions": self.store.transactions,
            "pending_writes": len(self._pending_flips),
            "refresh_pending": len(self._refresh),
            "uptime_s": round(time.monotonic() - self.clock.mono0, 3),
        }

    async def _stats_publisher(self) -> None:
        """Publish the counters, retained, every ``stats_interval`` seconds (monitoring the monitor)."""
        while True:
            await asyncio.sleep(self.config.stats_interval)
            client = self._client
            if client is None:
                continue
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self.topics.orchestrator_stats, json.dumps(self.counters()), qos=0, retain=True)

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval)
            self._flush_seen = True
            self._writer_wake.set()

    async def _writer(self) -> None:
        backoff = 0.5
        while True:
            await self._writer_wake.wait()
            self._writer_wake.clear()
            if await self._write_once():
                backoff = 0.5
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                self._writer_wake.set()

    async def _write_once(self, limit: int | None = _WRITE_BATCH) -> bool:
        """One transaction: pending flips (at most ``limit``), notified marks, and the last-seen flush when due.

        Flips that raise an alert go first and alone, whole runtimes at a
        time: the unknown -> alive wave after a start (100,000 flips) must not
        hold a verdict's alert behind it. The last-seen flush (100,000 rows with
        100,000 runtimes, some 100 ms) is written a chunk at a time and gives
        way when an alert's flips arrive: the transaction commits what it
        has, the next one writes the alert's flips alone, and the flush goes
        on after. With no alerts, a flush is still one transaction.
        """
        flips = self._pending_flips.take(limit)
        if self._pending_flips:
            self._writer_wake.set()  # the rest in the next transaction
        waiters, self._flip_waiters = self._flip_waiters, []
        marks, self._notified_keys = self._notified_keys, set()
        alive_at = None
        if self._flush_seen and self._seen_backlog is None:
            self._flush_seen = False
            self._seen_taken = self.detector.take_all_seen() if self._flush_all else self.detector.take_seen()
            self._seen_backlog = in_key_order(self._seen_taken, self.clock.offset)
            self._seen_done = False
            alive_at = time.time()
        backlog = self._seen_backlog
        if backlog is not None and limit is not None and any(f.event is not None for f in flips):
            backlog = None  # an alert waits for this commit: the flush goes on in the next transaction
            self._writer_wake.set()
        seen = None if backlog is None else self._seen_rows(backlog, give_way=limit is not None)
        if not flips and seen is None and not marks and alive_at is None:
            _resolve(waiters, set())
            return True
        now = time.time()
        # A notice that went out before its flip was written is written as notified.
        flips = [dataclasses.replace(f, notified_at=now) if f.key in marks else f for f in flips]
        try:
            lost = await self._db(
                self.store.record,
                flips,
                seen or {},
                now=now,
                lease=self.config.outbox_lease,
                alive_at=alive_at,
                notified=list(marks),
            )
        except Exception as exc:
            self._db_ok = False
            log.error("database write failed (%d transitions kept for retry): %s", len(flips), exc)
            self._pending_flips.put_back(flips)
            self._flip_waiters[:0] = waiters
            self._notified_keys |= marks
            if self._seen_backlog is not None:
                # Some of the flush may be stored already; giving all of it back is harmless (newer times win).
                self.detector.restore_seen(self._seen_taken)
                self._seen_taken, self._seen_backlog, self._flush_seen = {}, None, True
            with contextlib.suppress(Exception):
                await self._db(self.store.reconnect)
            return False
        self._db_ok = True
        _resolve(waiters, lost)
        if self._seen_backlog is not None:
            if self._seen_done:
                self._seen_taken, self._seen_backlog = {}, None
            if self._seen_backlog is not None or self._flush_seen:
                self._writer_wake.set()  # the rest of the flush (or the next one) in the next transaction
        return True

    def _seen_rows(
        self, backlog: Iterator[list[tuple[str, float]]], *, give_way: bool
    ) -> Iterator[list[tuple[str, float]]]:
        """The flush's chunks of ``(runtime_id, wall-clock last seen)``, read on the database thread.

        Stops between chunks once an alert is waiting (``give_way``); sets
        ``_seen_done`` when the backlog is exhausted.
        """
        waiting = self._pending_flips.alert_waiting
        for chunk in backlog:
            yield chunk
            if give_way and waiting.is_set():
                return
        self._seen_done = True

    async def _final_flush(self) -> None:
        self._flush_seen = self._flush_all = True
        try:
            async with asyncio.timeout(10):
                while True:
                    if not await self._write_once(limit=None):
                        await asyncio.sleep(0.5)
                    elif self._seen_backlog is None and not self._flush_seen:
                        break
        except TimeoutError:
            log.error("database unavailable at shutdown: %d transitions not stored", len(self._pending_flips))
        with contextlib.suppress(Exception):
            await self._db(self.store.close)

    async def _db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the database thread; typed like ``fn``, so a wrong call fails mypy, not production."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    # --- maintenance commands: silence, unsilence, deregister, silences ------

    async def _load_silences(self) -> None:
        """Put the stored silences into the dispatcher (the expired ones are deleted), then hold the dead.

        A runtime already dead under a silence is re-checked when the silence
        ends, as if its notice had been held by this process.
        """
        try:
            pruned = await self._db(self.store.prune_silences, time.time())
            rows = await self._db(self.store.silences)
        except Exception as exc:
            raise RuntimeError(database_error("cannot read the silences from", self.config.db, exc)) from exc
        self.dispatcher.silences = SilenceBook.from_rows(rows)
        if rows:  # a View per runtime for nothing otherwise: 100,000 of them at start-up
            self.dispatcher.restore_held(v.runtime_id for v in self.detector.views() if v.state is State.DEAD)
        if rows or pruned:
            log.info("loaded %d silences (%d expired ones deleted)", len(rows), pruned)

    def _on_command(self, payload: Any, retained: bool, properties: Properties | None) -> None:
        """Queue a command from ``{prefix}/orchestrator/command`` for the commander (called by ``handle``)."""
        if not isinstance(payload, bytes | bytearray):
            payload = b"" if payload is None else str(payload).encode()
        response_topic, correlation = _response_to(properties)
        try:
            self._commands.put_nowait(_CommandRequest(bytes(payload), retained, response_topic, correlation))
        except asyncio.QueueFull:
            self._reject("busy", "command:busy", "command: too many commands waiting")

    async def _commander(self) -> None:
        """Run the commands one at a time: database first, then memory, then the reply."""
        while True:
            req = await self._commands.get()
            try:
                await self._run_command(req)
            except Exception:  # one command must never stop the others
                self.stats["errors"] += 1
                log.exception("command failed")

    async def _run_command(self, req: _CommandRequest) -> None:
        if req.retained:
            # The live copy ran when it was sent; a retained one would run again at every (re)subscribe.
            self._reject("retained_command", "command:retained", "retained command (not run, not answered)")
            return
        request_id = protocol.peek_request_id(req.payload, limit=self.config.max_payload)
        try:
            command = protocol.decode_command(req.payload, limit=self.config.max_payload)
        except ProtocolError as exc:
            self._reject(exc.reason, f"command:{exc.reason}", f"command: {exc}")
            reply = protocol.encode_command_reply(False, None, request_id, error=str(exc))
            await self._reply_command(req, request_id, reply)
            return
        run = {
            "silence": self._command_silence,
            "unsilence": self._command_unsilence,
            "deregister": self._command_deregister,
            "silences": self._command_silences,
        }[command.command]
        try:
            fields = await run(command)
        except _CommandFailed as exc:
            log.info("command %s refused: %s", command.command, exc)
            reply = protocol.encode_command_reply(False, command.command, command.request_id, error=str(exc))
        except Exception as exc:
            self.stats["rejected.database"] += 1
            log.error("command %s failed: database: %s", command.command, exc)
            error = "the orchestrator's database is unavailable; try again"
            reply = protocol.encode_command_reply(False, command.command, command.request_id, error=error)
        else:
            self.stats["commands"] += 1
            reply = protocol.encode_command_reply(True, command.command, command.request_id, **fields)
        await self._reply_command(req, command.request_id, reply)
        with contextlib.suppress(Exception):  # expired silences are only clutter: deleted when convenient
            await self._db(self.store.prune_silences, time.time())

    async def _command_silence(self, command: protocol.Command) -> dict[str, Any]:
        assert command.target is not None
        assert command.seconds is not None
        until = time.time() + command.seconds
        await self._db(self.store.save_silence, command.target, until, command.reason)
        self.dispatcher.silence(command.target, until, command.reason)
        why = f" ({command.reason})" if command.reason else ""
        log.warning("silenced %s for %.0f s%s", command.target, command.seconds, why)
        return self._silence_fields(Silence(command.target, until, command.reason))

    async def _command_unsilence(self, command: protocol.Command) -> dict[str, Any]:
        assert command.target is not None
        entry = self.dispatcher.silences.get(command.target)
        if entry is None or entry.until <= time.time():
            raise _CommandFailed(f"no silence on {command.target!r}")
        await self._db(self.store.delete_silence, command.target)
        self.dispatcher.unsilence(command.target)
        log.warning("lifted the silence on %s", command.target)
        return {"target": command.target, "lifted": True}

    async def _command_silences(self, command: protocol.Command) -> dict[str, Any]:
        now = time.time()
        return {"silences": [self._silence_fields(e) for e in self.dispatcher.silences.entries() if e.until > now]}

    def _silence_fields(self, entry: Silence) -> dict[str, Any]:
        matches = sum(1 for rid in self.detector.ids() if entry.matches(rid))
        return {"target": entry.pattern, "until": protocol.iso(entry.until), "reason": entry.reason, "matches": matches}

    async def _command_deregister(self, command: protocol.Command) -> dict[str, Any]:
        """Forget a runtime for good: its record, and every retained message that would bring it back."""
        rid = command.id
        assert rid is not None
        if rid not in self.detector:
            raise _CommandFailed(f"{rid} is not registered")
        await self._db(self.store.deregister, [rid])
        self.detector.deregister(rid)
        self._early_sessions.pop(rid, None)
        self._status_due.add(rid)  # cleared by the publisher should the clears below not reach the broker
        self._rearm.set()
        self._outbox_wake.set()
        log.warning("%s deregistered by command", rid)
        client = self._client
        if client is not None:
            try:
                await self._clear_retained(client, rid)
            except aiomqtt.MqttError as exc:
                log.warning("could not clear the retained messages of %s: %s", rid, exc)
        return {"id": rid, "deregistered": True}

    async def _clear_retained(self, client: aiomqtt.Client, runtime_id: str) -> None:
        """Clear a deregistered runtime's retained status, interval request and state.

        Without the interval request an orchestrator restart would register it
        again. We are subscribed to those topics: the echo of each clear is
        recognised (``_our_clear``) rather than taken for a deregistration or
        rejected as a malformed state.
        """
        now = time.monotonic()
        if len(self._cleared) > _MAX_LOGGED_IDS:
            self._cleared = {t: until for t, until in self._cleared.items() if until > now}
        topics = (self.topics.interval(runtime_id), self.topics.state(runtime_id))
        for topic in topics:
            self._cleared[topic] = now + _CLEAR_ECHO
        clears = [self._status_message(runtime_id), *((topic, b"", True) for topic in topics)]
        await asyncio.gather(
            *(client.publish(topic, payload, qos=1, retain=retain) for topic, payload, retain in clears)
        )

    def _our_clear(self, topic: str, now: float) -> bool:
        """True (once) for the echo of an empty retained message we published on ``topic``."""
        until = self._cleared.pop(topic, None)
        return until is not None and until >= now

    def _may_reply_to_command(self, topic: str) -> bool:
        """As for interval requests (``_may_reply_on``): outside our prefix, under ``{prefix}/replies/``,
        or under ``{prefix}/orchestrator/command/reply/``; never status, alerts or a runtime's topics."""
        root = self.topics.prefix + "/"
        if not topic.startswith(root) or topic.startswith((root + "replies/", self.topics.command + "/reply/")):
            return True
        self._reject("response_topic", "command:response_topic", f"command response topic {_shown(topic)} not allowed")
        return False

    async def _reply_command(self, req: _CommandRequest, request_id: str | None, payload: bytes) -> None:
        """Answer on the MQTT 5 Response Topic if usable, else on ``.../command/reply/{request_id}``, else not."""
        client = self._client
        if client is None:
            return
        try:
            if req.response_topic is not None and self._may_reply_to_command(req.response_topic):
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                if req.correlation is not None:
                    props.CorrelationData = req.correlation
                await client.publish(req.response_topic, payload, qos=1, properties=props)
            elif request_id is not None:
                await client.publish(self.topics.command_reply(request_id), payload, qos=1)
        except aiomqtt.MqttError as exc:
            log.warning("could not reply to a command: %s", exc)


class _QueueFull(logging.Filter):
    """aiomqtt warns once per message it discards from a full queue: count them, log every 10 s."""

    def __init__(self, stats: collections.Counter[str]) -> None:
        super().__init__()
        self.stats = stats
        self.logged = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Message queue is full"):
            return True
        self.stats["dropped.queue_full"] += 1
        now = time.monotonic()
        if now - self.logged < 10.0:
            return False
        self.logged = now
        record.msg = "incoming queue full (max_queued_messages): discarding; %d discarded so far"
        record.args = (self.stats["dropped.queue_full"],)
        return True


def _resolve(waiters: list[asyncio.Future[set[str]]], lost: set[str]) -> None:
    for future in waiters:
        if not future.done():
            future.set_result(lost)


def _response_to(properties: Properties | None) -> tuple[str | None, bytes | None]:
    """The MQTT 5 Response Topic and Correlation Data of a request, if usable."""
    if properties is None:
        return None, None
    topic = getattr(properties, "ResponseTopic", None)
    correlation = getattr(properties, "CorrelationData", None)
    if not isinstance(topic, str) or not topic or len(topic) > 1024 or "+" in topic or "#" in topic:
        return None, None
    return topic, correlation if isinstance(correlation, bytes) else None


def _connect_properties() -> Properties:
    """MQTT 5 CONNECT properties of the general client: the largest Receive Maximum the protocol allows.

    Mosquitto keeps at most ``max_inflight_messages`` (20) QoS 1 messages in
    flight to a client without one, ``max_queued_messages`` (1,000) queued
    behind, and silently drops the rest: 5,000 agents registering at once on
    its defaults lost 2,742 registrations. This client still takes QoS 1
    bursts: the retained registrations a fetch brings (orchestrator.healing),
    and every interval request on a broker without the lean connection.
    """
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = 65535
    return props


def _unsupported_version(exc: Exception) -> bool:
    rc = getattr(exc, "rc", None)
    return getattr(rc, "value", rc) in (1, 132)


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def _shown_id(value: str) -> str:
    return value if len(value) <= 200 else value[:200]

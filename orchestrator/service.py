"""The orchestrator process: the composition root that builds the rooms and runs them.

Each room owns one concern and its own file (see ``docs/architecture.md``):

* :mod:`~orchestrator.link` keeps the broker connections up and publishes for everyone;
* :mod:`~orchestrator.intake` routes every message; pulses go straight to the pure
  :mod:`~orchestrator.detector`;
* :mod:`~orchestrator.registrar` stores interval requests, then answers them;
* :mod:`~orchestrator.watch` turns deadlines into verdicts once an echo proves the link;
* :mod:`~orchestrator.outbox` stores each transition and tells the world about it;
  :mod:`~orchestrator.writer` owns the database's write queue;
* :mod:`~orchestrator.statuses` republishes retained statuses, paced;
* :mod:`~orchestrator.commands` runs administrators' commands.

Liveness is judged on ``time.monotonic()`` at receipt; wall-clock times are
derived from one anchor taken at start, for display and storage only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable

from runtime_agent import protocol
from runtime_agent.protocol import Topics
from runtime_agent.url import redact_url

from . import _paho, rejections
from .broker import EmbeddedBroker, check_bindable
from .clock import WallClock
from .commands import Commander
from .config import Config
from .conflict import ConflictWatch
from .database import Database
from .detector import Detector, State
from .dispatch import Dispatcher, Route, build_routes, retry_policy, storm_policy
from .healing import RegistrationHealer
from .intake import Births, Common, Intake
from .link import BrokerLink, Echo
from .notify import MqttNotifier, Notice
from .outbox import Outbox
from .overview import Overview
from .registrar import Refetcher, Registrar
from .rejections import Rejections
from .statuses import StatsPublisher, Statuses
from .store import RuntimeRow, Store, database_error
from .watch import Watch
from .writer import Writer

log = logging.getLogger("orchestrator")
_paho.apply()  # paho's per-message MQTT 5 property tables, shared (see orchestrator/_paho.py)

__all__ = ["Orchestrator", "WallClock"]


class Orchestrator:
    """Watches every registered runtime; ``await run(stop)`` until ``stop`` is set."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        self.clock = WallClock()
        self.detector = Detector(now=time.monotonic(), seen_every=config.last_seen_every)
        self.store = Store(config.db)
        self.db = Database(self.store)
        self.stats: collections.Counter[str] = collections.Counter()
        self.ready = asyncio.Event()
        """Set while subscribed and judging; tests and the demo wait on it."""
        self._downtime: tuple[float, float] | None = None
        """(last known alive, restarted) when the monitor was down long enough to miss a death."""
        self._linked_before = False
        """Whether a connection came up before: then an external broker may have restarted (see link_up)."""
        echo = Echo(self.topics.echo(config.client_id))
        self.link = BrokerLink(config, topics=self.topics, echo=echo, stats=self.stats)
        self.statuses = Statuses(topics=self.topics, detector=self.detector, clock=self.clock)
        self._build_output()
        self._build_input(echo)
        self.overview = Overview(
            detector=self.detector,
            clock=self.clock,
            stats=self.stats,
            intake=self.intake,
            outbox=self.outbox,
            writer=self.writer,
            store=self.store,
            dispatcher=self.dispatcher,
            verdict_latency=self.watch.verdict_latency,
            ready=self.ready,
        )
        self.stats_publisher = StatsPublisher(
            topic=self.topics.orchestrator_stats,
            counters=self.overview.counters,
            link=self.link,
            interval=config.stats_interval,
        )

    def _build_output(self) -> None:
        """The rooms a verdict passes through: watch -> outbox -> writer, dispatcher, link."""
        config, detector = self.config, self.detector
        self.writer = Writer(db=self.db, detector=detector, clock=self.clock, config=config)
        self.dispatcher = Dispatcher(
            [*build_routes(config), _summaries(lambda payload: self.outbox.publish_alert_payload(payload))],
            storm=storm_policy(config),
            reminder_interval=config.reminder_interval,
            population=lambda: len(detector),
            state_of=lambda rid: detector.view(rid).state.value if rid in detector else None,
            on_delivered=lambda notice: self.outbox.confirm(notice.key),
            retry=retry_policy(config),
        )
        self.outbox = Outbox(
            config=config,
            db=self.db,
            writer=self.writer,
            link=self.link,
            statuses=self.statuses,
            dispatcher=self.dispatcher,
            clock=self.clock,
            rearm=lambda: self.watch.rearm(),
            stats=self.stats,
        )
        self.watch = Watch(detector=detector, verdicts=self.outbox, link=self.link, stats=self.stats, config=config)

    def _build_input(self, echo: Echo) -> None:
        """The rooms a message passes through: intake -> detector, registrar, commander."""
        reject = Rejections(self.stats)
        births, conflicts, healer = Births(), ConflictWatch(), RegistrationHealer()
        common = Common(self.topics, self.detector, reject, self.stats, self.config)
        self.registrar = Registrar(
            common,
            db=self.db,
            link=self.link,
            healer=healer,
            births=births,
            conflicts=conflicts,
            emit=self.outbox.emit,
            publish_status=self.outbox.publish_status,
            rearm=self.watch.rearm,
        )
        self.commander = Commander(
            common,
            db=self.db,
            dispatcher=self.dispatcher,
            link=self.link,
            deregister=self.registrar.deregister,
        )
        self.refetcher = Refetcher(
            healer=healer,
            link=self.link,
            topics=self.topics,
            stats=self.stats,
            deliver=lambda *m: self.intake.receive(*m),
        )
        self.intake = Intake(
            common,
            echo=echo,
            verdicts=self.outbox,
            watch=self.watch,
            requests=self.registrar.submit,
            commands=self.commander.submit,
            our_clear=self.registrar.our_clear,
            healer=healer,
            heal=self.refetcher.wake,
            conflicts=conflicts,
            births=births,
        )

    # --- life cycle ----------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Load the database, start the broker if embedded, and watch until ``stop``."""
        if self.config.broker is None:
            check_bindable(*self.config.listen_address)  # fail before touching the database
        await self._restore()
        async with contextlib.AsyncExitStack() as stack:
            if self.config.broker is None:
                host, port = self.config.listen_address
                broker = await stack.enter_async_context(EmbeddedBroker(host, port))
                self.link.broker_url = broker.url
            if self.config.http_address is not None:
                from .web import WebServer  # imported here: only --http pays for aiohttp

                await stack.enter_async_context(WebServer(self.overview, *self.config.http_address))
            jobs = (
                self.registrar.run,
                self.registrar.run_replies,
                self.refetcher.run,
                self.watch.run,
                self.outbox.run,
                self.outbox.refresher.run,
                self.writer.run,
                self.writer.run_flush_timer,
                self.stats_publisher.run,
                self.commander.run,
                self.dispatcher.run,
            )
            workers = [asyncio.create_task(job(), name=job.__qualname__) for job in jobs]
            workers.append(asyncio.create_task(self.outbox.run_redelivery(self.ready), name="redelivery"))
            self.watch.start_sentinel()
            try:
                await self.link.run(stop, self, self.intake)
            finally:
                self.watch.stop_sentinel()
                await self.dispatcher.aclose(drain=2.0)
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                await self.writer.final_flush()
        self.db.shutdown()
        log.info("stopped; pulses received %d, rejected: %s", self.intake.pulses, rejections.summary(self.stats))

    async def _restore(self) -> None:
        """Every registered runtime into the detector, the silences into the dispatcher; a long downtime noted."""
        try:
            await self.db(self.store.open)
            rows = await self.db(self.store.load)
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
        self._check_downtime(await self.db(self.store.alive_at), rows)
        await self.commander.load_silences(self.config.db)
        del rows  # 100,000 rows would otherwise live as long as this frame (about 170 B each)
        # What is loaded lives as long as the process: keep it out of the collector's full passes, which
        # otherwise walk every runtime's objects (40-80 ms with 100,000, the event loop stopped meanwhile).
        gc.collect()
        gc.freeze()

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

    # --- the link's life cycle (orchestrator.link.LinkUser) --------------------

    async def link_up(self) -> None:
        """Connected and subscribed: judge afresh, republish every status, tell of a long downtime.

        The first window waits for the agents' reconnects too when their
        broker may have restarted: the embedded broker always has (it started
        with us), an external one only if we lost it (agents stayed connected
        to it while we restarted). Only runtimes being watched need it: with
        none yet (a first start) the window is the usual one.
        """
        restarted = self.config.broker is None or self._linked_before
        self._linked_before = True
        watched = self.detector.counts[State.ALIVE] + self.detector.counts[State.UNKNOWN]
        allowance = self.config.reconnect_allowance if restarted and watched else 0.0
        self.detector.resume(time.monotonic(), allowance=allowance)
        self.outbox.refresher.all(self.detector.ids())  # the broker may have lost retained statuses
        self.watch.rearm()
        self.outbox.wake()
        if self._downtime is not None:
            since, back = self._downtime
            payload = protocol.encode_monitor_down(since=since, back=back, runtimes=len(self.detector))
            await self.link.publish(self.topics.alerts, payload, qos=1)
            reason = f"the orchestrator was not running for about {back - since:.0f} s"
            self.dispatcher.submit([Notice("monitor_down", None, back, None, reason, count=len(self.detector))])
            self._downtime = None
            self.stats["alerts"] += 1
        self.ready.set()
        log.info(
            "ready: watching %d runtimes on %s (MQTT %s, prefix %s)",
            len(self.detector),
            self.link.shown_broker,
            "5" if self.link.mqtt5 else "3.1.1",
            self.config.prefix,
        )

    async def link_closing(self) -> None:
        await self.outbox.commit()
        await self.outbox.publish_due()

    def link_down(self) -> None:
        self.ready.clear()
        self.detector.suspend()


def _summaries(publish: Callable[[bytes], Awaitable[None]]) -> Route:
    """The dispatcher's own summaries (outages, reminders, silences ending) on the alert topic.

    The alert topic carries every per-runtime event itself (the complete
    machine feed); the dispatcher adds the people's channels, with storm
    control, reminders and silences, and puts its summaries there too.
    """
    events = frozenset({"outage", "outage_recovered", "reminder", "silence_ended"})
    return Route(MqttNotifier(publish), events, (), "mqtt")

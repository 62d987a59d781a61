"""The outbox: every transition is stored (compare-and-set), then told: status, alert topic, people's channels.

Transitions come from the intake, the watch and the registrar through
:meth:`Outbox.emit`. Each batch is handed to the writer; the outbox waits for
the commit at most ``db_timeout`` (a slow database does not hold an alert
back: it is then sent from memory) and drops alerts another orchestrator
recorded first. A flip is marked notified once the alert topic and the
dispatcher both have it; flips committed but never notified (a crash, a lost
link) are claimed and sent again by :meth:`Outbox.run_redelivery`, the
healthchecks way: the flips table doubles as the outbox.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .clock import WallClock
from .database import Database
from .detector import State, Transition
from .dispatch import Dispatcher
from .link import BrokerLink, LinkError
from .notify import Notice, NotifyError
from .statuses import Refresher, Statuses
from .store import FlipRow
from .writer import Key, Writer

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("orchestrator")

_LOGGED_EVENTS = 20
"""Events logged a line each per batch of transitions; the rest are counted by kind of event."""


class Outbox:
    """Transitions in; stored, published and dispatched out."""

    def __init__(
        self,
        *,
        config: Config,
        db: Database,
        writer: Writer,
        link: BrokerLink,
        statuses: Statuses,
        dispatcher: Dispatcher,
        clock: WallClock,
        rearm: Callable[[], None],
        stats: collections.Counter[str],
    ) -> None:
        self.config = config
        self._db = db
        self._writer = writer
        self._link = link
        self._statuses = statuses
        self._dispatcher = dispatcher
        self.clock = clock
        self._rearm = rearm
        self.stats = stats
        self.listeners: list[Callable[[Transition], None]] = []
        """Called with every transition on the event loop (the dashboard's change feed); each must be quick."""
        self.refresher = Refresher(statuses=statuses, link=link, idle=self.wait_idle)
        self._new: list[Transition] = []
        self._unsent_alerts: list[FlipRow] = []
        self._status_due: set[str] = set()
        self._awaiting: dict[Key, int] = {}
        """Flips being notified -> confirmations still missing (the alert topic, the dispatcher)."""
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        """Clear while the outbox has transitions to commit or notices to send: the refresher waits."""
        self._idle.set()

    def __len__(self) -> int:
        """Transitions not yet stored, and notices not yet sent on every channel."""
        return len(self._new) + len(self._writer.pending) + len(self._awaiting)

    def emit(self, transition: Transition) -> None:
        """A transition from any room: stored and told by the next round."""
        self._new.append(transition)
        self._wake.set()
        for listener in self.listeners:
            try:
                listener(transition)
            except Exception:  # a listener must never break judging
                log.exception("transition listener failed")
        if transition.new is State.ALIVE:
            self._rearm()  # a revived runtime may now have the earliest deadline

    def publish_status(self, runtime_id: str) -> None:
        """Publish this runtime's status with the next round (a registration, a deregistration)."""
        self._status_due.add(runtime_id)
        self._wake.set()

    def wake(self) -> None:
        """Connected again: publish what waited."""
        self._wake.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._idle.clear()
            try:
                await self._round()
            finally:
                if not self._wake.is_set():
                    self._idle.set()

    async def _round(self) -> None:
        """Commit the new transitions, then (if connected) publish what is due."""
        await self.commit()  # connected or not: the database is told at once
        if not self._link.connected:
            return  # woken again on connect
        try:
            await self.publish_due()
        except LinkError as exc:
            log.warning("publishing paused, broker connection lost: %s", exc)

    async def commit(self) -> None:
        """Write the new transitions (waiting at most ``db_timeout``) and queue their statuses and alerts.

        The write is a compare-and-set: a transition another orchestrator
        already recorded is not alerted twice. A slow database does not hold
        an alert back; it is then sent from memory.
        """
        batch, self._new = self._new, []
        if not batch:
            return
        log_events(batch)
        flips = flip_rows(batch, self.clock)
        committed = self._writer.submit(flips)
        lost: set[str] = set()
        # Known down: do not make every batch wait db_timeout in turn behind the one before.
        wait = self.config.db_timeout if self._writer.healthy else 0.0
        if any(f.event is not None for f in flips):  # else nothing to alert: no need to wait for the verdict
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow our own cancellation
                # when the write completes at that moment, and the outbox then never stops.
                async with asyncio.timeout(wait):
                    lost = await asyncio.shield(committed)
            except TimeoutError:
                log.warning("database slow: publishing %d transitions before it confirms them", len(batch))
        # A change that raises an alert is published with it; the rest (unknown -> alive after a
        # start, alive -> unknown on a lost link) waits in the refresher's paced queue.
        for t in batch:
            if t.event is not None:
                self._status_due.add(t.runtime_id)
            else:
                self.refresher.later(t.runtime_id)
        self.queue_alerts([f for f in flips if f.event is not None and f.runtime_id not in lost])
        if lost:
            self.stats["conflicts.recorded_elsewhere"] += len(lost)

    async def publish_due(self) -> None:
        """Publish the alerts, then the statuses, that are due; mark the alerts notified."""
        due, self._status_due = self._status_due, set()
        alerts, self._unsent_alerts = self._unsent_alerts, []
        try:
            if alerts:
                await self._link.send(self._statuses.alert(f) for f in alerts)
        except BaseException:
            # Not sent (already committed): keep it for the next connection, ahead of anything newer.
            self._unsent_alerts = alerts + self._unsent_alerts
            self._status_due |= due
            raise
        self.stats["alerts"] += len(alerts)
        for f in alerts:
            self.confirm(f.key)
        try:
            if due:
                await self._link.send(self._statuses.status(rid) for rid in due)
        except BaseException:
            self._status_due |= due
            raise

    def queue_alerts(self, flips: list[FlipRow]) -> None:
        """Send these flips' notices: on the alert topic (with the statuses) and through the dispatcher."""
        if not flips:
            return
        for f in flips:
            self._awaiting[f.key] = 2
        self._unsent_alerts += flips
        self._dispatcher.submit(
            Notice(f.event or "", f.runtime_id, f.at, f.last_seen, f.reason, key=f.key) for f in flips
        )

    def confirm(self, key: object) -> None:
        """One more channel has this flip's notice; once all have it the database marks it notified."""
        if not isinstance(key, tuple) or key not in self._awaiting:
            return
        self._awaiting[key] -= 1
        if self._awaiting[key] <= 0:
            del self._awaiting[key]
            self._writer.mark_notified(key)

    async def publish_alert_payload(self, payload: bytes) -> None:
        """The dispatcher's summaries on the alert topic (its MqttNotifier)."""
        try:
            await self._link.publish(self._statuses.topics.alerts, payload, qos=1)
        except LinkError as exc:
            raise NotifyError(str(exc), retryable=True) from exc

    async def run_redelivery(self, ready: asyncio.Event) -> None:
        """Send the notices owed from before: flips committed but never notified (a crash, a lost link).

        Runs at start and every ``outbox_interval``; only flips whose lease
        ran out are taken, so notices another live orchestrator is sending
        are left to it.
        """
        while True:
            if self._link.connected and ready.is_set():
                try:
                    owed = await self._db(self._db.store.claim_unnotified, time.time(), lease=self.config.outbox_lease)
                except Exception as exc:
                    log.warning("cannot read the outbox: %s", exc)
                    owed = []
                owed = [f for f in owed if f.key not in self._awaiting]  # ours, still on their way
                if owed:
                    log.info("sending %d notices owed from before", len(owed))
                    self.queue_alerts(owed)
                    self._wake.set()
            await asyncio.sleep(self.config.outbox_interval)


def flip_rows(batch: list[Transition], clock: WallClock) -> list[FlipRow]:
    """The database's rows of these transitions (wall-clock times); 100,000 at once after a start."""
    wall, wall_or_none = clock.wall, clock.wall_or_none
    return [
        FlipRow(t.runtime_id, t.old.value, t.new.value, t.event, t.reason, wall(t.at), wall_or_none(t.last_seen))
        for t in batch
    ]


def log_events(batch: list[Transition]) -> None:
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

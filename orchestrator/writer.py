"""The writer: the one task that writes to the database, retrying until it can.

It takes flips (state changes, each with its alert event) from the outbox,
marks flips notified once every channel has them, and flushes last-seen times
every ``flush_interval``. A slow or absent database never loses a flip and
never holds a verdict: the outbox waits for a commit at most ``db_timeout``,
and flips that raise an alert are written first, alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Iterator

from runtime_agent.backoff import backoff_delays

from .clock import WallClock
from .config import Config
from .database import Database
from .detector import Detector
from .store import FlipRow, in_key_order

log = logging.getLogger("orchestrator")

_WRITE_BATCH = 1_000
"""Flips per transaction at most (those raising alerts are never split: they go first)."""

Key = tuple[str, float]
"""A flip's identity: ``(runtime_id, at)``."""


class FlipQueue:
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


class _SeenFlush:
    """One last-seen flush in progress: what it took from the detector, and what is still to write."""

    def __init__(self, taken: dict[str, float], offset: float) -> None:
        self.taken = taken
        self.backlog: Iterator[list[tuple[str, float]]] = in_key_order(taken, offset)
        self.done = False

    def rows(self, waiting: threading.Event | None) -> Iterator[list[tuple[str, float]]]:
        """The flush's chunks of ``(runtime_id, wall-clock last seen)``, read on the database thread.

        Stops between chunks once an alert is ``waiting``; ``done`` once the backlog is exhausted.
        """
        for chunk in self.backlog:
            yield chunk
            if waiting is not None and waiting.is_set():
                return
        self.done = True


class Writer:
    """Owns the database's write queue: flips, notified marks, last-seen flushes."""

    def __init__(
        self,
        *,
        db: Database,
        detector: Detector,
        clock: WallClock,
        config: Config,
    ) -> None:
        self._db = db
        self.detector = detector
        self.clock = clock
        self.flush_interval = config.flush_interval
        self.outbox_lease = config.outbox_lease
        self.pending = FlipQueue()
        self._waiters: list[asyncio.Future[set[str]]] = []
        self._notified: set[Key] = set()
        self._wake = asyncio.Event()
        self._flush_due = False
        self._flush_all = False
        """Set by a clean stop: the next flush takes every last-seen time not yet stored, not just those due."""
        self._flush: _SeenFlush | None = None
        self.healthy = True
        """False after a failed write until one succeeds: verdicts then go out without waiting for it."""

    def submit(self, flips: list[FlipRow]) -> asyncio.Future[set[str]]:
        """Queue flips; the future gives the runtimes whose flip another orchestrator recorded first."""
        self.pending.extend(flips)
        future: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._wake.set()
        return future

    def mark_notified(self, key: Key) -> None:
        """Every channel has this flip's notice: the next transaction marks it notified."""
        self._notified.add(key)
        self._wake.set()

    def flush_seen(self) -> None:
        """Write the last-seen times that are due (the flush timer, or a test)."""
        self._flush_due = True
        self._wake.set()

    @property
    def flushing(self) -> bool:
        """Whether a last-seen flush is under way or due."""
        return self._flush is not None or self._flush_due

    async def run(self) -> None:
        """Write whenever there is something to write; after a failure, retry with backoff."""
        delays = backoff_delays(0.5, 10.0)
        while True:
            await self._wake.wait()
            self._wake.clear()
            if await self.write_once():
                delays = backoff_delays(0.5, 10.0)
            else:
                await asyncio.sleep(next(delays))
                self._wake.set()

    async def run_flush_timer(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            self.flush_seen()

    async def write_once(self, limit: int | None = _WRITE_BATCH) -> bool:
        """One transaction: pending flips (at most ``limit``), notified marks, and the last-seen flush when due.

        Flips that raise an alert go first and alone, whole runtimes at a
        time: the unknown -> alive wave after a start (100,000 flips) must not
        hold a verdict's alert behind it. The last-seen flush (100,000 rows with
        100,000 runtimes, some 100 ms) is written a chunk at a time and gives
        way when an alert's flips arrive: the transaction commits what it
        has, the next one writes the alert's flips alone, and the flush goes
        on after. With no alerts, a flush is still one transaction.
        """
        flips = self.pending.take(limit)
        if self.pending:
            self._wake.set()  # the rest in the next transaction
        waiters, self._waiters = self._waiters, []
        marks, self._notified = self._notified, set()
        alive_at = None
        if self._flush_due and self._flush is None:
            self._flush_due = False
            taken = self.detector.seen.take_all() if self._flush_all else self.detector.seen.take()
            self._flush = _SeenFlush(taken, self.clock.offset)
            alive_at = time.time()
        flush = self._flush
        if flush is not None and limit is not None and any(f.event is not None for f in flips):
            flush = None  # an alert waits for this commit: the flush goes on in the next transaction
            self._wake.set()
        seen = None if flush is None else flush.rows(self.pending.alert_waiting if limit is not None else None)
        if not flips and seen is None and not marks and alive_at is None:
            _resolve(waiters, set())
            return True
        now = time.time()
        # A notice that went out before its flip was written is written as notified.
        flips = [dataclasses.replace(f, notified_at=now) if f.key in marks else f for f in flips]
        try:
            lost = await self._db(
                self._db.store.record,
                flips,
                seen or {},
                now=now,
                lease=self.outbox_lease,
                alive_at=alive_at,
                notified=list(marks),
            )
        except Exception as exc:
            self._failed(exc, flips, waiters, marks)
            with contextlib.suppress(Exception):
                await self._db(self._db.store.reconnect)
            return False
        self.healthy = True
        _resolve(waiters, lost)
        if self._flush is not None:
            if self._flush.done:
                self._flush = None
            if self._flush is not None or self._flush_due:
                self._wake.set()  # the rest of the flush (or the next one) in the next transaction
        return True

    def _failed(
        self, exc: Exception, flips: list[FlipRow], waiters: list[asyncio.Future[set[str]]], marks: set[Key]
    ) -> None:
        """Keep everything of a failed transaction for the next one."""
        self.healthy = False
        log.error("database write failed (%d transitions kept for retry): %s", len(flips), exc)
        self.pending.put_back(flips)
        self._waiters[:0] = waiters
        self._notified |= marks
        if self._flush is not None:
            # Some of the flush may be stored already; giving all of it back is harmless (newer times win).
            self.detector.seen.give_back(self._flush.taken)
            self._flush, self._flush_due = None, True

    async def final_flush(self) -> None:
        """At a clean stop: every flip and every last-seen time not yet stored (10 s at most), then close."""
        self._flush_due = self._flush_all = True
        try:
            async with asyncio.timeout(10):
                while True:
                    if not await self.write_once(limit=None):
                        await asyncio.sleep(0.5)
                    elif not self.flushing:
                        break
        except TimeoutError:
            log.error("database unavailable at shutdown: %d transitions not stored", len(self.pending))
        with contextlib.suppress(Exception):
            await self._db(self._db.store.close)


def _resolve(waiters: list[asyncio.Future[set[str]]], lost: set[str]) -> None:
    for future in waiters:
        if not future.done():
            future.set_result(lost)

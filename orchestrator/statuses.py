"""Retained documents for dashboards: each runtime's status, the orchestrator's stats, and the paced refresh.

A broker that restarted without persistence (the embedded one always) has
lost every retained status; the refresher republishes them after each
(re)connect, 500 at a time, and only while the outbox is idle, so verdicts
and pulses come first. Changes that raise no alert (unknown -> alive after a
start) take the same paced queue: 100,000 statuses at once would hold up the
pulses for as long as they take.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from runtime_agent import protocol
from runtime_agent.protocol import Topics

from .clock import WallClock
from .detector import Detector
from .ingest import Message
from .link import LinkError
from .store import FlipRow


class Statuses:
    """Builds the messages: a runtime's retained status as it is now, and an alert from a flip."""

    def __init__(self, *, topics: Topics, detector: Detector, clock: WallClock) -> None:
        self.topics = topics
        self.detector = detector
        self.clock = clock

    def status(self, runtime_id: str) -> Message:
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

    def alert(self, f: FlipRow) -> Message:
        assert f.event is not None
        payload = protocol.encode_alert(f.event, f.runtime_id, at=f.at, last_seen=f.last_seen, reason=f.reason)
        return self.topics.alerts, payload, False


class Sender(Protocol):
    """The link's bulk publish (:meth:`orchestrator.link.BrokerLink.send`)."""

    @property
    def connected(self) -> bool: ...

    async def send(self, messages: Iterable[Message]) -> None: ...


class Publisher(Protocol):
    """The link's single publish (:meth:`orchestrator.link.BrokerLink.publish`)."""

    @property
    def connected(self) -> bool: ...

    async def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False) -> None: ...


class Refresher:
    """Republishes statuses, paced, behind the outbox's work."""

    def __init__(
        self,
        *,
        statuses: Statuses,
        link: Sender,
        idle: Callable[[], Awaitable[None]],
        batch: int = 500,
        pause: float = 0.05,
    ) -> None:
        self._statuses = statuses
        self._link = link
        self._idle = idle
        """Awaited before each batch: the outbox has no verdicts in hand."""
        self.batch = batch
        self.pause = pause
        self._queue: collections.deque[str] = collections.deque()
        self._queued: set[str] = set()
        """The IDs in ``_queue``, so a runtime waits there once however often it changes."""
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def all(self, runtime_ids: Iterable[str]) -> None:
        """Queue every runtime's status (after a connect: the broker may have lost them), replacing the queue."""
        self._queue = collections.deque(runtime_ids)
        self._queued = set(self._queue)
        self._wake.set()

    def later(self, runtime_id: str) -> None:
        """Queue a runtime's status (paced), unless it is queued already."""
        if runtime_id not in self._queued:
            self._queued.add(runtime_id)
            self._queue.append(runtime_id)
            self._wake.set()

    async def run(self) -> None:
        """At most ``batch / pause`` statuses a second (10,000)."""
        while True:
            await self._wake.wait()
            # Verdicts first: a burst of them (a mass death during the refresh after a start) must not
            # share the broker's in-flight window, the event loop and the observers' links with it.
            await self._idle()
            if not self._link.connected or not self._queue:
                self._wake.clear()
                continue
            batch = [self._queue.popleft() for _ in range(min(self.batch, len(self._queue)))]
            if self._queue:
                self._queued.difference_update(batch)
            else:
                self._queued = set()  # a set never shrinks: drop the one that held them all
            try:
                await self._link.send(self._statuses.status(rid) for rid in batch)
            except LinkError:
                for rid in reversed(batch):
                    if rid not in self._queued:
                        self._queued.add(rid)
                        self._queue.appendleft(rid)
                self._wake.clear()  # woken again on the next connect
                continue
            await asyncio.sleep(self.pause)


class StatsPublisher:
    """Publishes the orchestrator's counters, retained, every ``interval`` seconds (monitoring the monitor)."""

    def __init__(self, *, topic: str, counters: Callable[[], dict[str, Any]], link: Publisher, interval: float) -> None:
        self.topic = topic
        self.counters = counters
        self._link = link
        self.interval = interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._link.connected:
                with contextlib.suppress(LinkError):
                    await self._link.publish(self.topic, json.dumps(self.counters()), qos=0, retain=True)

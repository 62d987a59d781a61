"""What the dashboard, ``/metrics`` and the stats topic read: a read-only view over the rooms.

It implements :class:`orchestrator.web.DashboardSource`; nothing here
changes state except the listeners list the web server subscribes to.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping
from typing import Any

from runtime_agent import protocol

from .clock import WallClock
from .detector import Detector, Transition
from .dispatch import Dispatcher
from .intake import Intake
from .metrics import LatencyHistogram
from .outbox import Outbox
from .store import RuntimeRow, Store
from .writer import Writer


class Overview:
    """Counters and runtime documents, in the shapes the web server and the stats topic publish."""

    def __init__(
        self,
        *,
        detector: Detector,
        clock: WallClock,
        stats: collections.Counter[str],
        intake: Intake,
        outbox: Outbox,
        writer: Writer,
        store: Store,
        dispatcher: Dispatcher,
        verdict_latency: LatencyHistogram,
        ready: asyncio.Event,
    ) -> None:
        self.detector = detector
        self.clock = clock
        self.stats = stats
        self._intake = intake
        self._outbox = outbox
        self._writer = writer
        self._store = store
        self._dispatcher = dispatcher
        self.verdict_latency = verdict_latency
        """Seconds from a runtime's deadline to its dead verdict, for ``/metrics``."""
        self._ready = ready
        self.listeners: list[Callable[[Transition], None]] = outbox.listeners

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

    def runtimes(self) -> list[dict[str, Any]]:
        return [row.status() for row in self.rows()]

    def runtime(self, runtime_id: str) -> dict[str, Any] | None:
        if runtime_id not in self.detector:
            return None
        v = self.detector.view(runtime_id)
        last_seen, since = self.clock.wall_or_none(v.last_seen), self.clock.wall(v.since)
        return protocol.status_dict(runtime_id, v.state.value, v.interval, v.grace, last_seen, since, v.reason)

    def is_ready(self) -> bool:
        return self._ready.is_set()

    def notification_stats(self) -> Mapping[tuple[str, str], int]:
        """Notifications by ``(channel, outcome)``: sent, failed, retried, dropped."""
        return self._dispatcher.stats

    def outbox_backlog(self) -> int:
        """Transitions not yet stored, and notices not yet sent on every channel."""
        return len(self._outbox)

    def counters(self) -> dict[str, Any]:
        """What the orchestrator has done so far, for the stats topic and the shutdown log."""
        stats = self.stats
        return {
            "runtimes": len(self.detector),
            "states": {state.value: n for state, n in self.detector.counts.items()},
            "pulses": self._intake.pulses,
            "rejected": {k.removeprefix("rejected."): v for k, v in stats.items() if k.startswith("rejected.")},
            "dropped": {k.removeprefix("dropped."): v for k, v in stats.items() if k.startswith("dropped.")},
            "alerts": stats["alerts"],
            "registrations": stats["registrations"],
            "registration": {
                what: stats[f"registration.{what}"]
                for what in ("received", "confirmed", "rejected", "healed", "fetched", "fetched_refused", "replies")
            },
            "unregistered_pulses": stats["unregistered_pulses"],
            "db_transactions": self._store.transactions,
            "pending_writes": len(self._writer.pending),
            "refresh_pending": len(self._outbox.refresher),
            "uptime_s": round(time.monotonic() - self.clock.mono0, 3),
        }

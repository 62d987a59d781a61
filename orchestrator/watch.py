"""The watch: sleeps until the detector's next deadline, proves the link, then collects verdicts.

It also holds live wills until an echo proves the link (a broker going down
sends every will at once, then drops us too), and runs the stall sentinel: a
process that was paused or starved restarts its watch instead of judging
pulses it has not read yet.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Protocol

from .config import Config
from .detector import Detector, NotRegistered, Transition
from .metrics import LatencyHistogram

log = logging.getLogger("orchestrator")

_WILL_GATHER = 0.05
"""Seconds the watch waits after a will for the rest of its burst, before proving the link."""
_SETTLE_BUDGET = 1_000
"""Stale deadlines re-armed per event-loop turn (1-7 ms of work, the database thread permitting)."""


class Verdicts(Protocol):
    def emit(self, transition: Transition) -> None: ...


class Link(Protocol):
    """What the watch needs of the broker link: a round trip through the broker, and a way to give up on it."""

    async def prove(self) -> float | None: ...

    def declare_lost(self) -> None: ...


class Watch:
    """Deadlines, wills and stalls; the only room that turns silence into verdicts."""

    def __init__(
        self,
        *,
        detector: Detector,
        verdicts: Verdicts,
        link: Link,
        stats: collections.Counter[str],
        config: Config,
    ) -> None:
        self.detector = detector
        self._verdicts = verdicts
        self._link = link
        self._stats = stats
        self.echo_timeout = config.echo_timeout
        self.stall_threshold = config.stall_threshold
        self.verdict_latency = LatencyHistogram()
        """Seconds from a runtime's deadline to its dead verdict, for ``/metrics``."""
        self._wake = asyncio.Event()
        self._wills: list[tuple[str, float, int | None]] = []
        """Wills received (runtime, receipt time, session), applied once an echo proves the link."""
        self._sentinel_timer: asyncio.TimerHandle | None = None

    def rearm(self) -> None:
        """A deadline may have moved earlier (a registration, a revival): look again."""
        self._wake.set()

    def will(self, runtime_id: str, received: float, session: int | None) -> None:
        """A live will: applied as of its receipt once an echo proves the link."""
        self._wills.append((runtime_id, received, session))
        self._wake.set()

    def apply_wills(self) -> None:
        """Apply the wills received so far, as of their receipt: the link has just proved itself."""
        wills, self._wills = self._wills, []
        for runtime_id, received, session in wills:
            with contextlib.suppress(NotRegistered):  # deregistered meanwhile
                transition = self.detector.offline(runtime_id, received, session)
                if transition is not None:
                    self._verdicts.emit(transition)

    # --- the stall sentinel --------------------------------------------------

    def start_sentinel(self) -> None:
        self.sentinel(time.monotonic())

    @property
    def watching_stalls(self) -> bool:
        return self._sentinel_timer is not None

    def stop_sentinel(self) -> None:
        if self._sentinel_timer is not None:
            self._sentinel_timer.cancel()
            self._sentinel_timer = None

    def sentinel(self, planned: float) -> None:
        """Notice this process stalling (paused, swapped, starved); runs every ``stall_threshold / 4``.

        Pulses that arrived during a stall are still unread, so a deadline that
        fell due meanwhile proves nothing: the watch starts afresh, as after a
        reconnect. A plain callback, not a task: once the loop runs again it
        fires in the same turn as the watch's timer, before the watch's next
        step can judge, whatever the watch was doing when it stopped.
        """
        now = time.monotonic()
        late = now - planned
        if late > self.stall_threshold:
            self._stats["stalls"] += 1
            deadline = self.detector.next_deadline()
            if self.detector.suspended:
                log.warning("stalled for %.1f s while cut off from the broker (judging nobody anyway)", late)
            elif deadline is not None and deadline <= now:
                log.warning("stalled for %.1f s: restarting the watch instead of judging", late)
                self.detector.resume(now)
                self._wake.set()
            else:
                log.warning("stalled for %.1f s; nothing fell due meanwhile", late)
        tick = self.stall_threshold / 4
        self._sentinel_timer = asyncio.get_running_loop().call_later(tick, self.sentinel, now + tick)

    # --- the watch itself ----------------------------------------------------

    async def run(self) -> None:
        """Sleep until the next deadline (or until re-armed), then collect verdicts."""
        while True:
            deadline = self.detector.next_deadline()
            delay = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            await self._step(time.monotonic())

    async def _step(self, now: float) -> None:
        if self.detector.suspended:
            # Cut off from the broker: whoever falls due is unknown, not dead (no alert).
            self._wills.clear()
            for transition in self.detector.expire(now):
                self._verdicts.emit(transition)
            return
        if self.detector.settle(now, _SETTLE_BUDGET):
            await asyncio.sleep(0)  # more to re-arm: go on once the event loop has read what came meanwhile
            self._wake.set()
            return
        if not self._wills and not self.detector.overdue(now):
            return
        if self._wills:
            # A will rarely comes alone (a host, a switch, a broker): gather the burst into one batch,
            # so storm control sees one outage rather than a trickle.
            await asyncio.sleep(_WILL_GATHER)
        round_trip = await self._link.prove()
        if round_trip is None:
            self._link_failed()
            return
        self.apply_wills()
        # A pulse takes about as long through the broker as our echo did: judge as of that long
        # ago, so a congested broker (pulses sent in time, delivered late) kills nobody.
        verdict_at = time.monotonic()
        for transition in self.detector.expire(verdict_at - round_trip):
            if transition.deadline is not None:
                self.verdict_latency.observe(max(0.0, verdict_at - transition.deadline))
            self._verdicts.emit(transition)

    def _link_failed(self) -> None:
        self._stats["echo_timeouts"] += 1
        log.warning(
            "no echo from the broker within %.1f s: the link is broken, judging nobody until it is back",
            self.echo_timeout,
        )
        if self._wills:
            log.warning("ignoring %d wills received as the link failed", len(self._wills))
            self._wills.clear()
        self.detector.suspend()
        self._link.declare_lost()

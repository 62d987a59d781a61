"""Delivery of notices, decoupled from detection.

The service hands notices to :meth:`Dispatcher.submit`, which never waits:
it decides what to send (silences, storm control) and queues one job per
matching route. Each route has its own queue and task, so a slow or broken
channel delays nobody but itself. The decisions that need no I/O live in
:mod:`orchestrator.storm` and :class:`orchestrator.silence.SilenceBook`,
tested on a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import heapq
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runtime_agent.protocol import iso

from .notify import EVENTS, Notice, Notifier, NotifyError, ShellNotifier, channel_from_url
from .silence import Silence, SilenceBook, is_glob
from .storm import OWN, Emission, RetryPolicy, StormGate, StormPolicy

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Route:
    """A channel and what it wants: ``events`` (None: all) and runtime globs (empty: all)."""

    channel: Notifier
    events: frozenset[str] | None = None
    runtimes: tuple[str, ...] = ()
    name: str = ""
    _regex: re.Pattern[str] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.channel.name)
        unknown = sorted(set(self.events or ()) - set(EVENTS))
        if unknown:
            raise ValueError(f"route {self.name}: unknown event(s) {', '.join(unknown)} (known: {', '.join(EVENTS)})")
        if self.runtimes:
            regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self.runtimes))
            object.__setattr__(self, "_regex", regex)

    def matches(self, runtime_id: str) -> bool:
        return self._regex is None or self._regex.match(runtime_id) is not None

    def select(self, notice: Notice, members: Sequence[str] = (), max_ids: int = 20) -> Notice | None:
        """The notice this route should get, or None.

        A group notice passes if any of its runtimes match; it is narrowed to
        those (when ``members`` lists them all). ``monitor_down`` and group
        notices that name no runtime concern the monitor itself and always pass.
        """
        if self.events is not None and notice.event not in self.events:
            return None
        if self._regex is None or notice.event == "monitor_down":
            return notice
        if notice.runtime_id is not None:
            return notice if self.matches(notice.runtime_id) else None
        ids = members or notice.runtime_ids
        if not ids:
            return notice
        matching = [rid for rid in ids if self.matches(rid)]
        if not matching:
            return None
        if not members or len(matching) == len(members):
            return notice
        return dataclasses.replace(notice, count=len(matching), runtime_ids=tuple(matching[:max_ids]))


class _Ticket:
    """How many routes still owe an answer for the submitted notices in ``covers``."""

    __slots__ = ("covers", "remaining")

    def __init__(self, covers: tuple[Notice, ...], remaining: int) -> None:
        self.covers = covers
        self.remaining = remaining


@dataclass(slots=True)
class _Lane:
    route: Route
    queue: deque[tuple[Notice, _Ticket]] = dataclasses.field(default_factory=deque)
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    busy: bool = False
    task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _Dead:
    """A dead runtime awaiting its next reminder."""

    due: float
    since: float
    last_seen: float | None


class Dispatcher:
    """Routes notices to channels, with storm control, reminders, silences and retries.

    ``on_delivered(notice)`` is called once per submitted notice, when every
    route it went to has handled it (sent, or finally failed, or dropped), or
    at once when it goes nowhere (silenced, no matching route). It may be
    called from within :meth:`submit`.
    """

    def __init__(
        self,
        routes: Iterable[Route],
        *,
        clock: Callable[[], float] = time.time,
        storm: StormPolicy | None = None,
        reminder_interval: float | None = None,
        silences: SilenceBook | None = None,
        population: Callable[[], int] = lambda: 0,
        state_of: Callable[[str], str | None] = lambda runtime_id: None,
        on_delivered: Callable[[Notice], None] | None = None,
        retry: RetryPolicy | None = None,
        queue_limit: int = 10_000,
    ) -> None:
        self.routes = list(routes)
        names = [r.name for r in self.routes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"route names must be unique (they key the stats): {', '.join(duplicates)}")
        self.clock = clock
        self.storm = storm or StormPolicy()
        self.reminder_interval = reminder_interval
        self.silences = silences if silences is not None else SilenceBook()
        self.population = population
        self.state_of = state_of
        self.on_delivered = on_delivered
        self.retry = retry or RetryPolicy()
        self.queue_limit = queue_limit
        self.stats: Counter[tuple[str, str]] = Counter()
        """``(route name, outcome)`` -> count; outcomes: sent, failed, retried, dropped."""
        self._lanes = [_Lane(route) for route in self.routes]
        self._dead_gate = StormGate(self.storm, "outage", "died")
        self._recovered_gate = StormGate(self.storm, "outage_recovered", "recovered")
        self._reminder_gate = StormGate(self.storm, "reminder", "are still dead")
        self._gates = (self._dead_gate, self._recovered_gate, self._reminder_gate)
        self._held: dict[str, float | None] = {}  # silenced runtime -> last_seen of its latest held dead notice
        self._dead: dict[str, _Dead] = {}
        self._reminders: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._closed = False

    # --- the hot path: no awaits --------------------------------------------------

    def submit(self, notices: Iterable[Notice]) -> None:
        """Decide and queue; never blocks. One call is one batch for storm control."""
        now = self.clock()
        visible: list[Notice] = []
        for notice in notices:
            rid = notice.runtime_id
            if rid is not None:
                self._watch(notice, now)
                if self.silences.is_silenced(rid, now):
                    self._held[rid] = notice.last_seen if notice.event == "dead" else self._held.get(rid)
                    self._finish((notice,))
                    continue
            visible.append(notice)
        if visible:
            population = self.population()
            for emission in self._gated(visible, now, population):
                self._route(emission)
        self._wake.set()

    def _gated(self, notices: list[Notice], now: float, population: int) -> list[Emission]:
        """Per-runtime dead/recovered notices through their storm gates, in submission order."""
        gates = {"dead": self._dead_gate, "recovered": self._recovered_gate}
        kinds = {kind: [n for n in notices if n.event == kind and n.runtime_id is not None] for kind in gates}
        verdicts = {kind: gates[kind].admit(batch, now, population) for kind, batch in kinds.items() if batch}
        out: list[Emission] = []
        flushed: set[str] = set()
        for notice in notices:
            kind = notice.event if notice.event in gates and notice.runtime_id is not None else None
            if kind is None:
                out.append(Emission(notice, (notice,)))
                continue
            absorbed, emissions = verdicts[kind]
            if kind not in flushed:
                flushed.add(kind)
                out.extend(emissions)
            if not absorbed:
                out.append(Emission(notice, (notice,)))
        return out

    def _watch(self, notice: Notice, now: float) -> None:
        """Reminder bookkeeping: a heap entry per dead runtime, invalidated lazily."""
        if self.reminder_interval is None:
            return
        rid = notice.runtime_id
        assert rid is not None
        if notice.event == "dead":
            due = now + self.reminder_interval
            self._dead[rid] = _Dead(due, notice.at, notice.last_seen)
            heapq.heappush(self._reminders, (due, rid))
        elif notice.event in ("recovered", "stopped"):
            self._dead.pop(rid, None)

    def _route(self, emission: Emission) -> None:
        jobs = []
        for lane in self._lanes:
            notice = lane.route.select(emission.notice, emission.members, self.storm.max_ids)
            if notice is not None:
                jobs.append((lane, notice))
        if not jobs:
            self._finish(emission.covers)
            return
        ticket = _Ticket(emission.covers, len(jobs))
        for lane, notice in jobs:
            if len(lane.queue) >= self.queue_limit:
                dropped, old_ticket = lane.queue.popleft()
                self.stats[lane.route.name, "dropped"] += 1
                log.warning("%s: queue full, dropped the oldest notice (%s)", lane.route.name, dropped.title())
                self._done(old_ticket)
            lane.queue.append((notice, ticket))
            lane.wake.set()

    def _done(self, ticket: _Ticket) -> None:
        ticket.remaining -= 1
        if ticket.remaining == 0:
            self._finish(ticket.covers)

    def _finish(self, notices: Iterable[Notice]) -> None:
        if self.on_delivered is None:
            return
        for notice in notices:
            if notice.key is OWN:
                continue
            try:
                self.on_delivered(notice)
            except Exception:
                log.exception("on_delivered failed for %s", notice.title())

    # --- timers ---------------------------------------------------------------------

    def tick(self) -> None:
        """Act on everything due as of ``clock()``: silence ends, reminders, storm updates."""
        now = self.clock()
        emissions: list[Emission] = []
        for ended in self.silences.expired(now):
            emissions += self._silence_over(ended, now, "expired")
        population = self.population()
        reminders = self._due_reminders(now)
        absorbed, gated = self._reminder_gate.admit(reminders, now, population)
        emissions += gated
        if not absorbed:
            emissions += [Emission(n, ()) for n in reminders]
        for gate in (self._dead_gate, self._recovered_gate):
            update = gate.poll(now)
            if update is not None:
                emissions.append(update)
        for emission in emissions:
            self._route(emission)

    def _due_reminders(self, now: float) -> list[Notice]:
        interval = self.reminder_interval
        due: list[Notice] = []
        while interval is not None and self._reminders and self._reminders[0][0] <= now:
            at, rid = heapq.heappop(self._reminders)
            dead = self._dead.get(rid)
            if dead is None or dead.due != at:
                continue  # recovered, or re-scheduled since
            if self.state_of(rid) != "dead":
                del self._dead[rid]
                continue
            dead.due = max(at + interval, now + interval / 2)  # after a long pause, one reminder, not a burst
            heapq.heappush(self._reminders, (dead.due, rid))
            if not self.silences.is_silenced(rid, now):
                reason = f"dead since {iso(dead.since)}"
                due.append(Notice("reminder", rid, now, dead.last_seen, reason, key=OWN))
        return due

    def _silence_over(self, ended: Silence, now: float, how: str) -> list[Emission]:
        """``silence_ended``, then one ``dead`` per held runtime that is no longer silenced and still dead."""
        what = f"silence on {ended.pattern!r} {how}" + (f" ({ended.reason})" if ended.reason else "")
        rid = None if is_glob(ended.pattern) else ended.pattern
        emissions = [
            Emission(Notice("silence_ended", rid, now, None, what, count=0 if rid is None else 1, key=OWN), ())
        ]
        freed = sorted(r for r in self._held if ended.matches(r) and not self.silences.is_silenced(r, now))
        still_dead = []
        for runtime_id in freed:
            last_seen = self._held.pop(runtime_id)
            if self.state_of(runtime_id) == "dead":
                still_dead.append(Notice("dead", runtime_id, now, last_seen, f"still dead; {what}", key=OWN))
        absorbed, gated = self._dead_gate.admit(still_dead, now, self.population())
        emissions += gated
        if not absorbed:
            emissions += [Emission(n, ()) for n in still_dead]
        return emissions

    def next_deadline(self) -> float | None:
        """The earliest wall-clock time :meth:`tick` has something to do."""
        deadlines = [self.silences.next_expiry(), *(g.next_deadline() for g in self._gates)]
        if self._reminders:
            deadlines.append(self._reminders[0][0])
        return min((d for d in deadlines if d is not None), default=None)

    # --- silences -------------------------------------------------------------------

    def silence(self, pattern: str, until: float, reason: str | None = None) -> Silence:
        """Silence ``pattern`` (an ID or a glob) until wall-clock ``until``."""
        entry = self.silences.silence(pattern, until, reason)
        self._wake.set()
        return entry

    def unsilence(self, pattern: str) -> bool:
        """Lift a silence now: held runtimes that are still dead are announced at once."""
        entry = self.silences.get(pattern)
        if entry is None or not self.silences.unsilence(pattern):
            return False
        for emission in self._silence_over(entry, self.clock(), "lifted"):
            self._route(emission)
        self._wake.set()
        return True

    def restore_held(self, runtime_ids: Iterable[str]) -> None:
        """After a restart: runtimes (the dead ones) to re-check when the silence covering them ends."""
        now = self.clock()
        for rid in runtime_ids:
            if self.silences.is_silenced(rid, now):
                self._held.setdefault(rid, None)

    # --- delivery -------------------------------------------------------------------

    def backlog(self) -> int:
        """Notices queued or being delivered, over all routes."""
        return sum(len(lane.queue) + lane.busy for lane in self._lanes)

    async def run(self) -> None:
        """Deliver until :meth:`aclose`: one task per route, and the timers here."""
        self._start_lanes()
        try:
            while not self._closed:
                self._wake.clear()
                self.tick()
                deadline = self.next_deadline()
                # Capped: the clock is wall time, which may jump.
                timeout = 30.0 if deadline is None else min(30.0, max(0.0, deadline - self.clock()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel on 3.11
                        await self._wake.wait()
        finally:
            await self._stop_lanes()

    def _start_lanes(self) -> None:
        for lane in self._lanes:
            if lane.task is None or lane.task.done():
                lane.task = asyncio.create_task(self._work(lane), name=f"notify {lane.route.name}")

    async def _stop_lanes(self) -> None:
        tasks = [lane.task for lane in self._lanes if lane.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self._lanes:
            lane.task = None
            lane.busy = False

    async def aclose(self, drain: float = 0.0) -> None:
        """Stop delivering (after up to ``drain`` seconds for what is queued) and close the channels."""
        if drain > 0:
            now = self.clock()
            for gate in self._gates:
                gathered = gate.flush(now)
                if gathered is not None:
                    self._route(gathered)
            self._start_lanes()
            if self.backlog():
                self._idle.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(drain):
                        await self._idle.wait()
        self._closed = True
        self._wake.set()
        await self._stop_lanes()
        for route in self.routes:
            close = getattr(route.channel, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("closing %s failed", route.name)

    async def _work(self, lane: _Lane) -> None:
        while True:
            if not lane.queue:
                lane.wake.clear()
                await lane.wake.wait()
                continue
            notice, ticket = lane.queue.popleft()
            lane.busy = True
            await self._deliver(lane.route, notice)
            lane.busy = False
            self._done(ticket)  # not on cancellation: an unsent notice stays in the caller's outbox
            if not self.backlog():
                self._idle.set()

    async def _deliver(self, route: Route, notice: Notice) -> None:
        """Try up to ``retry.attempts`` times; log once when giving up."""
        attempts = self.retry.attempts
        delays = self.retry.delays()
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(self.retry.attempt_timeout):
                    await route.channel.notify(notice)
            except NotifyError as exc:
                error = exc
            except TimeoutError:
                error = NotifyError(f"no answer within {self.retry.attempt_timeout:g} s", retryable=True)
            except Exception as exc:  # a broken channel must not stop the lane
                log.exception("%s: unexpected error", route.name)
                error = NotifyError(f"{type(exc).__name__}: {exc}", retryable=False)
            else:
                self.stats[route.name, "sent"] += 1
                return
            if not error.retryable or attempt == attempts:
                self.stats[route.name, "failed"] += 1
                log.warning("%s: gave up on %r after %d attempt(s): %s", route.name, notice.title(), attempt, error)
                return
            self.stats[route.name, "retried"] += 1
            log.debug("%s: attempt %d failed, retrying: %s", route.name, attempt, error)
            await asyncio.sleep(self.retry.wait(next(delays), error.retry_after))


# --- from the configuration ----------------------------------------------------------


def build_routes(config: Config) -> list[Route]:
    """One route per ``notify`` entry; a channel that cannot be built is a ConfigError naming the entry."""
    from .config import ConfigError

    routes: list[Route] = []
    names: set[str] = set()
    for number, entry in enumerate(config.notify):
        try:
            channel: Notifier
            if entry.command is not None:
                channel = ShellNotifier(entry.command, timeout=entry.timeout, name=entry.name)
            else:
                assert entry.url is not None
                channel = channel_from_url(entry.url, timeout=entry.timeout, name=entry.name)
        except ValueError as exc:
            raise ConfigError(f"notify[{number}]: {exc}") from None
        name = channel.name if channel.name not in names else f"{channel.name} #{number + 1}"
        if name in names:
            raise ConfigError(f"notify[{number}]: name {name!r} is used twice")
        names.add(name)
        events = None if entry.events is None else frozenset(entry.events)
        routes.append(Route(channel, events, entry.runtimes, name))
    return routes


def storm_policy(config: Config) -> StormPolicy:
    return StormPolicy(config.storm_window, config.storm_count, config.storm_share, config.storm_max_ids)


def retry_policy(config: Config) -> RetryPolicy:
    return RetryPolicy(attempts=config.notify_retries + 1)

"""The failure detector: events and ``now`` in, transitions out.

Pure on purpose: no clock, no MQTT, no database. Every method takes ``now``
(seconds on the orchestrator's monotonic clock, at receipt) so the whole
state machine is tested with a fake clock.

Deadlines live in a heap with lazy re-arming: a pulse only stores ``now``
(a dict lookup and an attribute write), and a runtime's heap entry is
popped and pushed again about once per ``interval + grace``, not once per
pulse. Nothing ever walks every runtime on a timer.

Which last-seen times the database stores, and when, is not the detector's
business but :class:`~orchestrator.lastseen.LastSeen`'s (``Detector.seen``):
the detector tells it of re-arms, changes of state and first signs of life,
the moments it spends work on a runtime anyway, so the database's work
follows the runtimes' windows, not their pulses.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from .lastseen import LastSeen


class State(enum.Enum):
    UNKNOWN = "unknown"
    ALIVE = "alive"
    DEAD = "dead"
    STOPPED = "stopped"


ALIVE, DEAD, STOPPED, UNKNOWN = State.ALIVE, State.DEAD, State.STOPPED, State.UNKNOWN
_SHARED_VALUES = 4096
"""Distinct intervals and graces whose float objects :meth:`Detector.restore` shares."""
NEVER_RAN = "stopped before it ever ran"
"""The reason of a quiet stop (see :meth:`Detector.stopped`); its return to life is no ``recovered`` either."""
_WATCHED = (ALIVE, UNKNOWN)
"""States with a deadline: the two in which silence means death."""


class NotRegistered(KeyError):
    """A message for a runtime ID the detector does not know."""


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of a runtime's state; ``event`` names the alert it raises, if any."""

    runtime_id: str
    old: State
    new: State
    at: float
    last_seen: float | None
    reason: str
    event: str | None
    deadline: float | None = field(default=None, compare=False)
    """For a verdict of silence: the deadline it passed (verdict latency = ``at`` minus this)."""


@dataclass(frozen=True, slots=True)
class View:
    """A read-only snapshot of one runtime, for status documents."""

    runtime_id: str
    state: State
    interval: float
    grace: float
    last_seen: float | None
    since: float
    reason: str | None


class _Runtime:
    __slots__ = (
        "dead_session",
        "grace",
        "interval",
        "last_seen",
        "phase",
        "reason",
        "session",
        "since",
        "state",
        "stored",
        "token",
    )

    def __init__(self, interval: float, grace: float, state: State, since: float) -> None:
        self.interval = interval
        self.grace = grace
        self.state = state
        self.since = since
        self.reason: str | None = None
        self.last_seen: float | None = None
        self.stored: float | None = None
        """:class:`LastSeen`'s, not the detector's, like ``phase``: kept here for memory (see :mod:`.lastseen`)."""
        self.phase = 0.0
        self.token = 0
        """Identifies this runtime's one live heap entry; 0 when it has none."""
        self.session: int | None = None
        """The session number of the runtime's newest connection, from its birth message."""
        self.dead_session: int | None = None
        """The session declared dead by a will: its late pulses must not revive it."""


class Detector:
    """Tracks every registered runtime and decides alive, dead, stopped or unknown.

    No runtime goes dead before it has been watched for a full
    ``interval + grace`` since :meth:`resume` (start-up or broker reconnect),
    so a restart or a broker blip never raises a wave of false alerts.
    """

    def __init__(self, *, now: float, seen_every: float = 0.0) -> None:
        self._runtimes: dict[str, _Runtime] = {}
        self.seen = LastSeen(self._runtimes, seen_every)
        """The last-seen times for the database: a live runtime's is picked once in each period of ``seen_every`` s."""
        self._heap: list[tuple[float, int, str]] = []
        self._tokens = itertools.count(1)
        self._watch_from = now
        self._resumed_at = now
        """When :meth:`resume` was last called: ``_watch_from`` beyond it is an allowance."""
        self._suspended = False
        self._values: dict[float, float] = {}
        self.counts: dict[State, int] = dict.fromkeys(State, 0)
        """How many runtimes are in each state, kept as they change (never counted by a scan)."""
        self.session_changes: list[str] = []
        """Runtimes that just showed a session other than their newest (a live birth of a new one, or a
        pulse of another): signs of two claimants of one ID, for the caller to weigh and then clear."""
        self.heap_pops = 0
        """How many deadline entries have been examined: a measure of work, for tests."""

    # --- queries -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._runtimes)

    def __contains__(self, runtime_id: object) -> bool:
        return runtime_id in self._runtimes

    def ids(self) -> list[str]:
        return list(self._runtimes)

    def view(self, runtime_id: str) -> View:
        rt = self._get(runtime_id)
        return View(runtime_id, rt.state, rt.interval, rt.grace, rt.last_seen, rt.since, rt.reason)

    def views(self) -> Iterator[View]:
        for runtime_id in self._runtimes:
            yield self.view(runtime_id)

    def deadline(self, runtime_id: str) -> float | None:
        """When the runtime will be declared dead if it stays silent; None if not watched."""
        rt = self._get(runtime_id)
        return self._deadline(rt) if rt.state in _WATCHED else None

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`expire` may have work; None when idle.

        It may be early (the entry is re-armed lazily) but never late.
        """
        if not self._heap:
            return None
        return self._heap[0][0]

    @property
    def suspended(self) -> bool:
        return self._suspended

    # --- registration --------------------------------------------------------

    def register(
        self, runtime_id: str, interval: float, grace: float, now: float, *, live: bool = True
    ) -> Transition | None:
        """Add a runtime or change its interval.

        ``live`` is False for a retained request re-delivered at subscribe: it
        sets the interval but is no sign of life.
        """
        rt = self._runtimes.get(runtime_id)
        if rt is None:
            rt = self._runtimes[runtime_id] = _Runtime(interval, grace, UNKNOWN, now)
            rt.reason = "registered"
            self.seen.added(runtime_id, rt)
            self.counts[UNKNOWN] += 1
            self._arm(runtime_id, rt)
        elif (rt.interval, rt.grace) != (interval, grace):
            rt.interval, rt.grace = interval, grace
            if rt.state in _WATCHED:
                self._arm(runtime_id, rt)
        if live:
            return self._alive(runtime_id, rt, now, "registered")
        return None

    def restore(
        self,
        runtime_id: str,
        *,
        interval: float,
        grace: float,
        state: State,
        since: float,
        last_seen: float | None,
        reason: str | None,
    ) -> None:
        """Load a runtime as the database had it; the watch starts at :meth:`resume`."""
        previous = self._runtimes.get(runtime_id)
        if previous is not None:
            self.counts[previous.state] -= 1
        # Rows from the database bring their own copy of every value: share the common ones.
        interval, grace = self._shared(interval), self._shared(grace)
        rt = self._runtimes[runtime_id] = _Runtime(interval, grace, state, since)
        self.counts[state] += 1
        rt.last_seen = last_seen
        self.seen.added(runtime_id, rt)  # the database has this last-seen time already
        rt.reason = None if reason is None else sys.intern(reason)
        if state in _WATCHED:
            self._arm(runtime_id, rt)

    def deregister(self, runtime_id: str) -> bool:
        """Forget a runtime; its heap entry becomes stale and is dropped when popped."""
        self.seen.forget(runtime_id)
        rt = self._runtimes.pop(runtime_id, None)
        if rt is None:
            return False
        self.counts[rt.state] -= 1
        return True

    # --- events --------------------------------------------------------------

    def pulse(self, runtime_id: str, now: float, session: int | None = None) -> Transition | None:
        """A pulse arrived. Raises :class:`NotRegistered` for an unknown ID.

        This is the hot path: one dict lookup, one store and two tests when
        the runtime is already alive. Nothing here is for the database but
        the test for a first sign of life (which :attr:`seen` picks at once).
        """
        rt = self._runtimes.get(runtime_id)
        if rt is None:
            raise NotRegistered(runtime_id)
        if session is not None:
            if session == rt.dead_session:
                return None  # a late pulse from a connection already declared dead
            if session != rt.session and rt.session is not None:
                self.session_changes.append(runtime_id)
        if rt.last_seen is None:  # its first sign of life: the database shows 'never' until it has one
            rt.last_seen = now
            self.seen.force(runtime_id, rt)
        else:
            rt.last_seen = now
        if rt.state is ALIVE:
            return None
        return self._alive(runtime_id, rt, now, "pulse received")

    def online(
        self, runtime_id: str, now: float, session: int | None = None, *, live: bool = True
    ) -> Transition | None:
        """A birth message: the runtime connected (a new session, if numbered)."""
        rt = self._get(runtime_id)
        if session is not None:
            if session == rt.dead_session:
                return None
            if live and rt.session is not None and session != rt.session:
                self.session_changes.append(runtime_id)
            rt.session = session
        if not live:
            return None  # a retained copy: it names the session, but is no sign of life now
        first = rt.last_seen is None
        rt.last_seen = now
        transition = self._alive(runtime_id, rt, now, "connected")
        if first:
            self.seen.force(runtime_id, rt)  # the change of state forced it already, if there was one
        return transition

    def offline(
        self, runtime_id: str, now: float, session: int | None = None, *, live: bool = True
    ) -> Transition | None:
        """A last will: the broker lost the runtime's connection.

        A will from another session than the newest birth's is stale and
        ignored. A retained will seen at start-up changes nothing: the watch
        after start decides, so a restart raises no alert from old news.
        """
        rt = self._get(runtime_id)
        if session is not None and rt.session is not None and session != rt.session:
            return None
        if not live or rt.state not in _WATCHED:
            return None
        rt.dead_session = session
        return self._become(runtime_id, rt, DEAD, now, "connection lost", "dead")

    def stopped(self, runtime_id: str, now: float, session: int | None = None) -> Transition | None:
        """The runtime said it is stopping on purpose: no dead alert follows.

        One that never ran (registered from a retained request, never a pulse
        nor a live birth: an agent whose start failed) stops quietly: no
        ``stopped`` alert about something nobody saw running, and no
        ``recovered`` when it comes to life after all.
        """
        rt = self._get(runtime_id)
        if session is not None and rt.session is not None and session != rt.session:
            return None
        if rt.state is STOPPED:
            return None
        if rt.state is UNKNOWN and rt.last_seen is None:
            return self._become(runtime_id, rt, STOPPED, now, NEVER_RAN, None)
        return self._become(runtime_id, rt, STOPPED, now, "stopped by runtime", "stopped")

    # --- time ----------------------------------------------------------------

    def overdue(self, now: float) -> bool:
        """Whether :meth:`expire` would change a state at ``now`` (stale entries are re-armed on the way).

        The orchestrator asks this first, so it proves its own link to the
        broker only when someone is really about to be declared dead.
        """
        return self._next_due(now) is not None

    def expire(self, now: float) -> list[Transition]:
        """Declare dead every watched runtime whose deadline has passed by ``now``.

        While suspended (the orchestrator cannot see pulses) nobody is
        declared dead: an ``alive`` runtime whose deadline passes becomes
        ``unknown`` instead, without an alert, and stays watched, so after
        :meth:`resume` it is dead only if it stays silent for a full window.
        """
        out: list[Transition] = []
        while (due := self._next_due(now)) is not None:
            runtime_id, rt = due
            heapq.heappop(self._heap)
            self.heap_pops += 1
            rt.token = 0
            if self._suspended:
                if rt.state is ALIVE:
                    out.append(self._become(runtime_id, rt, UNKNOWN, now, "the orchestrator lost its broker", None))
                self._push(runtime_id, rt, now + rt.interval + rt.grace)  # looked at again one window on
                continue
            if rt.state is ALIVE and rt.last_seen is not None and rt.last_seen > self._watch_from:
                reason = f"no pulse for {now - rt.last_seen:.1f} s (interval {rt.interval:g} s + grace {rt.grace:g} s)"
            else:
                reason = f"no pulse within {rt.interval + rt.grace:g} s of watching"
            deadline = self._deadline(rt)
            out.append(self._become(runtime_id, rt, DEAD, now, reason, "dead", deadline))
        return out

    def settle(self, now: float, budget: int) -> bool:
        """Re-arm at most ``budget`` stale heap entries due by ``now``; whether more are waiting.

        After a start every runtime is armed for the same instant (start +
        interval + grace), and at that instant each one that pulsed is
        re-armed: 100,000 of them at once held the event loop for over 100 ms.
        The caller settles them a slice at a time, reading pulses in between.
        """
        if self._next_due(now, budget) is not None:
            return False
        heap = self._heap
        return bool(heap) and heap[0][0] <= now

    def _next_due(self, now: float, budget: int | None = None) -> tuple[str, _Runtime] | None:
        """Settle stale entries due by ``now`` (at most ``budget``); the top runtime if its real deadline passed.

        An entry is stale when its runtime pulsed since it was armed (it is
        re-armed at the real deadline, in one sift: ``heapreplace``), or was
        re-armed, deregistered or left the watched states (it is dropped).
        With every runtime pulsing on time this runs once per interval per
        runtime, as often as pulses arrive: it is the detector's other hot
        path. (Writing :meth:`_deadline` out here saved another 8 %; the rule
        stays in one place instead.)
        """
        heap, runtimes, rearmed = self._heap, self._runtimes, self.seen.rearmed
        settled = 0
        while heap and heap[0][0] <= now:
            if budget is not None and settled >= budget:
                return None
            settled += 1
            _, token, runtime_id = heap[0]
            rt = runtimes.get(runtime_id)
            if rt is None or rt.token != token or rt.state not in _WATCHED:
                heapq.heappop(heap)
                self.heap_pops += 1
                if rt is not None and rt.token == token:
                    rt.token = 0
                continue
            deadline = self._deadline(rt)
            if deadline <= now:
                return runtime_id, rt
            rt.token = token = next(self._tokens)
            heapq.heapreplace(heap, (deadline, token, runtime_id))
            self.heap_pops += 1
            rearmed(runtime_id, rt)
        return None

    def suspend(self) -> None:
        """Stop judging: the orchestrator lost its broker and cannot see pulses."""
        self._suspended = True

    def resume(self, now: float, *, allowance: float = 0.0) -> None:
        """Start (again) to judge, giving every watched runtime a full interval + grace after ``allowance`` s.

        ``allowance`` is for the runtimes' way back after their broker
        restarted: their agents reconnect with backoff. It holds for every
        runtime alike (one back sooner keeps it too), so a deadline never
        moves earlier and the heap's lazy entries are never late (for that
        too, a later resume never cuts short an allowance still running).
        O(1): the new start time is read when each entry next falls due.
        """
        running = self._watch_from > max(self._resumed_at, now)  # an earlier allowance not over yet
        self._watch_from = max(self._watch_from, now + allowance) if running else now + allowance
        self._resumed_at = now
        self._suspended = False

    # --- internals -----------------------------------------------------------

    def _shared(self, value: float) -> float:
        """One float object per distinct interval or grace (a bounded cache), not one per runtime."""
        shared = self._values.get(value)
        if shared is not None:
            return shared
        if len(self._values) < _SHARED_VALUES:
            self._values[value] = value
        return value

    def _get(self, runtime_id: str) -> _Runtime:
        rt = self._runtimes.get(runtime_id)
        if rt is None:
            raise NotRegistered(runtime_id)
        return rt

    def _deadline(self, rt: _Runtime) -> float:
        start = max(self._watch_from, rt.since)
        if rt.last_seen is not None and rt.last_seen > start:
            start = rt.last_seen
        return start + rt.interval + rt.grace

    def _push(self, runtime_id: str, rt: _Runtime, deadline: float) -> None:
        rt.token = next(self._tokens)
        heapq.heappush(self._heap, (deadline, rt.token, runtime_id))

    def _arm(self, runtime_id: str, rt: _Runtime) -> None:
        self._push(runtime_id, rt, self._deadline(rt))

    def _alive(self, runtime_id: str, rt: _Runtime, now: float, reason: str) -> Transition | None:
        if rt.state is ALIVE:
            return None
        event = "recovered" if rt.state is DEAD or (rt.state is STOPPED and rt.reason != NEVER_RAN) else None
        rt.dead_session = None
        transition = self._become(runtime_id, rt, ALIVE, now, reason, event)
        if rt.token == 0:
            self._arm(runtime_id, rt)
        return transition

    def _become(
        self,
        runtime_id: str,
        rt: _Runtime,
        new: State,
        now: float,
        reason: str,
        event: str | None,
        deadline: float | None = None,
    ) -> Transition:
        old = rt.state
        rt.state, rt.since, rt.reason = new, now, reason
        self.seen.force(runtime_id, rt)  # the database's row as exact as the flip's
        self.counts[old] -= 1
        self.counts[new] += 1
        if new not in _WATCHED:
            # Drop its heap entry: it was armed for the interval of the time, which
            # may shrink before the runtime is alive again, and _alive arms afresh.
            rt.token = 0
        return Transition(runtime_id, old, new, now, rt.last_seen, reason, event, deadline)

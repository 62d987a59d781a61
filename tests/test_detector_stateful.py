"""The detector against an obvious O(n) reference model, under random operations.

The model keeps, for every runtime, its state and last activity and finds
verdicts by scanning every runtime: no heap, no laziness. Every step checks
that the detector agrees with it, and that the model itself obeys the rules
the detector promises (who may be dead, which events go with which changes).
The last-seen times the detector's policy hands out for the database are
checked against the promises the writer relies on (never older than stored,
forced ones in the next take, given-back ones not lost, exact after a stop).
"""

from __future__ import annotations

import unittest
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from orchestrator.detector import (
    ALIVE,
    DEAD,
    NEVER_RAN,
    STOPPED,
    UNKNOWN,
    Detector,
    NotRegistered,
    State,
    Transition,
)

IDS = ("a", "b", "c", "d")
WATCHED = (ALIVE, UNKNOWN)

ids = st.sampled_from(IDS)
seconds = st.floats(min_value=0.1, max_value=5.0, allow_nan=False, allow_infinity=False)
sessions = st.none() | st.integers(min_value=0, max_value=3)
steps = st.floats(min_value=0.0, max_value=6.0, allow_nan=False, allow_infinity=False)


@dataclass
class ModelRuntime:
    interval: float
    grace: float
    state: State
    since: float
    reason: str | None
    last_seen: float | None = None
    session: int | None = None
    dead_session: int | None = None


class Model:
    """The reference: plain fields, verdicts by scanning every runtime."""

    def __init__(self, now: float) -> None:
        self.runtimes: dict[str, ModelRuntime] = {}
        self.watch_from = now
        self.resumed_at = now
        self.suspended = False
        self.stored: dict[str, float] = {}
        """The last-seen time the database holds for each runtime: the last one handed out, or restored."""
        self.owed: dict[str, float] = {}
        """Times the next take must hand out (this one or newer): forced by a change of state or a first
        sign of life, or given back after a failed write."""

    def owe(self, rid: str, at: float) -> None:
        self.owed[rid] = max(at, self.owed.get(rid, at))

    def deadline(self, rid: str) -> float | None:
        rt = self.runtimes[rid]
        if rt.state not in WATCHED:
            return None
        start = max(self.watch_from, rt.since)
        if rt.last_seen is not None:
            start = max(start, rt.last_seen)
        return start + rt.interval + rt.grace

    def watched_deadlines(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for rid in self.runtimes:
            deadline = self.deadline(rid)
            if deadline is not None:
                out[rid] = deadline
        return out

    def become(self, rid: str, new: State, now: float, reason: str, event: str | None) -> Transition:
        rt = self.runtimes[rid]
        old = rt.state
        rt.state, rt.since, rt.reason = new, now, reason
        if rt.last_seen is not None and rt.last_seen != self.stored.get(rid):
            self.owe(rid, rt.last_seen)  # the database's row as exact as the change's
        return Transition(rid, old, new, now, rt.last_seen, reason, event)

    def alive(self, rid: str, now: float, reason: str) -> Transition | None:
        rt = self.runtimes[rid]
        if rt.state is ALIVE:
            return None
        event = "recovered" if rt.state is DEAD or (rt.state is STOPPED and rt.reason != NEVER_RAN) else None
        rt.dead_session = None
        return self.become(rid, ALIVE, now, reason, event)

    def register(self, rid: str, interval: float, grace: float, now: float, live: bool) -> Transition | None:
        rt = self.runtimes.get(rid)
        if rt is None:
            self.runtimes[rid] = ModelRuntime(interval, grace, UNKNOWN, now, "registered")
        else:
            rt.interval, rt.grace = interval, grace
        return self.alive(rid, now, "registered") if live else None

    def pulse(self, rid: str, now: float, session: int | None) -> Transition | None:
        rt = self.runtimes[rid]
        if session is not None and session == rt.dead_session:
            return None
        if rt.last_seen is None:
            self.owe(rid, now)  # a first sign of life: the database says 'never' no longer than a flush
        rt.last_seen = now
        return self.alive(rid, now, "pulse received")

    def online(self, rid: str, now: float, session: int | None, live: bool) -> Transition | None:
        rt = self.runtimes[rid]
        if session is not None:
            if session == rt.dead_session:
                return None
            rt.session = session
        if not live:
            return None
        if rt.last_seen is None:
            self.owe(rid, now)
        rt.last_seen = now
        return self.alive(rid, now, "connected")

    def stale_session(self, rid: str, session: int | None) -> bool:
        current = self.runtimes[rid].session
        return session is not None and current is not None and session != current

    def offline(self, rid: str, now: float, session: int | None, live: bool) -> Transition | None:
        rt = self.runtimes[rid]
        if self.stale_session(rid, session) or not live or rt.state not in WATCHED:
            return None
        rt.dead_session = session
        return self.become(rid, DEAD, now, "connection lost", "dead")

    def stopped(self, rid: str, now: float, session: int | None) -> Transition | None:
        rt = self.runtimes[rid]
        if self.stale_session(rid, session) or rt.state is STOPPED:
            return None
        if rt.state is UNKNOWN and rt.last_seen is None:  # it never ran: no news for anyone
            return self.become(rid, STOPPED, now, NEVER_RAN, None)
        return self.become(rid, STOPPED, now, "stopped by runtime", "stopped")

    def expire(self, now: float) -> dict[str, Transition]:
        out: dict[str, Transition] = {}
        for rid, deadline in self.watched_deadlines().items():
            if deadline > now:
                continue
            rt = self.runtimes[rid]
            if self.suspended:
                if rt.state is ALIVE:
                    out[rid] = self.become(rid, UNKNOWN, now, "the orchestrator lost its broker", None)
                continue
            if rt.state is ALIVE and rt.last_seen is not None and rt.last_seen > self.watch_from:
                reason = f"no pulse for {now - rt.last_seen:.1f} s (interval {rt.interval:g} s + grace {rt.grace:g} s)"
            else:
                reason = f"no pulse within {rt.interval + rt.grace:g} s of watching"
            out[rid] = self.become(rid, DEAD, now, reason, "dead")
        return out


def check_transition(t: Transition | None) -> None:
    """The rules every transition obeys, whatever caused it."""
    if t is None:
        return
    assert t.old is not t.new, t
    assert (t.event == "dead") == (t.new is DEAD), t
    assert (t.event == "stopped") == (t.new is STOPPED and t.reason != NEVER_RAN), t
    quiet = t.new is STOPPED and t.reason == NEVER_RAN
    assert not quiet or (t.old is UNKNOWN and t.last_seen is None), t
    if t.event == "recovered":
        assert t.old in (DEAD, STOPPED), t
        assert t.new is ALIVE, t
    if t.old is DEAD and t.new is ALIVE:  # from STOPPED too, unless the stop was quiet: the model says which
        assert t.event == "recovered", t


class DetectorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.detector = Detector(now=self.now)
        self.model = Model(self.now)
        self.used_sessions: set[int] = set()

    @initialize(every=st.sampled_from([0.0, 3.0, 60.0]))
    def choose_seen_every(self, every: float) -> None:
        """The period of last-seen picks: at every re-arm, or on each runtime's phase."""
        self.detector = Detector(now=self.now, seen_every=every)

    def agree(self, got: Transition | None, want: Transition | None) -> None:
        assert got == want, (got, want)
        check_transition(got)

    # --- registration ------------------------------------------------------------

    @rule(rid=ids, interval=seconds, grace=seconds, live=st.booleans())
    def register(self, rid: str, interval: float, grace: float, live: bool) -> None:
        got = self.detector.register(rid, interval, grace, self.now, live=live)
        self.agree(got, self.model.register(rid, interval, grace, self.now, live))

    @precondition(lambda self: len(self.model.runtimes) < len(IDS))
    @rule(
        data=st.data(),
        interval=seconds,
        grace=seconds,
        state=st.sampled_from(list(State)),
        since_ago=st.floats(0.0, 20.0),
        seen_ago=st.none() | st.floats(0.0, 20.0),
    )
    def restore(
        self,
        data: st.DataObject,
        interval: float,
        grace: float,
        state: State,
        since_ago: float,
        seen_ago: float | None,
    ) -> None:
        rid = data.draw(st.sampled_from([r for r in IDS if r not in self.model.runtimes]))
        since = self.now - since_ago
        last_seen = None if seen_ago is None else self.now - seen_ago
        self.detector.restore(
            rid, interval=interval, grace=grace, state=state, since=since, last_seen=last_seen, reason="restored"
        )
        self.model.runtimes[rid] = ModelRuntime(interval, grace, state, since, "restored", last_seen)
        if last_seen is not None:
            self.model.stored[rid] = last_seen

    @rule(rid=ids)
    def deregister(self, rid: str) -> None:
        known = rid in self.model.runtimes
        assert self.detector.deregister(rid) is known
        self.model.runtimes.pop(rid, None)
        self.model.stored.pop(rid, None)
        self.model.owed.pop(rid, None)

    # --- messages -------------------------------------------------------------------

    def pick(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.model.runtimes)), label="rid")

    def pick_session(self, data: st.DataObject, rid: str) -> int | None:
        """Often a session already used, to reach the stale- and dead-session paths."""
        rt = self.model.runtimes[rid]
        known = sorted({s for s in (rt.session, rt.dead_session) if s is not None} | self.used_sessions)
        choices = sessions | st.sampled_from(known) if known else sessions
        session = data.draw(choices, label="session")
        if session is not None:
            self.used_sessions.add(session)
        return session

    @precondition(lambda self: bool(self.model.runtimes))
    @rule(data=st.data())
    def pulse(self, data: st.DataObject) -> None:
        rid = self.pick(data)
        session = self.pick_session(data, rid)
        self.agree(self.detector.pulse(rid, self.now, session), self.model.pulse(rid, self.now, session))

    @precondition(lambda self: bool(self.model.runtimes))
    @rule(data=st.data(), live=st.booleans())
    def online(self, data: st.DataObject, live: bool) -> None:
        rid = self.pick(data)
        session = self.pick_session(data, rid)
        got = self.detector.online(rid, self.now, session, live=live)
        self.agree(got, self.model.online(rid, self.now, session, live))

    @precondition(lambda self: bool(self.model.runtimes))
    @rule(data=st.data(), live=st.booleans())
    def offline(self, data: st.DataObject, live: bool) -> None:
        rid = self.pick(data)
        session = self.pick_session(data, rid)
        got = self.detector.offline(rid, self.now, session, live=live)
        self.agree(got, self.model.offline(rid, self.now, session, live))

    @precondition(lambda self: bool(self.model.runtimes))
    @rule(data=st.data())
    def stopped(self, data: st.DataObject) -> None:
        rid = self.pick(data)
        session = self.pick_session(data, rid)
        self.agree(self.detector.stopped(rid, self.now, session), self.model.stopped(rid, self.now, session))

    @rule(rid=ids, session=sessions)
    def message_for_unknown_id_is_rejected(self, rid: str, session: int | None) -> None:
        if rid in self.model.runtimes:
            return
        for call in (self.detector.pulse, self.detector.online, self.detector.offline, self.detector.stopped):
            try:
                call(rid, self.now, session)
            except NotRegistered:
                continue
            raise AssertionError(f"{call.__name__} for an unregistered ID was accepted")

    # --- time -------------------------------------------------------------------------

    @rule(dt=steps)
    def advance(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: bool(self.model.watched_deadlines()))
    @rule()
    def advance_to_next_model_deadline(self) -> None:
        self.now = max(self.now, min(self.model.watched_deadlines().values()))

    @rule()
    def expire(self) -> None:
        deadlines = self.model.watched_deadlines()
        got = self.detector.expire(self.now)
        want = self.model.expire(self.now)
        assert {t.runtime_id: t for t in got} == want
        assert len(got) == len(want), "a runtime was declared dead twice in one expire()"
        for t in got:
            check_transition(t)
            assert t.new is (UNKNOWN if self.model.suspended else DEAD)
            assert deadlines[t.runtime_id] <= self.now, "dead before its deadline"
        if not self.model.suspended:
            for rid, deadline in self.model.watched_deadlines().items():
                assert deadline > self.now, f"{rid} outlived its deadline through expire()"

    @rule()
    def suspend(self) -> None:
        self.detector.suspend()
        self.model.suspended = True

    @rule(allowance=st.sampled_from([0.0, 0.0, 0.5, 7.5]))
    def resume(self, allowance: float) -> None:
        self.detector.resume(self.now, allowance=allowance)
        model = self.model
        running = model.watch_from > max(model.resumed_at, self.now)  # an allowance is never cut short
        model.watch_from = max(model.watch_from, self.now + allowance) if running else self.now + allowance
        model.resumed_at = self.now
        self.model.suspended = False

    def check_taken(self, seen: dict[str, float]) -> None:
        """Times for the database: of registered runtimes, seen by then, never older than the one stored,
        and every one owed among them."""
        for rid, value in seen.items():
            rt = self.model.runtimes[rid]
            assert rt.last_seen is not None, rid
            assert value <= rt.last_seen, (rid, value, rt.last_seen)
            old = self.model.stored.get(rid)
            assert old is None or value >= old, (rid, value, old)
        for rid, at in self.model.owed.items():
            assert rid in seen, (rid, at)
            assert seen[rid] >= at, (rid, seen[rid], at)

    def handed_out(self, seen: dict[str, float]) -> None:
        """``seen`` was taken and stored."""
        self.check_taken(seen)
        self.model.stored.update(seen)
        self.model.owed.clear()

    @rule()
    def take(self) -> None:
        self.handed_out(self.detector.seen.take())

    @rule()
    def take_all(self) -> None:
        self.handed_out(self.detector.seen.take_all())
        for rid, rt in self.model.runtimes.items():
            assert self.model.stored.get(rid) == rt.last_seen, rid  # after a clean stop the database is exact

    @rule()
    def failed_write(self) -> None:
        """A write of the times taken fails: they are given back, and owed, each at its runtime's newest."""
        seen = self.detector.seen.take()
        self.check_taken(seen)
        self.detector.seen.give_back(seen)
        self.model.owed.clear()
        for rid in seen:
            last_seen = self.model.runtimes[rid].last_seen
            assert last_seen is not None
            self.model.owe(rid, last_seen)

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def same_runtimes_and_fields(self) -> None:
        assert len(self.detector) == len(self.model.runtimes)
        for rid in IDS:
            assert (rid in self.detector) == (rid in self.model.runtimes)
        for view in self.detector.views():
            rt = self.model.runtimes[view.runtime_id]
            got = (view.state, view.interval, view.grace, view.last_seen, view.since, view.reason)
            assert got == (rt.state, rt.interval, rt.grace, rt.last_seen, rt.since, rt.reason), view.runtime_id

    @invariant()
    def same_deadlines(self) -> None:
        for rid in self.model.runtimes:
            assert self.detector.deadline(rid) == self.model.deadline(rid), rid

    @invariant()
    def next_deadline_is_never_late(self) -> None:
        assert self.detector.suspended is self.model.suspended
        nxt = self.detector.next_deadline()
        if self.model.suspended:
            return  # entries are pushed a window on as they fall due: early is fine, none is needed
        deadlines = self.model.watched_deadlines()
        if deadlines:
            assert nxt is not None, "a watched runtime has no heap entry"
            assert nxt <= min(deadlines.values()), (nxt, deadlines)


DetectorMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDetectorStateful: type[unittest.TestCase] = DetectorMachine.TestCase

"""Example-based tests of the pure failure detector, driven by a fake clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orchestrator.detector import ALIVE, DEAD, STOPPED, UNKNOWN, Detector, NotRegistered, Transition

from .fakeclock import FakeClock

EPS = 1e-6
IV = 10.0
GRACE = 5.0


def register_alive(det: Detector, clock: FakeClock, rid: str = "rt-1", iv: float = IV, grace: float = GRACE) -> None:
    t = det.register(rid, iv, grace, clock.now)
    assert t is not None
    assert t.new is ALIVE


def expire_ids(det: Detector, now: float) -> list[str]:
    return [t.runtime_id for t in det.expire(now)]


# --- registration --------------------------------------------------------------


def test_register_live_makes_new_runtime_alive_without_alert_event(det: Detector, clock: FakeClock) -> None:
    t = det.register("rt-1", IV, GRACE, clock.now)

    assert t == Transition("rt-1", UNKNOWN, ALIVE, clock.now, None, "registered", None)
    assert det.view("rt-1").state is ALIVE
    assert "rt-1" in det
    assert len(det) == 1


def test_register_retained_leaves_new_runtime_unknown_and_returns_nothing(det: Detector, clock: FakeClock) -> None:
    assert det.register("rt-1", IV, GRACE, clock.now, live=False) is None

    view = det.view("rt-1")
    assert view.state is UNKNOWN
    assert view.reason == "registered"
    assert view.last_seen is None


def test_registration_sets_interval_grace_and_since(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", 3.0, 4.5, clock.now)

    view = det.view("rt-1")
    assert (view.interval, view.grace, view.since) == (3.0, 4.5, clock.now)


def test_registration_is_not_a_pulse_so_last_seen_stays_empty(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", IV, GRACE, clock.now)

    assert det.view("rt-1").last_seen is None


def test_new_runtime_deadline_is_registration_plus_interval_plus_grace(det: Detector, clock: FakeClock) -> None:
    clock.advance(7)
    det.register("rt-1", IV, GRACE, clock.now)

    assert det.deadline("rt-1") == clock.now + IV + GRACE


def test_grace_is_taken_from_the_caller_not_defaulted(det: Detector, clock: FakeClock) -> None:
    register: Callable[..., object] = det.register
    with pytest.raises(TypeError):
        register("rt-1", IV, now=clock.now)

    det.register("rt-1", IV, 0.5, clock.now)
    assert det.deadline("rt-1") == clock.now + IV + 0.5


def test_registering_again_with_same_interval_is_no_transition(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    deadline = det.deadline("rt-1")
    clock.advance(3)

    assert det.register("rt-1", IV, GRACE, clock.now) is None
    assert det.deadline("rt-1") == deadline


def test_live_registration_of_unknown_runtime_makes_it_alive(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", IV, GRACE, clock.now, live=False)
    clock.advance(1)

    t = det.register("rt-1", IV, GRACE, clock.now)

    assert t is not None
    assert (t.old, t.new, t.event) == (UNKNOWN, ALIVE, None)


def test_views_lists_every_runtime(det: Detector, clock: FakeClock) -> None:
    det.register("a", IV, GRACE, clock.now)
    det.register("b", IV, GRACE, clock.now, live=False)

    assert {(v.runtime_id, v.state) for v in det.views()} == {("a", ALIVE), ("b", UNKNOWN)}


# --- pulses and silence ----------------------------------------------------------


def test_regular_pulses_keep_runtime_alive(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    for _ in range(100):
        clock.advance(IV)
        assert det.pulse("rt-1", clock.now) is None
        assert det.expire(clock.now) == []

    assert det.view("rt-1").state is ALIVE


def test_pulse_records_last_seen(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    clock.advance(2)
    det.pulse("rt-1", clock.now)

    assert det.view("rt-1").last_seen == clock.now
    assert det.deadline("rt-1") == clock.now + IV + GRACE


def test_pulse_on_unknown_runtime_makes_it_alive_without_event(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", IV, GRACE, clock.now, live=False)
    clock.advance(1)

    t = det.pulse("rt-1", clock.now)

    assert t == Transition("rt-1", UNKNOWN, ALIVE, clock.now, clock.now, "pulse received", None)


def test_silent_runtime_is_not_dead_just_before_its_deadline(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    clock.advance(1)
    det.pulse("rt-1", clock.now)
    deadline = clock.now + IV + GRACE

    assert det.expire(deadline - EPS) == []
    assert det.view("rt-1").state is ALIVE


def test_silent_runtime_is_dead_exactly_at_its_deadline(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    clock.advance(1)
    det.pulse("rt-1", clock.now)
    seen = clock.now
    deadline = seen + IV + GRACE

    det.expire(deadline - EPS)
    verdicts = det.expire(deadline)

    assert len(verdicts) == 1
    t = verdicts[0]
    assert (t.runtime_id, t.old, t.new, t.at, t.last_seen, t.event) == ("rt-1", ALIVE, DEAD, deadline, seen, "dead")
    assert det.view("rt-1").state is DEAD
    assert det.view("rt-1").since == deadline


def test_runtime_pulsing_later_than_interval_but_within_grace_stays_alive(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    for _ in range(10):
        clock.advance(IV + GRACE - EPS)
        assert det.expire(clock.now) == []
        det.pulse("rt-1", clock.now)

    assert det.view("rt-1").state is ALIVE


def test_verdict_reason_names_silence_interval_and_grace(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock, iv=2.5, grace=1.5)
    clock.advance(1)
    det.pulse("rt-1", clock.now)

    (t,) = det.expire(clock.now + 4.0)

    assert t.reason == "no pulse for 4.0 s (interval 2.5 s + grace 1.5 s)"
    assert det.view("rt-1").reason == t.reason


def test_verdict_reason_for_runtime_never_heard_since_watching(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", IV, GRACE, clock.now, live=False)

    (t,) = det.expire(clock.now + IV + GRACE)

    assert (t.old, t.new, t.event) == (UNKNOWN, DEAD, "dead")
    assert t.reason == "no pulse within 15 s of watching"


def test_late_expire_reports_the_actual_silence(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    clock.advance(1)
    det.pulse("rt-1", clock.now)

    (t,) = det.expire(clock.now + 100)

    assert t.at == clock.now + 100
    assert t.reason.startswith("no pulse for 100.0 s")


def test_dead_runtime_is_reported_only_once(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)

    assert expire_ids(det, clock.now + IV + GRACE) == ["rt-1"]
    assert det.expire(clock.now + 10 * (IV + GRACE)) == []
    assert det.deadline("rt-1") is None


def test_expire_judges_each_runtime_by_its_own_deadline(det: Detector, clock: FakeClock) -> None:
    det.register("fast", 1.0, 1.0, clock.now)
    det.register("slow", 5.0, 5.0, clock.now)
    det.register("chatty", 1.0, 1.0, clock.now)
    start = clock.now
    for _ in range(20):
        clock.advance(1)
        det.pulse("chatty", clock.now)

    assert expire_ids(det, start + 2.0) == ["fast"]
    assert det.expire(start + 10.0 - EPS) == []
    assert expire_ids(det, start + 10.0) == ["slow"]
    assert det.view("chatty").state is ALIVE


# --- recovery ----------------------------------------------------------------------


def test_dead_runtime_recovers_on_pulse_with_event_recovered(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.expire(clock.advance(IV + GRACE))
    clock.advance(30)

    t = det.pulse("rt-1", clock.now)

    assert t == Transition("rt-1", DEAD, ALIVE, clock.now, clock.now, "pulse received", "recovered")
    assert det.view("rt-1").state is ALIVE


def test_recovered_runtime_is_watched_again_with_a_fresh_deadline(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.expire(clock.advance(IV + GRACE))
    det.pulse("rt-1", clock.advance(30))
    recovered_at = clock.now

    assert det.deadline("rt-1") == recovered_at + IV + GRACE
    assert det.expire(recovered_at + IV + GRACE - EPS) == []
    assert expire_ids(det, recovered_at + IV + GRACE) == ["rt-1"]


def test_live_reregistration_of_dead_runtime_is_a_recovery(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.expire(clock.advance(IV + GRACE))

    t = det.register("rt-1", IV, GRACE, clock.advance(1))

    assert t is not None
    assert (t.old, t.new, t.event, t.reason) == (DEAD, ALIVE, "recovered", "registered")


# --- last will and session numbers -----------------------------------------------------


def test_will_declares_runtime_dead_at_once_with_reason_connection_lost(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.online("rt-1", clock.now, session=1)
    clock.advance(1)

    t = det.offline("rt-1", clock.now, session=1)

    assert t is not None
    assert (t.old, t.new, t.at, t.reason, t.event) == (ALIVE, DEAD, clock.now, "connection lost", "dead")
    assert det.view("rt-1").state is DEAD
    assert det.deadline("rt-1") is None


def test_will_without_session_declares_dead(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)

    t = det.offline("rt-1", clock.advance(1))

    assert t is not None
    assert t.new is DEAD


def test_will_declares_unknown_runtime_dead(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", IV, GRACE, clock.now, live=False)

    t = det.offline("rt-1", clock.advance(1))

    assert t is not None
    assert (t.old, t.new) == (UNKNOWN, DEAD)


def test_will_from_older_session_after_newer_online_is_ignored(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.online("rt-1", clock.now, session=1)
    det.online("rt-1", clock.advance(1), session=2)

    assert det.offline("rt-1", clock.advance(1), session=1) is None
    assert det.view("rt-1").state is ALIVE


def test_will_on_dead_runtime_is_ignored(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.offline("rt-1", clock.advance(1))

    assert det.offline("rt-1", clock.advance(1)) is None


def test_late_pulse_from_session_declared_dead_does_not_revive(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.online("rt-1", clock.now, session=7)
    det.pulse("rt-1", clock.advance(1), session=7)
    det.offline("rt-1", clock.advance(1), session=7)
    seen_before = det.view("rt-1").last_seen

    assert det.pulse("rt-1", clock.advance(0.1), session=7) is None
    assert det.view("rt-1").state is DEAD
    assert det.view("rt-1").last_seen == seen_before


def test_late_birth_from_session_declared_dead_does_not_revive(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.online("rt-1", clock.now, session=7)
    det.offline("rt-1", clock.advance(1), session=7)

    assert det.online("rt-1", clock.advance(0.1), session=7) is None
    assert det.view("rt-1").state is DEAD


def test_birth_of_new_session_after_will_recovers(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.online("rt-1", clock.now, session=7)
    det.offline("rt-1", clock.advance(1), session=7)

    t = det.online("rt-1", clock.advance(1), session=8)

    assert t == Transition("rt-1", DEAD, ALIVE, clock.now, clock.now, "connected", "recovered")


def test_pulse_of_new_session_after_will_recovers(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.online("rt-1", clock.now, session=7)
    det.offline("rt-1", clock.advance(1), session=7)

    t = det.pulse("rt-1", clock.advance(1), session=8)

    assert t is not None
    assert (t.old, t.new, t.event) == (DEAD, ALIVE, "recovered")


def test_retained_will_changes_nothing(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    before = det.view("rt-1")
    deadline = det.deadline("rt-1")

    assert det.offline("rt-1", clock.advance(1), session=3, live=False) is None
    assert det.view("rt-1") == before
    assert det.deadline("rt-1") == deadline


def test_retained_birth_names_session_but_is_no_sign_of_life(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", IV, GRACE, clock.now, live=False)

    assert det.online("rt-1", clock.advance(1), session=4, live=False) is None
    assert det.view("rt-1").state is UNKNOWN
    assert det.view("rt-1").last_seen is None
    # It did record the session: a will from another session is now stale.
    assert det.offline("rt-1", clock.advance(1), session=3) is None
    assert det.offline("rt-1", clock.now, session=4) is not None


def test_birth_is_a_sign_of_life(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", IV, GRACE, clock.now, live=False)

    t = det.online("rt-1", clock.advance(1), session=1)

    assert t == Transition("rt-1", UNKNOWN, ALIVE, clock.now, clock.now, "connected", None)
    assert det.view("rt-1").last_seen == clock.now


# --- stopped -----------------------------------------------------------------------------


def test_stopped_runtime_is_never_declared_dead(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)

    t = det.stopped("rt-1", clock.advance(1))

    assert t is not None
    assert (t.old, t.new, t.reason, t.event) == (ALIVE, STOPPED, "stopped by runtime", "stopped")
    assert det.deadline("rt-1") is None
    assert det.expire(clock.advance(1000 * (IV + GRACE))) == []
    assert det.view("rt-1").state is STOPPED


def test_stopped_runtime_recovers_on_pulse(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.stopped("rt-1", clock.advance(1))

    t = det.pulse("rt-1", clock.advance(100))

    assert t is not None
    assert (t.old, t.new, t.event) == (STOPPED, ALIVE, "recovered")
    assert det.deadline("rt-1") == clock.now + IV + GRACE


def test_will_after_stop_is_ignored(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.stopped("rt-1", clock.advance(1))

    assert det.offline("rt-1", clock.advance(1)) is None
    assert det.view("rt-1").state is STOPPED


def test_second_stop_returns_nothing(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.stopped("rt-1", clock.advance(1))

    assert det.stopped("rt-1", clock.advance(1)) is None


def test_stop_from_older_session_is_ignored(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.online("rt-1", clock.now, session=2)

    assert det.stopped("rt-1", clock.advance(1), session=1) is None
    assert det.view("rt-1").state is ALIVE


def test_a_runtime_that_never_ran_stops_without_an_alert(det: Detector, clock: FakeClock) -> None:
    """Registered from a retained request, never seen: its retained ``stopped`` is no news for anyone."""
    det.register("rt-1", IV, GRACE, clock.now, live=False)

    t = det.stopped("rt-1", clock.advance(1))

    assert t is not None
    assert (t.old, t.new, t.last_seen, t.reason, t.event) == (
        UNKNOWN,
        STOPPED,
        None,
        "stopped before it ever ran",
        None,
    )
    assert det.expire(clock.advance(100 * (IV + GRACE))) == []


def test_a_runtime_registered_live_that_stops_before_its_first_pulse_raises_stopped(
    det: Detector, clock: FakeClock
) -> None:
    """A live request is a sign of life: that runtime ran."""
    register_alive(det, clock)

    t = det.stopped("rt-1", clock.advance(1))

    assert t is not None
    assert (t.last_seen, t.event) == (None, "stopped")


def test_a_restored_runtime_that_was_seen_before_raises_stopped(clock: FakeClock) -> None:
    det = Detector(now=clock.now)
    det.restore("rt-1", interval=IV, grace=GRACE, state=UNKNOWN, since=clock.now, last_seen=clock.now - 5, reason=None)

    t = det.stopped("rt-1", clock.advance(1))

    assert t is not None
    assert t.event == "stopped"


def test_stop_of_dead_runtime_marks_it_stopped(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.expire(clock.advance(IV + GRACE))

    t = det.stopped("rt-1", clock.advance(1))

    assert t is not None
    assert (t.old, t.new, t.event) == (DEAD, STOPPED, "stopped")


# --- interval changes --------------------------------------------------------------------


def test_shorter_interval_takes_effect_at_once(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock, iv=100, grace=100)
    det.pulse("rt-1", clock.advance(0.5))
    last_seen = clock.now

    assert det.register("rt-1", 1.0, 1.0, clock.advance(0.5)) is None

    # The new deadline counts from the last sign of life, not from the change.
    deadline = last_seen + 1.0 + 1.0
    assert det.deadline("rt-1") == deadline
    nxt = det.next_deadline()
    assert nxt is not None
    assert nxt <= deadline
    assert det.expire(deadline - EPS) == []
    assert expire_ids(det, deadline) == ["rt-1"]


def test_longer_interval_postpones_the_verdict(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock, iv=1.0, grace=1.0)
    registered = clock.now

    det.register("rt-1", 50.0, 50.0, clock.advance(1))

    assert det.expire(registered + 100 - EPS) == []
    assert expire_ids(det, registered + 100) == ["rt-1"]


def test_grace_change_alone_rearms_the_deadline(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock, iv=5.0, grace=50.0)

    det.register("rt-1", 5.0, 1.0, clock.now)

    assert expire_ids(det, clock.now + 6.0) == ["rt-1"]


def test_shorter_interval_set_while_dead_by_will_applies_after_recovery(det: Detector, clock: FakeClock) -> None:
    # Regression: the will left the old (long) heap entry live, and the
    # recovery did not re-arm, so the verdict came at the old deadline.
    register_alive(det, clock, iv=5.0, grace=5.0)
    det.offline("rt-1", clock.advance(1))

    det.register("rt-1", 0.1, 0.1, clock.advance(0.5), live=False)
    det.pulse("rt-1", clock.advance(0.5))

    deadline = clock.now + 0.1 + 0.1
    assert det.deadline("rt-1") == deadline
    nxt = det.next_deadline()
    assert nxt is not None
    assert nxt <= deadline
    assert expire_ids(det, deadline) == ["rt-1"]


def test_shorter_interval_set_while_stopped_applies_after_recovery(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock, iv=5.0, grace=5.0)
    det.stopped("rt-1", clock.advance(1))

    t = det.register("rt-1", 0.1, 0.1, clock.advance(0.5))

    assert t is not None
    assert t.event == "recovered"
    assert expire_ids(det, clock.now + 0.2) == ["rt-1"]


# --- deregistration and unknown IDs ---------------------------------------------------------


def test_deregister_removes_runtime(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)

    assert det.deregister("rt-1") is True
    assert "rt-1" not in det
    assert len(det) == 0
    assert list(det.views()) == []


def test_deregister_of_unknown_id_returns_false(det: Detector) -> None:
    assert det.deregister("nobody") is False


def test_stale_heap_entry_of_deregistered_runtime_is_ignored(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.deregister("rt-1")

    assert det.expire(clock.advance(10 * (IV + GRACE))) == []
    assert det.heap_pops == 1


def test_reregistered_runtime_is_not_judged_by_its_old_heap_entry(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    old_deadline = clock.now + IV + GRACE
    det.deregister("rt-1")
    det.register("rt-1", IV, GRACE, clock.advance(5))

    assert det.expire(old_deadline) == []
    assert expire_ids(det, clock.now + IV + GRACE) == ["rt-1"]


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda d, now: d.pulse("ghost", now), id="pulse"),
        pytest.param(lambda d, now: d.online("ghost", now), id="online"),
        pytest.param(lambda d, now: d.offline("ghost", now), id="offline"),
        pytest.param(lambda d, now: d.stopped("ghost", now), id="stopped"),
        pytest.param(lambda d, now: d.view("ghost"), id="view"),
        pytest.param(lambda d, now: d.deadline("ghost"), id="deadline"),
    ],
)
def test_message_for_unknown_id_raises_not_registered(
    det: Detector, clock: FakeClock, call: Callable[[Detector, float], object]
) -> None:
    det.register("rt-1", IV, GRACE, clock.now)

    with pytest.raises(NotRegistered) as info:
        call(det, clock.now)

    assert isinstance(info.value, KeyError)
    assert info.value.args == ("ghost",)


def test_pulse_for_deregistered_id_raises_not_registered(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.deregister("rt-1")

    with pytest.raises(NotRegistered):
        det.pulse("rt-1", clock.now)


# --- restore, suspend and resume ----------------------------------------------------------------


def test_restored_runtime_keeps_database_fields(clock: FakeClock) -> None:
    det = Detector(now=clock.now)

    det.restore("rt-1", interval=3.0, grace=4.0, state=ALIVE, since=10.0, last_seen=12.0, reason="connected")

    view = det.view("rt-1")
    assert (view.state, view.interval, view.grace, view.since, view.last_seen, view.reason) == (
        ALIVE,
        3.0,
        4.0,
        10.0,
        12.0,
        "connected",
    )


def test_restored_runtime_with_ancient_last_seen_gets_full_watch_after_resume(clock: FakeClock) -> None:
    det = Detector(now=clock.now)
    det.restore("rt-1", interval=IV, grace=GRACE, state=ALIVE, since=1.0, last_seen=2.0, reason="pulse received")
    det.restore("rt-2", interval=IV, grace=GRACE, state=UNKNOWN, since=1.0, last_seen=None, reason="registered")
    det.resume(clock.advance(3))
    resumed = clock.now

    assert det.expire(resumed + IV + GRACE - EPS) == []
    verdicts = det.expire(resumed + IV + GRACE)
    assert sorted(t.runtime_id for t in verdicts) == ["rt-1", "rt-2"]
    assert all(t.reason == "no pulse within 15 s of watching" for t in verdicts)


def test_restored_dead_or_stopped_runtime_is_not_watched(clock: FakeClock) -> None:
    det = Detector(now=clock.now)
    det.restore("dead", interval=IV, grace=GRACE, state=DEAD, since=1.0, last_seen=1.0, reason="connection lost")
    det.restore("stopped", interval=IV, grace=GRACE, state=STOPPED, since=1.0, last_seen=1.0, reason="stopped")
    det.resume(clock.now)

    assert det.deadline("dead") is None
    assert det.deadline("stopped") is None
    assert det.next_deadline() is None
    assert det.expire(clock.advance(1000)) == []


def test_restored_dead_runtime_recovers_on_pulse(clock: FakeClock) -> None:
    det = Detector(now=clock.now)
    det.restore("rt-1", interval=IV, grace=GRACE, state=DEAD, since=1.0, last_seen=1.0, reason="connection lost")
    det.resume(clock.now)

    t = det.pulse("rt-1", clock.advance(1))

    assert t is not None
    assert (t.old, t.new, t.event) == (DEAD, ALIVE, "recovered")
    assert det.deadline("rt-1") == clock.now + IV + GRACE


def test_pulse_after_resume_counts_from_the_pulse(clock: FakeClock) -> None:
    det = Detector(now=clock.now)
    det.restore("rt-1", interval=IV, grace=GRACE, state=ALIVE, since=1.0, last_seen=2.0, reason="pulse received")
    det.resume(clock.now)
    det.pulse("rt-1", clock.advance(4))

    assert det.expire(clock.now + IV + GRACE - EPS) == []
    assert expire_ids(det, clock.now + IV + GRACE) == ["rt-1"]


def test_suspended_detector_declares_nothing_dead(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)

    det.suspend()

    assert det.suspended is True
    assert [t.new for t in det.expire(clock.advance(100 * (IV + GRACE)))] == [UNKNOWN]
    assert det.view("rt-1").state is UNKNOWN


def test_resume_after_suspend_gives_a_full_interval_plus_grace(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.pulse("rt-1", clock.advance(1))
    det.suspend()
    det.resume(clock.advance(60))
    resumed = clock.now

    assert det.suspended is False
    assert det.deadline("rt-1") == resumed + IV + GRACE
    assert det.next_deadline() is not None
    assert det.expire(resumed + IV + GRACE - EPS) == []
    (t,) = det.expire(resumed + IV + GRACE)
    assert t.reason == "no pulse within 15 s of watching"


@pytest.fixture
def resumed(det: Detector, clock: FakeClock) -> float:
    """When the watch resumed, with a 7.5 s allowance, after a minute cut off; ``rt-1`` was alive before."""
    register_alive(det, clock)
    det.suspend()
    det.resume(clock.advance(60), allowance=7.5)
    return clock.now


def test_resume_with_an_allowance_starts_the_window_that_much_later(det: Detector, resumed: float) -> None:
    """After a broker restart the agents come back on their backoff: the window starts after the allowance."""
    assert det.deadline("rt-1") == resumed + 7.5 + IV + GRACE
    assert det.expire(resumed + 7.5 + IV + GRACE - EPS) == []
    (t,) = det.expire(resumed + 7.5 + IV + GRACE)
    assert t.event == "dead"


def test_a_runtime_back_within_the_allowance_keeps_it(det: Detector, clock: FakeClock, resumed: float) -> None:
    """One allowance for all: a deadline never moves earlier, so the heap's lazy entries are never late."""
    det.pulse("rt-1", clock.advance(1))

    assert det.deadline("rt-1") == resumed + 7.5 + IV + GRACE
    det.pulse("rt-1", clock.advance(10))
    assert det.deadline("rt-1") == clock.now + IV + GRACE


def test_will_is_still_acted_on_while_suspended(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.suspend()

    t = det.offline("rt-1", clock.advance(1))

    assert t is not None
    assert t.new is DEAD


# --- next_deadline -------------------------------------------------------------------------------


def test_next_deadline_is_none_when_nothing_is_watched(det: Detector, clock: FakeClock) -> None:
    assert det.next_deadline() is None

    register_alive(det, clock)
    det.expire(clock.advance(IV + GRACE))

    assert det.next_deadline() is None


def test_next_deadline_is_never_later_than_the_true_next_verdict(det: Detector, clock: FakeClock) -> None:
    specs = {"a": (1.0, 0.5), "b": (2.0, 2.0), "c": (0.3, 0.2), "d": (5.0, 1.0)}
    for rid, (iv, grace) in specs.items():
        det.register(rid, iv, grace, clock.now)
    for step in range(400):
        clock.advance(0.05 + (step % 7) * 0.03)
        rid = "abcd"[(step * 7) % 4]
        if step % 3:
            det.pulse(rid, clock.now)
        if step % 50 == 25:
            iv, grace = specs[rid]
            specs[rid] = (grace, iv)
            det.register(rid, grace, iv, clock.now)
        if step % 11 == 0:
            det.expire(clock.now)
        deadlines = [d for d in (det.deadline(r) for r in specs) if d is not None]
        nxt = det.next_deadline()
        if deadlines:
            assert nxt is not None
            assert nxt <= min(deadlines)


def test_loop_waking_only_at_next_deadline_declares_dead_exactly_on_time(det: Detector, clock: FakeClock) -> None:
    det.register("a", 1.0, 1.0, clock.now)
    det.register("b", 3.0, 0.5, clock.now)
    start = clock.now
    det.pulse("a", start + 1.5)
    det.pulse("b", start + 2.0)
    det.pulse("a", start + 3.0)

    verdicts: list[Transition] = []
    while (nxt := det.next_deadline()) is not None:
        verdicts.extend(det.expire(nxt))

    assert [(t.runtime_id, t.at) for t in verdicts] == [("a", start + 5.0), ("b", start + 5.5)]


# --- work done: no per-pulse or per-tick heap work ---------------------------------------------------


def test_heap_work_scales_with_deadlines_not_pulses_or_ticks() -> None:
    runtimes, duration, iv, grace = 10_000, 60, 10.0, 10.0
    det = Detector(now=0.0)
    ids = [f"rt-{i}" for i in range(runtimes)]
    for rid in ids:
        det.register(rid, iv, grace, 0.0)
    # Ten groups pulse once a second each, staggered by 0.1 s; expire() every tick.
    groups = [ids[g::10] for g in range(10)]
    for tick in range(1, duration * 10 + 1):
        now = tick / 10
        for rid in groups[tick % 10]:
            det.pulse(rid, now)
        assert det.expire(now) == []

    assert all(v.state is ALIVE for v in det.views())
    assert 0 < det.heap_pops < 3 * runtimes * duration / (iv + grace)


def test_expire_on_quiet_detector_with_nothing_due_pops_nothing() -> None:
    det = Detector(now=0.0)
    for i in range(10_000):
        det.register(f"rt-{i}", 10.0, 10.0, 0.0)

    for tick in range(1, 200):
        assert det.expire(tick / 10) == []

    assert det.heap_pops == 0
    assert len(det.expire(20.0)) == 10_000


def runtimes_that_all_pulsed(n: int) -> Detector:
    """``n`` runtimes armed for the same instant (10 + 10 s) that each pulsed at 1 s: all stale at 20 s."""
    det = Detector(now=0.0)
    for i in range(n):
        det.register(f"rt-{i}", 10.0, 10.0, 0.0)
        det.pulse(f"rt-{i}", 1.0)
    return det


def test_settle_re_arms_at_most_its_budget_and_says_more_wait() -> None:
    det = runtimes_that_all_pulsed(100)

    assert det.settle(20.0, 30) is True
    assert det.heap_pops == 30


def test_settle_re_arms_every_stale_entry_in_slices_then_says_none_wait() -> None:
    det = runtimes_that_all_pulsed(100)

    slices = 0
    while det.settle(20.0, 30):
        slices += 1

    assert (slices, det.heap_pops) == (3, 100)
    assert det.next_deadline() == 21.0  # re-armed at their real deadlines
    assert det.expire(20.0) == []


def test_settle_stops_at_a_runtime_that_is_really_due() -> None:
    det = runtimes_that_all_pulsed(10)
    det.register("rt-silent", 5.0, 5.0, 0.0)  # due at 10 s, ahead of every stale entry

    assert det.settle(20.0, 5) is False
    assert det.heap_pops == 0
    assert expire_ids(det, 20.0) == ["rt-silent"]


# --- blind: suspended while deadlines pass ----------------------------------------------------


def test_an_alive_runtime_goes_unknown_not_dead_while_suspended(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", IV, GRACE, clock.now)
    det.suspend()

    (t,) = det.expire(clock.advance(IV + GRACE))

    assert (t.old, t.new, t.event) == (ALIVE, UNKNOWN, None)
    assert t.reason == "the orchestrator lost its broker"


def test_a_runtime_stays_unknown_through_a_long_suspension(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", IV, GRACE, clock.now)
    det.suspend()
    det.expire(clock.advance(IV + GRACE))

    for _ in range(10):
        assert det.expire(clock.advance(IV + GRACE)) == []
    assert det.view("rt-1").state is UNKNOWN


def test_an_unknown_runtime_gets_a_full_window_after_resume(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", IV, GRACE, clock.now)
    det.suspend()
    det.expire(clock.advance(3 * (IV + GRACE)))
    det.resume(clock.advance(1))
    resumed = clock.now

    assert det.expire(resumed + IV + GRACE - EPS) == []
    (t,) = det.expire(resumed + IV + GRACE)
    assert (t.old, t.new, t.event) == (UNKNOWN, DEAD, "dead")


def test_a_pulse_after_resume_brings_an_unknown_runtime_back_without_an_alert(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", IV, GRACE, clock.now)
    det.suspend()
    det.expire(clock.advance(IV + GRACE))
    det.resume(clock.advance(1))

    t = det.pulse("rt-1", clock.advance(1))

    assert t is not None
    assert (t.old, t.new, t.event) == (UNKNOWN, ALIVE, None)


def test_a_pulse_of_another_session_than_the_newest_is_noted(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.online("rt-1", clock.now, session=7)
    det.pulse("rt-1", clock.advance(0.1), session=7)
    assert det.session_changes == []

    det.pulse("rt-1", clock.advance(0.1), session=8)

    assert det.session_changes == ["rt-1"]


def test_a_live_birth_of_a_new_session_is_noted_and_a_retained_one_is_not(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.online("rt-1", clock.now, session=7)
    det.online("rt-1", clock.advance(0.1), session=8, live=False)
    assert det.session_changes == []

    det.online("rt-1", clock.advance(0.1), session=9)

    assert det.session_changes == ["rt-1"]

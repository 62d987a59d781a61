"""The last-seen policy: which runtimes' times go to the database, and when.

First the policy alone, fed by hand on plain records with a fake ``now``,
then as the detector feeds it (re-arms, changes of state, first signs of
life), driven by a fake clock.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.detector import ALIVE, DEAD, STOPPED, UNKNOWN, Detector
from orchestrator.lastseen import PHASES, LastSeen, phase_index

from .fakeclock import FakeClock

EVERY = 60.0
IV = 10.0
GRACE = 5.0


@dataclass
class Rec:
    """A detector's record, as far as the policy sees it."""

    last_seen: float | None = None
    stored: float | None = None
    phase: float = 0.0


def policy(records: dict[str, Rec], every: float = EVERY) -> LastSeen:
    """A policy over ``records`` (runtime ID -> record, kept by reference), each added as the detector adds one."""
    seen = LastSeen(records, every)
    for runtime_id, rec in records.items():
        seen.added(runtime_id, rec)
    return seen


def boundary_after(seen: LastSeen, runtime_id: str, t: float) -> float:
    """The start of the runtime's next period after ``t``, on its own phase."""
    phase = seen.phase(runtime_id)
    return ((t + phase) // seen.every + 1) * seen.every - phase


# --- the phase -------------------------------------------------------------------------------


def test_the_phase_is_the_crc32_of_the_ids_utf8_bytes() -> None:
    for runtime_id in ("rt-1", "rt-2", "runtime-ü", ""):
        assert phase_index(runtime_id) == zlib.crc32(runtime_id.encode("utf-8")) % PHASES


def test_the_phase_of_an_id_is_pinned() -> None:
    assert [phase_index(r) for r in ("rt-1", "rt-2", "runtime-ü")] == [338, 232, 318]
    assert LastSeen({}, EVERY).phase("rt-1") == 338 * EVERY / PHASES


def test_the_phase_is_the_same_in_processes_with_other_hash_seeds() -> None:
    ids = [f"rt-{i}" for i in range(50)] + ["runtime-ü", "a"]
    code = (
        "import json, sys; from orchestrator.lastseen import LastSeen; ids = json.loads(sys.argv[1]); "
        "s = LastSeen({}, 60.0); print(json.dumps([[s.phase(r) for r in ids], [hash(r) for r in ids]]))"
    )
    runs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(ids)],
            env=env,
            cwd=Path(__file__).resolve().parents[1],  # this tree's orchestrator, first on the path with -c
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(out.stdout))
    (phases_1, hashes_1), (phases_2, hashes_2) = runs

    assert hashes_1 != hashes_2  # the salted hash() the phase used to come from does differ
    here = LastSeen({}, 60.0)
    assert phases_1 == phases_2 == [here.phase(r) for r in ids]


@pytest.mark.parametrize("every", [0.5, 60.0, 86400.0])
def test_the_phase_lies_within_the_period(every: float) -> None:
    seen = LastSeen({}, every)

    assert all(0 <= seen.phase(f"rt-{i}") < every for i in range(5000))


def id_patterns() -> dict[str, list[str]]:
    rng = random.Random(19)
    n = 10_000
    return {
        "numbered": [f"rt-{i}" for i in range(n)],
        "zero-padded": [f"rt-{i:06d}" for i in range(n)],
        "uuid": [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(n)],
        "host-worker": [f"node{i // 100:03d}-worker-{i % 100}" for i in range(n)],
        "bare numbers": [str(i) for i in range(n)],
    }


@pytest.mark.parametrize("pattern", list(id_patterns()))
def test_phases_spread_evenly_over_the_period(pattern: str) -> None:
    ids = id_patterns()[pattern]
    seen = LastSeen({}, EVERY)
    bins = 20

    counts = Counter(int(seen.phase(r) * bins // EVERY) for r in ids)

    expected = len(ids) / bins
    assert sorted(counts) == list(range(bins))
    assert all(0.85 * expected <= c <= 1.15 * expected for c in counts.values()), counts


def test_adding_a_record_gives_it_its_phase() -> None:
    rec = Rec()

    policy({"rt-1": rec})

    assert rec.phase == 338 * EVERY / PHASES


def test_records_of_one_phase_share_one_float() -> None:
    # 1024 phases: among 2,000 IDs some share one. The record keeps a reference, not a float of its own.
    records = {f"rt-{i}": Rec() for i in range(2000)}
    policy(records)

    by_phase: dict[int, list[Rec]] = {}
    for runtime_id, rec in records.items():
        by_phase.setdefault(phase_index(runtime_id), []).append(rec)
    shared = [recs for recs in by_phase.values() if len(recs) > 1]
    assert shared
    assert all(rec.phase is recs[0].phase for recs in shared for rec in recs)


# --- added --------------------------------------------------------------------------------------


def test_a_registered_record_has_nothing_stored_and_nothing_picked() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec})

    assert rec.stored is None
    assert seen.take() == {}


def test_a_restored_record_has_the_databases_time_stored_and_nothing_picked() -> None:
    rec = Rec(last_seen=2.0)
    seen = policy({"rt-1": rec})

    assert rec.stored == 2.0
    assert seen.take() == {}
    assert seen.take_all() == {}


# --- rearmed -----------------------------------------------------------------------------------------


def test_a_rearm_of_a_runtime_never_seen_picks_nothing() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec})

    seen.rearmed("rt-1", rec)

    assert seen.take() == {}


def test_a_rearm_picks_a_time_when_none_was_handed_out() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec})
    rec.last_seen = 5.0

    seen.rearmed("rt-1", rec)

    assert seen.take() == {"rt-1": 5.0}
    assert rec.stored == 5.0


def test_a_rearm_in_the_same_period_picks_nothing() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec})
    start = boundary_after(seen, "rt-1", 1000.0)
    rec.last_seen = rec.stored = start

    rec.last_seen = start + EVERY - 1e-6
    seen.rearmed("rt-1", rec)

    assert seen.take() == {}
    assert rec.stored == start


def test_a_rearm_in_a_new_period_picks_the_newest_time() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec})
    start = boundary_after(seen, "rt-1", 1000.0)
    rec.last_seen = rec.stored = start + EVERY - 1e-6

    rec.last_seen = start + EVERY
    seen.rearmed("rt-1", rec)

    assert seen.take() == {"rt-1": start + EVERY}
    assert rec.stored == start + EVERY


def test_periods_follow_each_runtimes_own_phase() -> None:
    a, b = Rec(), Rec()
    seen = policy({"rt-1": a, "rt-2": b})  # phases 19.8 s and 13.6 s
    a.stored = b.stored = 1000.0
    # rt-1's next period starts at 1020 - 19.8 = 1000.2 s, rt-2's at 1020 - 13.6 = 1006.4 s.
    a.last_seen = b.last_seen = 1003.0

    seen.rearmed("rt-1", a)
    seen.rearmed("rt-2", b)

    assert seen.take() == {"rt-1": 1003.0}


@pytest.mark.parametrize("every", [0.0, EVERY])
def test_a_rearm_picks_nothing_when_nothing_was_seen_since_the_last_pick(every: float) -> None:
    rec = Rec()
    seen = policy({"rt-1": rec}, every)
    rec.last_seen = rec.stored = boundary_after(LastSeen({}, EVERY), "rt-1", 1000.0)  # a pick at a period's start

    seen.rearmed("rt-1", rec)

    assert seen.take() == {}


def test_with_a_period_of_zero_every_rearm_after_a_pulse_picks() -> None:
    rec = Rec(last_seen=5.0)
    seen = policy({"rt-1": rec}, 0.0)

    seen.rearmed("rt-1", rec)
    rec.last_seen = 5.001
    seen.rearmed("rt-1", rec)
    first = seen.take()
    seen.rearmed("rt-1", rec)

    assert first == {"rt-1": 5.001}
    assert seen.take() == {}


def test_a_later_pick_replaces_an_earlier_one_not_yet_taken() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec}, 0.0)
    rec.last_seen = 5.0
    seen.rearmed("rt-1", rec)

    rec.last_seen = 6.0
    seen.rearmed("rt-1", rec)

    assert seen.take() == {"rt-1": 6.0}


# --- force -------------------------------------------------------------------------------------------------


def test_force_picks_the_exact_time_within_the_same_period() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec}, 86400.0)
    rec.last_seen = rec.stored = 1000.0

    rec.last_seen = 1001.25
    seen.force("rt-1", rec)

    assert seen.take() == {"rt-1": 1001.25}


def test_force_picks_nothing_when_the_time_was_handed_out_already() -> None:
    rec = Rec(last_seen=1000.0)
    seen = policy({"rt-1": rec})

    seen.force("rt-1", rec)

    assert seen.take() == {}


def test_force_picks_nothing_for_a_runtime_never_seen() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec})

    seen.force("rt-1", rec)

    assert seen.take() == {}


# --- forget ---------------------------------------------------------------------------------------------------


def test_forget_drops_a_picked_time() -> None:
    a, b = Rec(), Rec()
    seen = policy({"a": a, "b": b})
    a.last_seen = b.last_seen = 5.0
    seen.force("a", a)
    seen.force("b", b)

    seen.forget("a")

    assert seen.take() == {"b": 5.0}


def test_forget_of_a_runtime_with_nothing_picked_is_harmless() -> None:
    seen = policy({})

    seen.forget("nobody")

    assert seen.take() == {}


# --- take, take_all, give_back ------------------------------------------------------------------------------------


def test_take_hands_each_picked_time_out_once() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec})
    rec.last_seen = 5.0
    seen.force("rt-1", rec)

    assert seen.take() == {"rt-1": 5.0}
    assert seen.take() == {}


def test_take_does_not_walk_the_runtimes() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec})
    rec.last_seen = 5.0  # seen, never picked

    assert seen.take() == {}


def test_take_all_hands_out_every_time_not_yet_handed_out() -> None:
    picked, unpicked, stored, never = Rec(), Rec(), Rec(last_seen=1.0), Rec()
    seen = policy({"picked": picked, "unpicked": unpicked, "stored": stored, "never": never})
    picked.last_seen = 3.0
    seen.force("picked", picked)
    unpicked.last_seen = 4.0

    assert seen.take_all() == {"picked": 3.0, "unpicked": 4.0}
    assert (picked.stored, unpicked.stored, stored.stored, never.stored) == (3.0, 4.0, 1.0, None)


def test_take_all_after_take_hands_out_only_what_take_did_not() -> None:
    a, b = Rec(), Rec()
    seen = policy({"a": a, "b": b})
    a.last_seen = 5.0
    seen.force("a", a)
    assert seen.take() == {"a": 5.0}
    b.last_seen = 6.0

    assert seen.take_all() == {"b": 6.0}


def test_take_all_after_take_hands_out_a_newer_time_of_the_same_runtime() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec})
    rec.last_seen = 5.0
    seen.force("rt-1", rec)
    seen.take()
    rec.last_seen = 5.5

    assert seen.take_all() == {"rt-1": 5.5}


def test_nothing_is_left_after_take_all() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec})
    rec.last_seen = 5.0
    seen.take_all()

    assert seen.take_all() == {}
    assert seen.take() == {}


def test_give_back_picks_the_same_times_again() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec})
    rec.last_seen = 5.0
    seen.force("rt-1", rec)
    taken = seen.take()

    seen.give_back(taken)

    assert seen.take() == taken


def test_give_back_re_picks_the_newest_time() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec})
    rec.last_seen = 5.0
    seen.force("rt-1", rec)
    taken = seen.take()
    rec.last_seen = 7.0  # a pulse while the write was failing

    seen.give_back(taken)

    assert seen.take() == {"rt-1": 7.0}
    assert rec.stored == 7.0


def test_give_back_skips_runtimes_no_longer_registered() -> None:
    records = {"a": Rec(), "b": Rec()}
    seen = policy(records)
    for rid, rec in records.items():
        rec.last_seen = 5.0
        seen.force(rid, rec)
    taken = seen.take()
    del records["b"]

    seen.give_back(taken)

    assert seen.take() == {"a": 5.0}


def test_given_back_times_go_out_with_take_all_too() -> None:
    rec = Rec()
    seen = policy({"rt-1": rec})
    rec.last_seen = 5.0
    seen.force("rt-1", rec)
    seen.give_back(seen.take())

    assert seen.take_all() == {"rt-1": 5.0}


# --- fed by the detector -------------------------------------------------------------------------------------------


def register_alive(det: Detector, clock: FakeClock, rid: str = "rt-1") -> None:
    t = det.register(rid, IV, GRACE, clock.now)
    assert t is not None
    assert t.new is ALIVE


def pulsed_then_rearmed(det: Detector, clock: FakeClock, rid: str = "rt-1") -> float:
    """Register ``rid``, pulse it once, and reach its first deadline so it is re-armed; the pulse's time."""
    register_alive(det, clock, rid)
    seen = clock.advance(1)
    det.pulse(rid, seen)
    assert det.expire(clock.advance(IV + GRACE - 1)) == []  # the entry armed at registration
    return seen


class Spy:
    """Stands in for the policy and records every call the detector makes to it."""

    def __init__(self, real: LastSeen) -> None:
        self.real = real
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.real, name)

        def call(*args: Any) -> Any:
            self.calls.append(name)
            return method(*args)

        return call


def test_the_detector_owns_a_policy_with_its_period(clock: FakeClock) -> None:
    det = Detector(now=clock.now, seen_every=42.0)

    assert isinstance(det.seen, LastSeen)
    assert det.seen.every == 42.0


def test_registration_is_not_a_sign_of_life_so_nothing_is_picked(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", IV, GRACE, clock.now)

    assert det.seen.take() == {}


def test_a_first_pulse_is_picked_at_once(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)

    det.pulse("rt-1", clock.advance(1))

    assert det.seen.take() == {"rt-1": clock.now}


def test_a_first_birth_of_an_alive_runtime_is_picked_at_once(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)

    assert det.online("rt-1", clock.advance(1), session=1) is None

    assert det.seen.take() == {"rt-1": clock.now}


def test_a_first_birth_that_changes_the_state_is_picked_once(det: Detector, clock: FakeClock) -> None:
    det.register("rt-1", IV, GRACE, clock.now, live=False)

    t = det.online("rt-1", clock.advance(1), session=1)

    assert t is not None
    assert det.seen.take() == {"rt-1": clock.now}


def test_a_retained_birth_is_no_sign_of_life_so_nothing_is_picked(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)

    det.online("rt-1", clock.advance(1), session=1, live=False)

    assert det.seen.take() == {}


def test_later_pulses_alone_pick_nothing(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.pulse("rt-1", clock.advance(1))
    det.seen.take()

    det.pulse("rt-1", clock.advance(1))
    det.pulse("rt-1", clock.advance(1))

    assert det.seen.take() == {}


def test_a_pulse_after_the_first_does_no_last_seen_work(clock: FakeClock) -> None:
    det = Detector(now=clock.now, seen_every=EVERY)
    register_alive(det, clock)
    det.pulse("rt-1", clock.advance(1))
    spy = Spy(det.seen)
    det.seen = spy  # type: ignore[assignment]

    for _ in range(100):
        det.pulse("rt-1", clock.advance(0.01))

    assert spy.calls == []


def test_a_late_pulse_of_a_session_declared_dead_picks_nothing(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock)
    det.online("rt-1", clock.now, session=7)
    det.pulse("rt-1", clock.advance(1), session=7)
    det.offline("rt-1", clock.advance(1), session=7)
    det.seen.take()

    assert det.pulse("rt-1", clock.advance(0.1), session=7) is None

    assert det.seen.take() == {}


def test_a_rearm_picks_the_last_seen_time_once(det: Detector, clock: FakeClock) -> None:
    seen = pulsed_then_rearmed(det, clock)

    assert det.seen.take() == {"rt-1": seen}
    assert det.seen.take() == {}


def test_a_rearm_reports_to_the_policy(clock: FakeClock) -> None:
    det = Detector(now=clock.now, seen_every=EVERY)
    register_alive(det, clock)
    det.pulse("rt-1", clock.advance(1))
    spy = Spy(det.seen)
    det.seen = spy  # type: ignore[assignment]

    det.expire(clock.advance(IV + GRACE - 1))

    assert spy.calls == ["rearmed"]


def test_a_settle_picks_like_an_expire() -> None:
    det = Detector(now=0.0, seen_every=0.0)
    for i in range(10):
        det.register(f"rt-{i}", 10.0, 10.0, 0.0)
        det.pulse(f"rt-{i}", 1.0)
    det.seen.take()
    for i in range(10):
        det.pulse(f"rt-{i}", 2.0)

    while det.settle(20.0, 3):
        pass

    assert det.seen.take() == {f"rt-{i}": 2.0 for i in range(10)}


def test_a_live_runtime_is_picked_once_per_period_and_never_further_behind(clock: FakeClock) -> None:
    det = Detector(now=clock.now, seen_every=EVERY)
    register_alive(det, clock)
    start = clock.now
    picks: list[float] = []
    while clock.now - start < 600:
        det.pulse("rt-1", clock.advance(IV / 2))
        assert det.expire(clock.now) == []
        picks.extend(det.seen.take().values())

    assert 10 <= len(picks) <= 12  # the first pulse at once, then one per period of 60 s
    assert max(b - a for a, b in itertools.pairwise(picks)) <= EVERY + IV + GRACE


def test_runtimes_picked_together_are_next_picked_spread_over_the_period(clock: FakeClock) -> None:
    det = Detector(now=clock.now, seen_every=EVERY)
    ids = [f"rt-{i}" for i in range(1000)]
    for rid in ids:
        register_alive(det, clock, rid)
    first: set[str] = set()
    second: dict[str, float] = {}
    for step in range(1, 3000):  # 300 s; each runtime pulses every 5 s, 20 of them every 0.1 s
        for rid in ids[step % 50 :: 50]:
            det.pulse(rid, clock.advance(0.1 / 20))
        assert det.expire(clock.now) == []
        for rid in det.seen.take():
            if rid in first:
                second.setdefault(rid, clock.now)
            first.add(rid)

    assert len(second) == len(ids)
    per_6_s = Counter(int(at // 6) for at in second.values())
    assert max(per_6_s.values()) <= 400  # in waves of re-arms over the period, not all 1,000 in one


@pytest.mark.parametrize(
    "flip",
    [
        pytest.param(lambda d, now: d.offline("rt-1", now), id="will"),
        pytest.param(lambda d, now: d.stopped("rt-1", now), id="stopped"),
    ],
)
def test_a_change_of_state_forces_the_exact_last_seen(clock: FakeClock, flip: Any) -> None:
    det = Detector(now=clock.now, seen_every=3600.0)
    pulsed_then_rearmed(det, clock)
    det.seen.take()
    seen = clock.advance(1)
    det.pulse("rt-1", seen)

    flip(det, clock.advance(1))

    assert det.seen.take() == {"rt-1": seen}


def test_a_verdict_of_silence_forces_the_exact_last_pulse(clock: FakeClock) -> None:
    det = Detector(now=clock.now, seen_every=3600.0)
    pulsed_then_rearmed(det, clock)
    det.seen.take()
    last = clock.advance(1)
    det.pulse("rt-1", last)

    (t,) = det.expire(last + IV + GRACE)

    assert (t.new, t.last_seen) == (DEAD, last)
    assert det.seen.take() == {"rt-1": last}


def test_a_recovery_forces_the_exact_time_of_the_pulse(clock: FakeClock) -> None:
    det = Detector(now=clock.now, seen_every=3600.0)
    pulsed_then_rearmed(det, clock)
    det.stopped("rt-1", clock.advance(1))
    det.seen.take()

    t = det.pulse("rt-1", clock.advance(5))

    assert t is not None
    assert (t.old, t.new) == (STOPPED, ALIVE)
    assert det.seen.take() == {"rt-1": clock.now}


def test_a_change_of_state_with_its_time_handed_out_picks_nothing(clock: FakeClock) -> None:
    det = Detector(now=clock.now, seen_every=3600.0)
    pulsed_then_rearmed(det, clock)
    det.seen.take()

    det.offline("rt-1", clock.advance(1))

    assert det.seen.take() == {}


def test_a_restored_last_seen_is_already_stored(det: Detector) -> None:
    det.restore("rt-1", interval=IV, grace=GRACE, state=ALIVE, since=1.0, last_seen=2.0, reason="pulse received")

    assert det.seen.take_all() == {}


def test_a_restored_runtime_never_seen_is_picked_at_its_first_pulse(det: Detector, clock: FakeClock) -> None:
    det.restore("rt-1", interval=IV, grace=GRACE, state=UNKNOWN, since=1.0, last_seen=None, reason="registered")
    det.resume(clock.now)

    det.pulse("rt-1", clock.advance(1))

    assert det.seen.take() == {"rt-1": clock.now}


def test_deregister_drops_a_picked_time(det: Detector, clock: FakeClock) -> None:
    pulsed_then_rearmed(det, clock)

    det.deregister("rt-1")

    assert det.seen.take() == {}
    assert det.seen.take_all() == {}


def test_take_all_takes_every_time_the_detector_has_not_handed_out(clock: FakeClock) -> None:
    det = Detector(now=clock.now, seen_every=3600.0)
    register_alive(det, clock, "a")
    register_alive(det, clock, "b")
    register_alive(det, clock, "never-pulsed")
    det.pulse("a", clock.advance(1))
    det.pulse("b", clock.advance(1))
    det.seen.take()
    det.pulse("a", clock.advance(1))

    assert det.seen.take_all() == {"a": clock.now}
    assert det.seen.take_all() == {}
    assert det.seen.take() == {}


def test_give_back_re_picks_the_newest_times_of_runtimes_still_registered(det: Detector, clock: FakeClock) -> None:
    register_alive(det, clock, "a")
    register_alive(det, clock, "b")
    det.pulse("a", clock.advance(1))
    det.pulse("b", clock.now)
    taken = det.seen.take_all()
    det.pulse("a", clock.advance(1))
    det.deregister("b")

    det.seen.give_back(taken)

    assert det.seen.take() == {"a": clock.now}

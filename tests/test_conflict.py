"""ConflictWatch on a fake clock: when two claimants of one runtime ID are announced, and when not."""

from __future__ import annotations

from orchestrator.conflict import SIGNS, ConflictWatch

WINDOW = 20.0


def test_a_reconnect_is_not_a_conflict() -> None:
    watch = ConflictWatch()
    assert watch.sign("rt-1", 0.0, WINDOW) is False  # a pulse of the new session before its birth
    assert watch.sign("rt-1", 0.01, WINDOW) is False  # the birth


def test_three_signs_within_the_window_are_a_conflict() -> None:
    watch = ConflictWatch()
    results = [watch.sign("rt-1", t, WINDOW) for t in (0.0, 0.5, 1.0)]
    assert results == [False] * (SIGNS - 1) + [True]
    assert watch.in_conflict("rt-1", 1.0, WINDOW)


def test_signs_spread_wider_than_the_window_are_not() -> None:
    watch = ConflictWatch()
    assert not any(watch.sign("rt-1", t, WINDOW) for t in (0.0, 15.0, 30.0, 45.0, 60.0))


def test_an_ongoing_conflict_is_announced_once_per_quiet_spell() -> None:
    watch = ConflictWatch()
    raised = [watch.sign("rt-1", t * 0.5, WINDOW) for t in range(30)]
    assert raised.count(True) == 1
    assert watch.sign("rt-1", 100.0, WINDOW) is False
    assert watch.sign("rt-1", 100.5, WINDOW) is False
    assert watch.sign("rt-1", 101.0, WINDOW) is True  # quiet for longer than the window: news again


def test_the_conflict_ends_after_a_quiet_window() -> None:
    watch = ConflictWatch()
    for t in (0.0, 0.5, 1.0):
        watch.sign("rt-1", t, WINDOW)
    assert not watch.in_conflict("rt-1", 1.0 + WINDOW + 0.1, WINDOW)


def test_runtimes_are_counted_apart() -> None:
    watch = ConflictWatch()
    assert watch.sign("rt-1", 0.0, WINDOW) is False
    assert watch.sign("rt-2", 0.1, WINDOW) is False
    assert watch.sign("rt-1", 0.2, WINDOW) is False
    assert watch.sign("rt-2", 0.3, WINDOW) is False

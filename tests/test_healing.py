"""RegistrationHealer: which unregistered runtimes get their retained registration fetched, and when (fake clock)."""

from __future__ import annotations

import pytest

from orchestrator.healing import RegistrationHealer, Tally


@pytest.fixture
def healer() -> RegistrationHealer:
    return RegistrationHealer(retry_after=60.0, batch=3, max_wanted=5, fetch_window=30.0)


def test_a_first_unregistered_pulse_asks_for_a_fetch(healer: RegistrationHealer) -> None:
    assert healer.unregistered_pulse("rt-1", now=0.0) is True
    assert len(healer) == 1


def test_more_pulses_of_a_waiting_runtime_ask_nothing_more(healer: RegistrationHealer) -> None:
    healer.unregistered_pulse("rt-1", now=0.0)
    assert healer.unregistered_pulse("rt-1", now=0.1) is False
    assert len(healer) == 1


def test_take_hands_out_a_batch_in_order_of_first_pulse(healer: RegistrationHealer) -> None:
    for i in range(4):
        healer.unregistered_pulse(f"rt-{i}", now=float(i))
    assert healer.take(now=10.0) == ["rt-0", "rt-1", "rt-2"]
    assert healer.take(now=10.0) == ["rt-3"]
    assert healer.take(now=10.0) == []
    assert healer.fetched == 4


def test_a_fetched_runtime_is_not_fetched_again_within_retry_after(healer: RegistrationHealer) -> None:
    healer.unregistered_pulse("rt-1", now=0.0)
    healer.take(now=1.0)
    assert healer.unregistered_pulse("rt-1", now=60.9) is False
    assert healer.unregistered_pulse("rt-1", now=61.0) is True


def test_at_most_max_wanted_wait_at_once(healer: RegistrationHealer) -> None:
    asked = [healer.unregistered_pulse(f"rt-{i}", now=0.0) for i in range(8)]
    assert asked == [True] * 5 + [False] * 3
    assert len(healer) == 5


def test_a_registration_soon_after_its_fetch_counts_as_healed(healer: RegistrationHealer) -> None:
    healer.unregistered_pulse("rt-1", now=0.0)
    healer.take(now=1.0)
    assert healer.registered("rt-1", now=2.0) is True
    assert healer.healed == 1


def test_a_registration_after_the_fetch_window_is_not_counted(healer: RegistrationHealer) -> None:
    healer.unregistered_pulse("rt-1", now=0.0)
    healer.take(now=1.0)
    assert healer.registered("rt-1", now=31.5) is False
    assert healer.healed == 0


def test_a_registration_without_a_fetch_is_not_counted(healer: RegistrationHealer) -> None:
    assert healer.registered("rt-1", now=0.0) is False
    assert healer.healed == 0


def test_a_registration_while_waiting_cancels_the_fetch(healer: RegistrationHealer) -> None:
    healer.unregistered_pulse("rt-1", now=0.0)
    healer.registered("rt-1", now=0.5)  # its own request arrived first
    assert healer.take(now=1.0) == []


def test_tally_counts_pulses_and_runtimes_then_starts_afresh(healer: RegistrationHealer) -> None:
    for rid in ("a", "b", "a", "c", "a"):
        healer.unregistered_pulse(rid, now=0.0)
    assert healer.tally() == Tally(pulses=5, runtimes=3, examples=("a", "b", "c"))
    assert healer.tally() is None


def test_tally_keeps_a_bounded_number_of_ids() -> None:
    healer = RegistrationHealer(max_wanted=10)
    for i in range(1_000):
        healer.unregistered_pulse(f"rt-{i}", now=0.0)
    tally = healer.tally()
    assert tally is not None
    assert (tally.pulses, tally.runtimes, len(tally.examples)) == (1_000, 10, 5)


def test_a_fetched_copy_is_claimed_once(healer: RegistrationHealer) -> None:
    healer.unregistered_pulse("rt-1", now=0.0)
    healer.take(now=1.0)
    assert healer.claim("rt-1", now=2.0) is True
    assert healer.claim("rt-1", now=2.5) is False
    assert healer.healed == 0

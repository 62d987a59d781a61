"""Delivery: routing, per-channel isolation, retries, storm control, reminders and silences.

Decisions run on a fake wall clock; deliveries run on the real event loop
against in-process channels that record, fail or hang on demand.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.config import ConfigError, load_config
from orchestrator.dispatch import Dispatcher, Route, build_routes, retry_policy, storm_policy
from orchestrator.notify import AppriseNotifier, Notice, NotifyError, ShellNotifier, WebhookNotifier
from orchestrator.silence import SilenceBook
from orchestrator.storm import RetryPolicy, StormGate, StormPolicy

T0 = 1_764_000_000.0
FAST_RETRY = RetryPolicy(attempts=3, base=0.001, max=0.01)


@dataclass
class FakeClock:
    """Wall-clock seconds that only move when the test says so."""

    now: float = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Channel:
    """Records what it is sent; raises the queued errors first; hangs while ``gate`` is clear."""

    name: str
    received: list[Notice] = field(default_factory=list)
    errors: list[NotifyError] = field(default_factory=list)
    attempts: int = 0
    gate: asyncio.Event | None = None
    changed: asyncio.Event | None = None

    async def notify(self, notice: Notice) -> None:
        self.attempts += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        self.received.append(notice)
        if self.changed is not None:
            self.changed.set()

    async def until(self, count: int) -> None:
        """Until ``count`` notices have arrived."""
        while len(self.received) < count:
            self.changed = asyncio.Event()
            await self.changed.wait()

    def events(self) -> list[tuple[str, str | None]]:
        return [(n.event, n.runtime_id) for n in self.received]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def states() -> dict[str, str]:
    """What ``state_of`` answers, set by each test; runtimes not in it are unknown (None)."""
    return {}


@pytest.fixture
def channel() -> Channel:
    return Channel("main")


@pytest.fixture
def delivered() -> list[Notice]:
    """Every notice ``on_delivered`` was called with, in order."""
    return []


@pytest.fixture
def make_dispatcher(clock: FakeClock, states: dict[str, str], delivered: list[Notice]) -> Callable[..., Dispatcher]:
    """A Dispatcher on the fake clock; keyword arguments override its defaults."""

    def make(routes: Iterable[Route], **kwargs: Any) -> Dispatcher:
        options: dict[str, Any] = {
            "clock": clock,
            "state_of": states.get,
            "population": lambda: 1000,
            "on_delivered": delivered.append,
            "retry": FAST_RETRY,
        }
        options.update(kwargs)
        return Dispatcher(routes, **options)

    return make


def dead(rid: str, at: float = T0, key: object = None) -> Notice:
    return Notice("dead", rid, at, at - 10, "connection lost", key=key if key is not None else rid)


def recovered(rid: str, at: float = T0) -> Notice:
    return Notice("recovered", rid, at, at, "pulse", key=f"{rid}/recovered")


def running(dispatcher: Dispatcher, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` while the dispatcher delivers, then close it."""

    async def scenario() -> None:
        task = asyncio.create_task(dispatcher.run())
        try:
            await body()
        finally:
            await dispatcher.aclose()
            await task

    asyncio.run(asyncio.wait_for(scenario(), 20))


async def settle(dispatcher: Dispatcher, within: float = 2.0) -> None:
    """Until nothing is queued or in flight (a few loop turns for the lanes to start)."""
    deadline = time.monotonic() + within
    for _ in range(3):
        await asyncio.sleep(0)
    while dispatcher.backlog():
        assert time.monotonic() < deadline, "deliveries did not finish"
        await asyncio.sleep(0.002)


def deliver(dispatcher: Dispatcher, *batches: Iterable[Notice]) -> None:
    """Submit each batch (one storm-control batch each) and wait for every delivery."""

    async def body() -> None:
        for batch in batches:
            dispatcher.submit(batch)
        await settle(dispatcher)

    running(dispatcher, body)


# --- routing -----------------------------------------------------------------------------


def test_route_with_events_gets_only_those(make_dispatcher: Callable[..., Dispatcher], channel: Channel) -> None:
    dispatcher = make_dispatcher([Route(channel, events=frozenset({"dead"}))])
    deliver(dispatcher, [dead("a"), recovered("a")])
    assert channel.events() == [("dead", "a")]


def test_route_with_runtime_globs_gets_only_matching_ids(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel
) -> None:
    dispatcher = make_dispatcher([Route(channel, runtimes=("db-*", "cache-1"))])
    deliver(dispatcher, [dead("db-1"), dead("web-1"), dead("cache-1"), dead("cache-10")])
    assert channel.events() == [("dead", "db-1"), ("dead", "cache-1")]


def test_route_without_filters_gets_everything(make_dispatcher: Callable[..., Dispatcher], channel: Channel) -> None:
    notices = [dead("a"), recovered("a"), Notice("stopped", "b", T0), Notice("monitor_down", None, T0)]
    deliver(make_dispatcher([Route(channel)]), notices)
    assert channel.received == notices


def test_group_notice_is_narrowed_to_the_routes_runtimes() -> None:
    route = Route(Channel("x"), runtimes=("db-*",))
    outage = Notice("outage", None, T0, runtime_ids=("web-1", "db-1"), count=4)
    narrowed = route.select(outage, members=("web-1", "db-1", "db-2", "web-2"))
    assert narrowed is not None
    assert (narrowed.count, narrowed.runtime_ids) == (2, ("db-1", "db-2"))


def test_group_notice_without_a_matching_runtime_is_not_routed() -> None:
    route = Route(Channel("x"), runtimes=("db-*",))
    outage = Notice("outage", None, T0, runtime_ids=("web-1",), count=1)
    assert route.select(outage, members=("web-1",)) is None


def test_group_notice_known_only_by_its_first_ids_passes_if_one_matches() -> None:
    route = Route(Channel("x"), runtimes=("db-*",))
    outage = Notice("outage", None, T0, runtime_ids=("web-1", "db-1"), count=300)
    assert route.select(outage) == outage


def test_monitor_down_passes_any_runtime_filter() -> None:
    route = Route(Channel("x"), runtimes=("db-*",))
    notice = Notice("monitor_down", None, T0, runtime_ids=("web-1",))
    assert route.select(notice) == notice


def test_route_with_an_unknown_event_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"unknown event.*deadd"):
        Route(Channel("x"), events=frozenset({"deadd"}))


def test_route_name_defaults_to_the_channel_name() -> None:
    assert Route(Channel("pager")).name == "pager"


def test_duplicate_route_names_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"unique.*pager"):
        Dispatcher([Route(Channel("pager")), Route(Channel("pager"))])


# --- isolation ------------------------------------------------------------------------------


def test_hanging_channel_does_not_delay_another(make_dispatcher: Callable[..., Dispatcher]) -> None:
    fast, stuck = Channel("fast"), Channel("stuck")
    dispatcher = make_dispatcher([Route(stuck), Route(fast)])
    waited: list[float] = []

    async def body() -> None:
        stuck.gate = asyncio.Event()  # never set: every notify hangs
        started = time.monotonic()
        dispatcher.submit([dead("a")])
        dispatcher.submit([dead("b")])
        waited.append(time.monotonic() - started)
        await fast.until(2)
        waited.append(time.monotonic() - started)

    running(dispatcher, body)
    submit_time, delivery_time = waited
    assert submit_time < 0.05
    assert delivery_time < 0.5
    assert stuck.received == []


def test_on_delivered_waits_for_the_slowest_route(
    make_dispatcher: Callable[..., Dispatcher], delivered: list[Notice]
) -> None:
    fast, slow = Channel("fast"), Channel("slow")
    dispatcher = make_dispatcher([Route(fast), Route(slow)])
    seen_before_release: list[Notice] = []

    async def body() -> None:
        slow.gate = asyncio.Event()
        dispatcher.submit([dead("a")])
        await fast.until(1)
        seen_before_release.extend(delivered)
        slow.gate.set()
        await settle(dispatcher)

    running(dispatcher, body)
    assert seen_before_release == []
    assert [n.runtime_id for n in delivered] == ["a"]


def test_aclose_stops_a_hanging_delivery_without_marking_it_delivered(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, delivered: list[Notice]
) -> None:
    dispatcher = make_dispatcher([Route(channel)])

    async def body() -> None:
        channel.gate = asyncio.Event()
        dispatcher.submit([dead("a")])
        await asyncio.sleep(0.01)

    running(dispatcher, body)
    assert delivered == []


def test_full_queue_drops_the_oldest_and_counts_it(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, delivered: list[Notice]
) -> None:
    dispatcher = make_dispatcher([Route(channel)], queue_limit=2, storm=StormPolicy(window=0))
    dispatcher.submit([dead("a"), dead("b"), dead("c")])  # not running yet: all three queue
    assert dispatcher.stats["main", "dropped"] == 1
    assert [n.runtime_id for n in delivered] == ["a"]
    deliver(dispatcher)
    assert channel.events() == [("dead", "b"), ("dead", "c")]


# --- retries and delivery accounting --------------------------------------------------------


def test_retryable_errors_are_retried_until_success(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel
) -> None:
    channel.errors = [NotifyError("503", retryable=True), NotifyError("timeout", retryable=True)]
    dispatcher = make_dispatcher([Route(channel)])
    deliver(dispatcher, [dead("a")])
    assert channel.attempts == 3
    assert channel.events() == [("dead", "a")]
    assert dispatcher.stats["main", "retried"] == 2
    assert dispatcher.stats["main", "sent"] == 1


def test_non_retryable_error_is_tried_once(make_dispatcher: Callable[..., Dispatcher], channel: Channel) -> None:
    channel.errors = [NotifyError("400", retryable=False)]
    dispatcher = make_dispatcher([Route(channel)])
    deliver(dispatcher, [dead("a")])
    assert channel.attempts == 1
    assert dispatcher.stats["main", "failed"] == 1


def test_exhausted_retries_count_as_failed_and_the_next_notice_goes_out(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, delivered: list[Notice]
) -> None:
    channel.errors = [NotifyError("503", retryable=True)] * 3
    dispatcher = make_dispatcher([Route(channel)])
    deliver(dispatcher, [dead("a")], [dead("b")])
    assert channel.attempts == 4
    assert channel.events() == [("dead", "b")]
    assert dispatcher.stats["main", "failed"] == 1
    assert [n.runtime_id for n in delivered] == ["a", "b"]


def test_unexpected_exception_in_a_channel_does_not_stop_its_lane(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel
) -> None:
    class Broken:
        name = "broken"
        calls = 0

        async def notify(self, notice: Notice) -> None:
            Broken.calls += 1
            if Broken.calls == 1:
                raise KeyError("bug")

    dispatcher = make_dispatcher([Route(Broken())])
    deliver(dispatcher, [dead("a")], [dead("b")])
    assert dispatcher.stats["broken", "failed"] == 1
    assert dispatcher.stats["broken", "sent"] == 1


def test_on_delivered_is_called_once_per_notice_over_several_routes(
    make_dispatcher: Callable[..., Dispatcher], delivered: list[Notice]
) -> None:
    ok, failing = Channel("ok"), Channel("failing", errors=[NotifyError("x", retryable=False)] * 10)
    dispatcher = make_dispatcher([Route(ok), Route(failing)])
    notices = [dead("a"), recovered("a"), dead("b")]
    deliver(dispatcher, notices[:2], notices[2:])
    assert sorted(n.key for n in delivered) == sorted(n.key for n in notices)  # type: ignore[type-var]


def test_notice_no_route_wants_is_delivered_at_once(
    make_dispatcher: Callable[..., Dispatcher], delivered: list[Notice]
) -> None:
    dispatcher = make_dispatcher([Route(Channel("x"), events=frozenset({"dead"}))])
    dispatcher.submit([recovered("a")])
    assert [n.event for n in delivered] == ["recovered"]


def test_backoff_without_jitter_doubles_up_to_the_cap() -> None:
    delays = RetryPolicy(base=1.0, max=60.0, jitter=0).delays()
    assert list(itertools.islice(delays, 9)) == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_backoff_is_jittered_like_the_reconnect_loops_and_never_above_the_cap() -> None:
    bases = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0] + [60.0] * 94
    policy = RetryPolicy(base=1.0, max=60.0, rng=random.Random(19).random)
    delays = list(itertools.islice(policy.delays(), len(bases)))
    ratios = [delay / base for delay, base in zip(delays, bases, strict=True)]
    assert all(0.5 <= ratio <= 1.5 for ratio in ratios), ratios
    assert max(delays) == 60.0
    assert min(ratios) < 0.6  # the band is used: notices that failed together retry apart
    assert len({round(ratio, 6) for ratio in ratios[:6]}) == 6


def test_backoff_honours_a_longer_retry_after_within_the_cap() -> None:
    policy = RetryPolicy(base=1.0, max=60.0)
    assert policy.wait(1.0, 30.0) == 30.0
    assert policy.wait(1.0, 600.0) == 60.0
    assert policy.wait(4.0, 0.5) == 4.0
    assert policy.wait(4.0) == 4.0


def test_bad_retry_numbers_fail_when_the_policy_is_made() -> None:
    with pytest.raises(ValueError, match="cap"):
        RetryPolicy(base=2.0, max=1.0)


def test_each_retry_waits_a_jittered_delay_drawn_from_the_policy(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel
) -> None:
    """One draw of the policy's randomness per retry, none for a notice that goes out at once."""
    draws: list[float] = []

    def rng() -> float:
        draws.append(random.random())
        return draws[-1]

    channel.errors = [NotifyError("503", retryable=True)] * 2
    dispatcher = make_dispatcher([Route(channel)], retry=RetryPolicy(attempts=3, base=0.001, max=0.01, rng=rng))
    deliver(dispatcher, [dead("a")], [dead("b")])
    assert channel.events() == [("dead", "a"), ("dead", "b")]
    assert len(draws) == 2


# --- storm gate (pure) ------------------------------------------------------------------------

POLICY = StormPolicy(window=10.0, count=20, share=0.1, max_ids=5)


def deads(prefix: str, n: int, at: float = T0) -> list[Notice]:
    return [dead(f"{prefix}-{i}", at) for i in range(n)]


@pytest.fixture
def gate() -> StormGate:
    return StormGate(POLICY, "outage", "died")


def test_isolated_death_passes_at_once(gate: StormGate) -> None:
    assert gate.admit([dead("a")], T0, 1000) == (False, [])


def test_deaths_up_to_the_count_pass_one_by_one(gate: StormGate) -> None:
    for i, notice in enumerate(deads("rt", 20)):
        assert gate.admit([notice], T0 + i * 0.1, 1000) == (False, [])


def test_batch_over_the_count_is_one_outage_and_nothing_else(gate: StormGate) -> None:
    batch = deads("rt", 21)
    absorbed, [emission] = gate.admit(batch, T0, 1000)
    assert absorbed
    assert emission.notice.event == "outage"
    assert emission.notice.count == 21
    assert emission.notice.runtime_ids == ("rt-0", "rt-1", "rt-2", "rt-3", "rt-4")
    assert emission.covers == tuple(batch)
    assert len(emission.members) == 21


def test_death_crossing_the_count_names_those_already_reported(gate: StormGate) -> None:
    for notice in deads("rt", 20):
        gate.admit([notice], T0, 1000)
    absorbed, [emission] = gate.admit([dead("last")], T0 + 1, 1000)
    assert absorbed
    assert emission.notice.count == 21
    assert emission.members[-1] == "last"
    assert [n.runtime_id for n in emission.covers] == ["last"]


def test_share_of_a_small_population_is_a_storm(gate: StormGate) -> None:
    assert gate.admit(deads("rt", 5), T0, 50) == (False, [])  # limit 5: 10 % of 50
    absorbed, [emission] = gate.admit([dead("x")], T0, 50)
    assert absorbed
    assert emission.notice.count == 6


def test_two_deaths_in_a_tiny_population_are_not_an_outage(gate: StormGate) -> None:
    assert gate.admit(deads("rt", 2), T0, 3) == (False, [])


def test_deaths_spread_wider_than_the_window_never_storm(gate: StormGate) -> None:
    for i, notice in enumerate(deads("rt", 100)):
        assert gate.admit([notice], T0 + i * 0.6, 1000) == (False, [])


def test_same_runtime_dying_twice_counts_once(gate: StormGate) -> None:
    for i in range(30):
        assert gate.admit([dead("flappy")], T0 + i * 0.1, 1000) == (False, [])


def test_later_deaths_in_a_storm_come_as_one_update_per_window(gate: StormGate) -> None:
    gate.admit(deads("first", 21), T0, 1000)
    assert gate.admit(deads("more", 3, T0 + 2), T0 + 2, 1000) == (True, [])
    assert gate.admit(deads("yet", 2, T0 + 4), T0 + 4, 1000) == (True, [])
    assert gate.poll(T0 + 9.9) is None
    assert gate.next_deadline() == T0 + 10
    update = gate.poll(T0 + 10)
    assert update is not None
    assert update.notice.event == "outage"
    assert update.notice.count == 5
    assert len(update.covers) == 5


def test_storm_ends_after_a_quiet_window(gate: StormGate) -> None:
    gate.admit(deads("first", 21), T0, 1000)
    assert gate.poll(T0 + 10) is None
    assert not gate.in_storm
    assert gate.admit([dead("lone")], T0 + 30, 1000) == (False, [])


def test_window_zero_turns_storm_control_off() -> None:
    gate = StormGate(StormPolicy(window=0), "outage", "died")
    assert gate.admit(deads("rt", 500), T0, 1000) == (False, [])


def test_flush_sends_what_a_storm_gathered(gate: StormGate) -> None:
    gate.admit(deads("first", 21), T0, 1000)
    gate.admit([dead("late")], T0 + 1, 1000)
    flushed = gate.flush(T0 + 1)
    assert flushed is not None
    assert flushed.members == ("late",)


batches = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=8),  # seconds since the previous batch
        st.lists(st.integers(min_value=0, max_value=60), max_size=30),  # runtime numbers
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(batches=batches, population=st.integers(min_value=0, max_value=400))
def test_every_notice_is_sent_alone_or_covered_by_exactly_one_summary(
    batches: list[tuple[float, list[int]]], population: int
) -> None:
    gate = StormGate(StormPolicy(window=5.0, count=10, share=0.1, max_ids=3), "outage", "died")
    now, submitted, alone, emissions = T0, [], [], []
    for gap, numbers in batches:
        now += gap
        batch = [dead(f"rt-{n}", now, key=object()) for n in numbers]
        submitted += batch
        absorbed, out = gate.admit(batch, now, population)
        emissions += out
        if not absorbed:
            alone += batch
        update = gate.poll(now)
        if update is not None:
            emissions.append(update)
    last = gate.flush(now + 100)
    if last is not None:
        emissions.append(last)
    covered = [n for e in emissions for n in e.covers]
    assert sorted(map(id, alone + covered)) == sorted(map(id, submitted))
    for e in emissions:
        assert e.notice.event == "outage"
        assert e.notice.count == len(e.members) == len(set(e.members))
        assert e.notice.runtime_ids == e.members[:3]


@settings(max_examples=200, deadline=None)
@given(batches=batches)
def test_a_batch_that_stays_under_the_limit_outside_a_storm_is_never_held(
    batches: list[tuple[float, list[int]]],
) -> None:
    policy = StormPolicy(window=5.0, count=10, share=1.0)
    gate = StormGate(policy, "outage", "died")
    now = T0
    recent: dict[str, float] = {}
    for gap, numbers in batches:
        now += gap
        gate.poll(now)  # what admit does first: may end the storm
        was_storm = gate.in_storm
        recent = {rid: t for rid, t in recent.items() if t > now - policy.window}
        recent.update({f"rt-{n}": now for n in numbers})
        absorbed, _ = gate.admit([dead(f"rt-{n}", now) for n in numbers], now, 1000)
        if numbers and not was_storm and len(recent) <= policy.count:
            assert not absorbed


# --- storm control in the dispatcher -------------------------------------------------------------


def test_mass_death_in_one_batch_sends_only_the_outage(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, delivered: list[Notice]
) -> None:
    batch = deads("rt", 50)
    dispatcher = make_dispatcher([Route(channel)], storm=POLICY)
    deliver(dispatcher, batch)
    [outage] = channel.received
    assert (outage.event, outage.count, len(outage.runtime_ids)) == ("outage", 50, 5)
    assert sorted(n.key for n in delivered) == sorted(n.key for n in batch)  # type: ignore[type-var]


def test_mass_recovery_in_one_batch_sends_only_outage_recovered(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel
) -> None:
    dispatcher = make_dispatcher([Route(channel)], storm=POLICY)
    deliver(dispatcher, [recovered(f"rt-{i}") for i in range(30)])
    assert [(n.event, n.count) for n in channel.received] == [("outage_recovered", 30)]


def test_storm_update_goes_out_on_the_timer(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, clock: FakeClock
) -> None:
    dispatcher = make_dispatcher([Route(channel)], storm=POLICY)

    async def body() -> None:
        dispatcher.submit(deads("rt", 30))
        clock.advance(1)
        dispatcher.submit([dead("late-1", clock.now), dead("late-2", clock.now)])
        clock.advance(9)
        dispatcher.tick()
        await settle(dispatcher)

    running(dispatcher, body)
    assert [(n.event, n.count) for n in channel.received] == [("outage", 30), ("outage", 2)]


def test_silenced_runtimes_do_not_count_towards_an_outage(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, clock: FakeClock
) -> None:
    silences = SilenceBook()
    silences.silence("noisy-*", clock.now + 3600)
    dispatcher = make_dispatcher([Route(channel)], storm=POLICY, silences=silences)
    deliver(dispatcher, deads("noisy", 15) + deads("rt", 15))
    assert [n.event for n in channel.received] == ["dead"] * 15


def test_outage_is_narrowed_per_route(make_dispatcher: Callable[..., Dispatcher]) -> None:
    everyone, db_team = Channel("everyone"), Channel("db")
    dispatcher = make_dispatcher([Route(everyone), Route(db_team, runtimes=("db-*",))], storm=POLICY)
    deliver(dispatcher, deads("web", 25) + deads("db", 3))
    assert [(n.event, n.count) for n in everyone.received] == [("outage", 28)]
    assert [(n.event, n.count, n.runtime_ids) for n in db_team.received] == [("outage", 3, ("db-0", "db-1", "db-2"))]


# --- reminders -----------------------------------------------------------------------------


def test_reminder_every_interval_while_dead(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, clock: FakeClock, states: dict[str, str]
) -> None:
    dispatcher = make_dispatcher([Route(channel)], reminder_interval=60.0)
    states["a"] = "dead"

    async def body() -> None:
        dispatcher.submit([dead("a")])
        for step in (59.0, 1.0, 60.0):
            clock.advance(step)
            dispatcher.tick()
        await settle(dispatcher)

    running(dispatcher, body)
    assert channel.events() == [("dead", "a"), ("reminder", "a"), ("reminder", "a")]
    assert channel.received[1].reason == "dead since 2025-11-24T16:00:00.000Z"


def test_no_reminder_after_recovery(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, clock: FakeClock, states: dict[str, str]
) -> None:
    dispatcher = make_dispatcher([Route(channel)], reminder_interval=60.0)

    async def body() -> None:
        dispatcher.submit([dead("a")])
        clock.advance(30)
        dispatcher.submit([recovered("a", clock.now)])
        clock.advance(100)
        dispatcher.tick()
        await settle(dispatcher)

    states["a"] = "alive"
    running(dispatcher, body)
    assert channel.events() == [("dead", "a"), ("recovered", "a")]


def test_reminders_stop_when_state_of_says_no_longer_dead(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, clock: FakeClock, states: dict[str, str]
) -> None:
    dispatcher = make_dispatcher([Route(channel)], reminder_interval=60.0)
    states["a"] = "stopped"  # e.g. its recovery notice was lost: the state is what counts
    dispatcher.submit([dead("a")])
    clock.advance(60)
    dispatcher.tick()
    assert dispatcher.next_deadline() is None


def test_reminders_are_off_by_default(
    make_dispatcher: Callable[..., Dispatcher], clock: FakeClock, states: dict[str, str]
) -> None:
    dispatcher = make_dispatcher([Route(Channel("x"))])
    states["a"] = "dead"
    dispatcher.submit([dead("a")])
    assert dispatcher.next_deadline() is None


def test_silenced_runtime_gets_no_reminder(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, clock: FakeClock, states: dict[str, str]
) -> None:
    silences = SilenceBook()
    dispatcher = make_dispatcher([Route(channel)], reminder_interval=60.0, silences=silences)
    states["a"] = "dead"

    async def body() -> None:
        dispatcher.submit([dead("a")])
        silences.silence("a", clock.now + 1000)
        clock.advance(60)
        dispatcher.tick()
        await settle(dispatcher)

    running(dispatcher, body)
    assert channel.events() == [("dead", "a")]


def test_reminder_timer_cost_does_not_grow_with_dead_runtimes(
    make_dispatcher: Callable[..., Dispatcher], clock: FakeClock, measure: Callable[[str, float, str], None]
) -> None:
    dispatcher = make_dispatcher([], reminder_interval=3600.0, on_delivered=None)
    for start in range(0, 100_000, 10_000):
        dispatcher.submit([dead(f"rt-{i}") for i in range(start, start + 10_000)])
    clock.advance(60)
    started = time.perf_counter()
    for _ in range(100):
        dispatcher.tick()
        dispatcher.next_deadline()
    per_tick = (time.perf_counter() - started) / 100
    measure("tick with 100,000 dead runtimes, none due", per_tick * 1e6, "µs")
    assert per_tick < 0.001


# --- silences in the dispatcher -----------------------------------------------------------------


@pytest.fixture
def silences() -> SilenceBook:
    return SilenceBook()


def test_silenced_notice_is_held_and_marked_delivered(
    make_dispatcher: Callable[..., Dispatcher],
    channel: Channel,
    clock: FakeClock,
    silences: SilenceBook,
    delivered: list[Notice],
) -> None:
    silences.silence("a", clock.now + 60, "maintenance")
    dispatcher = make_dispatcher([Route(channel)], silences=silences)
    deliver(dispatcher, [dead("a"), dead("b")])
    assert channel.events() == [("dead", "b")]
    assert sorted(n.runtime_id for n in delivered) == ["a", "b"]  # type: ignore[type-var]


def test_silence_expiring_while_dead_sends_one_dead(
    make_dispatcher: Callable[..., Dispatcher],
    channel: Channel,
    clock: FakeClock,
    silences: SilenceBook,
    states: dict[str, str],
) -> None:
    silences.silence("a", clock.now + 60, "maintenance")
    dispatcher = make_dispatcher([Route(channel, events=frozenset({"dead"}))], silences=silences)
    states["a"] = "dead"

    async def body() -> None:
        dispatcher.submit([dead("a")])
        clock.advance(61)
        dispatcher.tick()
        dispatcher.tick()
        await settle(dispatcher)

    running(dispatcher, body)
    [notice] = channel.received
    assert (notice.event, notice.runtime_id) == ("dead", "a")
    assert notice.reason == "still dead; silence on 'a' expired (maintenance)"
    assert notice.last_seen == T0 - 10


def test_silence_expiring_after_recovery_sends_no_dead(
    make_dispatcher: Callable[..., Dispatcher],
    channel: Channel,
    clock: FakeClock,
    silences: SilenceBook,
    states: dict[str, str],
) -> None:
    silences.silence("a", clock.now + 60)
    dispatcher = make_dispatcher([Route(channel, events=frozenset({"dead", "recovered"}))], silences=silences)

    async def body() -> None:
        dispatcher.submit([dead("a")])
        clock.advance(30)
        states["a"] = "alive"
        dispatcher.submit([recovered("a", clock.now)])
        clock.advance(31)
        dispatcher.tick()
        await settle(dispatcher)

    running(dispatcher, body)
    assert channel.received == []


def test_silence_end_is_announced(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, clock: FakeClock, silences: SilenceBook
) -> None:
    silences.silence("db-*", clock.now + 60, "upgrade")
    dispatcher = make_dispatcher([Route(channel)], silences=silences)

    async def body() -> None:
        clock.advance(60)
        dispatcher.tick()
        await settle(dispatcher)

    running(dispatcher, body)
    [notice] = channel.received
    assert (notice.event, notice.runtime_id) == ("silence_ended", None)
    assert notice.reason == "silence on 'db-*' expired (upgrade)"


def test_unsilence_while_dead_sends_one_dead_at_once(
    make_dispatcher: Callable[..., Dispatcher],
    channel: Channel,
    clock: FakeClock,
    silences: SilenceBook,
    states: dict[str, str],
) -> None:
    silences.silence("db-*", clock.now + 3600)
    dispatcher = make_dispatcher([Route(channel, events=frozenset({"dead"}))], silences=silences)
    states.update({"db-1": "dead", "db-2": "alive"})

    async def body() -> None:
        dispatcher.submit([dead("db-1"), dead("db-2")])
        assert dispatcher.unsilence("db-*")
        assert not dispatcher.unsilence("db-*")
        await settle(dispatcher)

    running(dispatcher, body)
    assert channel.events() == [("dead", "db-1")]
    assert "lifted" in (channel.received[0].reason or "")


def test_end_of_one_silence_says_nothing_while_another_still_covers(
    make_dispatcher: Callable[..., Dispatcher],
    channel: Channel,
    clock: FakeClock,
    silences: SilenceBook,
    states: dict[str, str],
) -> None:
    silences.silence("db-1", clock.now + 60)
    silences.silence("db-*", clock.now + 120)
    dispatcher = make_dispatcher([Route(channel, events=frozenset({"dead"}))], silences=silences)
    states["db-1"] = "dead"

    async def body() -> None:
        dispatcher.submit([dead("db-1")])
        clock.advance(60)
        dispatcher.tick()
        await settle(dispatcher)
        assert channel.received == []
        clock.advance(60)
        dispatcher.tick()
        await settle(dispatcher)

    running(dispatcher, body)
    assert channel.events() == [("dead", "db-1")]


def test_restored_held_runtimes_are_announced_after_a_restart(
    make_dispatcher: Callable[..., Dispatcher],
    channel: Channel,
    clock: FakeClock,
    states: dict[str, str],
) -> None:
    rows = [("db-*", clock.now + 60, "upgrade")]
    dispatcher = make_dispatcher([Route(channel, events=frozenset({"dead"}))], silences=SilenceBook.from_rows(rows))
    states.update({"db-1": "dead", "web-1": "dead"})
    dispatcher.restore_held(["db-1", "web-1"])

    async def body() -> None:
        clock.advance(60)
        dispatcher.tick()
        await settle(dispatcher)

    running(dispatcher, body)
    assert channel.events() == [("dead", "db-1")]


def test_mass_silence_end_is_one_outage(
    make_dispatcher: Callable[..., Dispatcher],
    channel: Channel,
    clock: FakeClock,
    silences: SilenceBook,
    states: dict[str, str],
) -> None:
    silences.silence("*", clock.now + 60)
    dispatcher = make_dispatcher([Route(channel, events=frozenset({"dead", "outage"}))], silences=silences)
    batch = deads("rt", 40)
    states.update({n.runtime_id: "dead" for n in batch if n.runtime_id})

    async def body() -> None:
        dispatcher.submit(batch)
        clock.advance(60)
        dispatcher.tick()
        await settle(dispatcher)

    running(dispatcher, body)
    assert [(n.event, n.count) for n in channel.received] == [("outage", 40)]


def test_on_delivered_is_not_called_for_the_dispatchers_own_notices(
    make_dispatcher: Callable[..., Dispatcher],
    channel: Channel,
    clock: FakeClock,
    delivered: list[Notice],
    states: dict[str, str],
) -> None:
    dispatcher = make_dispatcher([Route(channel)], reminder_interval=10.0)
    states["a"] = "dead"

    async def body() -> None:
        dispatcher.submit([dead("a")])
        await settle(dispatcher)
        clock.advance(10)
        dispatcher.tick()
        await settle(dispatcher)

    running(dispatcher, body)
    assert channel.events() == [("dead", "a"), ("reminder", "a")]
    assert [n.event for n in delivered] == ["dead"]


# --- the silence book (pure) --------------------------------------------------------------------


def test_exact_silence_covers_only_that_id(silences: SilenceBook) -> None:
    silences.silence("db-1", T0 + 60)
    assert silences.is_silenced("db-1", T0)
    assert not silences.is_silenced("db-10", T0)


def test_glob_silence_covers_matching_ids(silences: SilenceBook) -> None:
    silences.silence("db-*", T0 + 60)
    assert silences.is_silenced("db-10", T0)
    assert not silences.is_silenced("web-1", T0)


def test_silence_is_case_sensitive_like_runtime_ids(silences: SilenceBook) -> None:
    silences.silence("DB-*", T0 + 60)
    assert not silences.is_silenced("db-1", T0)


def test_silence_stops_covering_at_its_end(silences: SilenceBook) -> None:
    silences.silence("db-*", T0 + 60)
    assert silences.is_silenced("db-1", T0 + 59.9)
    assert not silences.is_silenced("db-1", T0 + 60)


def test_expired_removes_and_returns_ended_silences_earliest_first(silences: SilenceBook) -> None:
    silences.silence("b", T0 + 20)
    silences.silence("a-*", T0 + 10)
    silences.silence("c", T0 + 90)
    assert [s.pattern for s in silences.expired(T0 + 30)] == ["a-*", "b"]
    assert [s.pattern for s in silences.entries()] == ["c"]
    assert silences.expired(T0 + 30) == []


def test_later_silence_for_the_same_pattern_replaces_the_earlier(silences: SilenceBook) -> None:
    silences.silence("db-*", T0 + 60, "first")
    silences.silence("db-*", T0 + 10, "second")
    assert silences.to_rows() == [("db-*", T0 + 10, "second")]
    assert silences.next_expiry() == T0 + 10


def test_unsilence_lifts_exactly_that_pattern(silences: SilenceBook) -> None:
    silences.silence("db-*", T0 + 60)
    silences.silence("db-1", T0 + 60)
    assert silences.unsilence("db-*")
    assert not silences.unsilence("db-*")
    assert silences.is_silenced("db-1", T0)
    assert not silences.is_silenced("db-2", T0)


def test_rows_round_trip(silences: SilenceBook) -> None:
    silences.silence("db-*", T0 + 60, "upgrade")
    silences.silence("worker-7", T0 + 5, None)
    restored = SilenceBook.from_rows(silences.to_rows())
    assert restored.entries() == silences.entries()
    assert restored.is_silenced("db-3", T0)


@pytest.mark.parametrize(("pattern", "until"), [("", T0), ("a", float("nan")), ("a", float("inf"))])
def test_bad_silence_is_rejected(silences: SilenceBook, pattern: str, until: float) -> None:
    with pytest.raises(ValueError, match="silence"):
        silences.silence(pattern, until)


# --- routes from the configuration ---------------------------------------------------------------


def test_build_routes_makes_one_route_per_entry_with_its_filters() -> None:
    config = load_config(
        notify=[
            {"url": "http://127.0.0.1:9/hook"},
            {"url": "json://127.0.0.1:9/", "events": ["dead"], "runtimes": ["db-*"], "name": "chat"},
            {"command": [sys.executable, "-c", "pass"], "timeout": 2},
        ]
    )
    hook, chat, shell = build_routes(config)
    assert isinstance(hook.channel, WebhookNotifier)
    assert isinstance(chat.channel, AppriseNotifier)
    assert (chat.name, chat.events, chat.runtimes) == ("chat", frozenset({"dead"}), ("db-*",))
    assert isinstance(shell.channel, ShellNotifier)
    assert shell.channel.timeout == 2.0


def test_build_routes_names_the_entry_it_cannot_build() -> None:
    config = load_config(notify=["json://127.0.0.1:9/", "nosuchservice://x"])
    with pytest.raises(ConfigError, match=r"^notify\[1\]: notification URL #1 \(nosuchservice://"):
        build_routes(config)


def test_build_routes_keeps_route_names_unique() -> None:
    config = load_config(notify=["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"])
    names = [route.name for route in build_routes(config)]
    assert len(set(names)) == 2


def test_policies_follow_the_configuration() -> None:
    config = load_config(storm_window=5.0, storm_count=7, storm_share=0.5, storm_max_ids=3, notify_retries=2)
    assert storm_policy(config) == StormPolicy(window=5.0, count=7, share=0.5, max_ids=3)
    assert retry_policy(config).attempts == 3


# --- the run loop on the real clock ----------------------------------------------------------------


def test_run_sends_reminders_on_time_by_itself(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, states: dict[str, str]
) -> None:
    dispatcher = make_dispatcher([Route(channel)], clock=time.time, reminder_interval=0.1)
    states["a"] = "dead"
    took: list[float] = []

    async def body() -> None:
        started = time.monotonic()
        dispatcher.submit([dead("a", time.time())])
        await channel.until(3)
        took.append(time.monotonic() - started)

    running(dispatcher, body)
    assert channel.events() == [("dead", "a"), ("reminder", "a"), ("reminder", "a")]
    assert 0.15 <= took[0] < 1.0


def test_run_wakes_for_a_silence_added_while_it_sleeps(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, states: dict[str, str]
) -> None:
    dispatcher = make_dispatcher([Route(channel, events=frozenset({"dead"}))], clock=time.time)
    states["a"] = "dead"

    async def body() -> None:
        await asyncio.sleep(0.01)  # the loop is asleep with nothing to do (up to 30 s)
        dispatcher.silence("a", time.time() + 0.1, "deploy")
        dispatcher.submit([dead("a", time.time())])
        await asyncio.wait_for(channel.until(1), 1.0)

    running(dispatcher, body)
    assert channel.received[0].reason == "still dead; silence on 'a' expired (deploy)"


def test_aclose_with_drain_sends_what_is_queued_and_gathered(
    make_dispatcher: Callable[..., Dispatcher], channel: Channel, delivered: list[Notice]
) -> None:
    dispatcher = make_dispatcher([Route(channel)], storm=POLICY)
    batch = [*deads("rt", 30), dead("late")]

    async def scenario() -> None:
        task = asyncio.create_task(dispatcher.run())
        dispatcher.submit(batch[:30])
        dispatcher.submit(batch[30:])  # gathered into the storm's next update
        await dispatcher.aclose(drain=2.0)
        await task

    asyncio.run(asyncio.wait_for(scenario(), 20))
    assert [(n.event, n.count) for n in channel.received] == [("outage", 30), ("outage", 1)]
    assert len(delivered) == 31

"""The intake's handle(): how each incoming message is routed, counted or rejected, without a broker.

Messages are handed to ``handle()`` directly, inside an event loop of the
test's own (``asyncio.run``). Registration through the interval topic needs
the registrar, so those tests run the whole orchestrator against a broker URL
that refuses connections: its workers run, it never connects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from orchestrator.config import Config
from orchestrator.detector import State, Transition
from orchestrator.outbox import flip_rows, log_events
from orchestrator.service import Orchestrator
from orchestrator.statuses import Refresher
from orchestrator.store import CHUNK, FlipRow, Store
from orchestrator.writer import FlipQueue
from runtime_agent import protocol

TOPICS = protocol.Topics()
UNREACHABLE_BROKER = "mqtt://127.0.0.1:1"
SESSION = 41
OTHER_SESSION = 42


@pytest.fixture
def orchestrator(sqlite_url: str) -> Orchestrator:
    """An Orchestrator on a SQLite file of the test's own, with a broker it never reaches; not running."""
    return Orchestrator(Config(db=sqlite_url, broker=UNREACHABLE_BROKER))


@pytest.fixture
def registered(orchestrator: Orchestrator) -> str:
    """The ID of a runtime registered straight into the orchestrator's detector (alive, never pulsed)."""
    orchestrator.detector.register("rt-1", 5.0, 5.0, time.monotonic())
    return "rt-1"


def deliver(orchestrator: Orchestrator, *messages: tuple[str, bytes, bool], link_ok: bool = True) -> None:
    """Hand ``(topic, payload, retained)`` messages to ``handle()`` in order, inside an event loop.

    With ``link_ok`` the wills are then applied, as the watcher does once its echo returns.
    """

    async def handle_all() -> None:
        for topic, payload, retained in messages:
            orchestrator.intake.receive(topic, payload, retained)
        if link_ok:
            orchestrator.watch.apply_wills()

    asyncio.run(handle_all())


def rejections(orchestrator: Orchestrator) -> dict[str, int]:
    return {k: v for k, v in orchestrator.stats.items() if k.startswith("rejected")}


@asynccontextmanager
async def running(orchestrator: Orchestrator) -> AsyncIterator[None]:
    """Run the orchestrator (database, registrar, watcher...) until the block ends; it never reaches a broker."""
    stop = asyncio.Event()
    task = asyncio.create_task(orchestrator.run(stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def until(condition: Callable[[], bool]) -> None:
    """Wait (at most 5 s) until ``condition()`` holds."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - the orchestrator offers no event for "registered"
            await asyncio.sleep(0.005)


# --- pulses --------------------------------------------------------------------


def test_pulse_from_an_unregistered_id_is_rejected_as_unregistered(orchestrator: Orchestrator) -> None:
    deliver(orchestrator, (TOPICS.pulse("rt-unknown"), b"", False))
    assert rejections(orchestrator) == {"rejected.unregistered": 1}


def test_pulse_from_an_unregistered_id_registers_nothing(orchestrator: Orchestrator) -> None:
    deliver(orchestrator, (TOPICS.pulse("rt-unknown"), b"", False))
    assert "rt-unknown" not in orchestrator.detector


def test_every_unregistered_pulse_is_counted(orchestrator: Orchestrator) -> None:
    deliver(orchestrator, *[(TOPICS.pulse(f"rt-{i % 3}"), b"", False) for i in range(7)])
    assert orchestrator.stats["rejected.unregistered"] == 7


@pytest.mark.parametrize("payload", [b"", protocol.encode_pulse(seq=3, session=SESSION)])
def test_well_formed_pulse_refreshes_last_seen(orchestrator: Orchestrator, registered: str, payload: bytes) -> None:
    before = time.monotonic()
    deliver(orchestrator, (TOPICS.pulse(registered), payload, False))
    last_seen = orchestrator.detector.view(registered).last_seen
    assert last_seen is not None
    assert last_seen >= before


def test_well_formed_pulse_is_counted_as_a_pulse(orchestrator: Orchestrator, registered: str) -> None:
    deliver(orchestrator, (TOPICS.pulse(registered), b"", False), (TOPICS.pulse(registered), b"", False))
    assert orchestrator.intake.pulses == 2
    assert rejections(orchestrator) == {}


MALFORMED_PULSES = {
    "truncated JSON": (b"{", "malformed_json"),
    "NaN": (b'{"seq": NaN}', "malformed_json"),
    "array": (b"[]", "bad_type"),
    "string seq": (b'{"seq": "one"}', "bad_type"),
    "negative session": (b'{"session": -1}', "bad_type"),
    "bad UTF-8": (b"\xff\xfe", "bad_utf8"),
    "over max_payload": (b'{"pad": "' + b"x" * 70_000 + b'"}', "too_large"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_PULSES))
def test_malformed_pulse_is_counted_under_its_protocol_error_reason(
    orchestrator: Orchestrator, registered: str, case: str
) -> None:
    payload, reason = MALFORMED_PULSES[case]
    deliver(orchestrator, (TOPICS.pulse(registered), payload, False))
    assert rejections(orchestrator) == {f"rejected.{reason}": 1}


@pytest.mark.parametrize("case", sorted(MALFORMED_PULSES))
def test_malformed_pulse_does_not_refresh_last_seen(orchestrator: Orchestrator, registered: str, case: str) -> None:
    payload, _ = MALFORMED_PULSES[case]
    deliver(orchestrator, (TOPICS.pulse(registered), payload, False))
    assert orchestrator.detector.view(registered).last_seen is None


def test_malformed_pulse_does_not_revive_a_dead_runtime(orchestrator: Orchestrator, registered: str) -> None:
    orchestrator.detector.offline(registered, time.monotonic())
    deliver(orchestrator, (TOPICS.pulse(registered), b"{", False))
    assert orchestrator.detector.view(registered).state is State.DEAD


# --- topics ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "other/app/data",
        "heartbeat/v1/alerts",
        "heartbeat/v1/status/rt-1",
        "heartbeat/v1/runtimes/rt-1",
        "heartbeat/v2/runtimes/rt-1/pulse",
    ],
)
def test_topic_outside_the_runtimes_tree_is_rejected_as_foreign(orchestrator: Orchestrator, topic: str) -> None:
    deliver(orchestrator, (topic, b"", False))
    assert rejections(orchestrator) == {"rejected.foreign_topic": 1}


def test_unknown_kind_under_a_runtime_is_rejected_as_unknown_topic(orchestrator: Orchestrator, registered: str) -> None:
    deliver(orchestrator, (f"heartbeat/v1/runtimes/{registered}/bogus", b"", False))
    assert rejections(orchestrator) == {"rejected.unknown_topic": 1}


def test_custom_prefix_makes_the_default_prefix_foreign(sqlite_url: str) -> None:
    orchestrator = Orchestrator(Config(db=sqlite_url, broker=UNREACHABLE_BROKER, prefix="site-a/hb"))
    deliver(orchestrator, (TOPICS.pulse("rt-1"), b"", False))
    assert rejections(orchestrator) == {"rejected.foreign_topic": 1}


# --- state messages ------------------------------------------------------------------


def test_online_from_an_unregistered_valid_id_is_not_rejected(orchestrator: Orchestrator) -> None:
    deliver(orchestrator, (TOPICS.state("rt-new"), protocol.encode_state("online", SESSION), False))
    assert rejections(orchestrator) == {}


def test_retained_online_from_an_unregistered_id_is_rejected_as_unregistered(orchestrator: Orchestrator) -> None:
    deliver(orchestrator, (TOPICS.state("rt-new"), protocol.encode_state("online", SESSION), True))
    assert rejections(orchestrator) == {"rejected.unregistered": 1}


def test_online_from_an_invalid_unregistered_id_is_rejected_as_unregistered(orchestrator: Orchestrator) -> None:
    deliver(orchestrator, (TOPICS.state("bad id"), protocol.encode_state("online", SESSION), False))
    assert rejections(orchestrator) == {"rejected.unregistered": 1}


def test_a_will_from_an_unregistered_id_is_rejected_as_unregistered(orchestrator: Orchestrator) -> None:
    deliver(orchestrator, (TOPICS.state("rt-new"), protocol.encode_state("offline", SESSION), False))
    assert rejections(orchestrator) == {"rejected.unregistered": 1}


@pytest.mark.parametrize("retained", [True, False], ids=["retained", "live"])
def test_a_stop_before_the_registration_is_kept_for_it_and_stops_the_runtime_quietly(
    orchestrator: Orchestrator, retained: bool
) -> None:
    """An agent whose start failed leaves its request and ``stopped``; the broker may deliver the stop first."""

    async def scenario() -> tuple[State, str | None]:
        async with running(orchestrator):
            orchestrator.intake.receive(TOPICS.state("rt-new"), protocol.encode_state("stopped", SESSION), retained)
            orchestrator.intake.receive(TOPICS.interval("rt-new"), protocol.encode_interval(30.0), True)
            await until(lambda: "rt-new" in orchestrator.detector)
            view = orchestrator.detector.view("rt-new")
            return view.state, view.reason

    assert asyncio.run(asyncio.wait_for(scenario(), 20)) == (State.STOPPED, "stopped before it ever ran")
    assert rejections(orchestrator) == {}


def test_malformed_state_is_counted_under_its_protocol_error_reason(
    orchestrator: Orchestrator, registered: str
) -> None:
    deliver(orchestrator, (TOPICS.state(registered), b'{"state": "zombie"}', False))
    assert rejections(orchestrator) == {"rejected.bad_value": 1}


def test_will_without_a_known_session_kills_a_runtime_registered_directly(
    orchestrator: Orchestrator, registered: str
) -> None:
    """The control for the tests below: with no session on record, any will counts."""
    deliver(orchestrator, (TOPICS.state(registered), protocol.encode_state("offline", OTHER_SESSION), False))
    assert orchestrator.detector.view(registered).state is State.DEAD


def test_a_will_waits_for_the_link_to_prove_itself(orchestrator: Orchestrator, registered: str) -> None:
    """A broker going down sends every will at once: none counts before an echo comes back."""
    deliver(orchestrator, (TOPICS.state(registered), protocol.encode_state("offline"), False), link_ok=False)
    assert orchestrator.detector.view(registered).state is State.ALIVE


def birth_then_registration(orchestrator: Orchestrator, *wills: bytes) -> State:
    """Birth (session SESSION) of an unregistered runtime, its interval request, then the given wills.

    Returns the runtime's state after the wills.
    """

    async def scenario() -> State:
        async with running(orchestrator):
            orchestrator.intake.receive(TOPICS.state("rt-new"), protocol.encode_state("online", SESSION), False)
            orchestrator.intake.receive(TOPICS.interval("rt-new"), protocol.encode_interval(30.0), False)
            await until(lambda: "rt-new" in orchestrator.detector)
            for will in wills:
                orchestrator.intake.receive(TOPICS.state("rt-new"), will, False)
            orchestrator.watch.apply_wills()  # as the watcher does once its echo returns
            return orchestrator.detector.view("rt-new").state

    return asyncio.run(asyncio.wait_for(scenario(), 20))


def test_registration_after_birth_makes_the_runtime_alive(orchestrator: Orchestrator) -> None:
    assert birth_then_registration(orchestrator) is State.ALIVE


def test_will_of_another_session_than_the_early_birth_is_ignored(orchestrator: Orchestrator) -> None:
    state = birth_then_registration(orchestrator, protocol.encode_state("offline", OTHER_SESSION))
    assert state is State.ALIVE


def test_will_of_the_early_births_session_kills_the_runtime(orchestrator: Orchestrator) -> None:
    state = birth_then_registration(orchestrator, protocol.encode_state("offline", SESSION))
    assert state is State.DEAD


def test_stop_of_another_session_than_the_early_birth_is_ignored(orchestrator: Orchestrator) -> None:
    state = birth_then_registration(orchestrator, protocol.encode_state("stopped", OTHER_SESSION))
    assert state is State.ALIVE


# --- interval requests ---------------------------------------------------------------


def test_interval_request_is_not_applied_by_handle_itself(orchestrator: Orchestrator) -> None:
    """Registration waits for the database: handle() only queues the request for the registrar."""
    deliver(orchestrator, (TOPICS.interval("rt-new"), protocol.encode_interval(5.0), False))
    assert "rt-new" not in orchestrator.detector
    assert rejections(orchestrator) == {}


# --- limits ------------------------------------------------------------------------


def register_all(orchestrator: Orchestrator, requests: list[tuple[str, bytes]]) -> None:
    """Live interval requests through handle() and the registrar, until each is decided."""

    async def scenario() -> None:
        async with running(orchestrator):
            for rid, payload in requests:
                orchestrator.intake.receive(TOPICS.interval(rid), payload, False)
            decided = lambda: orchestrator.stats["registrations"] + sum(rejections(orchestrator).values())  # noqa: E731
            await until(lambda: decided() == len(requests))

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_a_batch_is_in_the_detector_before_its_first_reply_goes_out(
    orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies went one by one between registrations once, and kept the rest of a batch unregistered
    (its pulses refused) for a second per few hundred, until its first window ran out."""
    ids = [f"rt-{i}" for i in range(50)]
    registered_when_replying: list[int] = []

    async def slow_replies(replies: list[Any]) -> None:
        registered_when_replying.append(sum(rid in orchestrator.detector for rid in ids))
        await asyncio.sleep(0.01)

    monkeypatch.setattr(orchestrator.registrar, "send_replies", slow_replies)
    register_all(orchestrator, [(rid, protocol.encode_interval(5.0)) for rid in ids])
    assert registered_when_replying
    assert set(registered_when_replying) == {len(ids)}


def test_the_next_batch_is_applied_while_the_replies_of_the_last_are_still_going_out(
    orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Awaited by the registrar, a batch's replies (20 QoS 1 in flight on Mosquitto's defaults) held back
    the next batch: 20,000 registrations at once took 9 s."""
    replying = asyncio.Event()
    release = asyncio.Event()
    registered_while_replying: list[bool] = []

    async def stuck_replies(replies: list[Any]) -> None:
        replying.set()
        await release.wait()

    monkeypatch.setattr(orchestrator.registrar, "send_replies", stuck_replies)

    async def scenario() -> None:
        async with running(orchestrator):
            orchestrator.intake.receive(TOPICS.interval("rt-first"), protocol.encode_interval(5.0), False)
            await replying.wait()
            orchestrator.intake.receive(TOPICS.interval("rt-second"), protocol.encode_interval(5.0), False)
            await until(lambda: "rt-second" in orchestrator.detector)
            registered_while_replying.append(not release.is_set())
            release.set()

    asyncio.run(asyncio.wait_for(scenario(), 20))
    assert registered_while_replying == [True]


def test_registrations_beyond_max_runtimes_are_refused(sqlite_url: str) -> None:
    orchestrator = Orchestrator(Config(db=sqlite_url, broker=UNREACHABLE_BROKER, max_runtimes=3))
    register_all(orchestrator, [(f"rt-{i}", protocol.encode_interval(5.0)) for i in range(5)])
    assert sorted(orchestrator.detector.ids()) == ["rt-0", "rt-1", "rt-2"]
    assert rejections(orchestrator) == {"rejected.too_many_runtimes": 2}


def test_a_new_interval_for_a_watched_runtime_is_not_refused_at_max_runtimes(sqlite_url: str) -> None:
    orchestrator = Orchestrator(Config(db=sqlite_url, broker=UNREACHABLE_BROKER, max_runtimes=1))
    register_all(orchestrator, [("rt-0", protocol.encode_interval(5.0)), ("rt-0", protocol.encode_interval(7.0))])
    assert orchestrator.detector.view("rt-0").interval == 7.0
    assert rejections(orchestrator) == {}


def test_interval_requests_beyond_the_rate_per_id_are_refused(sqlite_url: str) -> None:
    orchestrator = Orchestrator(Config(db=sqlite_url, broker=UNREACHABLE_BROKER, max_requests_per_minute=4))
    register_all(orchestrator, [("rt-chatty", protocol.encode_interval(1.0 + i)) for i in range(6)])
    assert orchestrator.detector.view("rt-chatty").interval == 4.0
    assert rejections(orchestrator) == {"rejected.rate_limited": 2}


def test_messages_discarded_from_a_full_queue_are_counted_and_logged_at_most_every_10_s(
    orchestrator: Orchestrator, caplog: pytest.LogCaptureFixture
) -> None:
    mqtt_log = logging.getLogger("orchestrator.mqtt").getChild(orchestrator.config.client_id)
    with caplog.at_level(logging.WARNING, logger=mqtt_log.name):
        for _ in range(500):
            mqtt_log.warning("Message queue is full. Discarding message.")
    assert orchestrator.overview.counters()["dropped"] == {"queue_full": 500}
    assert len([r for r in caplog.records if "incoming queue full" in r.getMessage()]) == 1


# --- the last-seen flush -------------------------------------------------------------


FLUSHED = 3 * CHUNK


def register_everywhere(orchestrator: Orchestrator, ids: list[str], now: float) -> None:
    """Register ``ids`` (interval and grace 5 s) in the orchestrator's database and in its detector as of ``now``."""
    orchestrator.store.open()
    orchestrator.store.register([(rid, 5.0, 5.0) for rid in ids], time.time())
    for rid in ids:
        orchestrator.detector.register(rid, 5.0, 5.0, now)


@pytest.fixture
def pulsed(orchestrator: Orchestrator) -> list[str]:
    """IDs of ``FLUSHED`` runtimes in the database and the detector, each pulsed once and re-armed (a flush's worth)."""
    ids = [f"rt-{i:05d}" for i in range(FLUSHED)]
    now = time.monotonic()
    register_everywhere(orchestrator, ids, now)
    orchestrator.store.record([FlipRow(rid, "unknown", "alive", None, None, time.time(), None) for rid in ids], {})
    orchestrator.store.transactions = 0
    for rid in ids:
        orchestrator.detector.pulse(rid, now + 0.5)
    first = orchestrator.detector.next_deadline()  # the entries armed at registration, before the pulses
    assert first is not None
    assert orchestrator.detector.expire(first) == []  # re-armed, and their times picked for the database
    return ids


def stored_last_seen(orchestrator: Orchestrator) -> int:
    return sum(1 for row in orchestrator.store.load() if row.last_seen is not None)


def test_a_flush_without_alerts_is_one_transaction(orchestrator: Orchestrator, pulsed: list[str]) -> None:
    orchestrator.writer.flush_seen()
    assert asyncio.run(orchestrator.writer.write_once())
    assert orchestrator.store.transactions == 1
    assert stored_last_seen(orchestrator) == len(pulsed)


def test_pulses_after_the_first_wait_for_a_rearm_before_the_database_has_them(orchestrator: Orchestrator) -> None:
    register_everywhere(orchestrator, ["rt-1"], time.monotonic())
    first = time.monotonic()
    orchestrator.detector.pulse("rt-1", first)
    orchestrator.writer.flush_seen()
    assert asyncio.run(orchestrator.writer.write_once())
    orchestrator.detector.pulse("rt-1", first + 1)
    orchestrator.writer.flush_seen()

    assert asyncio.run(orchestrator.writer.write_once())

    (row,) = orchestrator.store.load()
    assert row.last_seen == pytest.approx(orchestrator.clock.wall(first), abs=1e-3)


def test_a_clean_stop_stores_every_last_seen_time_not_yet_stored(orchestrator: Orchestrator, sqlite_url: str) -> None:
    ids = [f"rt-{i}" for i in range(3)]
    now = time.monotonic()
    register_everywhere(orchestrator, ids, now)
    for rid in ids:
        orchestrator.detector.pulse(rid, now + 1)  # a first pulse is picked at once,
        orchestrator.detector.pulse(rid, now + 2)  # a later one only at a re-arm: the stop must store it

    asyncio.run(orchestrator.writer.final_flush())

    reopened = Store(sqlite_url)
    reopened.open()
    rows = {row.id: row.last_seen for row in reopened.load()}
    assert rows.keys() == set(ids)
    for rid in ids:
        assert rows[rid] == pytest.approx(
            orchestrator.clock.wall(orchestrator.detector.view(rid).last_seen or 0), abs=1e-3
        )


def alert_arrives_during_the_first_chunk(orchestrator: Orchestrator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the database thread see an alert waiting once it has written one chunk of the flush."""
    update_from = orchestrator.store._update_from

    def update_then_alert(*args: Any) -> None:
        update_from(*args)
        orchestrator.writer.pending.alert_waiting.set()

    monkeypatch.setattr(orchestrator.store, "_update_from", update_then_alert)


def test_a_flush_commits_at_the_next_chunk_once_an_alert_waits(
    orchestrator: Orchestrator, pulsed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    alert_arrives_during_the_first_chunk(orchestrator, monkeypatch)
    orchestrator.writer.flush_seen()
    assert asyncio.run(orchestrator.writer.write_once())
    assert orchestrator.store.transactions == 1
    assert stored_last_seen(orchestrator) == CHUNK
    assert orchestrator.writer.flushing  # the rest of the flush is still to come


def test_an_alerts_flips_are_written_alone_then_the_flush_goes_on(
    orchestrator: Orchestrator, pulsed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    alert_arrives_during_the_first_chunk(orchestrator, monkeypatch)
    orchestrator.writer.flush_seen()

    async def flush_with_an_alert() -> None:
        await orchestrator.writer.write_once()
        deaths = orchestrator.detector.expire(time.monotonic() + 60)[:1]
        committed = orchestrator.writer.submit(flip_rows(deaths, orchestrator.clock))
        await orchestrator.writer.write_once()
        assert committed.done()
        assert stored_last_seen(orchestrator) == CHUNK  # the alert's transaction carried no flush rows
        assert orchestrator.store.history(deaths[0].runtime_id)[0].new_state == "dead"
        for _ in range(FLUSHED // CHUNK):  # the rest, a chunk a transaction (an alert "waits" after every chunk)
            await orchestrator.writer.write_once()

    asyncio.run(flush_with_an_alert())
    assert stored_last_seen(orchestrator) == len(pulsed)
    assert not orchestrator.writer.flushing


# --- own stalls ------------------------------------------------------------------


def sentinel_after(orchestrator: Orchestrator, stall: float) -> None:
    """Run the stall sentinel once, as if the event loop had been deaf for ``stall`` seconds."""

    async def late() -> None:
        orchestrator.watch.sentinel(time.monotonic() - stall)
        assert orchestrator.watch.watching_stalls
        orchestrator.watch.stop_sentinel()

    asyncio.run(late())


@pytest.fixture
def overdue(orchestrator: Orchestrator) -> str:
    """The ID of an alive runtime whose deadline (last seen + 0.2 s) passed 0.8 s ago; not suspended."""
    orchestrator.detector.resume(time.monotonic() - 1.0)  # watching since before it registered
    orchestrator.detector.register("rt-overdue", 0.1, 0.1, time.monotonic() - 1.0)
    assert orchestrator.detector.overdue(time.monotonic())
    return "rt-overdue"


def test_a_stall_over_a_deadline_restarts_the_watch_instead_of_judging(
    orchestrator: Orchestrator, overdue: str
) -> None:
    sentinel_after(orchestrator, 2.0)
    assert orchestrator.stats["stalls"] == 1
    assert orchestrator.detector.expire(time.monotonic() + 0.1) == []
    deadline = orchestrator.detector.deadline(overdue)
    assert deadline is not None
    assert deadline > time.monotonic()


def test_a_stall_shorter_than_the_threshold_changes_nothing(orchestrator: Orchestrator, overdue: str) -> None:
    sentinel_after(orchestrator, 0.5)  # stall_threshold is 1 s
    assert orchestrator.stats["stalls"] == 0
    assert [t.runtime_id for t in orchestrator.detector.expire(time.monotonic())] == [overdue]


def test_a_stall_over_no_deadline_is_counted_but_restarts_nothing(
    orchestrator: Orchestrator, registered: str, caplog: pytest.LogCaptureFixture
) -> None:
    deadline = orchestrator.detector.deadline(registered)  # 10 s away
    with caplog.at_level(logging.WARNING):
        sentinel_after(orchestrator, 2.0)
    assert orchestrator.stats["stalls"] == 1
    assert "nothing fell due" in caplog.text
    assert orchestrator.detector.deadline(registered) == deadline


def test_a_stall_while_cut_off_from_the_broker_keeps_the_detector_suspended(
    orchestrator: Orchestrator, overdue: str, caplog: pytest.LogCaptureFixture
) -> None:
    orchestrator.detector.suspend()
    with caplog.at_level(logging.WARNING):
        sentinel_after(orchestrator, 2.0)
    assert orchestrator.detector.suspended
    assert "cut off from the broker" in caplog.text


def test_a_blocked_event_loop_is_noticed_whatever_the_watcher_was_doing(orchestrator: Orchestrator) -> None:
    async def block_the_loop() -> None:
        async with running(orchestrator):
            await until(lambda: orchestrator.watch.watching_stalls)
            time.sleep(1.5)  # noqa: ASYNC251 - the point: deaf for over stall_threshold (1 s), as under SIGSTOP
            await asyncio.sleep(0.01)

    asyncio.run(block_the_loop())
    assert orchestrator.stats["stalls"] == 1


# --- the writer's queue of flips --------------------------------------------------


def flip(runtime_id: str, new: str, at: float) -> FlipRow:
    """A flip to ``new``; one to ``dead`` raises an alert."""
    return FlipRow(
        runtime_id, "alive" if new == "dead" else "unknown", new, "dead" if new == "dead" else None, None, at, None
    )


@pytest.fixture
def wave() -> FlipQueue:
    """A queue holding the unknown -> alive flips of rt-0 .. rt-4999, in that order."""
    queue = FlipQueue()
    queue.extend(flip(f"rt-{i}", "alive", i) for i in range(5000))
    return queue


def test_flips_are_taken_in_order_of_arrival_up_to_the_limit(wave: FlipQueue) -> None:
    taken = wave.take(1000)
    assert [f.runtime_id for f in taken] == [f"rt-{i}" for i in range(1000)]
    assert len(wave) == 4000


def test_a_runtime_with_an_alert_goes_alone_with_all_its_flips_in_order(wave: FlipQueue) -> None:
    wave.extend([flip("rt-4000", "dead", 9000)])
    taken = wave.take(1000)
    assert [(f.runtime_id, f.new_state) for f in taken] == [("rt-4000", "alive"), ("rt-4000", "dead")]


def test_the_wave_goes_on_in_order_after_an_alerts_flips(wave: FlipQueue) -> None:
    wave.extend([flip("rt-4000", "dead", 9000)])
    wave.take(1000)
    assert [f.runtime_id for f in wave.take(1000)] == [f"rt-{i}" for i in range(1000)]


def test_a_runtime_taken_early_is_not_taken_again_when_its_turn_comes(wave: FlipQueue) -> None:
    wave.extend([flip("rt-10", "dead", 9000)])
    everything = wave.take(1000) + wave.take(None)
    assert len(everything) == 5001
    assert len(wave) == 0
    assert [f.new_state for f in everything if f.runtime_id == "rt-10"] == ["alive", "dead"]


def test_flips_put_back_come_before_those_queued_since(wave: FlipQueue) -> None:
    taken = wave.take(2)
    wave.extend([flip("rt-0", "dead", 9000)])
    wave.put_back(taken)
    again = wave.take(3)
    assert [(f.runtime_id, f.new_state) for f in again] == [("rt-0", "alive"), ("rt-0", "dead")]
    assert wave.take(1)[0].runtime_id == "rt-1"
    assert len(wave) + len(again) + 1 == 5001


def test_an_alert_waits_from_its_flip_queued_or_put_back_until_taken(wave: FlipQueue) -> None:
    assert not wave.alert_waiting.is_set()
    wave.extend([flip("rt-0", "dead", 9000)])
    assert wave.alert_waiting.is_set()
    taken = wave.take(10)
    assert not wave.alert_waiting.is_set()
    wave.put_back(taken)
    assert wave.alert_waiting.is_set()


# --- logging verdicts ---------------------------------------------------------------


def deaths(n: int) -> list[Transition]:
    return [Transition(f"rt-{i}", State.ALIVE, State.DEAD, 1.0, 0.5, "connection lost", "dead") for i in range(n)]


def test_a_few_deaths_are_logged_a_line_each(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        log_events(deaths(3))
    assert [r.getMessage() for r in caplog.records] == [f"rt-{i} is dead: connection lost" for i in range(3)]


def test_a_storm_of_deaths_is_logged_as_twenty_lines_and_a_count(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        log_events(deaths(10_000))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 21
    assert messages[-1].startswith("... and 9980 more runtimes dead")


def test_transitions_without_an_event_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    wave = [Transition(f"rt-{i}", State.UNKNOWN, State.ALIVE, 1.0, 1.0, "pulse received", None) for i in range(50)]
    with caplog.at_level(logging.DEBUG, logger="orchestrator"):
        log_events(wave)
    assert caplog.records == []


def test_the_status_refresh_waits_while_verdicts_are_being_published(
    orchestrator: Orchestrator, registered: str
) -> None:
    """A mass death during the paced refresh after a start must not share the link with 100,000 statuses."""
    sent: list[list[str]] = []

    class Link:
        connected = True

        async def send(self, messages: Any) -> None:
            sent.append([topic for topic, _, _ in messages])

    async def scenario() -> None:
        idle = asyncio.Event()  # clear: the outbox has verdicts in hand
        refresher = Refresher(statuses=orchestrator.statuses, link=Link(), idle=idle.wait)
        refresher.later(registered)
        task = asyncio.create_task(refresher.run())
        await asyncio.sleep(0.1)
        assert sent == []
        idle.set()
        await asyncio.sleep(0.1)
        task.cancel()
        assert sent == [[TOPICS.status(registered)]]

    asyncio.run(asyncio.wait_for(scenario(), 10))

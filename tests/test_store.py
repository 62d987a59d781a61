"""The Store on both databases it supports: SQLite (a file of the test's own) and PostgreSQL (a fresh database)."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import peewee
import pytest

from orchestrator import store as store_module
from orchestrator.silence import SilenceBook
from orchestrator.store import FlipRow, Runtime, RuntimeRow, Store, in_key_order
from orchestrator.store import Silence as StoredSilence

T0 = 1795902116.123456
"""A wall-clock time with microseconds, to check that times survive as doubles."""


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """A URL of an empty database: a SQLite file, or a fresh PostgreSQL database."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """An opened Store (tables created) on an empty database, closed after the test."""
    store = Store(db_url)
    store.open()
    try:
        yield store
    finally:
        store.close()


def flip(
    runtime_id: str,
    old: str,
    new: str,
    at: float,
    *,
    event: str | None = None,
    reason: str | None = None,
    last_seen: float | None = None,
) -> FlipRow:
    return FlipRow(runtime_id, old, new, event, reason, at, last_seen)


def row(store: Store, runtime_id: str) -> RuntimeRow:
    (found,) = [r for r in store.load() if r.id == runtime_id]
    return found


# --- register ------------------------------------------------------------------


def test_new_store_is_empty(store: Store) -> None:
    assert store.load() == []


def test_register_inserts_an_unknown_runtime(store: Store) -> None:
    store.register([("rt-a", 5.0, 10.0)], T0)
    assert store.load() == [RuntimeRow("rt-a", 5.0, 10.0, "unknown", T0, None, "registered")]


def test_register_inserts_every_item_of_a_batch(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0), ("rt-b", 2.0, 3.0)], T0)
    assert [(r.id, r.interval, r.grace) for r in store.load()] == [("rt-a", 1.0, 1.0), ("rt-b", 2.0, 3.0)]


def test_reregister_updates_interval_and_grace(store: Store) -> None:
    store.register([("rt-a", 5.0, 5.0)], T0)
    store.register([("rt-a", 7.5, 2.0)], T0 + 100)
    loaded = row(store, "rt-a")
    assert (loaded.interval, loaded.grace) == (7.5, 2.0)


def test_reregister_keeps_state_since_and_reason(store: Store) -> None:
    store.register([("rt-a", 5.0, 5.0)], T0)
    store.record([flip("rt-a", "unknown", "alive", T0 + 1, reason="pulse received")], {})
    store.register([("rt-a", 7.5, 2.0)], T0 + 100)
    loaded = row(store, "rt-a")
    assert (loaded.state, loaded.since, loaded.reason) == ("alive", T0 + 1, "pulse received")


def test_reregister_keeps_last_seen(store: Store) -> None:
    store.register([("rt-a", 5.0, 5.0)], T0)
    store.record([], {"rt-a": T0 + 3})
    store.register([("rt-a", 7.5, 2.0)], T0 + 100)
    assert row(store, "rt-a").last_seen == T0 + 3


def test_reregister_keeps_registered_at(store: Store) -> None:
    store.register([("rt-a", 5.0, 5.0)], T0)
    store.register([("rt-a", 7.5, 2.0)], T0 + 100)
    assert Runtime.get_by_id("rt-a").registered_at == T0


def test_register_of_more_than_one_chunk_stores_every_runtime(store: Store) -> None:
    ids = [f"rt-{i:04d}" for i in range(1201)]
    store.register([(rid, 1.0, 2.0) for rid in ids], T0)
    assert [r.id for r in store.load()] == ids


# --- record --------------------------------------------------------------------


def test_record_appends_flips_to_the_history(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    alive = flip("rt-a", "unknown", "alive", T0 + 1, reason="pulse received", last_seen=T0 + 1)
    dead = flip("rt-a", "alive", "dead", T0 + 3, event="dead", reason="connection lost", last_seen=T0 + 1)
    store.record([alive], {})
    store.record([dead], {})
    assert store.history("rt-a") == [dead, alive]


def test_record_sets_state_since_and_reason_from_the_flip(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    store.record([flip("rt-a", "unknown", "dead", T0 + 2, event="dead", reason="connection lost")], {})
    loaded = row(store, "rt-a")
    assert (loaded.state, loaded.since, loaded.reason) == ("dead", T0 + 2, "connection lost")


def test_record_sets_each_runtime_to_its_latest_flip_of_the_batch(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0), ("rt-b", 1.0, 1.0)], T0)
    store.record(
        [
            flip("rt-a", "unknown", "alive", T0 + 1, reason="pulse received"),
            flip("rt-b", "unknown", "alive", T0 + 1, reason="connected"),
            flip("rt-a", "alive", "dead", T0 + 2, event="dead", reason="connection lost"),
            flip("rt-a", "dead", "alive", T0 + 3, event="recovered", reason="pulse received"),
            flip("rt-b", "alive", "stopped", T0 + 4, event="stopped", reason="stopped by runtime"),
        ],
        {},
    )
    states = {r.id: (r.state, r.since, r.reason) for r in store.load()}
    assert states == {
        "rt-a": ("alive", T0 + 3, "pulse received"),
        "rt-b": ("stopped", T0 + 4, "stopped by runtime"),
    }


def test_record_with_a_null_reason_clears_the_reason(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    store.record([flip("rt-a", "unknown", "alive", T0 + 1, reason=None)], {})
    assert row(store, "rt-a").reason is None


def test_record_stores_the_last_seen_batch(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0), ("rt-b", 1.0, 1.0), ("rt-c", 1.0, 1.0)], T0)
    store.record([], {"rt-a": T0 + 1.5, "rt-b": T0 + 2.25})
    assert {r.id: r.last_seen for r in store.load()} == {"rt-a": T0 + 1.5, "rt-b": T0 + 2.25, "rt-c": None}


def test_record_last_seen_alone_leaves_the_state(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    store.record([], {"rt-a": T0 + 1})
    loaded = row(store, "rt-a")
    assert (loaded.state, loaded.since, loaded.reason) == ("unknown", T0, "registered")


def test_record_last_seen_of_an_unknown_runtime_creates_no_row(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    store.record([], {"rt-gone": T0 + 1})
    assert [r.id for r in store.load()] == ["rt-a"]


def test_record_of_more_than_one_chunk_updates_every_runtime(store: Store) -> None:
    ids = [f"rt-{i:04d}" for i in range(1201)]
    store.register([(rid, 1.0, 1.0) for rid in ids], T0)
    store.record(
        [flip(rid, "unknown", "alive", T0 + 1, reason="pulse received") for rid in ids],
        {rid: T0 + 2 for rid in ids},
    )
    loaded = store.load()
    assert len(loaded) == len(ids)
    assert {(r.state, r.since, r.last_seen) for r in loaded} == {("alive", T0 + 1, T0 + 2)}


def test_in_key_order_sorts_a_flush_of_one_run() -> None:
    seen = {"rt-c": 3.0, "rt-a": 1.0, "rt-b": 2.0}
    assert list(in_key_order(seen)) == [[("rt-a", 1.0), ("rt-b", 2.0), ("rt-c", 3.0)]]


def test_in_key_order_sorts_a_larger_flush_run_by_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "SORT_RUN", 3)
    seen = {rid: float(i) for i, rid in enumerate(["rt-e", "rt-a", "rt-g", "rt-c", "rt-b", "rt-f", "rt-d"])}
    ordered = [rid for chunk in in_key_order(seen) for rid, _ in chunk]
    assert ordered == ["rt-a", "rt-e", "rt-g", "rt-b", "rt-c", "rt-f", "rt-d"]


def test_in_key_order_keeps_each_runtimes_time() -> None:
    seen = {f"rt-{i:03d}": float(i) for i in reversed(range(200))}
    assert dict(pair for chunk in in_key_order(seen) for pair in chunk) == seen


def test_in_key_order_adds_the_offset_to_each_time() -> None:
    seen = {"rt-b": 2.0, "rt-a": 1.0}
    assert list(in_key_order(seen, 100.0)) == [[("rt-a", 101.0), ("rt-b", 102.0)]]


def test_in_key_order_cuts_chunks_a_statement_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CHUNK", 2)
    seen = {f"rt-{i}": float(i) for i in range(5)}
    assert [len(chunk) for chunk in in_key_order(seen)] == [2, 2, 1]


def chain(runtime_id: str, n: int) -> list[FlipRow]:
    """``n`` consistent flips of one runtime: unknown, then alive and dead in turn, a second apart."""
    states = ["unknown"] + ["alive", "dead"] * n
    return [flip(runtime_id, states[i], states[i + 1], T0 + i) for i in range(n)]


def test_record_of_more_than_one_chunk_appends_every_flip(store: Store) -> None:
    flips = chain("rt-a", 1201)
    store.register([("rt-a", 1.0, 1.0)], T0)
    store.record(flips, {})
    assert len(store.history("rt-a", limit=5000)) == 1201


def test_record_with_reused_chunk_sql_still_refuses_runtimes_that_moved_on(store: Store) -> None:
    """Full chunks reuse their SQL (``_execute_chunk``): the compare-and-set must still hold in every one."""
    ids = [f"rt-{i:04d}" for i in range(1000)]
    store.register([(rid, 1.0, 1.0) for rid in ids], T0)
    store.record([flip(rid, "unknown", "alive", T0 + 1) for rid in ids[::2]], {})  # builds the full chunks' SQL
    deaths = [flip(rid, "alive", "dead", T0 + 2, event="dead", reason="silent") for rid in ids]
    assert store.record(deaths, {}) == set(ids[1::2])
    states = {r.id: (r.state, r.reason) for r in store.load()}
    assert {states[rid] for rid in ids[::2]} == {("dead", "silent")}
    assert {states[rid] for rid in ids[1::2]} == {("unknown", "registered")}
    assert store.history(ids[0])[0] == deaths[0]
    assert store.history(ids[1]) == []


# --- deregister ------------------------------------------------------------------


def test_deregister_deletes_the_runtime(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0), ("rt-b", 1.0, 1.0)], T0)
    store.deregister(["rt-a"])
    assert [r.id for r in store.load()] == ["rt-b"]


def test_deregister_keeps_the_runtimes_flips(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    dead = flip("rt-a", "unknown", "dead", T0 + 2, event="dead", reason="connection lost")
    store.record([dead], {})
    store.deregister(["rt-a"])
    assert store.history("rt-a") == [dead]


def test_deregister_of_an_unknown_runtime_changes_nothing(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    store.deregister(["rt-unknown"])
    assert [r.id for r in store.load()] == ["rt-a"]


def test_deregister_of_more_than_one_chunk_deletes_every_runtime(store: Store) -> None:
    ids = [f"rt-{i:04d}" for i in range(1201)]
    store.register([(rid, 1.0, 1.0) for rid in [*ids, "rt-keep"]], T0)
    store.deregister(ids)
    assert [r.id for r in store.load()] == ["rt-keep"]


# --- history -----------------------------------------------------------------------


def test_history_is_newest_first(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    store.record([flip("rt-a", "unknown", "alive", T0 + 1)], {})
    store.record([flip("rt-a", "alive", "dead", T0 + 5)], {})
    assert [f.at for f in store.history("rt-a")] == [T0 + 5, T0 + 1]


def test_history_puts_the_later_stored_of_simultaneous_flips_first(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    first, second = flip("rt-a", "unknown", "alive", T0), flip("rt-a", "alive", "stopped", T0)
    store.record([first, second], {})
    assert store.history("rt-a") == [second, first]


def test_history_is_limited_to_the_newest(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    store.record(chain("rt-a", 10), {})
    assert [f.at for f in store.history("rt-a", limit=3)] == [T0 + 9, T0 + 8, T0 + 7]


def test_history_holds_only_that_runtimes_flips(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0), ("rt-b", 1.0, 1.0)], T0)
    store.record([flip("rt-a", "unknown", "alive", T0 + 1), flip("rt-b", "unknown", "dead", T0 + 2)], {})
    assert [f.runtime_id for f in store.history("rt-b")] == ["rt-b"]


# --- transactions, order, precision, persistence -------------------------------------


def test_each_write_call_counts_one_transaction(store: Store) -> None:
    store.register([(f"rt-{i}", 1.0, 1.0) for i in range(1201)], T0)
    assert store.transactions == 1
    store.record([flip(f"rt-{i}", "unknown", "alive", T0 + 1) for i in range(1201)], {"rt-0": T0 + 1})
    assert store.transactions == 2
    store.deregister(["rt-0", "rt-1"])
    assert store.transactions == 3


def test_record_with_nothing_to_write_is_no_transaction(store: Store) -> None:
    store.record([], {})
    assert store.transactions == 0


def test_load_orders_rows_by_id(store: Store) -> None:
    store.register([("rt-c", 1.0, 1.0), ("rt-a", 1.0, 1.0)], T0)
    store.register([("rt-b", 1.0, 1.0)], T0)
    assert [r.id for r in store.load()] == ["rt-a", "rt-b", "rt-c"]


def test_times_round_trip_as_doubles_with_sub_millisecond_precision(store: Store) -> None:
    store.register([("rt-a", 0.1, 86400.0)], T0)
    dead = flip("rt-a", "unknown", "dead", T0 + 0.000123, event="dead", last_seen=T0 + 0.000456)
    store.record([dead], {"rt-a": T0 + 0.000789})
    loaded = row(store, "rt-a")
    assert (loaded.interval, loaded.grace) == (0.1, 86400.0)
    assert (loaded.since, loaded.last_seen) == (T0 + 0.000123, T0 + 0.000789)
    (stored,) = store.history("rt-a")
    assert (stored.at, stored.last_seen) == (T0 + 0.000123, T0 + 0.000456)


def test_rows_survive_closing_and_reopening(db_url: str) -> None:
    first = Store(db_url)
    first.open()
    first.register([("rt-a", 2.0, 3.0)], T0)
    first.record([flip("rt-a", "unknown", "alive", T0 + 1, reason="connected")], {"rt-a": T0 + 1})
    first.close()
    second = Store(db_url)
    second.open()
    try:
        assert second.load() == [RuntimeRow("rt-a", 2.0, 3.0, "alive", T0 + 1, T0 + 1, "connected")]
    finally:
        second.close()


def test_sqlite_database_file_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat.db"
    store = Store(f"sqlite:///{path}")
    store.open()
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as reader:
        assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_database_errors_never_show_the_password() -> None:
    """The URL and the driver's message both go through runtime_agent.url.redact_url (its cases: test_url)."""
    url = "postgresql://hb:s3cret@127.0.0.1:5432/heartbeat"
    shown = "postgresql://hb:***@127.0.0.1:5432/heartbeat"
    message = store_module.database_error("cannot open the database", url, RuntimeError(f"cannot reach {url}"))
    assert message == f"cannot open the database {shown}: cannot reach {shown}"
    with pytest.raises(ValueError, match="unsupported database URL") as raised:
        store_module.open_database("mysql://hb:s3cret@127.0.0.1:9/heartbeat")
    assert "s3cret" not in str(raised.value)


# --- compare-and-set ----------------------------------------------------------------


def test_record_skips_a_runtime_whose_stored_state_moved_on(store: Store) -> None:
    """Two orchestrators saw the same death: the second writer's flip is refused and reported."""
    store.register([("rt-a", 1.0, 1.0)], T0)
    store.record([flip("rt-a", "unknown", "alive", T0 + 1)], {})
    first = flip("rt-a", "alive", "dead", T0 + 3, event="dead")
    second = flip("rt-a", "alive", "dead", T0 + 3.1, event="dead")
    assert store.record([first], {}) == set()
    assert store.record([second], {}) == {"rt-a"}
    assert store.history("rt-a")[0] == first


def test_record_of_a_deregistered_runtime_writes_no_flip(store: Store) -> None:
    assert store.record([flip("rt-gone", "alive", "dead", T0, event="dead")], {}) == {"rt-gone"}
    assert store.history("rt-gone") == []


# --- outbox -------------------------------------------------------------------------


def test_a_flip_with_an_event_is_owed_once_its_lease_runs_out(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    dead = flip("rt-a", "unknown", "dead", T0 + 1, event="dead")
    store.record([dead], {}, now=T0 + 1, lease=10)
    assert store.claim_unnotified(T0 + 5) == []  # the writer is still notifying it
    assert store.claim_unnotified(T0 + 12) == [dead]


def test_a_claimed_flip_is_not_claimed_again_within_the_lease(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    store.record([flip("rt-a", "unknown", "dead", T0 + 1, event="dead")], {}, now=T0, lease=0)
    assert len(store.claim_unnotified(T0 + 2, lease=10)) == 1
    assert store.claim_unnotified(T0 + 3, lease=10) == []


def test_a_notified_flip_is_never_owed(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    dead = flip("rt-a", "unknown", "dead", T0 + 1, event="dead")
    store.record([dead], {}, now=T0, lease=0)
    store.record([], {}, now=T0 + 2, notified=[dead.key])
    assert store.claim_unnotified(T0 + 100) == []


def test_a_flip_notified_before_it_was_written_is_never_owed(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    dead = flip("rt-a", "unknown", "dead", T0 + 1, event="dead")
    store.record([FlipRow(*dataclasses.astuple(dead)[:-1], notified_at=T0 + 1)], {}, now=T0, lease=0)
    assert store.claim_unnotified(T0 + 100) == []


def test_a_flip_without_an_event_is_never_owed(store: Store) -> None:
    store.register([("rt-a", 1.0, 1.0)], T0)
    store.record([flip("rt-a", "unknown", "alive", T0 + 1)], {}, now=T0, lease=0)
    assert store.claim_unnotified(T0 + 100) == []


def test_alive_at_is_remembered(store: Store) -> None:
    assert store.alive_at() is None
    store.record([], {}, alive_at=T0)
    store.record([], {}, alive_at=T0 + 5)
    assert store.alive_at() == T0 + 5


def test_an_old_database_gets_the_outbox_columns_with_history_counted_as_notified(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db = peewee.SqliteDatabase(str(tmp_path / "old.db"))
    db.execute_sql(
        "CREATE TABLE flip (id INTEGER PRIMARY KEY, runtime_id VARCHAR(128), old_state VARCHAR(16),"
        " new_state VARCHAR(16), event VARCHAR(16), reason TEXT, at REAL, last_seen REAL)"
    )
    db.execute_sql("INSERT INTO flip VALUES (1, 'rt-a', 'alive', 'dead', 'dead', 'x', 1.0, NULL)")
    db.close()
    store = Store(url)
    store.open()
    try:
        assert store.claim_unnotified(T0 + 100) == []
        assert len(store.history("rt-a")) == 1
    finally:
        store.close()


# --- silences ------------------------------------------------------------------------


def test_new_store_has_no_silences(store: Store) -> None:
    assert store.silences() == []


def test_saved_silences_come_back_by_pattern_and_load_into_a_silence_book(store: Store) -> None:
    store.save_silence("rt-1", T0 + 60, "patching")
    store.save_silence("db-*", T0 + 3600, None)

    assert store.silences() == [("db-*", T0 + 3600, None), ("rt-1", T0 + 60, "patching")]
    book = SilenceBook.from_rows(store.silences())
    assert book.is_silenced("db-7", T0)
    assert book.is_silenced("rt-1", T0)
    assert not book.is_silenced("rt-1", T0 + 61)


def test_a_silence_on_the_same_pattern_replaces_the_earlier_one(store: Store) -> None:
    store.save_silence("db-*", T0 + 60, "first")
    store.save_silence("db-*", T0 + 120, "second")

    assert store.silences() == [("db-*", T0 + 120, "second")]


def test_delete_silence_removes_exactly_that_pattern(store: Store) -> None:
    store.save_silence("db-*", T0 + 60, None)
    store.save_silence("db-1", T0 + 60, None)

    assert store.delete_silence("db-*") is True
    assert store.delete_silence("db-*") is False
    assert store.silences() == [("db-1", T0 + 60, None)]


def test_prune_silences_deletes_only_the_ended_ones(store: Store) -> None:
    store.save_silence("a", T0 - 1, None)
    store.save_silence("b", T0, None)
    store.save_silence("c", T0 + 1, None)

    assert store.prune_silences(T0) == 2
    assert store.silences() == [("c", T0 + 1, None)]


def test_silences_survive_reopening_and_an_older_database_gets_the_table(db_url: str) -> None:
    first = Store(db_url)
    first.open()
    try:
        first.db.drop_tables([StoredSilence])  # as made by a version without silences
        assert not first.db.table_exists("silence")
    finally:
        first.close()
    second = Store(db_url)
    second.open()
    try:
        second.save_silence("rt-1", T0, "kept")
    finally:
        second.close()
    third = Store(db_url)
    third.open()
    try:
        assert third.silences() == [("rt-1", T0, "kept")]
    finally:
        third.close()

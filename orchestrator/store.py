"""The configuration database: runtimes and their append-only history of flips.

Peewee models bound through a :class:`DatabaseProxy`, so the database is
chosen at run time from a URL (SQLite in WAL mode by default, PostgreSQL for
larger sites). A :class:`Store` is used from one thread only (the
orchestrator's database thread); every write it makes is one ``atomic()``
batch. Times are Unix seconds (UTC) as double precision.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import peewee
from playhouse import db_url
from playhouse.migrate import SchemaMigrator, migrate

from runtime_agent.protocol import status_dict
from runtime_agent.url import redact_url

log = logging.getLogger("orchestrator.store")

database = peewee.DatabaseProxy()

_CACHED_STATEMENTS = 16
"""Compiled statements the sqlite3 module keeps per connection (default 128)."""

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "busy_timeout": 5000,
    "foreign_keys": 1,
}


class BaseModel(peewee.Model):
    class Meta:
        database = database


class Runtime(BaseModel):
    """One registered runtime: its interval and its current state."""

    id = peewee.CharField(primary_key=True, max_length=128)
    interval = peewee.DoubleField()
    grace = peewee.DoubleField()
    state = peewee.CharField(max_length=16, default="unknown")
    since = peewee.DoubleField()
    last_seen = peewee.DoubleField(null=True)
    reason = peewee.TextField(null=True)
    registered_at = peewee.DoubleField()

    class Meta:
        table_name = "runtime"


class Flip(BaseModel):
    """One state change: the history, and the notification outbox.

    Only the delivery columns ever change: ``claimed_until`` is a lease held
    by the orchestrator sending the notice, ``notified_at`` is set once every
    channel has it. A flip with an event and no ``notified_at`` whose lease
    has run out is owed a notice (after a crash, by whoever reads it next).
    """

    id = peewee.BigAutoField()
    runtime_id = peewee.CharField(max_length=128)
    old_state = peewee.CharField(max_length=16)
    new_state = peewee.CharField(max_length=16)
    event = peewee.CharField(max_length=16, null=True)
    reason = peewee.TextField(null=True)
    at = peewee.DoubleField()
    last_seen = peewee.DoubleField(null=True)
    notified_at = peewee.DoubleField(null=True)
    claimed_until = peewee.DoubleField(null=True)

    class Meta:
        table_name = "flip"
        indexes = ((("runtime_id", "at"), False),)


class Fact(BaseModel):
    """Small facts about the orchestrator itself, such as when it was last known to be running."""

    key = peewee.CharField(primary_key=True, max_length=64)
    value = peewee.DoubleField()

    class Meta:
        table_name = "heartbeat_meta"


class Silence(BaseModel):
    """A maintenance silence: notices for runtimes matching ``pattern`` (an ID or a glob) held until ``until``."""

    pattern = peewee.CharField(primary_key=True, max_length=256)
    until = peewee.DoubleField()
    reason = peewee.TextField(null=True)
    created_at = peewee.DoubleField()

    class Meta:
        table_name = "silence"


Flip.add_index(Flip.index(Flip.claimed_until, where=Flip.notified_at.is_null(), name="flip_owed"))
"""Partial index: the outbox scan reads only the flips still owed a notice."""

MODELS: list[type[BaseModel]] = [Runtime, Flip, Fact, Silence]


@dataclass(frozen=True, slots=True)
class RuntimeRow:
    id: str
    interval: float
    grace: float
    state: str
    since: float
    last_seen: float | None
    reason: str | None

    def status(self) -> dict[str, Any]:
        """The status document of this runtime, as on its status topic and in ``status --json``."""
        return status_dict(self.id, self.state, self.interval, self.grace, self.last_seen, self.since, self.reason)


@dataclass(frozen=True, slots=True)
class FlipRow:
    """A transition as the database stores it (wall-clock times).

    ``notified_at`` is set when the notice went out before the database took
    the flip (a slow or absent database never holds a notice back).
    """

    runtime_id: str
    old_state: str
    new_state: str
    event: str | None
    reason: str | None
    at: float
    last_seen: float | None
    notified_at: float | None = None

    @property
    def key(self) -> tuple[str, float]:
        """Identifies the flip across the database and memory (one runtime, one instant)."""
        return (self.runtime_id, self.at)


def open_database(url: str) -> peewee.Database:
    """Make a peewee database from a URL; SQLite gets WAL and a busy timeout."""
    if url.startswith("sqlite:"):
        # A statement over a full chunk (500 rows, up to 4,500 parameters) compiles to some 100 KB or more, and the
        # sqlite3 module keeps 128 of them by default, one per distinct chunk size: 27 MiB with 100,000 runtimes.
        db = db_url.connect(url, pragmas=SQLITE_PRAGMAS, cached_statements=_CACHED_STATEMENTS)
    else:
        db = db_url.connect(url)
    if not isinstance(db, peewee.SqliteDatabase | peewee.PostgresqlDatabase):
        raise ValueError(f"unsupported database URL {redact_url(url)!r}: use sqlite:///PATH or postgresql://...")
    return db


CHUNK = 500
"""Rows per statement; the service reads its last-seen flush a chunk at a time to match."""


SORT_RUN = 65_536
"""Keys :func:`in_key_order` sorts at a time: some 30 ms holding the GIL (and so the event loop)."""


def in_key_order(rows: Mapping[str, float], offset: float = 0.0) -> Iterator[list[tuple[str, float]]]:
    """``rows``' items as ``(key, value + offset)``, ordered by key, in chunks of :data:`CHUNK`, a run at a time.

    The order is the runtime table's primary key's. The last-seen flush
    comes in pulse order, which in a real fleet is no order at all. Written
    in that order, nearly every row is on another page: 100,000 rows of
    1,000,000 cost SQLite 9-10 µs each, and 5 µs each of 100,000; sorted
    first, 4.5 and 2 µs, the sort (0.5 µs a key) included. A flush of more
    than :data:`SORT_RUN` rows is sorted a run at a time, as the chunks are
    read, and each run is written in order: merging them would cost more
    than the locality it adds, and one sort of all would hold the GIL for
    the whole of it. Each chunk is built by C iterators, not a generator
    per row: 0.19 µs a row against 0.31 (``offset`` turns the service's
    monotonic times into wall-clock ones on the way).
    """
    keys = list(rows)
    shift = offset.__add__
    for start in range(0, len(keys), SORT_RUN):
        run = sorted(keys[start : start + SORT_RUN])
        for i in range(0, len(run), CHUNK):
            part = run[i : i + CHUNK]
            yield list(zip(part, map(shift, map(rows.__getitem__, part)), strict=True))


class Store:
    """All database work of the orchestrator, in batches, from a single thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.db = open_database(url)
        database.initialize(self.db)
        self.transactions = 0
        """Committed write transactions: a measure for tests and benchmarks."""
        self._templates: dict[tuple[str, ...], tuple[str, str, str] | None] = {}
        """Kind of query -> (SQL before its VALUES rows, one row's placeholders, SQL after), or None if the
        query's SQL is not of that shape (see ``_execute_chunk``)."""

    def open(self) -> None:
        """Connect and create the tables if they do not exist yet."""
        self.db.connect(reuse_if_open=True)
        self._migrate()
        self.db.create_tables(MODELS, safe=True)

    def _migrate(self) -> None:
        """Add the columns a database made by an older version lacks."""
        if not self.db.table_exists("flip"):
            return
        have = {c.name for c in self.db.get_columns("flip")}
        missing = [f for f in (Flip.notified_at, Flip.claimed_until) if f.column_name not in have]
        if missing:
            migrator = SchemaMigrator.from_database(self.db)
            with self.db.atomic():
                migrate(*(migrator.add_column("flip", f.column_name, f) for f in missing))
            # Flips written before the outbox existed were notified the old way.
            Flip.update(notified_at=Flip.at).where(Flip.notified_at.is_null()).execute()

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    def reconnect(self) -> None:
        """Drop a broken connection so the next call opens a fresh one."""
        with contextlib.suppress(peewee.PeeweeException):
            self.db.close()
        self.db.connect(reuse_if_open=True)

    def load(self) -> list[RuntimeRow]:
        """Every registered runtime, ordered by ID."""
        query = Runtime.select().order_by(Runtime.id).tuples().iterator()
        return [RuntimeRow(i, iv, gr, st, si, ls, rs) for i, iv, gr, st, si, ls, rs, _ in query]

    def history(self, runtime_id: str, limit: int = 100) -> list[FlipRow]:
        query = (
            Flip.select(
                Flip.runtime_id, Flip.old_state, Flip.new_state, Flip.event, Flip.reason, Flip.at, Flip.last_seen
            )
            .where(Flip.runtime_id == runtime_id)
            .order_by(Flip.at.desc(), Flip.id.desc())
            .limit(limit)
            .tuples()
        )
        return [FlipRow(*row) for row in query.iterator()]

    def register(self, items: Sequence[tuple[str, float, float]], now: float) -> None:
        """Insert or update ``(id, interval, grace)`` rows in one transaction."""
        with self.db.atomic():
            for chunk in peewee.chunked(items, CHUNK):
                rows = [(rid, interval, grace, "unknown", now, "registered", now) for rid, interval, grace in chunk]
                self._execute_chunk(("register",), rows, self._register_query)
        self.transactions += 1

    @staticmethod
    def _register_query(rows: Sequence[tuple[Any, ...]]) -> peewee.Query:
        fields = [Runtime.id, Runtime.interval, Runtime.grace, Runtime.state, Runtime.since, Runtime.reason]
        return Runtime.insert_many(rows, fields=[*fields, Runtime.registered_at]).on_conflict(
            conflict_target=[Runtime.id],
            update={Runtime.interval: peewee.EXCLUDED.interval, Runtime.grace: peewee.EXCLUDED.grace},
        )

    def deregister(self, runtime_ids: Iterable[str]) -> None:
        ids = list(runtime_ids)
        with self.db.atomic():
            for chunk in peewee.chunked(ids, CHUNK):
                Runtime.delete().where(Runtime.id.in_(chunk)).execute()
        self.transactions += 1

    def silences(self) -> list[tuple[str, float, str | None]]:
        """Every stored silence as ``(pattern, until, reason)`` rows, by pattern (``SilenceBook.from_rows``)."""
        query = Silence.select(Silence.pattern, Silence.until, Silence.reason).order_by(Silence.pattern).tuples()
        return [(pattern, until, reason) for pattern, until, reason in query.iterator()]

    def save_silence(self, pattern: str, until: float, reason: str | None, now: float | None = None) -> None:
        """Store a silence; one for the same pattern is replaced (as in the silence book)."""
        now = time.time() if now is None else now
        with self.db.atomic():
            Silence.insert(pattern=pattern, until=until, reason=reason, created_at=now).on_conflict(
                conflict_target=[Silence.pattern],
                update={Silence.until: until, Silence.reason: reason, Silence.created_at: now},
            ).execute()
        self.transactions += 1

    def delete_silence(self, pattern: str) -> bool:
        """Delete the silence on exactly ``pattern``; False if there was none."""
        with self.db.atomic():
            deleted = Silence.delete().where(Silence.pattern == pattern).execute()
        self.transactions += 1
        return bool(deleted)

    def prune_silences(self, now: float) -> int:
        """Delete the silences that ended at or before ``now``; how many there were."""
        with self.db.atomic():
            deleted = Silence.delete().where(Silence.until <= now).execute()
        self.transactions += 1
        return int(deleted)

    def record(
        self,
        flips: Sequence[FlipRow],
        seen: Mapping[str, float] | Iterable[Sequence[tuple[str, float]]],
        *,
        now: float | None = None,
        lease: float = 30.0,
        alive_at: float | None = None,
        notified: Sequence[tuple[str, float]] = (),
    ) -> set[str]:
        """Append flips, set each runtime's current state, and store last-seen times: one transaction.

        The state change is a compare-and-set: a runtime whose stored state is
        no longer the batch's first ``old_state`` (another orchestrator got
        there first, or it was deregistered) keeps it, and its flips are not
        written. Returns those runtimes' IDs, so their notices are not sent
        twice. Flips with an event are written claimed for ``lease`` seconds
        by the caller, who is about to notify them; ``notified`` marks earlier
        flips ``(runtime_id, at)`` as notified. ``alive_at`` records when this
        orchestrator was last known to be running.

        ``seen`` may be an iterator of chunks of ``(runtime_id, last_seen)``,
        each at most :data:`CHUNK` long (as :func:`in_key_order` makes them):
        it is read a chunk at a time, so one that stops early ends the
        transaction early (the service's flush gives way to an alert that way).
        """
        if not flips and not seen and alive_at is None and not notified:
            return set()
        now = time.time() if now is None else now
        claim = now + lease
        lost: set[str] = set()
        with self.db.atomic():
            chains: dict[str, list[FlipRow]] = {}
            for f in flips:
                chains.setdefault(f.runtime_id, []).append(f)
            won: set[str] = set()
            for part in peewee.chunked(list(chains.items()), CHUNK):
                rows = [
                    (rid, chain[0].old_state, chain[-1].new_state, chain[-1].at, chain[-1].reason)
                    for rid, chain in part
                ]
                won.update(self._compare_and_set(rows))
            lost = set(chains) - won
            written = [f for f in flips if f.runtime_id in won]
            for chunk in peewee.chunked(written, CHUNK):
                self._insert_flips(
                    [
                        (
                            f.runtime_id,
                            f.old_state,
                            f.new_state,
                            f.event,
                            f.reason,
                            f.at,
                            f.last_seen,
                            f.notified_at,
                            claim if f.event is not None and f.notified_at is None else None,
                        )
                        for f in chunk
                    ]
                )
            for pairs in peewee.chunked(seen.items(), CHUNK) if isinstance(seen, Mapping) else seen:
                self._update_from(pairs, ("last_seen",))
            self._mark_notified(notified, now)
            if alive_at is not None:
                Fact.insert(key="alive_at", value=alive_at).on_conflict(
                    conflict_target=[Fact.key], update={Fact.value: alive_at}
                ).execute()
        self.transactions += 1
        if lost:
            log.info("%d state changes were already recorded by another writer; not notifying them", len(lost))
        return lost

    def _compare_and_set(self, rows: Sequence[tuple[str, str, str, float, str | None]]) -> list[str]:
        """Set ``(id, old, new, since, reason)`` where the state is still ``old``; the IDs that changed."""
        cursor = self._execute_chunk(("cas",), rows, self._cas_query)
        return [row[0] for row in cursor.fetchall()]

    def _cas_query(self, rows: Sequence[tuple[str, str, str, float, str | None]]) -> peewee.Query:
        values = peewee.ValuesList(rows).cte("v", columns=("rid", "old", "state", "since", "reason"))
        cols = {"state": values.c.state, "since": values.c.since, "reason": values.c.reason}
        old: Any = values.c.old
        if isinstance(self.db, peewee.PostgresqlDatabase):
            cols = {
                "state": peewee.Cast(values.c.state, "VARCHAR"),
                "since": peewee.Cast(values.c.since, "DOUBLE PRECISION"),
                "reason": peewee.Cast(values.c.reason, "TEXT"),
            }
            old = peewee.Cast(values.c.old, "VARCHAR")
        return (
            Runtime.update(**cols)
            .from_(values)
            .where((Runtime.id == values.c.rid) & (Runtime.state == old))
            .with_cte(values)
            .returning(Runtime.id)
        )

    def alive_at(self) -> float | None:
        """When an orchestrator last recorded that it was running on this database (None: never)."""
        row = Fact.get_or_none(Fact.key == "alive_at")
        return None if row is None else float(row.value)

    def claim_unnotified(self, now: float, *, lease: float = 30.0, limit: int = 1000) -> list[FlipRow]:
        """Take (for ``lease`` seconds) flips owed a notice: written, never notified, lease run out.

        A compare-and-set, so two orchestrators never both take the same flip.
        """
        owed = (
            Flip.select(Flip.id)
            .where(
                Flip.notified_at.is_null()
                & Flip.event.is_null(False)
                & (Flip.claimed_until.is_null() | (Flip.claimed_until < now))
            )
            .order_by(Flip.id)
            .limit(limit)
        )
        with self.db.atomic():
            ids = [row.id for row in owed]
            if not ids:
                return []
            query = (
                Flip.update(claimed_until=now + lease)
                .where(
                    Flip.id.in_(ids)
                    & Flip.notified_at.is_null()
                    & (Flip.claimed_until.is_null() | (Flip.claimed_until < now))
                )
                .returning(
                    Flip.runtime_id, Flip.old_state, Flip.new_state, Flip.event, Flip.reason, Flip.at, Flip.last_seen
                )
            )
            rows = [
                FlipRow(r.runtime_id, r.old_state, r.new_state, r.event, r.reason, r.at, r.last_seen)
                for r in query.execute()
            ]
        self.transactions += 1
        return sorted(rows, key=lambda f: f.at)

    def _mark_notified(self, keys: Sequence[tuple[str, float]], when: float) -> None:
        for chunk in peewee.chunked(keys, CHUNK):
            values = peewee.ValuesList(list(chunk)).cte("v", columns=("rid", "at"))
            at: Any = values.c.at
            if isinstance(self.db, peewee.PostgresqlDatabase):
                at = peewee.Cast(values.c.at, "DOUBLE PRECISION")
            (
                Flip.update(notified_at=when)
                .from_(values)
                .where((Flip.runtime_id == values.c.rid) & (Flip.at == at) & Flip.notified_at.is_null())
                .with_cte(values)
                .execute()
            )

    def _insert_flips(self, rows: Sequence[tuple[Any, ...]]) -> None:
        fields = [
            Flip.runtime_id,
            Flip.old_state,
            Flip.new_state,
            Flip.event,
            Flip.reason,
            Flip.at,
            Flip.last_seen,
            Flip.notified_at,
            Flip.claimed_until,
        ]
        self._execute_chunk(("flips",), rows, lambda some: Flip.insert_many(some, fields=fields))

    def _update_from(self, rows: Sequence[tuple[Any, ...]], columns: tuple[str, ...]) -> None:
        """``WITH v AS (VALUES ...) UPDATE runtime SET ... FROM v WHERE id = v.rid``: one statement per chunk."""
        self._execute_chunk(("update", *columns), rows, lambda some: self._update_query(some, columns))

    def _execute_chunk(
        self,
        kind: tuple[str, ...],
        rows: Sequence[tuple[Any, ...]],
        build: Callable[[Sequence[tuple[Any, ...]]], peewee.Query],
    ) -> Any:
        """Run ``build(rows)``, a query with one ``VALUES`` row per row, without peewee generating its SQL each time.

        The last-seen flush (100,000 rows every few seconds), the
        unknown -> alive wave after a start (100,000 flips) and a fleet
        registering at once spent most of their time in peewee generating
        SQL, 30 ms per 1,000 rows, on the database thread but holding the GIL
        the event loop needs. peewee builds the query for one row once per
        kind; the SQL for n rows repeats that row's placeholders n times.
        The template is checked against peewee's own SQL and parameters for
        two rows first, so a query of any other shape is always built by
        peewee.
        """
        if kind not in self._templates and len(rows) >= 2:
            self._templates[kind] = _values_template(rows, build)
        template = self._templates.get(kind)
        if template is None:
            sql, params = build(rows).sql()
            return self.db.execute_sql(sql, params)  # type: ignore[no-untyped-call]
        before, row, after = template
        sql = "".join((before, ", ".join(itertools.repeat(row, len(rows))), after))
        return self.db.execute_sql(sql, list(itertools.chain.from_iterable(rows)))  # type: ignore[no-untyped-call]

    def _update_query(self, rows: Sequence[tuple[Any, ...]], columns: tuple[str, ...]) -> peewee.Query:
        values = peewee.ValuesList(rows).cte("v", columns=("rid", *columns))
        if isinstance(self.db, peewee.PostgresqlDatabase):
            # VALUES columns arrive untyped in PostgreSQL; cast them to the target column types.
            casts = {"state": "VARCHAR", "reason": "TEXT"}
            update = {name: peewee.Cast(values.c[name], casts.get(name, "DOUBLE PRECISION")) for name in columns}
        else:
            update = {name: values.c[name] for name in columns}
        return Runtime.update(**update).from_(values).where(Runtime.id == values.c.rid).with_cte(values)


def _values_template(
    rows: Sequence[tuple[Any, ...]], build: Callable[[Sequence[tuple[Any, ...]]], peewee.Query]
) -> tuple[str, str, str] | None:
    """``(before, row, after)`` such that n rows' SQL is ``before + ", ".join([row] * n) + after``, or None.

    Derived from peewee's SQL for one row and proven on two: their parameters
    must be the rows' values in order, and the second SQL what the template says.
    """
    one, two = rows[:1], rows[:2]
    sql1, params1 = build(one).sql()
    sql2, params2 = build(two).sql()
    if list(params1) != list(one[0]) or list(params2) != list(itertools.chain.from_iterable(two)):
        return None
    for mark in ("?", "%s"):
        row = "(" + ", ".join([mark] * len(one[0])) + ")"
        if sql1.count(row) == 1:
            before, after = sql1.split(row)
            if sql2 == f"{before}{row}, {row}{after}":
                return before, row, after
    return None


def database_error(what: str, url: str, exc: Exception) -> str:
    """``"{what} {url}: {error}"`` with the password out of both the URL and the driver's message."""
    shown = redact_url(url)
    return f"{what} {shown}: {str(exc).replace(url, shown)}"

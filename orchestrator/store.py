"""The configuration database: runtimes and their append-only history of flips.

Peewee models bound through a :class:`DatabaseProxy`, so the database is
chosen at run time from a URL (SQLite in WAL mode by default, PostgreSQL for
larger sites). A :class:`Store` is used from one thread only (the
orchestrator's database thread); every write it makes is one ``atomic()``
batch. Times are Unix seconds (UTC) as double precision.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import peewee
from playhouse import db_url

log = logging.getLogger("orchestrator.store")

database = peewee.DatabaseProxy()

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
    """One state change, never updated: the history, and (later) the notification outbox."""

    id = peewee.BigAutoField()
    runtime_id = peewee.CharField(max_length=128)
    old_state = peewee.CharField(max_length=16)
    new_state = peewee.CharField(max_length=16)
    event = peewee.CharField(max_length=16, null=True)
    reason = peewee.TextField(null=True)
    at = peewee.DoubleField()
    last_seen = peewee.DoubleField(null=True)

    class Meta:
        table_name = "flip"
        indexes = ((("runtime_id", "at"), False),)


MODELS: list[type[BaseModel]] = [Runtime, Flip]


@dataclass(frozen=True, slots=True)
class RuntimeRow:
    id: str
    interval: float
    grace: float
    state: str
    since: float
    last_seen: float | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class FlipRow:
    """A transition as the database stores it (wall-clock times)."""

    runtime_id: str
    old_state: str
    new_state: str
    event: str | None
    reason: str | None
    at: float
    last_seen: float | None


def open_database(url: str) -> peewee.Database:
    """Make a peewee database from a URL; SQLite gets WAL and a busy timeout."""
    db = db_url.connect(url, pragmas=SQLITE_PRAGMAS) if url.startswith("sqlite:") else db_url.connect(url)
    if not isinstance(db, peewee.SqliteDatabase | peewee.PostgresqlDatabase):
        raise ValueError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://...")
    return db


_BATCH = 500


class Store:
    """All database work of the orchestrator, in batches, from a single thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.db = open_database(url)
        database.initialize(self.db)
        self.transactions = 0
        """Committed write transactions: a measure for tests and benchmarks."""

    def open(self) -> None:
        """Connect and create the tables if they do not exist yet."""
        self.db.connect(reuse_if_open=True)
        self.db.create_tables(MODELS, safe=True)

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
            for chunk in peewee.chunked(items, _BATCH):
                rows = [
                    {
                        "id": rid,
                        "interval": interval,
                        "grace": grace,
                        "state": "unknown",
                        "since": now,
                        "reason": "registered",
                        "registered_at": now,
                    }
                    for rid, interval, grace in chunk
                ]
                (
                    Runtime.insert_many(rows)
                    .on_conflict(
                        conflict_target=[Runtime.id],
                        update={
                            Runtime.interval: peewee.EXCLUDED.interval,
                            Runtime.grace: peewee.EXCLUDED.grace,
                        },
                    )
                    .execute()
                )
        self.transactions += 1

    def deregister(self, runtime_ids: Iterable[str]) -> None:
        ids = list(runtime_ids)
        with self.db.atomic():
            for chunk in peewee.chunked(ids, _BATCH):
                Runtime.delete().where(Runtime.id.in_(chunk)).execute()
        self.transactions += 1

    def record(self, flips: Sequence[FlipRow], seen: Mapping[str, float]) -> None:
        """Append flips, set each runtime's current state, and store last-seen times: one transaction."""
        if not flips and not seen:
            return
        with self.db.atomic():
            for chunk in peewee.chunked(flips, _BATCH):
                Flip.insert_many(
                    [(f.runtime_id, f.old_state, f.new_state, f.event, f.reason, f.at, f.last_seen) for f in chunk],
                    fields=[
                        Flip.runtime_id,
                        Flip.old_state,
                        Flip.new_state,
                        Flip.event,
                        Flip.reason,
                        Flip.at,
                        Flip.last_seen,
                    ],
                ).execute()
            latest: dict[str, FlipRow] = {f.runtime_id: f for f in flips}
            for chunk in peewee.chunked(list(latest.values()), _BATCH):
                self._update_from(
                    [(f.runtime_id, f.new_state, f.at, f.reason) for f in chunk], ("state", "since", "reason")
                )
            for pairs in peewee.chunked(list(seen.items()), _BATCH):
                self._update_from(pairs, ("last_seen",))
        self.transactions += 1

    def _update_from(self, rows: Sequence[tuple[Any, ...]], columns: tuple[str, ...]) -> None:
        """``WITH v AS (VALUES ...) UPDATE runtime SET ... FROM v WHERE id = v.rid``: one statement per chunk."""
        values = peewee.ValuesList(rows).cte("v", columns=("rid", *columns))
        if isinstance(self.db, peewee.PostgresqlDatabase):
            # VALUES columns arrive untyped in PostgreSQL; cast them to the target column types.
            casts = {"state": "VARCHAR", "reason": "TEXT"}
            update = {name: peewee.Cast(values.c[name], casts.get(name, "DOUBLE PRECISION")) for name in columns}
        else:
            update = {name: values.c[name] for name in columns}
        Runtime.update(**update).from_(values).where(Runtime.id == values.c.rid).with_cte(values).execute()


def redact_url(url: str) -> str:
    """A database URL without its password, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"

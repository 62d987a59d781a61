"""What the scenarios share: their world (:class:`Bench`), measurements, and results.

A scenario gets a :class:`Bench` (a temporary directory and a Mosquitto of
its own on a free loopback port), seeds a SQLite database, starts the
orchestrator as a separate process (``python -m orchestrator run``), watches
it through a :class:`StatsObserver` (a paho subscriber on the stats, state,
alert and status topics) and reads its RSS and CPU time from ``/proc``. The
processes themselves are :mod:`bench.processes`, which the tests use too.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from .processes import TOPICS, MosquittoBroker, OrchestratorProcess, Subscriber, start_mosquitto

CLK_TCK = os.sysconf("SC_CLK_TCK")
MOSQUITTO_LIMITS = "max_connections -1\nlog_type error\nlog_type warning\n"
"""Bench brokers take any number of connections and log only errors and warnings (not every connection)."""
LOSSLESS = "max_queued_messages 0\n"
"""Lifts the per-client cap (1000 by default) under which Mosquitto drops QoS 0 messages for a subscriber
that falls behind: a slow consumer shows up as lag (its count arriving late), not as silent loss in the broker."""


def raise_nofile() -> int:
    """Raise this process's open-file limit to the hard limit (children inherit it); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 20_000
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- /proc ---------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def child_pids(pid: int) -> list[int]:
    """The PIDs of a process's children (of all its threads)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def wait_idle(pid: int, *, below: float = 0.15, hold: float = 1.0, timeout: float = 120.0) -> float:
    """Wait until the process uses less than ``below`` of a core for ``hold`` seconds; returns seconds waited."""
    start = time.monotonic()
    quiet_since: float | None = None
    last_cpu, last_t = cpu_seconds(pid), start
    while time.monotonic() - start < timeout:
        time.sleep(0.25)
        cpu, now = cpu_seconds(pid), time.monotonic()
        usage = (cpu - last_cpu) / (now - last_t)
        last_cpu, last_t = cpu, now
        if usage < below:
            quiet_since = quiet_since or now
            if now - quiet_since >= hold:
                break
        else:
            quiet_since = None
    return time.monotonic() - start


def wait_settled(pid: int, observer: StatsObserver, timeout: float = 600.0, *, hold: float = 1.0) -> float:
    """Wait until start-up work is done: the status refresh after connecting (paced, about
    10,000 statuses a second, so a light load ``wait_idle`` alone takes for idle), then idle."""
    start = time.monotonic()
    observer.wait(lambda o: o.stats.get("refresh_pending", 0) == 0 and o.stats_at > start, timeout)
    wait_idle(pid, hold=hold, timeout=max(1.0, timeout - (time.monotonic() - start)))
    return time.monotonic() - start


# --- the database ----------------------------------------------------------------

_templates: dict[tuple[int, float, float, bool], Path] = {}
_template_dir: Path | None = None


def seed_db(path: Path, n: int, *, interval: float, grace: float, alive: bool = False) -> float:
    """A SQLite file with ``n`` registered runtimes ``rt-0000000``...; returns seconds spent.

    Seeded through ``orchestrator.store.Store.register`` (one batched transaction)
    once per shape, then copied. ``alive`` marks them alive as if each had pulsed
    before a restart (so a scenario can skip the unknown->alive wave), with the
    last-seen time an orchestrator stores at a runtime's first pulse: a row
    alive but never seen is one no orchestrator leaves, and each of its first
    pulses would be a database row, which the scaling window would count.
    """
    global _template_dir
    from orchestrator.store import Store

    from .load import runtime_id

    start = time.monotonic()
    key = (n, interval, grace, alive)
    template = _templates.get(key)
    if template is None:
        if _template_dir is None:
            _template_dir = Path(tempfile.mkdtemp(prefix="hb-bench-seed-"))
        template = _template_dir / f"seed-{n}-{interval}-{grace}-{int(alive)}.db"
        store = Store(f"sqlite:///{template}")
        store.open()
        if n:
            store.register([(runtime_id(i), interval, grace) for i in range(n)], time.time())
        if alive:
            store.db.execute_sql(  # type: ignore[no-untyped-call]
                "UPDATE runtime SET state = 'alive', reason = 'pulse received', last_seen = registered_at"
            )
        store.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[no-untyped-call]
        store.close()
        _templates[key] = template
    shutil.copyfile(template, path)
    return time.monotonic() - start


def cleanup_templates() -> None:
    global _template_dir
    if _template_dir is not None:
        shutil.rmtree(_template_dir, ignore_errors=True)
    _template_dir = None
    _templates.clear()


def db_count(path: Path, state: str) -> int:
    """Rows in ``state``, read-only, from outside the orchestrator."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
        return int(conn.execute("SELECT count(*) FROM runtime WHERE state = ?", (state,)).fetchone()[0])


# --- the orchestrator --------------------------------------------------------------


class Orchestrator(OrchestratorProcess):
    """``python -m orchestrator run`` on a configuration file of the scenario's, started at once."""

    def __init__(
        self,
        directory: Path,
        db: Path | str,
        *,
        broker: str | None = None,
        listen: str | None = None,
        stats_interval: float = 0.5,
        flush_interval: float = 5.0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.config = directory / "bench.yaml"
        settings: dict[str, Any] = {
            "stats_interval": stats_interval,
            "flush_interval": flush_interval,
            "log_level": os.environ.get("HEARTBEAT_BENCH_LOG_LEVEL", "WARNING"),
            **(extra or {}),
        }
        self.config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
        args = ["--db", db if isinstance(db, str) else f"sqlite:///{db}", "--config", str(self.config)]
        args += ["--broker", broker] if broker else ["--listen", str(listen)]
        super().__init__(args, directory / "orchestrator.log")
        self.start()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        try:
            return super().stop(sig, timeout)
        finally:
            keep = os.environ.get("HEARTBEAT_BENCH_LOGS")  # a directory to keep each orchestrator's log in
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                shutil.copy(self.log_path, Path(keep) / f"orchestrator-{self.pid}.log")


# --- the observer --------------------------------------------------------------------


_STATUS = TOPICS.status("")


@dataclass
class Alert:
    id: str
    event: str
    at: float
    """time.monotonic() when the observer received it."""


class StatsObserver(Subscriber):
    """A subscriber on the orchestrator's stats and state, and optionally alerts and status (``dead`` ones)."""

    def __init__(self, port: int, alerts: bool = False, status: bool = False) -> None:
        self.alerts = alerts
        self.status = status
        self.stats: dict[str, Any] = {}
        self.stats_at = 0.0
        self.online_at: list[float] = []
        self.alert_log: list[Alert] = []
        self.status_dead: dict[str, float] = {}
        """Runtime ID -> when its status topic first said dead."""
        self.dead_ids: set[str] = set()
        """IDs with a ``dead`` alert, kept as alerts arrive: a wait's predicate must cost O(1), not O(alerts).

        :meth:`wait` checks its predicate on every message while holding the lock
        ``_on_message`` needs; counting 10,000 alerts afresh on each of them made
        this observer, not the orchestrator, the last to see a will storm (3 s)."""
        super().__init__(port, name="bench-observer")

    def topics(self) -> list[str]:
        topics = [f"{TOPICS.prefix}/orchestrator/#"]
        if self.alerts:
            topics.append(TOPICS.alerts)
        if self.status:
            topics.append(TOPICS.status_filter)
        return topics

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        topic = msg.topic
        if topic.startswith(_STATUS):  # many, and only a dead one counts: no lock, no wake-up for the others
            if b'"state":"dead"' in msg.payload.replace(b" ", b""):
                with self._cond:
                    self.status_dead.setdefault(topic[len(_STATUS) :], now)
            return
        with self._cond:
            if topic == TOPICS.alerts:
                doc = json.loads(msg.payload)
                self.alert_log.append(Alert(doc["id"], doc["event"], now))
                if doc["event"] == "dead":
                    self.dead_ids.add(doc["id"])
            elif topic == TOPICS.orchestrator_stats:
                if not msg.retain:
                    self.stats = json.loads(msg.payload)
                    self.stats_at = now
            elif (
                topic == TOPICS.orchestrator_state
                and not msg.retain
                and json.loads(msg.payload).get("state") == "online"
            ):
                self.online_at.append(now)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[StatsObserver], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds (checked on every message); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def fresh_stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The first stats document published after now."""
        after = time.monotonic()
        if not self.wait(lambda o: o.stats_at > after, timeout):
            raise TimeoutError("no stats from the orchestrator")
        return dict(self.stats)

    def wait_ready(self, after: float, timeout: float = 120.0) -> float:
        """Wait for a live ``online`` state published after ``after``; returns when it arrived."""
        if not self.wait(lambda o: any(t > after for t in o.online_at), timeout):
            raise TimeoutError(f"orchestrator not ready within {timeout} s")
        return min(t for t in self.online_at if t > after)

    def dead_alerts(self) -> list[Alert]:
        with self._cond:
            return [a for a in self.alert_log if a.event == "dead"]


# --- a scenario's world ----------------------------------------------------------------------


class Bench:
    """A scenario's temporary directory and Mosquitto; ``orchestrator()`` and ``observer()`` are cleaned up too.

    The Mosquitto is lossless for QoS 0 subscribers (:data:`LOSSLESS`);
    ``broker_defaults=True`` keeps Mosquitto's own limits, for what must hold
    on a broker as users run it.
    """

    def __init__(self, name: str, *, broker_defaults: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"hb-bench-{name}-"))
        self.mosquitto: MosquittoBroker = start_mosquitto(
            self.dir, extra=MOSQUITTO_LIMITS + ("" if broker_defaults else LOSSLESS)
        )
        self._closers: list[Callable[[], object]] = []

    @property
    def port(self) -> int:
        return self.mosquitto.port

    def seed(self, n: int, *, interval: float, grace: float, alive: bool = False, name: str = "bench.db") -> Path:
        path = self.dir / name
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        seed_db(path, n, interval=interval, grace=grace, alive=alive)
        return path

    def orchestrator(self, db: Path | str, **kw: Any) -> Orchestrator:
        kw.setdefault("broker", self.mosquitto.url)
        orch = Orchestrator(self.dir, db, **kw)
        self._closers.append(orch.stop)
        return orch

    def observer(self, port: int | None = None, **kw: Any) -> StatsObserver:
        obs = StatsObserver(port or self.port, **kw)
        self._closers.append(obs.close)
        return obs

    def on_close(self, fn: Callable[[], object]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception as exc:
                print(f"bench: cleanup failed: {exc!r}", file=sys.stderr)
        self._closers.clear()
        self.mosquitto.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def bench(name: str, *, broker_defaults: bool = False) -> Iterator[Bench]:
    b = Bench(name, broker_defaults=broker_defaults)
    try:
        yield b
    finally:
        b.close()


def start_ready(
    b: Bench, db: Path | str, observer: StatsObserver, timeout: float = 180.0, **kw: Any
) -> tuple[Orchestrator, float]:
    """Start an orchestrator and wait for its live ``online``; returns it and the seconds it took."""
    orch = b.orchestrator(db, **kw)
    try:
        ready = observer.wait_ready(orch.started, timeout)
    except TimeoutError:
        raise RuntimeError(f"orchestrator not ready:\n{orch.log_tail()}") from None
    return orch, ready - orch.started


# --- results -------------------------------------------------------------------------------


@dataclass
class Figure:
    key: str
    value: Any
    target: str = ""
    ok: bool | None = None
    unit: str = ""


@dataclass
class Result:
    scenario: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """More measured values, in the JSON only."""
    seconds: float = 0.0
    error: str | None = None

    def add(self, key: str, value: Any, target: str = "", ok: bool | None = None, unit: str = "") -> None:
        self.figures.append(Figure(key, value, target, ok, unit))

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scenario": self.scenario}
        out.update({f.key: f.value for f in self.figures})
        out.update(self.extra)
        out["targets"] = {f.key: f.target for f in self.figures if f.target}
        out["met"] = {f.key: f.ok for f in self.figures if f.ok is not None}
        out["notes"] = self.notes
        out["seconds"] = round(self.seconds, 1)
        if self.error:
            out["error"] = self.error
        return out


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_show(v)}" for k, v in value.items())
    return str(value)


def format_table(results: list[Result]) -> str:
    rows = [("scenario", "figure", "measured", "target", "met")]
    for r in results:
        if r.error:
            rows.append((r.scenario, "error", r.error[:100], "", "✗"))
        for f in r.figures:
            met = "" if f.ok is None else "✓" if f.ok else "✗"
            rows.append((r.scenario, f.key, f"{_show(f.value)}{(' ' + f.unit) if f.unit else ''}", f.target, met))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  {r.scenario}: {note}" for r in results for note in r.notes]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)

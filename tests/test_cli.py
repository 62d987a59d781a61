"""The ``heartbeat-orchestrator`` CLI as a user runs it (subprocesses), and its pure helpers in-process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import ago, format_table
from orchestrator.store import FlipRow, RuntimeRow, Store

from .harness import ROOT

T0 = 1795902116.123456
"""2026-11-28T21:41:56.123456Z"""

STATUS_KEYS = {"id", "state", "interval", "grace", "last_seen", "since", "reason"}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def cli(*args: str, module: str = "orchestrator", cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``python -m MODULE ARGS`` as a user would, from ``cwd``, with this checkout on the path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


@pytest.fixture
def seeded_db(sqlite_url: str) -> str:
    """The URL of a database holding ``rt-alive`` (alive, seen) and ``rt-dead`` (dead by its will, never seen)."""
    store = Store(sqlite_url)
    store.open()
    try:
        store.register([("rt-alive", 5.0, 10.0), ("rt-dead", 1.0, 1.0)], T0)
        store.record(
            [
                FlipRow("rt-alive", "unknown", "alive", None, "pulse received", T0 + 1, T0 + 1),
                FlipRow("rt-dead", "unknown", "dead", "dead", "connection lost", T0 + 2, None),
            ],
            {"rt-alive": T0 + 4},
        )
    finally:
        store.close()
    return sqlite_url


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port with a listening socket on it (as Mosquitto on 1883 would be), closed after the test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# --- status ----------------------------------------------------------------------


def test_status_of_an_empty_database_prints_the_header_and_0_runtimes(tmp_path: Path, sqlite_url: str) -> None:
    result = cli("status", "--db", sqlite_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ID  STATE  INTERVAL  GRACE  LAST SEEN  SINCE  REASON", "0 runtimes"]


def test_status_table_ends_with_the_counts_line(tmp_path: Path, seeded_db: str) -> None:
    result = cli("status", "--db", seeded_db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "2 runtimes: 1 alive, 1 dead"


def test_status_table_has_one_row_per_runtime_in_id_order(tmp_path: Path, seeded_db: str) -> None:
    result = cli("status", "--db", seeded_db, cwd=tmp_path)
    rows = result.stdout.splitlines()[1:-1]
    assert [line.split()[:2] for line in rows] == [["rt-alive", "alive"], ["rt-dead", "dead"]]


def test_status_json_objects_have_exactly_the_status_keys(tmp_path: Path, seeded_db: str) -> None:
    result = cli("status", "--db", seeded_db, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    objects = json.loads(result.stdout)
    assert len(objects) == 2
    assert [set(obj) for obj in objects] == [STATUS_KEYS, STATUS_KEYS]


def test_status_json_times_are_iso_8601_utc_with_z(tmp_path: Path, seeded_db: str) -> None:
    objects = json.loads(cli("status", "--db", seeded_db, "--json", cwd=tmp_path).stdout)
    times = [obj[key] for obj in objects for key in ("since", "last_seen") if obj[key] is not None]
    assert len(times) == 3
    assert all(ISO_Z.match(t) for t in times), times


def test_status_json_lists_what_the_database_holds(tmp_path: Path, seeded_db: str) -> None:
    objects = json.loads(cli("status", "--db", seeded_db, "--json", cwd=tmp_path).stdout)
    assert objects == [
        {
            "id": "rt-alive",
            "state": "alive",
            "interval": 5.0,
            "grace": 10.0,
            "last_seen": "2026-11-28T21:42:00.123Z",
            "since": "2026-11-28T21:41:57.123Z",
            "reason": "pulse received",
        },
        {
            "id": "rt-dead",
            "state": "dead",
            "interval": 1.0,
            "grace": 1.0,
            "last_seen": None,
            "since": "2026-11-28T21:41:58.123Z",
            "reason": "connection lost",
        },
    ]


def test_status_json_of_an_empty_database_is_an_empty_list(tmp_path: Path, sqlite_url: str) -> None:
    result = cli("status", "--db", sqlite_url, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_status_takes_the_database_from_the_config_file(tmp_path: Path, seeded_db: str) -> None:
    config = tmp_path / "orchestrator.yaml"
    config.write_text(f"db: {seeded_db}\n")
    result = cli("status", "--config", str(config), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [obj["id"] for obj in json.loads(result.stdout)] == ["rt-alive", "rt-dead"]


def test_status_of_an_unreachable_database_exits_1_saying_so(tmp_path: Path) -> None:
    result = cli("status", "--db", "postgresql://heartbeat@127.0.0.1:1/heartbeat", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot read the database" in result.stderr
    assert "Traceback" not in result.stderr


# --- run: errors a user meets first ------------------------------------------------


def test_run_on_a_port_in_use_exits_1_quickly_and_suggests_broker(tmp_path: Path, held_port: int) -> None:
    started = time.monotonic()
    result = cli("run", "--listen", f"127.0.0.1:{held_port}", "--db", f"sqlite:///{tmp_path}/hb.db", cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert "already in use" in result.stderr
    assert f"--broker mqtt://127.0.0.1:{held_port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 10


def test_run_with_a_nonsense_broker_exits_2_with_a_clear_error(tmp_path: Path) -> None:
    result = cli("run", "--broker", "nonsense", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("heartbeat-orchestrator: error: broker: invalid broker URL 'nonsense'")
    assert "mqtt://nonsense" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_a_missing_config_file_exits_2_naming_it(tmp_path: Path) -> None:
    result = cli("run", "--config", "missing.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("heartbeat-orchestrator: error: cannot read config file missing.yaml")
    assert "Traceback" not in result.stderr


def test_run_with_an_unknown_config_key_exits_2_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.yaml"
    config.write_text("brokr: mqtt://127.0.0.1:1883\n")
    result = cli("run", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown option(s): brokr" in result.stderr


def test_no_command_exits_2_with_the_usage(tmp_path: Path) -> None:
    result = cli(cwd=tmp_path)
    assert result.returncode == 2
    assert "COMMAND" in result.stderr


# --- demo and help -----------------------------------------------------------------------


def _alerts(output: str) -> list[dict[str, Any]]:
    """The alert objects the demo printed (``alert...: {json}`` lines)."""
    return [json.loads(line[line.index("{") :]) for line in output.splitlines() if "alert" in line and "{" in line]


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """``heartbeat-orchestrator demo``, run once for the tests that read its output."""
    return cli("demo", cwd=tmp_path_factory.mktemp("demo"), timeout=90)


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_demo_exits_0(demo_output: subprocess.CompletedProcess[str]) -> None:
    assert demo_output.returncode == 0, demo_output.stdout + demo_output.stderr


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_demo_shows_a_dead_alert_for_the_killed_agent(demo_output: subprocess.CompletedProcess[str]) -> None:
    dead = [a for a in _alerts(demo_output.stdout) if a["id"] == "demo-b" and a["event"] == "dead"]
    assert [a["reason"] for a in dead] == ["connection lost"], demo_output.stdout


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_demo_shows_a_stopped_alert_for_the_stopped_agent(demo_output: subprocess.CompletedProcess[str]) -> None:
    stopped = [a for a in _alerts(demo_output.stdout) if a["id"] == "demo-c" and a["event"] == "stopped"]
    assert len(stopped) == 1, demo_output.stdout


@pytest.mark.parametrize("module", ["orchestrator", "runtime_agent"])
def test_help_exits_0(tmp_path: Path, module: str) -> None:
    result = cli("--help", module=module, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


# --- ago() ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.0, "0 s ago"),
        (3.2, "3 s ago"),
        (59.0, "59 s ago"),
        (60.0, "1 min ago"),
        (300.0, "5 min ago"),
        (3540.0, "59 min ago"),
        (3600.0, "1.0 h ago"),
        (5400.0, "1.5 h ago"),
        (86399.0, "24.0 h ago"),
        (86400.0, "1.0 d ago"),
        (3 * 86400.0, "3.0 d ago"),
    ],
)
def test_ago_picks_the_unit_by_size(seconds: float, expected: str) -> None:
    assert ago(T0 - seconds, T0) == expected


def test_ago_of_never_is_never() -> None:
    assert ago(None, T0) == "never"


def test_ago_of_a_future_time_is_0_s() -> None:
    assert ago(T0 + 30, T0) == "0 s ago"


# --- format_table() ----------------------------------------------------------------------------


def _row(
    runtime_id: str,
    state: str,
    *,
    interval: float = 5.0,
    grace: float = 5.0,
    since: float = T0 - 10,
    last_seen: float | None = None,
    reason: str | None = None,
) -> RuntimeRow:
    return RuntimeRow(runtime_id, interval, grace, state, since, last_seen, reason)


def test_table_of_no_rows_is_the_header_and_0_runtimes() -> None:
    assert format_table([], now=T0) == "ID  STATE  INTERVAL  GRACE  LAST SEEN  SINCE  REASON\n0 runtimes"


def test_table_counts_states_in_a_fixed_order_and_omits_zeros() -> None:
    rows = [_row("a", "unknown"), _row("b", "dead"), _row("c", "alive"), _row("d", "alive")]
    assert format_table(rows, now=T0).splitlines()[-1] == "4 runtimes: 2 alive, 1 dead, 1 unknown"


def test_table_says_1_runtime_in_the_singular() -> None:
    assert format_table([_row("a", "stopped")], now=T0).splitlines()[-1] == "1 runtime: 1 stopped"


def test_table_row_shows_seconds_and_times_ago() -> None:
    row = _row("rt-1", "dead", interval=0.5, grace=30.0, last_seen=T0 - 75, since=T0 - 3, reason="connection lost")
    assert re.split(r"\s{2,}", format_table([row], now=T0).splitlines()[1]) == [
        "rt-1",
        "dead",
        "0.5 s",
        "30 s",
        "1 min ago",
        "3 s ago",
        "connection lost",
    ]


def test_table_shows_never_for_a_runtime_never_seen() -> None:
    assert "never" in format_table([_row("rt-1", "unknown")], now=T0).splitlines()[1]


def test_table_columns_are_aligned() -> None:
    rows = [_row("short", "alive", reason="pulse received"), _row("a-much-longer-id", "dead", reason="x")]
    lines = format_table(rows, now=T0).splitlines()[:3]
    header = lines[0]
    for column in ("STATE", "INTERVAL", "GRACE", "LAST SEEN", "SINCE", "REASON"):
        start = header.index(column)
        for line in lines[1:]:
            assert line[start - 2 : start] == "  ", (column, line)
            assert line[start] != " ", (column, line)


def test_table_lines_have_no_trailing_spaces() -> None:
    rows = [_row("rt-1", "alive", reason=None), _row("rt-2", "dead", reason="a long reason")]
    assert all(line == line.rstrip() for line in format_table(rows, now=T0).splitlines())


def test_status_into_a_closed_pipe_exits_quietly(sqlite_url: str, tmp_path: Path) -> None:
    """`status --json | head -1`: the reader leaves early; no traceback, exit 0."""
    store = Store(sqlite_url)
    store.open()
    store.register([(f"rt-{i:05d}", 5.0, 5.0) for i in range(2000)], time.time())
    store.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "status", "--json", "--db", sqlite_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    assert proc.stdout.read(1) == b"["
    proc.stdout.close()
    assert proc.wait(30) == 0
    assert b"Traceback" not in proc.stderr.read()

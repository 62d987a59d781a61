"""The ``heartbeat-orchestrator`` CLI as a user runs it (subprocesses), and its pure helpers in-process."""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import paho.mqtt.publish as publish
import pytest

from orchestrator.admin import format_reply, parse_duration
from orchestrator.broker import broker_command, child_env, free_port
from orchestrator.config import ConfigError
from orchestrator.notify import EVENTS, Notice
from orchestrator.reports import format_alert, format_table
from orchestrator.store import FlipRow, RuntimeRow, Store
from orchestrator.terminal import ago, duration, use_color
from runtime_agent import protocol

from .harness import ROOT, TOPICS, MosquittoBroker, Observer

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


def test_status_notes_on_stderr_when_a_live_runtimes_stored_last_seen_is_older_than_its_window(
    tmp_path: Path, seeded_db: str
) -> None:
    result = cli("status", "--db", seeded_db, cwd=tmp_path)  # rt-alive's last seen is days old
    assert result.returncode == 0, result.stderr
    assert "last_seen_every" in result.stderr
    assert result.stdout.splitlines()[-1] == "2 runtimes: 1 alive, 1 dead"


def test_status_adds_no_note_when_every_live_runtimes_stored_last_seen_is_recent(
    tmp_path: Path, sqlite_url: str
) -> None:
    store = Store(sqlite_url)
    store.open()
    now = time.time()
    store.register([("rt-fresh", 5.0, 5.0)], now - 2)
    store.record([FlipRow("rt-fresh", "unknown", "alive", None, "pulse received", now - 1, now - 1)], {"rt-fresh": now})
    store.close()

    result = cli("status", "--db", sqlite_url, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "last_seen_every" not in result.stderr


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


# --- colour ----------------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_status_with_color_always_paints_the_state(tmp_path: Path, seeded_db: str) -> None:
    result = cli("status", "--db", seeded_db, "--color", "always", cwd=tmp_path)
    assert "\x1b[1;31mdead\x1b[0m" in result.stdout.splitlines()[2]


def test_status_into_a_pipe_is_not_coloured(tmp_path: Path, seeded_db: str) -> None:
    assert "\x1b[" not in cli("status", "--db", seeded_db, cwd=tmp_path).stdout


def test_auto_colour_is_on_for_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color("auto", _Stream(tty=True))


def test_auto_colour_is_off_for_a_terminal_when_no_color_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color("auto", _Stream(tty=True))


def test_color_always_wins_over_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_color("always", _Stream(tty=False))


def test_coloured_table_is_the_plain_table_once_the_codes_are_removed() -> None:
    rows = [_row("short", "alive", reason="pulse received"), _row("a-much-longer-id", "dead", reason="x")]
    assert ANSI.sub("", format_table(rows, now=T0, color=True)) == format_table(rows, now=T0)


# --- status --watch and --http ------------------------------------------------------------


def _popen(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def _read_until(stream: IO[str], marker: str, count: int = 1, timeout: float = 20) -> list[str]:
    """Lines from ``stream`` until ``marker`` has appeared in ``count`` of them (in a thread, so it can time out)."""
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        for line in stream:
            lines.append(line)
            if sum(marker in x for x in lines) >= count:
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(timeout), f"no {count} x {marker!r} within {timeout} s: {lines}"
    return lines


def test_status_watch_redraws_until_ctrl_c_then_exits_0(tmp_path: Path, seeded_db: str) -> None:
    proc = _popen("status", "--db", seeded_db, "--watch", "0.2", cwd=tmp_path)
    try:
        assert proc.stdout is not None
        lines = _read_until(proc.stdout, "2 runtimes: 1 alive, 1 dead", count=2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
    assert sum(line.startswith("every 0.2 s") for line in lines) >= 2


def test_status_watch_of_0_seconds_is_an_error(tmp_path: Path, seeded_db: str) -> None:
    result = cli("status", "--db", seeded_db, "--watch", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "--watch: between 0.1 and 86400 seconds" in result.stderr


SERVED = [
    {
        "id": "rt-mem",
        "state": "stopped",
        "interval": 2.0,
        "grace": 2.0,
        "last_seen": "2026-11-28T21:41:57.123Z",
        "since": "2026-11-28T21:41:58.123Z",
        "reason": "runtime stopped",
    }
]


@pytest.fixture
def api_url() -> Iterator[str]:
    """An HTTP server answering ``/api/runtimes`` with SERVED, as ``run --http`` would."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(SERVED).encode()
            self.send_response(200 if self.path == "/api/runtimes" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_status_http_json_prints_the_orchestrator_s_objects(tmp_path: Path, api_url: str) -> None:
    result = cli("status", "--http", api_url, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == SERVED


def test_status_http_table_shows_the_orchestrator_s_runtimes(tmp_path: Path, api_url: str) -> None:
    result = cli("status", "--http", api_url, cwd=tmp_path)
    assert result.stdout.splitlines()[-1] == "1 runtime: 1 stopped"


def test_status_http_of_nothing_listening_exits_1_saying_so(tmp_path: Path) -> None:
    result = cli("status", "--http", f"127.0.0.1:{free_port()}", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot read http://127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


# --- alerts --------------------------------------------------------------------------------


def test_alerts_prints_the_recent_alerts_from_the_database(tmp_path: Path, seeded_db: str) -> None:
    result = cli("alerts", "--db", seeded_db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["2026-11-28T21:41:58Z  dead       rt-dead  connection lost"]


def test_alerts_json_prints_the_alert_objects(tmp_path: Path, seeded_db: str) -> None:
    result = cli("alerts", "--db", seeded_db, "--json", cwd=tmp_path)
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {
            "event": "dead",
            "id": "rt-dead",
            "at": "2026-11-28T21:41:58.123Z",
            "last_seen": None,
            "reason": "connection lost",
        }
    ]


def test_alerts_limit_keeps_the_newest_oldest_first(tmp_path: Path, history_db: str) -> None:
    result = cli("alerts", "--db", history_db, "--limit", "2", cwd=tmp_path)
    assert [line.split()[1] for line in result.stdout.splitlines()] == ["dead", "recovered"]


def test_format_alert_is_time_event_id_reason() -> None:
    alert = {"event": "dead", "id": "worker-7", "at": "2026-11-29T01:02:03.456Z", "reason": "no pulse for 3.2 s"}
    assert format_alert(alert) == "2026-11-29T01:02:03Z  dead       worker-7  no pulse for 3.2 s"


Follow = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def follow(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[Follow]:
    """Starts ``alerts --follow ARGS`` on the test's Mosquitto and returns it once subscribed; killed afterwards."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = _popen("alerts", "--follow", "--broker", mosquitto.url, *args, cwd=tmp_path)
        started.append(proc)
        assert proc.stderr is not None
        _read_until(proc.stderr, "following")
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait(5)


def _publish_alert(broker: MosquittoBroker, alert: dict[str, Any]) -> None:
    publish.single(TOPICS.alerts, json.dumps(alert), qos=1, hostname="127.0.0.1", port=broker.port)


ALERT = {"event": "dead", "id": "worker-7", "at": "2026-11-29T01:02:03.456Z", "last_seen": None, "reason": "gone"}


def test_alerts_follow_prints_each_alert_as_it_comes(follow: Follow, mosquitto: MosquittoBroker) -> None:
    following = follow()
    _publish_alert(mosquitto, ALERT)
    assert following.stdout is not None
    assert _read_until(following.stdout, "worker-7") == ["2026-11-29T01:02:03Z  dead       worker-7  gone\n"]


def test_alerts_follow_json_prints_the_raw_objects(follow: Follow, mosquitto: MosquittoBroker) -> None:
    following = follow("--json")
    _publish_alert(mosquitto, ALERT)
    assert following.stdout is not None
    assert [json.loads(line) for line in _read_until(following.stdout, "worker-7")] == [ALERT]


def test_alerts_follow_exits_0_on_ctrl_c(follow: Follow) -> None:
    following = follow()
    following.send_signal(signal.SIGINT)
    assert following.wait(10) == 0


def test_alerts_follow_of_an_unreachable_broker_exits_1_saying_so(tmp_path: Path) -> None:
    result = cli("alerts", "--follow", "--broker", f"mqtt://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot reach the broker mqtt://127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


AT = T0 + 3


@pytest.mark.parametrize(
    ("alert", "line"),
    [
        (
            Notice("silence_ended", None, AT, None, "silence on 'db-*' expired (kernel upgrade)", count=0).to_dict(),
            "2026-11-28T21:41:59Z  silence_ended  silence on 'db-*' expired (kernel upgrade)",
        ),
        (
            Notice("silence_ended", "db-1", AT, None, "silence on 'db-1' lifted").to_dict(),
            "2026-11-28T21:41:59Z  silence_ended  db-1  silence on 'db-1' lifted",
        ),
        (
            Notice("outage", None, AT, None, "more than 20 died within 10 s", ("w-1", "w-2"), 250).to_dict(),
            "2026-11-28T21:41:59Z  outage     250 runtimes  more than 20 died within 10 s: w-1, w-2 and 248 more",
        ),
        (
            Notice("reminder", None, AT, None, "", ("w-1",), 1).to_dict(),
            "2026-11-28T21:41:59Z  reminder   1 runtime  w-1",
        ),
        (
            json.loads(protocol.encode_monitor_down(since=T0, back=AT + 120, runtimes=3)),
            "2026-11-28T21:43:59Z  monitor_down  the orchestrator was not running for about 123 s",
        ),
    ],
)
def test_format_alert_of_a_summary_names_what_it_covers_never_none(alert: dict[str, Any], line: str) -> None:
    assert format_alert(alert) == line


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("runtime_id", ["rt-1", None])
def test_format_alert_prints_no_none_for_any_event(event: str, runtime_id: str | None) -> None:
    alert = Notice(event, runtime_id, AT, None, None, count=0 if runtime_id is None else 1).to_dict()
    assert "None" not in format_alert(alert)


STOCK_AMQTT = """
import asyncio, sys
from amqtt.broker import Broker
async def main():
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{sys.argv[1]}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await broker.shutdown()
asyncio.run(main())
"""


@pytest.fixture(params=["embedded", "stock-amqtt"])
def amqtt_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """The port of an amqtt broker of the test's own: the embedded one, or amqtt as released.

    A site may run amqtt as released as its broker: that one sends a client
    the retained messages of every other client's subscriptions (issue 20).
    """
    port = free_port()
    script = [sys.executable, "-c", STOCK_AMQTT, str(port)]
    command = broker_command("127.0.0.1", port) if request.param == "embedded" else script
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield port
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


NOT_ALERTS = [
    protocol.encode_status(
        "rt-1", state="dead", interval=1.0, grace=1.0, last_seen=None, since=T0, reason="connection lost"
    ),
    json.dumps({"state": "online"}).encode(),
    json.dumps({"event": "dead", "reason": "no id, no time"}).encode(),
    b"not json",
]


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_alerts_follow_prints_only_the_alerts_whatever_else_the_broker_sends(
    tmp_path: Path, amqtt_port: int, as_json: bool
) -> None:
    """Retained statuses, stats and state (amqtt replayed them to every client), and non-alerts on the alert topic."""
    retained = [
        (TOPICS.status("rt-1"), NOT_ALERTS[0]),
        (TOPICS.orchestrator_state, NOT_ALERTS[1]),
        (TOPICS.orchestrator_stats, json.dumps({"runtimes": 1, "alerts": 0}).encode()),
        (f"{TOPICS.alerts}-elsewhere", json.dumps({**ALERT, "id": "elsewhere"}).encode()),  # an alert, not on its topic
    ]
    summary = Notice("outage", None, AT, None, "many died", ("w-1",), 2).to_dict()
    observer = Observer(amqtt_port)  # holds {p}/#, whose retained messages amqtt as released sends everyone
    following: subprocess.Popen[str] | None = None
    try:
        for topic, payload in retained:
            publish.single(topic, payload, qos=1, retain=True, hostname="127.0.0.1", port=amqtt_port)
        observer.wait_for(lambda m: m.topic == retained[-1][0], 10)  # so the broker has stored them all
        following = _popen(
            "alerts",
            "--follow",
            "--broker",
            f"mqtt://127.0.0.1:{amqtt_port}",
            *(("--json",) if as_json else ()),
            cwd=tmp_path,
        )
        assert following.stdout is not None
        assert following.stderr is not None
        _read_until(following.stderr, "following")
        payloads = [*NOT_ALERTS, json.dumps(ALERT).encode(), json.dumps(summary).encode()]
        publish.multiple(
            [(TOPICS.alerts, payload, 1, False) for payload in payloads], hostname="127.0.0.1", port=amqtt_port
        )
        lines = _read_until(following.stdout, "w-1")  # the last alert: every message before it was handled
    finally:
        if following is not None:
            following.kill()
            following.wait(5)
        observer.close()
    if as_json:
        assert [json.loads(line) for line in lines] == [ALERT, summary]
    else:
        assert lines == [
            "2026-11-29T01:02:03Z  dead       worker-7  gone\n",
            "2026-11-28T21:41:59Z  outage     2 runtimes  many died: w-1 and 1 more\n",
        ]


# --- history --------------------------------------------------------------------------------


@pytest.fixture
def history_db(sqlite_url: str) -> str:
    """A database where ``rt-1`` went alive, 10 s later dead, 30 s later alive again (recovered)."""
    store = Store(sqlite_url)
    store.open()
    try:
        store.register([("rt-1", 1.0, 1.0)], T0)
        store.record(
            [
                FlipRow("rt-1", "unknown", "alive", None, "pulse received", T0 + 1, T0 + 1),
                FlipRow("rt-1", "alive", "dead", "dead", "no pulse for 3.2 s", T0 + 11, T0 + 7.8),
                FlipRow("rt-1", "dead", "alive", "recovered", "pulse received", T0 + 41, T0 + 41),
            ],
            {},
        )
    finally:
        store.close()
    return sqlite_url


def test_history_json_gives_each_state_its_duration(tmp_path: Path, history_db: str) -> None:
    entries = json.loads(cli("history", "rt-1", "--db", history_db, "--json", cwd=tmp_path).stdout)
    assert [(e["to"], e["duration"]) for e in entries[:2]] == [("alive", 10.0), ("dead", 30.0)]


def test_history_s_current_state_lasts_until_now(tmp_path: Path, history_db: str) -> None:
    entries = json.loads(cli("history", "rt-1", "--db", history_db, "--json", cwd=tmp_path).stdout)
    assert entries[-1]["current"] is True
    assert entries[-1]["duration"] >= time.time() - (T0 + 41) - 60


def test_history_table_shows_reasons_and_durations_oldest_first(tmp_path: Path, history_db: str) -> None:
    result = cli("history", "rt-1", "--db", history_db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [re.split(r"\s{2,}", line) for line in result.stdout.splitlines()[1:]]
    assert [(r[2], r[3], r[-1]) for r in rows[:2]] == [
        ("alive", "10.0 s", "pulse received"),
        ("dead", "30.0 s", "no pulse for 3.2 s"),
    ]
    assert rows[2][3].endswith("(now)")


def test_history_limit_keeps_the_newest_transitions(tmp_path: Path, history_db: str) -> None:
    entries = json.loads(cli("history", "rt-1", "--db", history_db, "--json", "--limit", "1", cwd=tmp_path).stdout)
    assert [(e["from"], e["to"]) for e in entries] == [("dead", "alive")]


def test_history_of_an_unknown_runtime_exits_1_saying_so(tmp_path: Path, history_db: str) -> None:
    result = cli("history", "nobody", "--db", history_db, cwd=tmp_path)
    assert result.returncode == 1
    assert "no transitions recorded for nobody" in result.stderr


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(3.24, "3.2 s"), (59.9, "59.9 s"), (300.0, "5 min"), (5400.0, "1.5 h"), (172800.0, "2.0 d")],
)
def test_duration_picks_the_unit_by_size(seconds: float, expected: str) -> None:
    assert duration(seconds) == expected


# --- maintenance commands ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("15min", 900), ("2h", 7200), ("1d", 86400), ("90", 90), ("1.5h", 5400), ("2 H", 7200)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1w", "-5m", "0.5s", "367d", "1h30m", "nan"])
def test_parse_duration_rejects_what_it_cannot_read_or_the_protocol_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="--for"):
        parse_duration(text)


def test_format_reply_for_people() -> None:
    silence = {
        "ok": True,
        "command": "silence",
        "target": "db-*",
        "until": "2026-11-28T22:41:56.123Z",
        "reason": "patching",
        "matches": 3,
    }
    now = T0 + 3600 - 180
    assert format_reply(silence, now=now) == (
        "silenced db-* until 2026-11-28T22:41:56.123Z (3 min left), matching 3 registered runtimes: patching"
    )
    listed = {"ok": True, "command": "silences", "silences": [dict(silence, matches=1, reason=None)]}
    assert format_reply(listed, now=now) == (
        "db-* until 2026-11-28T22:41:56.123Z (3 min left), matching 1 registered runtime"
    )
    assert format_reply({"ok": True, "command": "silences", "silences": []}, now=now) == "no silences"
    assert format_reply({"ok": True, "command": "unsilence", "target": "db-*"}, now=now).startswith("lifted")
    assert format_reply({"ok": True, "command": "deregister", "id": "rt-1"}, now=now).startswith("deregistered rt-1")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["silence", "rt-1", "--for", "soon"], "--for"),
        (["silence", "rt 1", "--for", "1h"], "invalid target"),
        (["deregister", "db-*"], "invalid runtime id"),
        (["silences", "--timeout", "0"], "--timeout"),
    ],
)
def test_maintenance_commands_check_their_arguments_before_sending(tmp_path: Path, args: list[str], says: str) -> None:
    done = cli(*args, "--broker", "mqtt://127.0.0.1:1", cwd=tmp_path)
    assert done.returncode == 2
    assert says in done.stderr


def test_maintenance_command_without_a_broker_says_so(tmp_path: Path) -> None:
    done = cli("silences", "--broker", f"mqtt://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert done.returncode == 1
    assert "cannot reach the broker" in done.stderr


def test_maintenance_command_without_an_orchestrator_says_so(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    started = time.monotonic()
    done = cli("unsilence", "db-*", "--broker", mosquitto.url, "--timeout", "1", cwd=tmp_path)
    assert done.returncode == 1
    assert "no orchestrator answered within 1 s" in done.stderr
    assert "is it running, on this broker and prefix?" in done.stderr
    assert time.monotonic() - started < 15


def test_maintenance_command_takes_broker_and_prefix_from_the_config(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """A stand-in orchestrator on prefix acme/hb answers; the CLI finds it through --config alone."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from runtime_agent import protocol

    topics = protocol.Topics("acme/hb")
    got: list[protocol.Command] = []

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        command = protocol.decode_command(message.payload)
        got.append(command)
        assert command.request_id is not None
        reply = protocol.encode_command_reply(True, "deregister", command.request_id, id=command.id, deregistered=True)
        client.publish(topics.command_reply(command.request_id), reply, qos=1)

    subscribed = threading.Event()
    fake = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fake-orchestrator")
    fake.on_message = on_message
    fake.on_subscribe = lambda *args: subscribed.set()
    fake.connect("127.0.0.1", mosquitto.port)
    fake.loop_start()
    try:
        fake.subscribe(topics.command, qos=1)
        assert subscribed.wait(10)
        config = tmp_path / "orchestrator.yaml"
        config.write_text(f"broker: {mosquitto.url}\nprefix: acme/hb\n")
        done = cli("deregister", "rt-9", "--config", str(config), cwd=tmp_path)
    finally:
        fake.disconnect()
        fake.loop_stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("deregistered rt-9")
    assert [(c.command, c.id) for c in got] == [("deregister", "rt-9")]

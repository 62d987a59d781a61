"""The client commands find the running orchestrator: flags, HEARTBEAT_* variables, --config, then its note."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, from_environment, load_config
from orchestrator.discovery import NOTE, discovered, left_note, read_note

from .harness import ROOT, Deployment
from .test_cli import cli


def write_note(directory: Path, **fields: object) -> Path:
    path = directory / NOTE
    path.write_text(json.dumps({"pid": os.getpid(), **fields}))
    return path


# --- load_config: what fills what ---------------------------------------------------


def test_found_options_fill_only_what_nothing_else_set(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("prefix: from/file\n")
    found = {"broker": "mqtt://found:1883", "prefix": "found/prefix", "db": "sqlite:///found.db"}
    config = load_config(config_file, found=found, db="sqlite:///flag.db")
    assert (config.broker, config.prefix, config.db) == ("mqtt://found:1883", "from/file", "sqlite:///flag.db")


def test_a_listen_address_given_drops_the_found_broker() -> None:
    config = load_config(found={"broker": "mqtt://found:1883"}, listen="127.0.0.1:18830")
    assert (config.broker, config.listen) == (None, "127.0.0.1:18830")


def test_a_plain_db_path_is_a_sqlite_file(tmp_path: Path) -> None:
    assert load_config(db=str(tmp_path / "x.db")).db == f"sqlite:///{tmp_path}/x.db"
    assert load_config(db="heartbeat.db").db == "sqlite:///heartbeat.db"


def test_an_empty_db_is_still_an_error() -> None:
    with pytest.raises(ConfigError, match="db: expected a file path"):
        load_config(db="")


def test_the_environment_names_the_file_and_the_where_options() -> None:
    environ = {
        "HEARTBEAT_CONFIG": "/etc/heartbeat.yaml",
        "HEARTBEAT_BROKER": "mqtt://env:1883",
        "HEARTBEAT_PREFIX": "",  # empty: unset
        "HEARTBEAT_BROKER_PASSWORD": "secret",  # the agents' and clients' password, not an option
        "HEARTBEAT_TEST_PG": "postgresql://x",
    }
    assert from_environment(environ) == ("/etc/heartbeat.yaml", {"broker": "mqtt://env:1883"})


# --- the note ----------------------------------------------------------------------


def test_the_note_says_where_the_embedded_broker_listens_and_holds_no_password(tmp_path: Path) -> None:
    config = load_config(listen="0.0.0.0:18831", db=str(tmp_path / "hb.db"), prefix="site/a")
    with left_note(config, tmp_path) as path:
        assert path is not None
        assert discovered(path) == {
            "broker": "mqtt://127.0.0.1:18831",
            "prefix": "site/a",
            "db": f"sqlite:///{tmp_path}/hb.db",
        }
    config = load_config(broker="mqtt://ops:s3cret@broker.example:1883")
    with left_note(config, tmp_path) as path:
        assert path is not None
        assert "s3cret" not in path.read_text()
        assert discovered(path)["broker"] == "mqtt://ops@broker.example:1883"


def test_the_note_is_removed_when_the_orchestrator_stops(tmp_path: Path) -> None:
    with left_note(load_config(), tmp_path) as path:
        assert path is not None
        assert path.exists()
    assert not (tmp_path / NOTE).exists()


def test_a_note_left_by_a_process_that_is_gone_is_ignored(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = write_note(tmp_path, broker="mqtt://127.0.0.1:1")
    path.write_text(json.dumps({"pid": int(gone.stdout), "broker": "mqtt://127.0.0.1:1"}))
    assert read_note(path) is None
    assert discovered(path) == {}


def test_a_note_that_does_not_parse_is_ignored(tmp_path: Path) -> None:
    (tmp_path / NOTE).write_text("{not json")
    assert discovered(tmp_path / NOTE) == {}


def test_a_directory_we_cannot_write_in_leaves_no_note_and_no_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    with left_note(load_config(), missing) as path:
        assert path is None


# --- as a user runs them -------------------------------------------------------------


def test_a_client_command_finds_the_orchestrator_running_in_its_directory(tmp_path: Path) -> None:
    """The embedded broker on a port of its own; ``silences`` without flags, from the same directory."""
    with Deployment.running("embedded", tmp_path, f"sqlite:///{tmp_path}/hb.db") as d:
        assert read_note(tmp_path / NOTE) is not None
        result = cli("silences", "--json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["ok"] is True
        result = cli("alerts", "--limit", "1", cwd=tmp_path)  # the database, found the same way
        assert result.returncode == 0, result.stderr
        d.orchestrators[0].stop()
    assert not (tmp_path / NOTE).exists()


def test_heartbeat_variables_point_a_client_at_the_orchestrator(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with Deployment.running("embedded", tmp_path, f"sqlite:///{tmp_path}/hb.db") as d:
        env = {"HEARTBEAT_LISTEN": f"127.0.0.1:{d.port}"}
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator", "silences", "--json", "--timeout", "5"],
            capture_output=True,
            text=True,
            cwd=elsewhere,
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            timeout=30,
        )
        assert result.returncode == 0, result.stderr


def test_alerts_follow_takes_the_embedded_broker_s_listen_address(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with Deployment.running("embedded", tmp_path, f"sqlite:///{tmp_path}/hb.db") as d:
        follower = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "alerts", "--follow", "--listen", f"127.0.0.1:{d.port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=elsewhere,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert follower.stderr is not None
            line = follower.stderr.readline()
            assert f"on mqtt://127.0.0.1:{d.port}" in line, line
        finally:
            follower.send_signal(signal.SIGINT)
            follower.wait(10)


def test_status_takes_a_plain_db_path(tmp_path: Path) -> None:
    result = cli("status", "--db", str(tmp_path / "plain.db"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "0 runtimes" in result.stdout

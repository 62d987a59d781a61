"""Shared fixtures: real brokers and databases, each the test's own.

Nothing here touches the machine's shared Mosquitto on 1883 beyond reading:
a test that needs a broker gets its own Mosquitto on a free port.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.processes import PG_ADMIN_DEFAULT, scratch_database

from .fakeclock import clock, det  # noqa: F401 - fixtures for the pure modules' tests
from .harness import Deployment, MosquittoBroker, start_mosquitto
from .webhook import Hook

PG_ADMIN_URL = os.environ.get("HEARTBEAT_TEST_PG", PG_ADMIN_DEFAULT)


def pytest_configure(config: pytest.Config) -> None:
    """Let the processes tests start take Ctrl-C, however this run was started.

    A shell starts a background job with SIGINT ignored, and an ignored
    signal stays ignored across exec: every CLI process the tests send
    SIGINT to would then ignore it (seen when CI ran in the background).
    A handler of our own is not inherited, so children start with the
    default, and Python's Ctrl-C.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A fresh Mosquitto on a free loopback port, stopped after the test."""
    broker = start_mosquitto(tmp_path)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the machine's server, dropped afterwards."""
    pytest.importorskip("psycopg2")
    with scratch_database(PG_ADMIN_URL, "hb_test") as url:
        yield url


@pytest.fixture(params=["embedded", "mosquitto"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path, sqlite_url: str) -> Iterator[Deployment]:
    """A running orchestrator on SQLite, with its broker (embedded, or the test's own Mosquitto)."""
    with Deployment.running(request.param, tmp_path, sqlite_url) as d:
        yield d


@pytest.fixture
def mosquitto_deployment(tmp_path: Path, sqlite_url: str) -> Iterator[Deployment]:
    """A running orchestrator on the test's own Mosquitto, for what needs MQTT 5 or a broker that outlives it."""
    with Deployment.running("mosquitto", tmp_path, sqlite_url) as d:
        yield d


@pytest.fixture(params=["embedded", "mosquitto"])
def pg_deployment(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> Iterator[Deployment]:
    """The same, with the database on the machine's PostgreSQL (a fresh database per test)."""
    with Deployment.running(request.param, tmp_path, pg_url) as d:
        yield d


@pytest.fixture
def hook() -> Iterator[Hook]:
    """A webhook receiver on a free loopback port (see tests/webhook.py)."""
    h = Hook()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file in the test's own directory."""
    return f"sqlite:///{tmp_path / 'heartbeat.db'}"


_MEASURED: list[str] = []


@pytest.fixture
def measure(request: pytest.FixtureRequest) -> Callable[[str, float, str], None]:
    """Record a figure a test measured; all of them are printed at the end of the run."""

    def record(name: str, value: float, unit: str) -> None:
        _MEASURED.append(f"{request.node.nodeid}: {name} = {value:.3f} {unit}")

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _MEASURED:
        terminalreporter.section("measured figures")
        for line in _MEASURED:
            terminalreporter.write_line(line)

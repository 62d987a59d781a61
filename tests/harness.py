"""The tests' deployments on the shared process harness (:mod:`bench.processes`), and what is pytest's.

The processes and clients themselves (Mosquitto, ``python -m orchestrator``,
``python -m runtime_agent``, the observer, a bare runtime) are in
``bench/processes.py``, which the benchmarks use too; this module re-exports
them, composes them into a :class:`Deployment`, and adds a PostgreSQL server
of a test's own.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.processes import (
    PREFIX,
    ROOT,
    TOPICS,
    AgentProcess,
    MosquittoBroker,
    Observer,
    OrchestratorProcess,
    Received,
    Runtime,
    drop_connection,
    launch_mosquitto,
    process_env,
    start_mosquitto,
)
from orchestrator.broker import free_port, wait_for_port

__all__ = [
    "PREFIX",
    "ROOT",
    "TOPICS",
    "AgentProcess",
    "Deployment",
    "MosquittoBroker",
    "Observer",
    "OrchestratorProcess",
    "PostgresServer",
    "Received",
    "Runtime",
    "drop_connection",
    "launch_mosquitto",
    "process_env",
    "start_mosquitto",
]


class Deployment:
    """A broker (embedded in the orchestrator, or a Mosquitto of the test's own) plus a database URL."""

    def __init__(self, kind: str, tmp_path: Path, db_url: str) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.db_url = db_url
        self.mosquitto = start_mosquitto(tmp_path) if kind == "mosquitto" else None
        self.port = self.mosquitto.port if self.mosquitto else free_port()
        self.orchestrators: list[OrchestratorProcess] = []
        self.agents: list[AgentProcess] = []
        self.runtimes: list[Runtime] = []
        self._observer: Observer | None = None

    @classmethod
    @contextlib.contextmanager
    def running(cls, kind: str, tmp_path: Path, db_url: str, *extra: str) -> Iterator[Deployment]:
        """A deployment with its orchestrator (given ``extra`` arguments) started and ready; all stopped afterwards."""
        d = cls(kind, tmp_path, db_url)
        try:
            d.start_orchestrator(*extra)
            yield d
        finally:
            d.close()

    @property
    def mqtt5(self) -> bool:
        """Mosquitto speaks MQTT 5; the embedded amqtt broker only 3.1.1."""
        return self.kind == "mosquitto"

    @property
    def broker_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start_orchestrator(
        self, *extra: str, wait: bool = True, env: dict[str, str] | None = None, log_name: str = "orchestrator.log"
    ) -> OrchestratorProcess:
        args = ["--broker", self.broker_url] if self.mosquitto else ["--listen", f"127.0.0.1:{self.port}"]
        args += ["--db", self.db_url, "--log-level", "DEBUG", *extra]
        proc = OrchestratorProcess(args, self.tmp_path / log_name, env=env).start()
        self.orchestrators.append(proc)
        if wait:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: OrchestratorProcess, timeout: float = 20) -> None:
        """Ready means: the orchestrator's retained state says online, fresh from this process."""
        started = time.monotonic()
        wait_for_port(self.port, timeout)
        observer = self.observer
        try:
            observer.wait_for(
                lambda m: m.topic == TOPICS.orchestrator_state and m.json().get("state") == "online",
                timeout,
                after=started,
            )
        except TimeoutError:
            raise AssertionError(f"orchestrator not ready within {timeout} s:\n{proc.log()[-3000:]}") from None

    @property
    def observer(self) -> Observer:
        if self._observer is None:
            self._observer = Observer(self.port, mqtt5=self.mqtt5)
        return self._observer

    def agent(
        self,
        runtime_id: str,
        interval: float,
        *extra: str,
        grace: float | None = None,
        env: dict[str, str] | None = None,
    ) -> AgentProcess:
        agent = AgentProcess(runtime_id, interval, self.port, *extra, grace=grace, env=env)
        self.agents.append(agent)
        return agent

    def runtime(self, runtime_id: str, **kw: Any) -> Runtime:
        return self.runtime_via(self.port, runtime_id, **kw)

    def runtime_via(self, port: int, runtime_id: str, **kw: Any) -> Runtime:
        """A raw runtime connected to ``port`` (a proxy in front of the broker, say)."""
        rt = Runtime(port, runtime_id, **kw)
        self.runtimes.append(rt)
        return rt

    def status_json(self) -> list[dict[str, Any]]:
        out = subprocess.run(
            [sys.executable, "-m", "orchestrator", "status", "--db", self.db_url, "--json"],
            capture_output=True,
            env=process_env(),
            timeout=30,
            check=True,
        )
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        for rt in self.runtimes:
            rt.close()
        if self._observer:
            self._observer.close()
        for proc in self.orchestrators:
            if proc.alive:
                proc.stop()
        if self.mosquitto:
            self.mosquitto.stop()


class PostgresServer:
    """A PostgreSQL 15 of the test's own (initdb + pg_ctl, as the ``postgres`` user), which a test may stop.

    The data directory is a temporary directory outside pytest's (root-only)
    tmp tree, on a free loopback port with trust authentication; never the
    machine's shared server.
    """

    BIN = Path("/usr/lib/postgresql/15/bin")

    def __init__(self) -> None:
        if not (self.BIN / "initdb").exists():
            pytest.skip("PostgreSQL 15 server binaries are not installed")
        self.dir = Path(tempfile.mkdtemp(prefix="hb-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self._run(str(self.BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
            timeout=120,
        )

    def _ctl(self, *args: str) -> None:
        self._run(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-w", *args)

    def start(self) -> None:
        options = f"-k {self.dir} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-l", str(self.dir / "server.log"), "-o", options, "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._ctl("-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

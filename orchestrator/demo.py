"""``heartbeat-orchestrator demo``: the whole system in one command, for a newcomer.

Embedded broker and orchestrator in this process, three real agent processes,
one of them killed with SIGKILL so the broker sends its last will, one stopped
gracefully; the alerts and the status table are printed as they happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time

import aiomqtt

from runtime_agent.protocol import Topics

from .broker import free_port
from .config import Config
from .reports import format_table
from .service import Orchestrator

AGENTS = ("demo-a", "demo-b", "demo-c")


def demo(*, interval: float = 1.0) -> int:
    logging.basicConfig(level=logging.ERROR, format="   (%(name)s: %(message)s)")
    try:
        asyncio.run(_demo(interval))
    except (TimeoutError, RuntimeError, aiomqtt.MqttError) as exc:
        print(f"heartbeat-orchestrator demo: failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _say(text: str) -> None:
    print(text, flush=True)


async def _demo(interval: float) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="heartbeat-demo-") as tmp:
        config = Config(
            listen=f"127.0.0.1:{port}", db=f"sqlite:///{tmp}/demo.db", flush_interval=0.5, log_level="WARNING"
        )
        topics = Topics(config.prefix)
        _say(f"1. Orchestrator with its embedded MQTT broker on 127.0.0.1:{port}, database {tmp}/demo.db")
        orchestrator = Orchestrator(config)
        stop = asyncio.Event()
        runner = asyncio.create_task(orchestrator.run(stop))
        agents: dict[str, asyncio.subprocess.Process] = {}
        try:
            await asyncio.wait_for(_until_ready(runner, orchestrator.ready), 20)
            async with aiomqtt.Client("127.0.0.1", port, identifier="heartbeat-demo-admin") as admin:
                await admin.subscribe(topics.alerts, qos=1)
                _say(f"   an administrator subscribes to {topics.alerts}")
                _say(f"2. Three agents start: {', '.join(AGENTS)} (interval {interval:g} s, grace {interval:g} s)")
                for rid in AGENTS:
                    agents[rid] = await _start_agent(rid, interval, port)
                for rid, proc in agents.items():
                    line = await asyncio.wait_for(_readline(proc), 20)
                    _say(f"   {rid}: {line}")
                await asyncio.sleep(interval * 1.5)
                _say("\n" + _indent(format_table(orchestrator.overview.rows(), now=time.time())) + "\n")

                _say(
                    "3. demo-b is killed with SIGKILL: the broker notices the dropped connection and publishes its will"
                )
                killed_at = time.monotonic()
                agents["demo-b"].send_signal(signal.SIGKILL)
                alert = await asyncio.wait_for(_alert(admin, "demo-b", "dead"), 10 + 4 * interval)
                _say(f"   alert after {time.monotonic() - killed_at:.2f} s: {json.dumps(alert)}")

                _say("4. demo-c stops gracefully (SIGTERM): it says 'stopped', so no dead alert")
                agents["demo-c"].send_signal(signal.SIGTERM)
                alert = await asyncio.wait_for(_alert(admin, "demo-c", "stopped"), 15)
                _say(f"   alert: {json.dumps(alert)}")
                await asyncio.sleep(0.2)
                _say("\n" + _indent(format_table(orchestrator.overview.rows(), now=time.time())) + "\n")
            _say("5. Done. For real: `heartbeat-orchestrator run`; on each host")
            _say("   `heartbeat-agent --id ID --interval S --broker mqtt://HOST:1883`;")
            _say("   and `heartbeat-orchestrator status` for the table.")
        finally:
            for proc in agents.values():
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGTERM)
            for proc in agents.values():
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner, 15)
        if runner.done() and runner.exception() is not None:
            raise RuntimeError(f"orchestrator failed: {runner.exception()}")


async def _until_ready(runner: asyncio.Task[None], ready: asyncio.Event) -> None:
    """Wait for readiness, but fail at once if the orchestrator dies first."""
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if runner in done:
        waiter.cancel()
        raise RuntimeError(f"orchestrator stopped before it was ready: {runner.exception()}")


async def _start_agent(runtime_id: str, interval: float, port: int) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime_agent",
        "--id", runtime_id, "--interval", str(interval), "--broker", f"mqtt://127.0.0.1:{port}",
        "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip


async def _readline(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    if not line:
        raise RuntimeError(f"agent exited with {await proc.wait()} before registering")
    return line.decode().strip()


async def _alert(client: aiomqtt.Client, runtime_id: str, event: str) -> dict[str, object]:
    async for message in client.messages:
        alert = json.loads(bytes(message.payload))
        if alert.get("id") == runtime_id and alert.get("event") == event:
            return alert  # type: ignore[no-any-return]
    raise RuntimeError("alert stream ended")


def _indent(text: str) -> str:
    return "\n".join("   " + line for line in text.splitlines())

"""``will_storm``: every agent's connection drops at once; how long until all are dead.

10,000 (quick 1,000) agent-like raw MQTT 3.1.1 connections from one child
process, each with a last will on ``{p}/runtimes/{id}/state``
(``{"state":"offline","session":S}``, QoS 1, retained) and a retained QoS 1
birth ``{"state":"online","session":S}``; the runtimes are pre-seeded in the
database (interval = grace = 3600 s, so only the wills can kill them). Once
the orchestrator counts them all alive, the child is SIGKILLed: the kernel
closes every socket and Mosquitto fires every will. Measured from the kill
until the observer has every ``dead`` alert (and until stats say all dead).
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import socket
import time

from ..context import Context
from ..harness import Result, bench, start_ready
from ..load import encode_connect, encode_publish, runtime_id
from ..processes import TOPICS


def _agents(conn: multiprocessing.connection.Connection, port: int, n: int) -> None:
    socks = []
    rng = random.Random(os.getpid())
    try:
        for i in range(n):
            rid = runtime_id(i)
            session = rng.getrandbits(53)
            topic = TOPICS.state(rid)
            will = json.dumps({"state": "offline", "session": session}).encode()
            birth = json.dumps({"state": "online", "session": session}).encode()
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(
                encode_connect(f"bench-agent-{rid}", keepalive=0, will=(topic, will, 1, True))
                + encode_publish(topic, birth, qos=1, retain=True, packet_id=1)
            )
            socks.append(sock)
        for sock in socks:  # CONNACK (4 bytes) and PUBACK (4 bytes) each
            got = 0
            while got < 8:
                chunk = sock.recv(8 - got)
                if not chunk:
                    raise ConnectionError("broker closed an agent connection")
                got += len(chunk)
    except Exception as exc:
        conn.send(("error", repr(exc)))
        return
    conn.send(("ready", len(socks)))
    time.sleep(3600)  # until SIGKILLed


def run(ctx: Context) -> Result:
    result = Result("will_storm")
    n = 1_000 if ctx.quick else 10_000
    with bench("will_storm") as b:
        observer = b.observer(alerts=True)
        start_ready(b, b.seed(n, interval=3600, grace=3600), observer)
        mp = multiprocessing.get_context("spawn")
        parent, child = mp.Pipe()
        agents = mp.Process(target=_agents, args=(child, b.port, n), daemon=True)
        opened = time.monotonic()
        agents.start()
        b.on_close(lambda: agents.kill() if agents.is_alive() else None)
        if not parent.poll(120):
            raise TimeoutError("agents did not connect within 120 s")
        kind, value = parent.recv()
        if kind != "ready":
            raise RuntimeError(f"agents failed: {value}")
        connected_s = time.monotonic() - opened
        if not observer.wait(lambda o: o.stats.get("states", {}).get("alive", 0) >= n, 60):
            raise RuntimeError(f"not all agents alive: {observer.stats.get('states')}")
        assert agents.pid is not None
        killed = time.monotonic()
        os.kill(agents.pid, signal.SIGKILL)
        agents.join(10)
        alerts_ok = observer.wait(lambda o: len(o.dead_ids) >= n, 60)
        alerts_at = max(a.at for a in observer.dead_alerts()) if alerts_ok else float("inf")
        stats_ok = observer.wait(lambda o: o.stats.get("states", {}).get("dead", 0) >= n, 10)
        stats_at = observer.stats_at if stats_ok else float("inf")
    after = alerts_at - killed
    result.add("all_dead_after_s", round(after, 3), "≤ 2 s", after <= 2.0, "s")
    result.extra.update(
        connections=n,
        stats_all_dead_after_s=round(stats_at - killed, 3),
        connect_s=round(connected_s, 2),
    )
    result.notes.append(
        f"{n:,} connections opened in {connected_s:.1f} s; SIGKILL -> last dead alert {after:.3f} s, "
        f"stats all dead {stats_at - killed:.3f} s (stats every 0.5 s)"
    )
    return result

"""The web server: against a fake source in-process (fast, exact), then against a real orchestrator."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.broker import free_port
from orchestrator.config import Config
from orchestrator.detector import State, Transition
from orchestrator.metrics import LatencyHistogram
from orchestrator.service import Orchestrator
from orchestrator.web import WebServer, WebStartError
from runtime_agent import protocol

from .harness import TOPICS, Deployment, Observer

# --- a fake orchestrator ---------------------------------------------------------------


def _status(runtime_id: str, state: str) -> dict[str, Any]:
    return {
        "id": runtime_id,
        "state": state,
        "interval": 5.0,
        "grace": 5.0,
        "last_seen": None,
        "since": "2026-11-28T21:41:56.123Z",
        "reason": "test",
    }


class FakeSource:
    """A DashboardSource whose state a test sets directly; ``set`` calls the listeners as ``_emit`` does."""

    def __init__(self, states: Mapping[str, str] | None = None) -> None:
        self.statuses = {rid: _status(rid, state) for rid, state in (states or {}).items()}
        self.listeners: list[Callable[[Transition], None]] = []
        self.verdict_latency = LatencyHistogram()
        self.ready = True
        self.pulses = 0
        self.rejected: dict[str, int] = {}
        self.notifications: dict[tuple[str, str], int] = {}
        self.backlog = 0

    def set(self, runtime_id: str, state: str) -> None:
        old = self.statuses.get(runtime_id, {"state": "unknown"})["state"]
        self.statuses[runtime_id] = _status(runtime_id, state)
        for listener in self.listeners:
            listener(Transition(runtime_id, State(old), State(state), 0.0, None, "test", None))

    def remove(self, runtime_id: str) -> None:
        old = self.statuses.pop(runtime_id)["state"]
        for listener in self.listeners:
            listener(Transition(runtime_id, State(old), State.UNKNOWN, 0.0, None, "test", None))

    def runtimes(self) -> list[dict[str, Any]]:
        return [self.statuses[rid] for rid in sorted(self.statuses)]

    def runtime(self, runtime_id: str) -> dict[str, Any] | None:
        return self.statuses.get(runtime_id)

    def counters(self) -> dict[str, Any]:
        states = Counter(s["state"] for s in self.statuses.values())
        return {
            "runtimes": len(self.statuses),
            "states": {state.value: states[state.value] for state in State},
            "pulses": self.pulses,
            "rejected": self.rejected,
            "db_transactions": 7,
        }

    def is_ready(self) -> bool:
        return self.ready

    def notification_stats(self) -> Mapping[tuple[str, str], int]:
        return self.notifications

    def outbox_backlog(self) -> int:
        return self.backlog


@pytest.fixture
def source() -> FakeSource:
    """A fake orchestrator with three runtimes: one alive, one dead, one unknown."""
    return FakeSource({"rt-a": "alive", "rt-b": "dead", "rt-c": "unknown"})


@asynccontextmanager
async def serving(source: FakeSource, **kw: Any) -> AsyncIterator[tuple[WebServer, aiohttp.ClientSession]]:
    async with WebServer(source, "127.0.0.1", 0, **kw) as server, aiohttp.ClientSession(server.url) as session:
        yield server, session


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


async def next_event(response: aiohttp.ClientResponse) -> tuple[str, Any]:
    """The next Server-Sent Event's name and decoded data."""
    name, data = "message", ""
    while True:
        line = (await response.content.readline()).decode()
        if line == "":
            raise EOFError("the event stream ended")
        line = line.rstrip("\n")
        if not line:
            if data:
                return name, json.loads(data)
            continue
        field, _, value = line.partition(": ")
        if field == "event":
            name = value
        elif field == "data":
            data += value


async def next_named(response: aiohttp.ClientResponse, wanted: str) -> Any:
    while True:
        name, data = await next_event(response)
        if name == wanted:
            return data


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics body by (name, sorted labels); the parser rejects malformed text."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --- JSON and the probe -------------------------------------------------------------------


def test_api_runtimes_lists_the_source_objects(source: FakeSource) -> None:
    async def scenario() -> Any:
        async with serving(source) as (_, http), http.get("/api/runtimes") as response:
            return await response.json()

    assert run(scenario()) == source.runtimes()


def test_lookup_returns_only_the_known_runtimes_asked_for(source: FakeSource) -> None:
    async def scenario() -> Any:
        ids = {"ids": ["rt-c", "nobody", "rt-a"]}
        async with serving(source) as (_, http), http.post("/api/runtimes/lookup", json=ids) as response:
            return await response.json()

    assert run(scenario()) == [source.statuses["rt-c"], source.statuses["rt-a"]]


def test_lookup_without_a_list_of_ids_is_400(source: FakeSource) -> None:
    async def scenario() -> int:
        async with serving(source) as (_, http), http.post("/api/runtimes/lookup", json={"ids": "rt-a"}) as response:
            return response.status

    assert run(scenario()) == 400


def test_healthz_is_200_while_the_source_is_ready(source: FakeSource) -> None:
    async def scenario() -> int:
        async with serving(source) as (_, http), http.get("/healthz") as response:
            return response.status

    assert run(scenario()) == 200


def test_healthz_is_503_while_the_source_is_not_ready(source: FakeSource) -> None:
    source.ready = False

    async def scenario() -> int:
        async with serving(source) as (_, http), http.get("/healthz") as response:
            return response.status

    assert run(scenario()) == 503


def test_index_serves_the_dashboard_page(source: FakeSource) -> None:
    async def scenario() -> tuple[str, str]:
        async with serving(source) as (_, http), http.get("/") as response:
            return response.content_type, await response.text()

    content_type, body = run(scenario())
    assert content_type == "text/html"
    assert '<script src="/static/dashboard.js"' in body


@pytest.mark.parametrize("name", ["dashboard.js", "dashboard.css"])
def test_the_page_s_assets_are_served(source: FakeSource, name: str) -> None:
    async def scenario() -> int:
        async with serving(source) as (_, http), http.get(f"/static/{name}") as response:
            return response.status

    assert run(scenario()) == 200


@pytest.mark.parametrize("path", ["/favicon.ico", "/favicon.svg"])
def test_the_icon_is_served_as_svg(source: FakeSource, path: str) -> None:
    """Browsers ask for ``/favicon.ico`` unbidden (on the JSON pages too): an icon, not a 404 in their console."""

    async def scenario() -> tuple[int, str, bytes]:
        async with serving(source) as (_, http), http.get(path) as response:
            return response.status, response.content_type, await response.read()

    status, content_type, body = run(scenario())
    assert (status, content_type) == (200, "image/svg+xml")
    assert ElementTree.fromstring(body).tag == "{http://www.w3.org/2000/svg}svg"


def test_the_page_links_an_icon_that_is_served(source: FakeSource) -> None:
    async def scenario() -> tuple[str | None, int]:
        async with serving(source) as (_, http):
            async with http.get("/") as response:
                page = await response.text()
            link = re.search(r'<link rel="icon" href="([^"]+)"', page)
            if link is None:
                return None, 0
            async with http.get(link[1]) as response:
                return link[1], response.status

    href, status = run(scenario())
    assert href is not None, "no <link rel=icon> in the page"
    assert status == 200, href


# --- the event stream ---------------------------------------------------------------------


def test_events_start_with_a_snapshot_of_every_runtime(source: FakeSource) -> None:
    async def scenario() -> tuple[str, Any]:
        async with serving(source) as (_, http), http.get("/events") as response:
            return await next_event(response)

    name, data = run(scenario())
    assert name == "snapshot"
    assert data["runtimes"] == source.runtimes()


def test_snapshot_carries_the_counts(source: FakeSource) -> None:
    async def scenario() -> Any:
        async with serving(source) as (_, http), http.get("/events") as response:
            return await next_named(response, "snapshot")

    data = run(scenario())
    assert (data["total"], data["states"], data["ready"]) == (
        3,
        {"unknown": 1, "alive": 1, "dead": 1, "stopped": 0},
        True,
    )


def test_events_send_an_update_after_a_transition(source: FakeSource) -> None:
    async def scenario() -> Any:
        async with serving(source) as (_, http), http.get("/events") as response:
            await next_named(response, "snapshot")
            source.set("rt-a", "dead")
            return await next_named(response, "update")

    assert run(scenario())["runtimes"] == [source.statuses["rt-a"]]


def test_update_coalesces_transitions_of_one_runtime_into_its_latest_state(source: FakeSource) -> None:
    async def scenario() -> Any:
        async with serving(source) as (_, http), http.get("/events") as response:
            await next_named(response, "snapshot")
            source.set("rt-c", "alive")
            source.set("rt-c", "dead")
            source.set("rt-c", "alive")
            return await next_named(response, "update")

    assert run(scenario())["runtimes"] == [_status("rt-c", "alive")]


def test_update_names_a_deregistered_runtime_as_removed(source: FakeSource) -> None:
    async def scenario() -> Any:
        async with serving(source) as (_, http), http.get("/events") as response:
            await next_named(response, "snapshot")
            source.remove("rt-b")
            return await next_named(response, "update")

    assert run(scenario())["removed"] == ["rt-b"]


def test_counts_follow_an_update(source: FakeSource) -> None:
    async def scenario() -> Any:
        async with serving(source) as (_, http), http.get("/events") as response:
            await next_named(response, "snapshot")
            source.set("rt-c", "alive")
            await next_named(response, "update")
            return await next_named(response, "counts")

    assert run(scenario())["states"] == {"unknown": 0, "alive": 2, "dead": 1, "stopped": 0}


def test_updates_are_sent_at_most_once_per_batch_interval(source: FakeSource) -> None:
    async def scenario() -> list[float]:
        async with serving(source, batch_interval=0.25) as (_, http), http.get("/events") as response:
            await next_named(response, "snapshot")

            async def flap() -> None:
                for i in range(100):
                    source.set("rt-a", "dead" if i % 2 else "alive")
                    await asyncio.sleep(0.01)

            flapping = asyncio.create_task(flap())
            times: list[float] = []
            while not flapping.done():
                await next_named(response, "update")
                times.append(time.monotonic())
            return times

    times = run(scenario())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 2
    assert min(gaps) >= 0.2, gaps


def test_stopping_the_server_removes_its_listener(source: FakeSource) -> None:
    async def scenario() -> None:
        async with serving(source):
            assert len(source.listeners) == 1

    run(scenario())
    assert source.listeners == []


def test_stopping_the_server_ends_open_event_streams(source: FakeSource) -> None:
    async def scenario() -> float:
        server = WebServer(source, "127.0.0.1", 0)
        async with server, aiohttp.ClientSession(server.url) as http:
            response = await http.get("/events")
            await next_named(response, "snapshot")
            started = time.monotonic()
            await server.__aexit__(None, None, None)
            with pytest.raises((EOFError, aiohttp.ClientPayloadError)):
                await next_named(response, "never")
            return time.monotonic() - started

    assert run(scenario()) < 2


# --- metrics ------------------------------------------------------------------------------


def _scrape(source: FakeSource) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async def scenario() -> str:
        async with serving(source) as (_, http), http.get("/metrics") as response:
            assert response.content_type == "text/plain"
            return await response.text()

    return metric_samples(run(scenario()))


def test_metrics_count_runtimes_by_state(source: FakeSource) -> None:
    samples = _scrape(source)
    assert {
        state: samples[("heartbeat_runtimes", (("state", state),))] for state in ("alive", "dead", "stopped", "unknown")
    } == {"alive": 1, "dead": 1, "stopped": 0, "unknown": 1}


def test_metrics_read_the_pulse_and_rejection_counters(source: FakeSource) -> None:
    source.pulses = 42
    source.rejected = {"unregistered": 3, "too_large": 1}
    samples = _scrape(source)
    assert samples[("heartbeat_pulses_received_total", ())] == 42
    assert samples[("heartbeat_pulses_rejected_total", (("reason", "unregistered"),))] == 3
    assert samples[("heartbeat_pulses_rejected_total", (("reason", "too_large"),))] == 1


def test_metrics_histogram_has_the_observed_latencies(source: FakeSource) -> None:
    for seconds in (0.003, 0.02, 0.02, 3.0):
        source.verdict_latency.observe(seconds)
    samples = _scrape(source)
    assert samples[("heartbeat_verdict_latency_seconds_bucket", (("le", "0.025"),))] == 3
    assert samples[("heartbeat_verdict_latency_seconds_bucket", (("le", "+Inf"),))] == 4
    assert samples[("heartbeat_verdict_latency_seconds_count", ())] == 4
    assert samples[("heartbeat_verdict_latency_seconds_sum", ())] == pytest.approx(3.043)


def test_metrics_count_notifications_by_channel_and_outcome(source: FakeSource) -> None:
    source.notifications = {("email", "sent"): 4, ("webhook", "failed"): 2}
    samples = _scrape(source)
    assert samples[("heartbeat_notifications_total", (("channel", "email"), ("outcome", "sent")))] == 4
    assert samples[("heartbeat_notifications_total", (("channel", "webhook"), ("outcome", "failed")))] == 2


def test_metrics_show_the_backlog_and_database_transactions(source: FakeSource) -> None:
    source.backlog = 12
    samples = _scrape(source)
    assert (samples[("heartbeat_outbox_backlog", ())], samples[("heartbeat_db_transactions_total", ())]) == (12, 7)


@pytest.mark.parametrize(("ready", "up"), [(True, 1), (False, 0)])
def test_metrics_up_says_whether_the_source_is_ready(source: FakeSource, ready: bool, up: int) -> None:
    source.ready = ready
    assert _scrape(source)[("heartbeat_up", ())] == up


def test_two_servers_keep_separate_metrics() -> None:
    """Each server has its own registry: nothing is registered globally, so a second one never collides."""
    first, second = FakeSource({"rt-a": "alive"}), FakeSource({"rt-a": "dead", "rt-b": "dead"})
    assert _scrape(first)[("heartbeat_runtimes", (("state", "dead"),))] == 0
    assert _scrape(second)[("heartbeat_runtimes", (("state", "dead"),))] == 2


def test_latency_histogram_buckets_are_cumulative() -> None:
    histogram = LatencyHistogram(buckets=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 5.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]


# --- start-up errors ------------------------------------------------------------------------


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port with a listening socket on it, closed after the test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_port_in_use_is_a_web_start_error_saying_so(source: FakeSource, held_port: int) -> None:
    async def scenario() -> None:
        async with WebServer(source, "127.0.0.1", held_port):
            pass

    with pytest.raises(WebStartError, match=rf"127\.0\.0\.1:{held_port}: the address is already in use"):
        run(scenario())


# --- the Orchestrator as a DashboardSource (not running) ------------------------------------------


@pytest.fixture
def orchestrator(sqlite_url: str) -> Orchestrator:
    """An Orchestrator, not running, with ``rt-1`` registered straight into its detector."""
    orchestrator = Orchestrator(Config(db=sqlite_url, broker="mqtt://127.0.0.1:1"))
    orchestrator.detector.register("rt-1", 5.0, 5.0, time.monotonic())
    return orchestrator


def _stop(orchestrator: Orchestrator, runtime_id: str) -> None:
    """Deliver a ``stopped`` state message, as the runtime would publish it (a transition)."""

    async def deliver() -> None:
        topic = protocol.Topics().state(runtime_id)
        orchestrator.intake.receive(topic, protocol.encode_state("stopped"), False)

    asyncio.run(deliver())


def test_orchestrator_calls_its_listeners_with_each_transition(orchestrator: Orchestrator) -> None:
    seen: list[Transition] = []
    orchestrator.overview.listeners.append(seen.append)
    _stop(orchestrator, "rt-1")
    assert [(t.runtime_id, t.new) for t in seen] == [("rt-1", State.STOPPED)]


def test_a_failing_listener_neither_stops_judging_nor_the_other_listeners(orchestrator: Orchestrator) -> None:
    def broken(transition: Transition) -> None:
        raise RuntimeError("boom")

    seen: list[Transition] = []
    orchestrator.overview.listeners += [broken, seen.append]
    _stop(orchestrator, "rt-1")
    assert (orchestrator.detector.view("rt-1").state, len(seen)) == (State.STOPPED, 1)


def test_orchestrator_runtime_is_its_status_object(orchestrator: Orchestrator) -> None:
    status = orchestrator.overview.runtime("rt-1")
    assert status is not None
    assert status == orchestrator.overview.runtimes()[0]


def test_orchestrator_runtime_is_its_retained_status_document(orchestrator: Orchestrator) -> None:
    """docs/dashboard.md: the API's object has the status topic's fields, meaning the same; built at once, equal."""
    _, payload, retained = orchestrator.statuses.status("rt-1")
    assert retained
    assert orchestrator.overview.runtime("rt-1") == json.loads(payload)


def test_orchestrator_runtime_of_an_unknown_id_is_none(orchestrator: Orchestrator) -> None:
    assert orchestrator.overview.runtime("nobody") is None


# --- a real orchestrator ---------------------------------------------------------------------


@pytest.fixture
def web_deployment(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[Deployment, str]]:
    """A running orchestrator (own Mosquitto) serving HTTP, flushing last-seen times every 0.1 s; and its URL."""
    port = free_port()
    config = tmp_path / "orchestrator.yaml"
    config.write_text("flush_interval: 0.1\n")
    with Deployment.running(
        "mosquitto", tmp_path, sqlite_url, "--http", f"127.0.0.1:{port}", "--config", str(config)
    ) as d:
        yield d, f"http://127.0.0.1:{port}"


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def eventually(check: Callable[[], Any], timeout: float = 10) -> Any:
    """Poll ``check`` until it returns something truthy; its last value otherwise (for the assertion message)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.mark.e2e
def test_api_runtimes_equals_status_json(web_deployment: tuple[Deployment, str]) -> None:
    d, url = web_deployment
    rt = d.runtime("rt-web-1", mqtt5=True)
    rt.register(60)
    rt.pulse()
    eventually(lambda: [s["state"] for s in json.loads(get(f"{url}/api/runtimes")[1])] == ["alive"])

    def same() -> tuple[Any, Any] | None:
        """None when they agree; a live runtime's last-seen in the database may be older (``last_seen_every``)."""
        api, cli = json.loads(get(f"{url}/api/runtimes")[1]), d.status_json()
        seen = [(a.pop("last_seen"), c.pop("last_seen")) for a, c in zip(api, cli, strict=False)]
        agree = api == cli and all(c is None or (a is not None and c <= a) for a, c in seen)
        return None if agree else (api, cli, seen)

    assert eventually(lambda: same() is None), same()


@pytest.mark.e2e
def test_api_last_seen_is_live_where_the_retained_status_keeps_its_last_change(
    web_deployment: tuple[Deployment, str],
) -> None:
    """docs/dashboard.md: the same fields as ``{p}/status/{id}``, but pulses move only the API's ``last_seen``.

    A live registration makes the runtime alive: that one change of state is
    the only status published. The pulses after it change no state, so the
    topic keeps that ``last_seen`` while the API follows each pulse.
    """
    d, url = web_deployment
    started = time.monotonic()
    rt = d.runtime("rt-web-4", mqtt5=True)
    rt.register(60)
    published = d.observer.wait_status("rt-web-4", "alive", 15, after=started).json()

    def live() -> dict[str, Any]:
        return next(s for s in json.loads(get(f"{url}/api/runtimes")[1]) if s["id"] == "rt-web-4")

    seen = [published["last_seen"]]
    for _ in range(2):
        rt.pulse()
        # ISO 8601 UTC strings of one length compare as the times do.
        assert eventually(lambda: (now := live()["last_seen"]) is not None and (seen[-1] is None or now > seen[-1]))
        seen.append(live()["last_seen"])
    api = live()
    fresh = Observer(d.port, mqtt5=True)  # a new subscriber gets the retained copy as it stands
    try:
        retained = fresh.wait_for(lambda m: m.topic == TOPICS.status("rt-web-4"), 10).json()
    finally:
        fresh.close()
    assert retained == published
    assert api.keys() == retained.keys()
    assert {**api, "last_seen": None} == {**retained, "last_seen": None}
    assert api["last_seen"] == seen[-1] != retained["last_seen"]


@pytest.mark.e2e
def test_metrics_count_pulses_and_rejections_of_a_real_orchestrator(web_deployment: tuple[Deployment, str]) -> None:
    d, url = web_deployment
    rt = d.runtime("rt-web-2", mqtt5=True)
    rt.register(60)
    eventually(lambda: json.loads(get(f"{url}/api/runtimes")[1]))
    ghost = d.runtime("rt-ghost", mqtt5=True)
    for _ in range(5):
        rt.pulse()
    for _ in range(3):
        ghost.pulse()

    def counted() -> tuple[float, float]:
        samples = metric_samples(get(f"{url}/metrics")[1].decode())
        return (
            samples[("heartbeat_pulses_received_total", ())],
            samples.get(("heartbeat_pulses_rejected_total", (("reason", "unregistered"),)), 0),
        )

    assert eventually(lambda: counted() == (5, 3)), counted()


@pytest.mark.e2e
def test_events_deliver_an_update_when_a_real_runtime_stops(web_deployment: tuple[Deployment, str]) -> None:
    d, url = web_deployment
    rt = d.runtime("rt-web-3", mqtt5=True)
    rt.register(60)
    eventually(lambda: [s["state"] for s in json.loads(get(f"{url}/api/runtimes")[1])] == ["alive"])

    async def scenario() -> Any:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/events") as response:
            snapshot = await next_named(response, "snapshot")
            assert [s["state"] for s in snapshot["runtimes"]] == ["alive"]
            await asyncio.to_thread(rt.state, "stopped", None)
            return await next_named(response, "update")

    assert [(s["id"], s["state"]) for s in run(scenario())["runtimes"]] == [("rt-web-3", "stopped")]


@pytest.mark.e2e
def test_healthz_of_a_connected_orchestrator_is_200(web_deployment: tuple[Deployment, str]) -> None:
    _, url = web_deployment
    assert eventually(lambda: get(f"{url}/healthz")[0] == 200)

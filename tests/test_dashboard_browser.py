"""The dashboard in a real browser: a real orchestrator and agents, one killed, its row turning dead live.

Drives Debian's chromium (``/usr/bin/chromium``) through the Python playwright
package; no browser is ever downloaded.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.broker import free_port
from orchestrator.web import WebServer

from .harness import AgentProcess, Deployment
from .test_web import FakeSource

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]

if CHROMIUM.exists():
    from playwright.sync_api import Page, sync_playwright


@pytest.fixture
def dashboard_url(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[Deployment, str]]:
    """A running orchestrator on the test's own Mosquitto, serving the dashboard; and the dashboard's URL."""
    port = free_port()
    with Deployment.running("mosquitto", tmp_path, sqlite_url, "--http", f"127.0.0.1:{port}") as d:
        yield d, f"http://127.0.0.1:{port}/"


@pytest.fixture
def page() -> Iterator[Page]:
    """A fresh page in headless chromium."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 600})
        finally:
            browser.close()


def _row(runtime_id: str, state: str) -> str:
    return f'tr[data-id="{runtime_id}"][data-state="{state}"]'


def test_a_killed_agent_s_row_turns_dead_without_a_reload(
    dashboard_url: tuple[Deployment, str], page: Page, tmp_path: Path
) -> None:
    d, url = dashboard_url
    agents: list[AgentProcess] = [d.agent(f"web-{name}", 0.5) for name in ("a", "b", "c")]
    for agent in agents:
        agent.registered()
    page.goto(url)
    for agent in agents:
        page.wait_for_selector(_row(agent.runtime_id, "alive"), timeout=15_000)
    page.evaluate("window.__sameDocument = true")

    agents[1].signal(signal.SIGKILL)

    page.wait_for_selector(_row("web-b", "dead"), timeout=20_000)
    assert page.evaluate("window.__sameDocument === true"), "the page reloaded"
    assert page.text_content("#count-dead") == "1"
    assert [page.get_attribute(_row(f"web-{n}", "alive"), "data-id") for n in "ac"] == ["web-a", "web-c"]
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"dashboard screenshot: {shot}")
    extra = os.environ.get("HEARTBEAT_SCREENSHOT")
    if extra:
        shutil.copyfile(shot, extra)
        print(f"dashboard screenshot: {extra}")


@pytest.fixture
def big_dashboard_url() -> Iterator[str]:
    """The dashboard of a fake orchestrator with 100,000 runtimes (every 50th dead), served from a thread."""
    source = FakeSource({f"rt-{i:06d}": "dead" if i % 50 == 0 else "alive" for i in range(100_000)})
    started = threading.Event()
    url: list[str] = []
    stop: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def serve() -> None:
        async with WebServer(source, "127.0.0.1", 0) as server:
            stop.append((asyncio.get_running_loop(), asyncio.Event()))
            url.append(server.url)
            started.set()
            await stop[0][1].wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30)
    yield url[0] + "/"
    loop, event = stop[0]
    loop.call_soon_threadsafe(event.set)
    thread.join(10)


def test_100000_runtimes_render_one_page_and_filter_quickly(big_dashboard_url: str, page: Page) -> None:
    page.goto(big_dashboard_url)
    page.wait_for_function("document.querySelectorAll('tbody tr').length === 500", timeout=20_000)
    assert page.text_content("#note") == "showing 500 of 100000 matching (narrow the filter to see others)"
    assert page.text_content("#count-dead") == "2000"
    page.fill("#filter", "rt-012345")
    page.wait_for_function("document.querySelectorAll('tbody tr').length === 1", timeout=3_000)
    assert page.get_attribute("tbody tr", "data-id") == "rt-012345"

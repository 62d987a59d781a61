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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


TIMEZONE = "Asia/Kolkata"
"""The page's time zone: fixed (no summer time) and half an hour off, so a wrong offset cannot pass unseen."""


@pytest.fixture
def page() -> Iterator[Page]:
    """A fresh page in headless chromium, in :data:`TIMEZONE`."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 600}, timezone_id=TIMEZONE)
        finally:
            browser.close()


@contextmanager
def serving(source: FakeSource) -> Iterator[str]:
    """The dashboard of a fake orchestrator, served from a thread (playwright's sync API owns this one); its URL."""
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
    try:
        yield url[0] + "/"
    finally:
        loop, event = stop[0]
        loop.call_soon_threadsafe(event.set)
        thread.join(10)


def _status(runtime_id: str, state: str, **fields: Any) -> dict[str, Any]:
    """A status object as the API sends it; ``fields`` override the defaults."""
    return {
        "id": runtime_id,
        "state": state,
        "interval": 5.0,
        "grace": 5.0,
        "last_seen": "2026-11-28T21:41:56.123Z",
        "since": "2026-11-28T21:40:00.000Z",
        "reason": "test",
        **fields,
    }


def _fake(*statuses: dict[str, Any]) -> FakeSource:
    source = FakeSource()
    source.statuses = {s["id"]: s for s in statuses}
    return source


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
    # Every agent pulsed and the page's refresh (every 5 s) showed it: the shot shows times, not "never".
    page.wait_for_function(
        "[...document.querySelectorAll('td.seen')].every((td) => td.textContent !== 'never')", timeout=15_000
    )
    page.evaluate("window.__sameDocument = true")

    agents[1].signal(signal.SIGKILL)

    page.wait_for_selector(_row("web-b", "dead"), timeout=20_000)
    assert page.evaluate("window.__sameDocument === true"), "the page reloaded"
    assert page.text_content("#count-dead") == "1"
    assert [page.get_attribute(_row(f"web-{n}", "alive"), "data-id") for n in "ac"] == ["web-a", "web-c"]
    page.wait_for_function("document.getAnimations().length === 0")  # the shot shows the row, not its flash
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"dashboard screenshot: {shot}")
    extra = os.environ.get("HEARTBEAT_SCREENSHOT")
    if extra:
        shutil.copyfile(shot, extra)
        print(f"dashboard screenshot: {extra}")


@pytest.fixture
def big_dashboard_url() -> Iterator[str]:
    """The dashboard of a fake orchestrator with 100,000 runtimes (every 50th dead)."""
    with serving(FakeSource({f"rt-{i:06d}": "dead" if i % 50 == 0 else "alive" for i in range(100_000)})) as url:
        yield url


def test_100000_runtimes_render_one_page_and_filter_quickly(big_dashboard_url: str, page: Page) -> None:
    page.goto(big_dashboard_url)
    page.wait_for_function("document.querySelectorAll('tbody tr').length === 500", timeout=20_000)
    assert page.text_content("#note") == "showing 500 of 100000 matching (narrow the filter to see others)"
    assert page.text_content("#count-dead") == "2000"
    page.fill("#filter", "rt-012345")
    page.wait_for_function("document.querySelectorAll('tbody tr').length === 1", timeout=3_000)
    assert page.get_attribute("tbody tr", "data-id") == "rt-012345"


# --- what the page shows ---------------------------------------------------------------------


def test_relative_times_show_the_absolute_local_time_on_hover(page: Page) -> None:
    source = _fake(_status("rt-a", "alive"), _status("rt-b", "unknown", last_seen=None))
    with serving(source) as url:
        page.goto(url)
        page.wait_for_selector(_row("rt-b", "unknown"))
        # 21:41:56.123 UTC is 03:11:56.123 the next day in India (UTC+05:30).
        assert page.get_attribute(f"{_row('rt-a', 'alive')} td.seen", "title") == "2026-11-29 03:11:56.123 +05:30"
        assert page.get_attribute(f"{_row('rt-a', 'alive')} td.since", "title") == "2026-11-29 03:10:00.000 +05:30"
        assert page.get_attribute(f"{_row('rt-b', 'unknown')} td.seen", "title") is None  # "never" has no date

        # The page refreshes the last-seen times of the rows it shows every few seconds: the title follows.
        source.statuses["rt-a"] = _status("rt-a", "alive", last_seen="2026-11-28T21:42:01.500Z")
        page.wait_for_function(
            "document.querySelector('tr[data-id=\"rt-a\"] td.seen').title === '2026-11-29 03:12:01.500 +05:30'",
            timeout=15_000,
        )


def test_the_grace_column_follows_the_interval_and_sorts(page: Page) -> None:
    source = _fake(
        _status("rt-a", "alive", interval=2.0, grace=2.5),
        _status("rt-b", "alive", interval=2.0, grace=10.0),
        _status("rt-c", "alive", interval=2.0, grace=1.0),
    )
    with serving(source) as url:
        page.goto(url)
        page.wait_for_selector(_row("rt-c", "alive"))
        headers = [h.strip() for h in page.locator("thead th").all_text_contents()]
        assert headers[headers.index("interval") + 1] == "grace"
        assert page.text_content(f"{_row('rt-a', 'alive')} td.grace") == "2.5 s"
        page.click("th[data-key=grace]")
        page.wait_for_function("document.querySelector('tbody tr').dataset.id === 'rt-c'", timeout=3_000)
        order = [page.get_attribute(f"tbody tr:nth-child({i})", "data-id") for i in (1, 2, 3)]
        assert order == ["rt-c", "rt-a", "rt-b"]


def test_a_dead_row_is_marked_by_more_than_the_colour_of_its_text(page: Page) -> None:
    """A tinted row with a bar at its left, and a badge with a shape of its own beside the word."""
    with serving(_fake(_status("rt-a", "alive"), _status("rt-b", "dead"))) as url:
        page.goto(url)
        page.wait_for_selector(_row("rt-a", "alive"))
        style = """(id) => {
            const row = document.querySelector(`tr[data-id="${id}"]`);
            const first = getComputedStyle(row.cells[0]);
            const icon = row.querySelector("td.state .icon");
            return {
                background: first.backgroundColor,
                bar: first.boxShadow,
                icon: icon && icon.textContent,
                hidden: icon && icon.getAttribute("aria-hidden"),
                word: row.querySelector("td.state").textContent,
            };
        }"""
        dead, alive = page.evaluate(style, "rt-b"), page.evaluate(style, "rt-a")
    assert dead["background"] != alive["background"]
    assert (dead["bar"] != "none", alive["bar"]) == (True, "none")
    assert dead["icon"]
    assert alive["icon"] not in (None, "", dead["icon"])
    assert (dead["word"], alive["word"]) == (dead["icon"] + "dead", alive["icon"] + "alive")
    assert dead["hidden"] == "true"  # a screen reader says the word, not the shape


def test_the_page_loads_its_icon_and_nothing_fails(page: Page) -> None:
    """The browser used to ask for /favicon.ico and log a 404; now it loads the icon the page links."""
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.on("console", lambda m: failed.append(m.text) if m.type == "error" else None)
    with serving(_fake(_status("rt-a", "alive"))) as url:
        # The unlinked /favicon.ico request never shows as the page's; a linked icon's does, so it is the barrier.
        with page.expect_response(lambda r: "/favicon." in r.url, timeout=10_000) as icon:
            page.goto(url)
        page.wait_for_selector(_row("rt-a", "alive"))
    assert (icon.value.status, icon.value.header_value("content-type")) == (200, "image/svg+xml")
    assert failed == []

"""Notification channels against real receivers: an HTTP server on loopback, real apprise, real processes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from orchestrator.broker import free_port
from orchestrator.dispatch import Dispatcher, Route
from orchestrator.notify import (
    EVENTS,
    AppriseNotifier,
    MqttNotifier,
    Notice,
    NotifyError,
    ShellNotifier,
    WebhookNotifier,
    channel_from_url,
)
from orchestrator.storm import RetryPolicy
from runtime_agent import protocol

AT = 1_764_365_711.123
DEAD = Notice("dead", "worker-7", AT, AT - 10.0, "connection lost", key=41)
OUTAGE = Notice("outage", None, AT, None, "more than 20 runtimes died within 10 s", ("a", "b"), 25)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class HttpReceiver:
    """A loopback HTTP server: answers with the queued statuses (then 200) and records every request."""

    url: str
    requests: list[Received] = field(default_factory=list)
    statuses: deque[int] = field(default_factory=deque)
    extra_headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    """An HTTP server on 127.0.0.1 in a thread, independent of the test's event loop."""
    state = HttpReceiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            state.requests.append(Received(self.path, dict(self.headers), json.loads(raw or b"null")))
            if state.delay:
                state.release.wait(state.delay)
            status = state.statuses.popleft() if state.statuses else 200
            self.send_response(status)
            for name, value in state.extra_headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


async def send(channel: WebhookNotifier, notice: Notice) -> None:
    try:
        await channel.notify(notice)
    finally:
        await channel.aclose()


# --- the notice ---------------------------------------------------------------------


def test_per_runtime_document_is_the_mqtt_alert_payload() -> None:
    expected = protocol.encode_alert("dead", "worker-7", at=AT, last_seen=AT - 10.0, reason="connection lost")
    assert DEAD.encode() == expected


def test_group_document_adds_count_and_ids() -> None:
    doc = OUTAGE.to_dict()
    assert doc["id"] is None
    assert doc["count"] == 25
    assert doc["runtime_ids"] == ["a", "b"]
    assert doc["event"] == "outage"


def test_document_never_carries_the_key() -> None:
    assert "41" not in DEAD.encode().decode()
    assert "key" not in DEAD.to_dict()


def test_unknown_event_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown notice event 'deadd'"):
        Notice("deadd", "worker-7", AT)


@pytest.mark.parametrize("event", EVENTS)
def test_every_event_has_a_title_naming_the_runtime(event: str) -> None:
    assert "worker-7" in Notice(event, "worker-7", AT).title()


def test_body_is_one_readable_line_with_reason_and_times() -> None:
    body = DEAD.body()
    assert body == ("worker-7 is dead at 2025-11-28T21:35:11.123Z, last seen 2025-11-28T21:35:01.123Z: connection lost")


def test_group_body_names_the_first_ids_and_how_many_more() -> None:
    assert OUTAGE.title() == "heartbeat: outage: 25 runtimes dead"
    assert OUTAGE.body().endswith("Runtimes: a, b and 23 more")


# --- webhook --------------------------------------------------------------------------


def test_webhook_posts_the_json_document(receiver: HttpReceiver) -> None:
    run(send(WebhookNotifier(receiver.url + "/hook/T0KEN"), DEAD))

    [request] = receiver.requests
    assert request.path == "/hook/T0KEN"
    assert request.body == DEAD.to_dict()
    assert request.headers["Content-Type"] == "application/json"


def test_webhook_sends_configured_headers(receiver: HttpReceiver) -> None:
    run(send(WebhookNotifier(receiver.url, headers={"Authorization": "Bearer abc"}), DEAD))

    assert receiver.requests[0].headers["Authorization"] == "Bearer abc"


def test_webhook_name_hides_the_path_that_may_hold_a_token(receiver: HttpReceiver) -> None:
    channel = WebhookNotifier(receiver.url + "/hook/T0KEN")
    assert "T0KEN" not in channel.name
    assert "127.0.0.1" in channel.name


def test_webhook_url_error_hides_the_path_that_may_hold_a_token() -> None:
    with pytest.raises(ValueError, match=r"got 'ftp://files\.example\.com'$"):
        WebhookNotifier("ftp://files.example.com/hook/T0KEN")


def test_webhook_server_error_is_retryable(receiver: HttpReceiver) -> None:
    receiver.statuses.append(503)
    with pytest.raises(NotifyError, match="HTTP 503") as raised:
        run(send(WebhookNotifier(receiver.url), DEAD))
    assert raised.value.retryable


def test_webhook_bad_request_is_not_retryable(receiver: HttpReceiver) -> None:
    receiver.statuses.append(400)
    with pytest.raises(NotifyError, match="HTTP 400") as raised:
        run(send(WebhookNotifier(receiver.url), DEAD))
    assert not raised.value.retryable


def test_webhook_too_many_requests_is_retryable_after_the_asked_delay(receiver: HttpReceiver) -> None:
    receiver.statuses.append(429)
    receiver.extra_headers["Retry-After"] = "3"
    with pytest.raises(NotifyError) as raised:
        run(send(WebhookNotifier(receiver.url), DEAD))
    assert raised.value.retryable
    assert raised.value.retry_after == 3.0


def test_webhook_timeout_is_retryable_and_bounded(receiver: HttpReceiver) -> None:
    receiver.delay = 10.0
    started = time.monotonic()
    with pytest.raises(NotifyError, match=r"no answer within 0\.3 s") as raised:
        run(send(WebhookNotifier(receiver.url, timeout=0.3), DEAD))
    assert raised.value.retryable
    assert time.monotonic() - started < 2.0


def test_webhook_connection_refused_is_retryable() -> None:
    with pytest.raises(NotifyError) as raised:
        run(send(WebhookNotifier(f"http://127.0.0.1:{free_port()}/"), DEAD))
    assert raised.value.retryable


def test_webhook_server_error_then_success_is_delivered_by_retries(receiver: HttpReceiver) -> None:
    receiver.statuses.extend([500, 502])
    delivered: list[Notice] = []
    channel = WebhookNotifier(receiver.url)

    async def scenario() -> None:
        done = asyncio.Event()

        def on_delivered(notice: Notice) -> None:
            delivered.append(notice)
            done.set()

        retry = RetryPolicy(attempts=3, base=0.01)
        dispatcher = Dispatcher([Route(channel)], retry=retry, on_delivered=on_delivered)
        task = asyncio.create_task(dispatcher.run())
        dispatcher.submit([DEAD])
        await done.wait()
        await dispatcher.aclose()
        await task
        stats.update(dispatcher.stats)

    stats: dict[tuple[str, str], int] = {}
    run(scenario())
    assert len(receiver.requests) == 3
    assert stats[channel.name, "sent"] == 1
    assert stats[channel.name, "retried"] == 2
    assert delivered == [DEAD]


def test_webhook_rejects_a_non_http_url() -> None:
    with pytest.raises(ValueError, match="http"):
        WebhookNotifier("ftp://example.invalid/x")


# --- apprise --------------------------------------------------------------------------


def test_apprise_json_url_delivers_title_and_body(receiver: HttpReceiver) -> None:
    port = receiver.url.rsplit(":", 1)[1]
    channel = AppriseNotifier([f"json://127.0.0.1:{port}/apprise"], timeout=5)

    run(channel.notify(DEAD))

    [request] = receiver.requests
    assert request.path.startswith("/apprise")
    assert request.body["title"] == "heartbeat: worker-7 is dead"
    assert "worker-7" in request.body["message"]
    assert "connection lost" in request.body["message"]
    assert request.body["type"] == "failure"


def test_apprise_delivery_failure_is_retryable(receiver: HttpReceiver) -> None:
    receiver.statuses.append(500)
    port = receiver.url.rsplit(":", 1)[1]
    channel = AppriseNotifier([f"json://127.0.0.1:{port}/"], timeout=5)

    with pytest.raises(NotifyError, match="delivery failed") as raised:
        run(channel.notify(DEAD))
    assert raised.value.retryable


def test_apprise_unknown_scheme_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match=r"URL #2 \(nosuchservice://...\) is not one apprise supports"):
        AppriseNotifier(["json://127.0.0.1:9/", "nosuchservice://secret@host"])


def test_apprise_error_does_not_show_the_url_secret() -> None:
    with pytest.raises(ValueError, match="nosuchservice") as raised:
        AppriseNotifier(["nosuchservice://s3cret@host"])
    assert "s3cret" not in str(raised.value)


# --- shell ----------------------------------------------------------------------------

RECORDER = """
import json, os, sys
out = sys.argv[1]
env = {k: v for k, v in os.environ.items() if k.startswith("HEARTBEAT_")}
with open(out, "w") as f:
    json.dump({"argv": sys.argv[2:], "env": env, "stdin": sys.stdin.read()}, f)
"""


@pytest.fixture
def recorder_script(tmp_path: Path) -> Path:
    """A Python script that writes its arguments, HEARTBEAT_* environment and stdin to the file named by argv[1]."""
    path = tmp_path / "record.py"
    path.write_text(RECORDER)
    return path


def test_shell_gets_the_event_in_environment_and_json_on_stdin(tmp_path: Path, recorder_script: Path) -> None:
    out = tmp_path / "out.json"
    run(ShellNotifier([sys.executable, str(recorder_script), str(out)]).notify(DEAD))

    seen = json.loads(out.read_text())
    assert json.loads(seen["stdin"]) == DEAD.to_dict()
    assert seen["env"]["HEARTBEAT_EVENT"] == "dead"
    assert seen["env"]["HEARTBEAT_RUNTIME_ID"] == "worker-7"
    assert seen["env"]["HEARTBEAT_AT"] == "2025-11-28T21:35:11.123Z"
    assert seen["env"]["HEARTBEAT_REASON"] == "connection lost"
    assert seen["env"]["HEARTBEAT_COUNT"] == "1"
    assert seen["env"]["HEARTBEAT_RUNTIME_IDS"] == "worker-7"


def test_shell_group_notice_lists_ids_and_count(tmp_path: Path, recorder_script: Path) -> None:
    out = tmp_path / "out.json"
    run(ShellNotifier([sys.executable, str(recorder_script), str(out)]).notify(OUTAGE))

    env = json.loads(out.read_text())["env"]
    assert env["HEARTBEAT_RUNTIME_ID"] == ""
    assert env["HEARTBEAT_COUNT"] == "25"
    assert env["HEARTBEAT_RUNTIME_IDS"] == "a b"


def test_shell_string_is_split_without_a_shell(tmp_path: Path, recorder_script: Path) -> None:
    out = tmp_path / "out.json"
    command = f"'{sys.executable}' '{recorder_script}' '{out}' 'two words' '$HOME'"
    run(ShellNotifier(command).notify(DEAD))

    assert json.loads(out.read_text())["argv"] == ["two words", "$HOME"]


def test_shell_non_zero_exit_is_retryable_with_stderr_tail() -> None:
    command = [sys.executable, "-c", "import sys; sys.stderr.write('smtp relay refused\\n'); sys.exit(3)"]
    with pytest.raises(NotifyError, match="exit status 3: smtp relay refused") as raised:
        run(ShellNotifier(command).notify(DEAD))
    assert raised.value.retryable


def test_shell_timeout_kills_the_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    started = time.monotonic()
    with pytest.raises(NotifyError, match=r"killed after 0\.5 s") as raised:
        run(ShellNotifier([sys.executable, "-c", script], timeout=0.5).notify(DEAD))
    assert raised.value.retryable
    assert time.monotonic() - started < 3.0
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_shell_timeout_kills_the_commands_children_too(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    with pytest.raises(NotifyError, match="killed"):
        run(ShellNotifier([sys.executable, "-c", parent], timeout=1.0).notify(DEAD))
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            os.kill(int(pid_file.read_text()), 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    pytest.fail("the command's child outlived the timeout")


def test_shell_unknown_command_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="command not found"):
        ShellNotifier("no-such-command-heartbeat --flag")


# --- MQTT and the URL shortcut ------------------------------------------------------------


def test_mqtt_channel_publishes_the_alert_payload() -> None:
    published: list[bytes] = []

    async def publish(payload: bytes) -> None:
        published.append(payload)

    run(MqttNotifier(publish).notify(DEAD))
    assert published == [protocol.encode_alert("dead", "worker-7", at=AT, last_seen=AT - 10, reason="connection lost")]


def test_mqtt_publish_failure_is_retryable() -> None:
    async def publish(payload: bytes) -> None:
        raise ConnectionError("broker gone")

    with pytest.raises(NotifyError, match="broker gone") as raised:
        run(MqttNotifier(publish).notify(DEAD))
    assert raised.value.retryable


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1:8080/hook", WebhookNotifier),
        ("https://hooks.example.com/x", WebhookNotifier),
        ("json://127.0.0.1:8080/", AppriseNotifier),
        ("ntfy://ntfy.sh/heartbeat", AppriseNotifier),
    ],
)
def test_channel_from_url_picks_webhook_for_http_else_apprise(url: str, kind: type) -> None:
    assert isinstance(channel_from_url(url), kind)


def test_channel_from_url_rejects_what_apprise_does_not_know() -> None:
    with pytest.raises(ValueError, match="not one apprise supports"):
        channel_from_url("gopher://example.invalid/")

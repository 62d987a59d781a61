"""Notification channels: one event document, many ways to send it.

A :class:`Notice` is what every channel receives, so a webhook, a chat
message, a shell hook and the MQTT alert topic all describe an event the same
way. A channel only *sends*; deciding what to send, when, and how often to
retry is :mod:`orchestrator.dispatch`'s job. Every channel failure is one
exception type, :class:`NotifyError`, whose ``retryable`` says whether trying
again may help.

aiohttp and apprise are imported when a channel is built, not with this module,
so the configuration (which needs :data:`EVENTS`) stays cheap to load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit

from runtime_agent.protocol import iso
from runtime_agent.url import redact_url

if TYPE_CHECKING:
    import aiohttp

EVENTS: Final = (
    "dead",
    "recovered",
    "stopped",
    "conflict",
    "reminder",
    "outage",
    "outage_recovered",
    "monitor_down",
    "silence_ended",
)
"""Every event a notice can carry; config and routes are checked against it."""

_HEADLINES: Final = {
    "dead": "{} is dead",
    "recovered": "{} recovered",
    "stopped": "{} stopped",
    "conflict": "{}: conflicting registrations",
    "reminder": "{} is still dead",
    "outage": "outage: {} dead",
    "outage_recovered": "{} recovered",
    "monitor_down": "monitor down ({})",
    "silence_ended": "silence on {} ended",
}
_GROUP_HEADLINES: Final = {
    "outage": "outage: {} dead",
    "outage_recovered": "outage over: {} recovered",
    "reminder": "{} still dead",
    "dead": "{} dead",
    "recovered": "{} recovered",
}


@dataclass(frozen=True, slots=True)
class Notice:
    """One event to tell people about, in wall-clock Unix seconds.

    ``runtime_id`` is None for group events (outage, monitor_down, a group
    reminder, the end of a glob silence); they name ``count`` runtimes, of
    which ``runtime_ids`` holds the first few. ``key`` is the caller's handle
    (the outbox row) and never leaves the process.
    """

    event: str
    runtime_id: str | None
    at: float
    last_seen: float | None = None
    reason: str | None = None
    runtime_ids: tuple[str, ...] = ()
    count: int = 1
    key: object = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise ValueError(f"unknown notice event {self.event!r} (known: {', '.join(EVENTS)})")

    @property
    def is_group(self) -> bool:
        return self.runtime_id is None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: the MQTT alert's fields, plus ``count``/``runtime_ids`` for group events."""
        doc: dict[str, Any] = {
            "event": self.event,
            "id": self.runtime_id,
            "at": iso(self.at),
            "last_seen": iso(self.last_seen),
            "reason": self.reason,
        }
        if self.is_group:
            doc["count"] = self.count
            doc["runtime_ids"] = list(self.runtime_ids)
        return doc

    def encode(self) -> bytes:
        """``to_dict`` as UTF-8 JSON; byte-identical to ``protocol.encode_alert`` for per-runtime events."""
        return json.dumps(self.to_dict()).encode()

    def title(self) -> str:
        """A one-line headline, e.g. ``heartbeat: worker-7 is dead``."""
        if self.runtime_id is not None:
            return "heartbeat: " + _HEADLINES[self.event].format(self.runtime_id)
        if self.event in ("monitor_down", "silence_ended"):
            return f"heartbeat: {self.event.replace('_', ' ')}"
        runtimes = f"{self.count} runtime{'s' if self.count != 1 else ''}"
        return "heartbeat: " + _GROUP_HEADLINES.get(self.event, f"{self.event}: {{}}").format(runtimes)

    def body(self) -> str:
        """A readable line with the time, the last pulse, the reason and the IDs of a group."""
        parts = [f"{self.title().removeprefix('heartbeat: ')} at {iso(self.at)}"]
        if self.last_seen is not None:
            parts.append(f"last seen {iso(self.last_seen)}")
        text = ", ".join(parts)
        if self.reason:
            text += f": {self.reason}"
        if self.is_group and self.runtime_ids:
            more = self.count - len(self.runtime_ids)
            text += f". Runtimes: {', '.join(self.runtime_ids)}" + (f" and {more} more" if more > 0 else "")
        return text


class NotifyError(Exception):
    """A channel could not deliver; ``retryable`` says whether trying again may help.

    ``retry_after`` is the delay a server asked for (HTTP ``Retry-After``), if any.
    """

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class Notifier(Protocol):
    """A channel: sends one notice or raises :class:`NotifyError`. ``name`` appears in logs and stats."""

    name: str

    async def notify(self, notice: Notice) -> None: ...


# --- webhook ----------------------------------------------------------------------


_RETRYABLE_4XX: Final = frozenset({408, 425, 429})


class WebhookNotifier:
    """POSTs the notice's JSON document to a URL.

    5xx, 408, 429, timeouts and connection errors are retryable; other 4xx
    mean the request itself is wrong and are not.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError(f"webhook URL must be http(s)://HOST/..., got {redact_url(url)!r}")
        self.url = url
        self.timeout = timeout
        self.headers = {"User-Agent": "heartbeat-orchestrator", **(headers or {})}
        self.name = name or f"webhook {redact_url(url)}"
        self._session: aiohttp.ClientSession | None = None

    async def notify(self, notice: Notice) -> None:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout), headers=self.headers
            )
        try:
            async with self._session.post(self.url, json=notice.to_dict()) as response:
                if 200 <= response.status < 300:
                    return
                detail = (await response.text(errors="replace"))[:200].strip()
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except TimeoutError:
            raise NotifyError(f"{self.name}: no answer within {self.timeout:g} s", retryable=True) from None
        except aiohttp.ClientError as exc:
            raise NotifyError(f"{self.name}: {type(exc).__name__}: {exc}", retryable=True) from None
        status = response.status
        retryable = status >= 500 or status in _RETRYABLE_4XX
        message = f"{self.name}: HTTP {status} {response.reason or ''}".rstrip() + (f": {detail}" if detail else "")
        raise NotifyError(message, retryable=retryable, retry_after=retry_after)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare for webhooks, the backoff will do


# --- apprise ----------------------------------------------------------------------


_APPRISE_TYPES: Final = {
    "dead": "failure",
    "outage": "failure",
    "monitor_down": "failure",
    "reminder": "warning",
    "conflict": "warning",
    "recovered": "success",
    "outage_recovered": "success",
}


class AppriseNotifier:
    """Sends a title and a readable line through apprise (Slack, Matrix, e-mail, ntfy and 100+ more)."""

    def __init__(self, urls: list[str], *, timeout: float = 10.0, name: str | None = None) -> None:
        import apprise

        if not urls:
            raise ValueError("apprise needs at least one URL")
        self._apprise = apprise.Apprise()
        for number, url in enumerate(urls, 1):
            if not self._apprise.add(url):
                scheme = url.partition("://")[0] if "://" in url else url[:16]
                raise ValueError(
                    f"notification URL #{number} ({scheme}://...) is not one apprise supports or is malformed; "
                    "see https://github.com/caronc/apprise/wiki for the URL of each service"
                )
        self.timeout = timeout
        self.name = name or "apprise " + ",".join(sorted({u.partition("://")[0] for u in urls}))

    async def notify(self, notice: Notice) -> None:
        import apprise

        notify_type = apprise.NotifyType(_APPRISE_TYPES.get(notice.event, "info"))
        try:
            async with asyncio.timeout(self.timeout):  # not wait_for: on 3.11 it can swallow a cancel
                ok = await self._apprise.async_notify(body=notice.body(), title=notice.title(), notify_type=notify_type)
        except TimeoutError:
            raise NotifyError(f"{self.name}: no answer within {self.timeout:g} s", retryable=True) from None
        if not ok:
            raise NotifyError(f"{self.name}: delivery failed (see the apprise log messages)", retryable=True)


# --- shell ------------------------------------------------------------------------


class ShellNotifier:
    """Runs a command per notice: the JSON document on stdin, the main fields in ``HEARTBEAT_*`` variables.

    A string is split like a shell would (``shlex``) but no shell runs, so
    runtime IDs can never be interpreted as shell syntax.
    """

    def __init__(self, command: str | list[str] | tuple[str, ...], *, timeout: float = 10.0, name: str | None = None):
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise ValueError("command is empty")
        if shutil.which(argv[0]) is None:
            raise ValueError(f"command not found or not executable: {argv[0]!r}")
        self.argv = argv
        self.timeout = timeout
        self.name = name or f"command {os.path.basename(argv[0])}"

    def environment(self, notice: Notice) -> dict[str, str]:
        """The process environment plus the notice's fields (empty strings for missing values)."""
        return {
            **os.environ,
            "HEARTBEAT_EVENT": notice.event,
            "HEARTBEAT_RUNTIME_ID": notice.runtime_id or "",
            "HEARTBEAT_AT": iso(notice.at) or "",
            "HEARTBEAT_LAST_SEEN": iso(notice.last_seen) or "",
            "HEARTBEAT_REASON": notice.reason or "",
            "HEARTBEAT_COUNT": str(notice.count),
            "HEARTBEAT_RUNTIME_IDS": " ".join(
                notice.runtime_ids or ((notice.runtime_id,) if notice.runtime_id else ())
            ),
        }

    async def notify(self, notice: Notice) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=self.environment(notice),
                start_new_session=True,  # its own process group, so a timeout kills its children too
            )
        except OSError as exc:
            raise NotifyError(f"{self.name}: cannot start: {exc.strerror}", retryable=False) from None
        try:
            async with asyncio.timeout(self.timeout):
                _, stderr = await process.communicate(notice.encode())
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            raise NotifyError(f"{self.name}: killed after {self.timeout:g} s", retryable=True) from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            raise
        if process.returncode != 0:
            tail = stderr.decode(errors="replace").strip()[-300:]
            raise NotifyError(
                f"{self.name}: exit status {process.returncode}" + (f": {tail}" if tail else ""), retryable=True
            )


# --- MQTT -------------------------------------------------------------------------


class MqttNotifier:
    """The alert topic as a channel: ``publish`` sends the payload (the service binds topic and QoS)."""

    def __init__(self, publish: Callable[[bytes], Awaitable[None]], *, name: str = "mqtt") -> None:
        self._publish = publish
        self.name = name

    async def notify(self, notice: Notice) -> None:
        try:
            await self._publish(notice.encode())
        except Exception as exc:
            raise NotifyError(f"{self.name}: {type(exc).__name__}: {exc}", retryable=True) from exc


def channel_from_url(url: str, *, timeout: float = 10.0, name: str | None = None) -> Notifier:
    """``http(s)://`` is a webhook; any other scheme is handed to apprise (``run --notify URL``)."""
    if urlsplit(url).scheme.lower() in ("http", "https"):
        return WebhookNotifier(url, timeout=timeout, name=name)
    return AppriseNotifier([url], timeout=timeout, name=name)

"""``status``, ``history`` and ``alerts``: read what the orchestrator recorded without disturbing it (the
database, or a running one's ``--http`` and alert topic), and print it for people or as JSON."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from runtime_agent import protocol
from runtime_agent.protocol import Topics, iso

from .admin import NoAnswer, connect, mqtt_client
from .config import Config
from .store import FlipRow, RuntimeRow, Store, database_error
from .terminal import ago, duration, error, paint

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

STATES = protocol.RUNTIME_STATES


class ReadError(Exception):
    """The database or the orchestrator's web server could not be read; the message says which and why."""


class _Database:
    """The database, opened once and read again on each call (so ``--watch`` does not reconnect every frame)."""

    def __init__(self, config: Config) -> None:
        self.url = config.db
        self.store: Store | None = None

    def __enter__(self) -> _Database:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.store is not None:
            self.store.close()

    def read(self, fn: Callable[[Store], Any]) -> Any:
        try:
            if self.store is None:
                self.store = Store(self.url)
                self.store.open()
            return fn(self.store)
        except Exception as exc:
            raise ReadError(database_error("cannot read the database", self.url, exc)) from None


def fetch_statuses(url: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """``GET {url}/api/runtimes`` of a running orchestrator (``run --http``)."""
    base = url if "://" in url else f"http://{url}"
    endpoint = base.rstrip("/") + "/api/runtimes"
    try:
        with urllib.request.urlopen(endpoint, timeout=timeout) as response:
            data = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ReadError(f"cannot read {endpoint}: {reason}") from None
    if not isinstance(data, list):
        raise ReadError(f"{endpoint} did not return a JSON list")
    return data


def _wall(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()


def row_from_status(obj: dict[str, Any]) -> RuntimeRow:
    """A status object back into a row, for the table."""
    since = _wall(obj["since"])
    return RuntimeRow(
        obj["id"],
        obj["interval"],
        obj["grace"],
        obj["state"],
        0.0 if since is None else since,
        _wall(obj["last_seen"]),
        obj["reason"],
    )


def status(
    config: Config, *, as_json: bool, http: str | None = None, watch: float | None = None, color: bool = False
) -> int:
    with _Database(config) as db:

        def read() -> list[dict[str, Any]]:
            if http is not None:
                return fetch_statuses(http)
            rows: list[RuntimeRow] = db.read(lambda store: store.load())
            return [row.status() for row in rows]

        if watch is not None:
            return _watch(read, every=watch, as_json=as_json, color=color)
        try:
            statuses = read()
        except ReadError as exc:
            return error(exc)
        print(_render_status(statuses, as_json=as_json, color=color))
        if http is None and not as_json and _stored_behind(statuses, time.time()):
            print(STORED_LAST_SEEN, file=sys.stderr)
    return 0


STORED_LAST_SEEN = (
    "note: a live runtime's last seen is stored about once a minute (last_seen_every), so it may be older than "
    "its interval; `status --http HOST:PORT` reads it live from the running orchestrator"
)


def _stored_behind(statuses: list[dict[str, Any]], now: float) -> bool:
    """Whether an alive runtime's stored last-seen is older than its window, which would look like a contradiction."""
    for obj in statuses:
        if obj["state"] == "alive" and obj["last_seen"] is not None:  # parses only these rows' times again
            last_seen = _wall(obj["last_seen"])
            if last_seen is not None and now - last_seen > obj["interval"] + obj["grace"]:
                return True
    return False


def _render_status(statuses: list[dict[str, Any]], *, as_json: bool, color: bool) -> str:
    if as_json:
        return json.dumps(statuses, indent=2)
    return format_table([row_from_status(obj) for obj in statuses], now=time.time(), color=color)


def _watch(read: Callable[[], list[dict[str, Any]]], *, every: float, as_json: bool, color: bool) -> int:
    """Redraw until Ctrl-C (exit 0). On a terminal each frame replaces the last; in a pipe frames follow each other."""
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while True:
            try:
                frame = _render_status(read(), as_json=as_json, color=color)
            except ReadError as exc:
                frame = f"error: {exc}"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"{clear}every {every:g} s, at {stamp} (Ctrl-C to stop)\n{frame}\n\n")
            sys.stdout.flush()
            time.sleep(every)
    except KeyboardInterrupt:
        return 0


def format_table(rows: Sequence[RuntimeRow], *, now: float, color: bool = False) -> str:
    """The status table; with ``color``, states are painted (padding stays outside the escape codes)."""
    header = ("ID", "STATE", "INTERVAL", "GRACE", "LAST SEEN", "SINCE", "REASON")
    lines = [
        (r.id, r.state, f"{r.interval:g} s", f"{r.grace:g} s", ago(r.last_seen, now), ago(r.since, now), r.reason or "")
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=False)]
    out = []
    for line in (header, *lines):
        cells = [str(x).ljust(w) for x, w in zip(line, widths, strict=True)]
        if line is not header:
            cells[1] = paint(line[1], line[1], color) + " " * (widths[1] - len(line[1]))
        out.append("  ".join(cells).rstrip())
    counts = Counter(r.state for r in rows)
    summary = ", ".join(paint(f"{counts[s]} {s}", s, color) for s in STATES if counts[s])
    out.append(f"{len(rows)} runtime{'s' if len(rows) != 1 else ''}" + (f": {summary}" if summary else ""))
    return "\n".join(out)


# --- alerts ------------------------------------------------------------------------


def format_alert(alert: dict[str, Any], *, color: bool = False) -> str:
    """``2026-11-29T01:02:03Z  dead       worker-7  no pulse for 3.2 s``: one line per alert.

    A summary has ``"id": null`` (docs/protocol.md): it names how many
    runtimes it covers and the first few IDs instead, or nothing when it is
    about no runtime in particular (``monitor_down``; ``silence_ended`` of a
    glob, whose reason names the pattern). Never a ``None`` column.
    """
    at = alert.get("at")
    at = at if isinstance(at, str) else ""
    shown_at = f"{at[:19]}Z" if len(at) >= 19 else at
    event = str(alert.get("event"))
    runtime_id = alert.get("id")
    reason = str(alert.get("reason") or "")
    subject = runtime_id if isinstance(runtime_id, str) else ""
    count = alert.get("count")
    if runtime_id is None and isinstance(count, int) and not isinstance(count, bool) and count > 0:
        subject = f"{count} runtime{'s' if count != 1 else ''}"
        ids = alert.get("runtime_ids")
        if isinstance(ids, list) and ids:
            more = count - len(ids)
            listed = ", ".join(map(str, ids)) + (f" and {more} more" if more > 0 else "")
            reason = f"{reason}: {listed}" if reason else listed
    cells = (shown_at, paint(event.ljust(9), event, color), subject, reason)
    return "  ".join(cell for cell in cells if cell).rstrip()


def _is_alert(doc: object) -> bool:
    """Whether ``doc`` is an alert document: an ``event`` name, an ``id`` (null for a summary) and an ``at``.

    Statuses, stats and the orchestrator's state have no ``event``; a broker
    or a stray publisher can put them where ``alerts --follow`` reads.
    """
    if not isinstance(doc, dict) or "id" not in doc:
        return False
    return isinstance(doc.get("event"), str) and isinstance(doc["id"], str | None) and isinstance(doc.get("at"), str)


def _alert_of(flip: FlipRow) -> dict[str, Any]:
    """A stored flip as the alert the orchestrator published for it."""
    return {
        "event": flip.event,
        "id": flip.runtime_id,
        "at": iso(flip.at),
        "last_seen": iso(flip.last_seen),
        "reason": flip.reason,
    }


def recent_alerts(config: Config, *, limit: int, as_json: bool, color: bool) -> int:
    """The last ``limit`` flips that raised an alert, oldest first, from the database."""
    from .store import Flip

    def query(store: Store) -> list[FlipRow]:
        fields = (Flip.runtime_id, Flip.old_state, Flip.new_state, Flip.event, Flip.reason, Flip.at, Flip.last_seen)
        rows = (
            Flip.select(*fields).where(Flip.event.is_null(False)).order_by(Flip.at.desc(), Flip.id.desc()).limit(limit)
        )
        return [FlipRow(*row) for row in rows.tuples().iterator()]

    with _Database(config) as db:
        try:
            flips: list[FlipRow] = db.read(query)
        except ReadError as exc:
            return error(exc)
    for flip in reversed(flips):
        alert = _alert_of(flip)
        print(json.dumps(alert) if as_json else format_alert(alert, color=color))
    return 0


def follow_alerts(config: Config, *, as_json: bool, color: bool) -> int:
    """Subscribe to the alert topic and print each alert as it arrives, until Ctrl-C (exit 0)."""

    topic = Topics(config.prefix).alerts
    client, address = mqtt_client(config, "heartbeat-alerts")
    client.reconnect_delay_set(1, 10)

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if rc.is_failure:
            print(f"heartbeat-orchestrator: broker {address.url} refused the connection: {rc}", file=sys.stderr)
            return
        client.subscribe(topic, qos=1)

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any = None) -> None:
        print(f"following {topic} on {address.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)

    def on_disconnect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        print(f"lost the broker {address.url} ({rc}); reconnecting", file=sys.stderr, flush=True)

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic != topic:  # a broker may send what we did not subscribe to (amqtt's retained replay)
            return
        try:
            alert = json.loads(message.payload)
        except ValueError:
            alert = None
        if not _is_alert(alert):
            shown = bytes(message.payload)[:200]
            print(f"skipped a message that is not an alert: {shown!r}", file=sys.stderr, flush=True)
            return
        print(json.dumps(alert) if as_json else format_alert(alert, color=color), flush=True)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    try:
        connect(client, address)
    except NoAnswer as exc:
        return error(exc)
    try:
        client.loop_forever(retry_first_connection=False)
    except KeyboardInterrupt:
        client.disconnect()
    return 0


# --- history -------------------------------------------------------------------------


def history_entries(flips: Sequence[FlipRow], *, now: float) -> list[dict[str, Any]]:
    """Flips (any order) oldest first, each with how long the state it entered lasted (the last one: until now)."""
    ordered = sorted(flips, key=lambda f: f.at)
    entries = []
    for i, flip in enumerate(ordered):
        current = i == len(ordered) - 1
        until = now if current else ordered[i + 1].at
        entries.append(
            {
                "at": iso(flip.at),
                "from": flip.old_state,
                "to": flip.new_state,
                "event": flip.event,
                "reason": flip.reason,
                "last_seen": iso(flip.last_seen),
                "duration": round(max(0.0, until - flip.at), 3),
                "current": current,
            }
        )
    return entries


def history(config: Config, runtime_id: str, *, limit: int, as_json: bool, color: bool) -> int:
    with _Database(config) as db:
        try:
            flips: list[FlipRow] = db.read(lambda store: store.history(runtime_id, limit))
        except ReadError as exc:
            return error(exc)
    entries = history_entries(flips, now=time.time())
    if as_json:
        print(json.dumps(entries, indent=2))
    elif not entries:
        print(f"no transitions recorded for {runtime_id}", file=sys.stderr)
        return 1
    else:
        print(format_history(entries, color=color))
    return 0


def format_history(entries: Sequence[dict[str, Any]], *, color: bool = False) -> str:
    header = ("AT", "FROM", "TO", "FOR", "EVENT", "REASON")
    lines = [
        (
            f"{e['at'][:19]}Z",
            e["from"],
            e["to"],
            duration(e["duration"]) + (" (now)" if e["current"] else ""),
            e["event"] or "",
            e["reason"] or "",
        )
        for e in entries
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=False)]
    out = []
    for line in (header, *lines):
        cells = [x.ljust(w) for x, w in zip(line, widths, strict=True)]
        if line is not header:
            cells[2] = paint(line[2], line[2], color) + " " * (widths[2] - len(line[2]))
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)

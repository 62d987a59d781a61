"""Wire protocol v1: topics, IDs, bounds and payload codecs.

This is the one module both sides import, so the contract in
``docs/protocol.md`` lives in code exactly once. It does no I/O: every
function takes bytes or values and returns values or raises
:class:`ProtocolError`, whose ``reason`` is a short stable code that the
orchestrator counts rejections by.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

VERSION: Final = 1
DEFAULT_PREFIX: Final = "heartbeat/v1"

MIN_INTERVAL: Final = 0.1
"""Shortest interval or grace, in seconds: below it a verdict is noise."""
MAX_INTERVAL: Final = 86_400.0
"""Longest interval or grace, in seconds (one day)."""
MAX_ID_LENGTH: Final = 128
MAX_PAYLOAD: Final = 64 * 1024
"""Default cap on any payload the orchestrator decodes, in bytes."""

_ID_RE: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

RuntimeState = Literal["alive", "dead", "stopped", "unknown"]
RUNTIME_STATES: Final = get_args(RuntimeState)
"""The states a status document can carry, in display order."""
ConnectionState = Literal["online", "offline", "stopped"]
CONNECTION_STATES: Final = ("online", "offline", "stopped")


class ProtocolError(ValueError):
    """A message that breaks the protocol; ``reason`` is a stable code for counting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_valid_id(runtime_id: object) -> bool:
    """True for 1-128 characters of ``A-Z a-z 0-9 . _ - :``."""
    return isinstance(runtime_id, str) and _ID_RE.fullmatch(runtime_id) is not None


def check_id(runtime_id: object) -> str:
    """Return ``runtime_id`` if valid, else raise ``ProtocolError('bad_id')``."""
    if is_valid_id(runtime_id):
        return runtime_id  # type: ignore[return-value]
    shown = repr(runtime_id)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise ProtocolError(
        "bad_id",
        f"invalid runtime id {shown}: use 1-{MAX_ID_LENGTH} characters of A-Z a-z 0-9 . _ - :",
    )


def check_seconds(
    name: str, value: object, *, low: float = MIN_INTERVAL, high: float = MAX_INTERVAL, note: str = ""
) -> float:
    """Validate a duration (an interval or grace by default): a finite number within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError("bad_type", f"{name} must be a number of seconds, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond any float
        seconds = math.inf
    if not math.isfinite(seconds) or not low <= seconds <= high:
        raise ProtocolError("out_of_range", f"{name} must be between {low:g} and {high:g} seconds{note}, got {value!r}")
    return seconds


class Topics:
    """Every topic of protocol v1 under one configurable prefix."""

    __slots__ = (
        "_runtimes",
        "_runtimes_len",
        "alerts",
        "command",
        "orchestrator_state",
        "orchestrator_stats",
        "prefix",
    )

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix or prefix.startswith("/") or prefix.endswith("/") or any(c in prefix for c in "+#\0"):
            raise ValueError(f"invalid topic prefix {prefix!r}: no wildcards, no leading or trailing '/'")
        self.prefix = prefix
        self._runtimes = f"{prefix}/runtimes/"
        self._runtimes_len = len(self._runtimes)
        self.alerts = f"{prefix}/alerts"
        self.orchestrator_state = f"{prefix}/orchestrator/state"
        self.orchestrator_stats = f"{prefix}/orchestrator/stats"
        self.command = f"{prefix}/orchestrator/command"
        """Where administrators send maintenance commands (silence, deregister ...)."""

    def interval(self, runtime_id: str) -> str:
        return f"{self._runtimes}{runtime_id}/interval"

    def reply(self, runtime_id: str) -> str:
        return f"{self._runtimes}{runtime_id}/interval/reply"

    def pulse(self, runtime_id: str) -> str:
        return f"{self._runtimes}{runtime_id}/pulse"

    def state(self, runtime_id: str) -> str:
        return f"{self._runtimes}{runtime_id}/state"

    def status(self, runtime_id: str) -> str:
        return f"{self.prefix}/status/{runtime_id}"

    def echo(self, client_id: str) -> str:
        """Where an orchestrator sends itself a message to prove its link (see docs/protocol.md)."""
        return f"{self.prefix}/orchestrator/echo/{client_id}"

    def command_reply(self, request_id: str) -> str:
        """Where the answer to a command carrying ``request_id`` goes (without an MQTT 5 Response Topic)."""
        return f"{self.command}/reply/{request_id}"

    @property
    def status_filter(self) -> str:
        return f"{self.prefix}/status/+"

    @property
    def pulse_filter(self) -> str:
        return f"{self._runtimes}+/pulse"

    @property
    def state_filter(self) -> str:
        return f"{self._runtimes}+/state"

    @property
    def interval_filter(self) -> str:
        return f"{self._runtimes}+/interval"

    def subscriptions(self) -> list[tuple[str, int]]:
        """What the orchestrator subscribes to, with the QoS of each."""
        return [
            (self.interval_filter, 1),
            (self.state_filter, 1),
            (self.pulse_filter, 0),
            (self.command, 1),
        ]

    def pulse_id(self, topic: str) -> str:
        """The ID in a topic already known to match :attr:`pulse_filter`: one slice, for the hot path."""
        return topic[self._runtimes_len : -6]

    def parse(self, topic: str) -> tuple[str, str] | None:
        """Split ``{prefix}/runtimes/{id}/{kind}`` into ``(kind, id)``.

        Returns None for topics outside the runtimes tree. The ID is returned
        unchecked: callers validate it before using it for anything. String
        slicing, not a regex, since this runs once per pulse.
        """
        if not topic.startswith(self._runtimes):
            return None
        rest = topic[self._runtimes_len :]
        cut = rest.rfind("/")
        if cut <= 0:
            return None
        return rest[cut + 1 :], rest[:cut]


# --- payloads ---------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ProtocolError("malformed_json", f"{name} is not valid JSON")


def decode_object(payload: bytes, *, limit: int = MAX_PAYLOAD) -> dict[str, Any]:
    """Decode a UTF-8 JSON object, strictly (no NaN/Infinity, size-capped)."""
    if len(payload) > limit:
        raise ProtocolError("too_large", f"payload of {len(payload)} bytes exceeds the {limit} byte limit")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("bad_utf8", "payload is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError):
        raise ProtocolError("malformed_json", "payload is not valid JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError("bad_type", f"payload must be a JSON object, got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class IntervalRequest:
    interval: float
    grace: float


_INTERVAL_FIELDS: Final = frozenset({"interval", "grace"})


def decode_interval(payload: bytes, *, limit: int = MAX_PAYLOAD) -> IntervalRequest | None:
    """Decode an interval request; None means deregister (empty payload).

    Unknown fields are rejected: this is configuration, and a typo such as
    ``"intervall"`` should fail loudly rather than fall back to a default.
    """
    if not payload:
        return None
    obj = decode_object(payload, limit=limit)
    unknown = sorted(set(obj) - _INTERVAL_FIELDS)
    if unknown:
        raise ProtocolError("unknown_field", f"unknown field(s) {', '.join(map(repr, unknown))[:200]}")
    if "interval" not in obj:
        raise ProtocolError("missing_field", "missing field 'interval'")
    interval = check_seconds("interval", obj["interval"])
    grace = interval if obj.get("grace") is None else check_seconds("grace", obj["grace"])
    return IntervalRequest(interval, grace)


def encode_interval(interval: float, grace: float | None = None) -> bytes:
    body: dict[str, float] = {"interval": interval}
    if grace is not None:
        body["grace"] = grace
    return json.dumps(body).encode()


def _check_session(obj: dict[str, Any]) -> int | None:
    session = obj.get("session")
    if session is None:
        return None
    if isinstance(session, bool) or not isinstance(session, int) or not 0 <= session < 2**63:
        raise ProtocolError("bad_type", "session must be a non-negative integer")
    return session


@dataclass(frozen=True, slots=True)
class StateMessage:
    state: ConnectionState
    session: int | None


def decode_state(payload: bytes, *, limit: int = MAX_PAYLOAD) -> StateMessage:
    """Decode a runtime's birth, will or stop message. Extra fields are ignored."""
    obj = decode_object(payload, limit=limit)
    state = obj.get("state")
    if state not in CONNECTION_STATES:
        raise ProtocolError("bad_value", f"state must be one of {', '.join(CONNECTION_STATES)}, got {state!r}"[:200])
    return StateMessage(state, _check_session(obj))


def encode_state(state: ConnectionState, session: int | None = None) -> bytes:
    body: dict[str, Any] = {"state": state}
    if session is not None:
        body["session"] = session
    return json.dumps(body).encode()


@dataclass(frozen=True, slots=True)
class Pulse:
    seq: int | None
    session: int | None


EMPTY_PULSE: Final = Pulse(None, None)


def decode_pulse(payload: bytes, *, limit: int = MAX_PAYLOAD) -> Pulse:
    """Decode a pulse: empty, or an object with optional integer seq and session."""
    if not payload:
        return EMPTY_PULSE
    obj = decode_object(payload, limit=limit)
    seq = obj.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        raise ProtocolError("bad_type", "seq must be an integer")
    return Pulse(seq, _check_session(obj))


def encode_pulse(seq: int | None = None, session: int | None = None) -> bytes:
    if seq is None and session is None:
        return b""
    body: dict[str, int] = {}
    if seq is not None:
        body["seq"] = seq
    if session is not None:
        body["session"] = session
    return json.dumps(body, separators=(",", ":")).encode()


def encode_reply_ok(runtime_id: str, request: IntervalRequest | None) -> bytes:
    if request is None:
        return json.dumps({"ok": True, "id": runtime_id, "deregistered": True}).encode()
    return json.dumps({"ok": True, "id": runtime_id, "interval": request.interval, "grace": request.grace}).encode()


def encode_reply_error(runtime_id: str | None, error: str) -> bytes:
    return json.dumps({"ok": False, "id": runtime_id, "error": error}).encode()


@dataclass(frozen=True, slots=True)
class Reply:
    ok: bool
    id: str | None
    interval: float | None = None
    grace: float | None = None
    error: str | None = None
    deregistered: bool = False


def decode_reply(payload: bytes) -> Reply:
    obj = decode_object(payload)
    if not isinstance(obj.get("ok"), bool):
        raise ProtocolError("bad_type", "reply needs a boolean 'ok'")
    rid = obj.get("id")
    return Reply(
        ok=obj["ok"],
        id=rid if isinstance(rid, str) else None,
        interval=obj.get("interval"),
        grace=obj.get("grace"),
        error=obj.get("error"),
        deregistered=bool(obj.get("deregistered", False)),
    )


def iso(wall: float | None) -> str | None:
    """Unix seconds to ISO 8601 UTC with milliseconds, e.g. ``2026-11-28T21:35:11.123Z``."""
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_status(
    runtime_id: str,
    *,
    state: RuntimeState,
    interval: float,
    grace: float,
    last_seen: float | None,
    since: float | None,
    reason: str | None,
) -> bytes:
    """The retained status document (wall-clock Unix seconds in, ISO 8601 out)."""
    return json.dumps(status_dict(runtime_id, state, interval, grace, last_seen, since, reason)).encode()


def status_dict(
    runtime_id: str,
    state: str,
    interval: float,
    grace: float,
    last_seen: float | None,
    since: float | None,
    reason: str | None,
) -> dict[str, Any]:
    """The status object shared by the status topic and ``status --json``."""
    return {
        "id": runtime_id,
        "state": state,
        "interval": interval,
        "grace": grace,
        "last_seen": iso(last_seen),
        "since": iso(since),
        "reason": reason,
    }


def encode_alert(event: str, runtime_id: str, *, at: float, last_seen: float | None, reason: str | None) -> bytes:
    return json.dumps(
        {"event": event, "id": runtime_id, "at": iso(at), "last_seen": iso(last_seen), "reason": reason}
    ).encode()


def encode_monitor_down(*, since: float, back: float, runtimes: int) -> bytes:
    """The one alert after the orchestrator was down long enough to have missed a death.

    ``since`` is when it was last known to be running, ``back`` when it
    restarted; runtimes that died meanwhile are alerted after the start-up window.
    """
    return json.dumps(
        {
            "event": "monitor_down",
            "id": None,
            "at": iso(back),
            "since": iso(since),
            "down_for_s": round(back - since, 1),
            "runtimes": runtimes,
            "reason": f"the orchestrator was not running for about {back - since:.0f} s",
        }
    ).encode()


# --- maintenance commands (administrators -> orchestrator) -------------------

COMMANDS: Final = ("silence", "unsilence", "deregister", "silences")
MIN_SILENCE: Final = 1.0
"""Shortest silence, in seconds."""
MAX_SILENCE: Final = 366 * 86_400.0
"""Longest silence, in seconds (366 days)."""
MAX_TARGET_LENGTH: Final = 256
"""Longest silence target (an ID, or a glob, which may spell out character classes)."""
MAX_REASON_LENGTH: Final = 500

_TARGET_RE: Final = re.compile(r"[A-Za-z0-9._:\-*?\[\]]+")
_COMMAND_FIELDS: Final = {
    "silence": frozenset({"target", "for", "reason"}),
    "unsilence": frozenset({"target"}),
    "deregister": frozenset({"id"}),
    "silences": frozenset(),
}
_ALWAYS: Final = frozenset({"command", "request_id"})


@dataclass(frozen=True, slots=True)
class Command:
    """One maintenance command; only the fields of its kind are set."""

    command: str
    request_id: str | None = None
    target: str | None = None
    """silence, unsilence: a runtime ID or a glob of ID characters and ``* ? [ ]``."""
    seconds: float | None = None
    """silence: how long, from when the orchestrator receives it."""
    reason: str | None = None
    id: str | None = None
    """deregister: the runtime."""


def check_target(target: object) -> str:
    """A silence target: a runtime ID, or a glob of ID characters and ``* ? [ ]`` (``bad_target``)."""
    if not isinstance(target, str):
        raise ProtocolError("bad_target", f"target must be a runtime ID or a glob, got {type(target).__name__}")
    if not 1 <= len(target) <= MAX_TARGET_LENGTH or _TARGET_RE.fullmatch(target) is None:
        shown = repr(target) if len(target) <= 80 else repr(target[:77]) + "..."
        raise ProtocolError(
            "bad_target",
            f"invalid target {shown}: a runtime ID or a glob of 1-{MAX_TARGET_LENGTH} characters of "
            "A-Z a-z 0-9 . _ - : and * ? [ ]",
        )
    if not any(c in target for c in "*?[") and not is_valid_id(target):
        raise ProtocolError(
            "bad_target",
            f"invalid target {target[:80]!r}: without * ? or [ it is a runtime ID, "
            f"1-{MAX_ID_LENGTH} characters of A-Z a-z 0-9 . _ - :",
        )
    return target


def check_silence_seconds(value: object) -> float:
    """How long a silence lasts: a finite number of seconds from 1 to 366 days."""
    return check_seconds("'for'", value, low=MIN_SILENCE, high=MAX_SILENCE, note=" (366 days)")


def peek_request_id(payload: bytes, *, limit: int = MAX_PAYLOAD) -> str | None:
    """The valid ``request_id`` of a command, even one that is otherwise wrong (to send the error to)."""
    try:
        obj = decode_object(payload, limit=limit)
    except ProtocolError:
        return None
    rid = obj.get("request_id")
    return rid if is_valid_id(rid) else None


def decode_command(payload: bytes, *, limit: int = MAX_PAYLOAD) -> Command:
    """Decode a maintenance command, strictly: unknown commands and fields are rejected."""
    obj = decode_object(payload, limit=limit)
    command = obj.get("command")
    if command is None:
        raise ProtocolError("missing_field", "missing field 'command'")
    if not isinstance(command, str):
        raise ProtocolError("bad_type", f"command must be a string, got {type(command).__name__}")
    if command not in _COMMAND_FIELDS:
        shown = repr(command) if len(command) <= 40 else repr(command[:37]) + "..."
        raise ProtocolError("unknown_command", f"unknown command {shown} (known: {', '.join(COMMANDS)})")
    allowed = _COMMAND_FIELDS[command]
    unknown = sorted(set(obj) - allowed - _ALWAYS)
    if unknown:
        raise ProtocolError("unknown_field", f"unknown field(s) {', '.join(map(repr, unknown))[:200]} for {command}")
    request_id = obj.get("request_id")
    if request_id is not None and not is_valid_id(request_id):
        raise ProtocolError("bad_request_id", "request_id must be 1-128 characters of A-Z a-z 0-9 . _ - :")
    for name in sorted(allowed - {"reason"}):
        if name not in obj:
            raise ProtocolError("missing_field", f"missing field {name!r} for {command}")
    if command == "deregister":
        return Command(command, request_id, id=check_id(obj["id"]))
    if command == "silences":
        return Command(command, request_id)
    target = check_target(obj["target"])
    if command == "unsilence":
        return Command(command, request_id, target=target)
    reason = obj.get("reason")
    if reason is not None:
        if not isinstance(reason, str):
            raise ProtocolError("bad_type", f"reason must be a string, got {type(reason).__name__}")
        if len(reason) > MAX_REASON_LENGTH:
            raise ProtocolError("too_long", f"reason has {len(reason)} characters, at most {MAX_REASON_LENGTH}")
        reason = reason or None
    return Command(command, request_id, target=target, seconds=check_silence_seconds(obj["for"]), reason=reason)


def encode_command(command: Command) -> bytes:
    body: dict[str, Any] = {"command": command.command}
    if command.target is not None:
        body["target"] = command.target
    if command.seconds is not None:
        body["for"] = command.seconds
    if command.reason is not None:
        body["reason"] = command.reason
    if command.id is not None:
        body["id"] = command.id
    if command.request_id is not None:
        body["request_id"] = command.request_id
    return json.dumps(body).encode()


def encode_command_reply(ok: bool, command: str | None, request_id: str | None, **fields: Any) -> bytes:
    """``{"ok": true, "command": ..., ...}`` or, with ``error=...``, ``{"ok": false, ..., "error": ...}``."""
    body: dict[str, Any] = {"ok": ok, "command": command}
    if request_id is not None:
        body["request_id"] = request_id
    body.update(fields)
    return json.dumps(body).encode()


def decode_command_reply(payload: bytes) -> dict[str, Any]:
    """A command reply as a dict; it has a boolean ``ok`` and, when false, an ``error`` string."""
    obj = decode_object(payload)
    if not isinstance(obj.get("ok"), bool):
        raise ProtocolError("bad_type", "reply needs a boolean 'ok'")
    if not obj["ok"] and not isinstance(obj.get("error"), str):
        raise ProtocolError("bad_type", "a failed reply needs an 'error' string")
    return obj

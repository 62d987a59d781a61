"""Wire protocol v1: IDs, topics, bounds and every payload codec."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from runtime_agent.protocol import (
    DEFAULT_PREFIX,
    EMPTY_PULSE,
    MAX_ID_LENGTH,
    MAX_INTERVAL,
    MAX_PAYLOAD,
    MAX_SILENCE,
    MAX_TARGET_LENGTH,
    MIN_INTERVAL,
    MIN_SILENCE,
    Command,
    IntervalRequest,
    ProtocolError,
    Pulse,
    Reply,
    StateMessage,
    Topics,
    check_id,
    check_seconds,
    decode_command,
    decode_command_reply,
    decode_interval,
    decode_object,
    decode_pulse,
    decode_reply,
    decode_state,
    encode_alert,
    encode_command,
    encode_command_reply,
    encode_interval,
    encode_pulse,
    encode_reply_error,
    encode_reply_ok,
    encode_state,
    encode_status,
    is_valid_id,
    iso,
    peek_request_id,
    status_dict,
)

ISO_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-:"

valid_ids = st.text(alphabet=ID_ALPHABET, min_size=1, max_size=MAX_ID_LENGTH)


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(ProtocolError) as info:
        call()
    return info.value.reason


# --- runtime IDs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "runtime_id",
    [
        pytest.param("a", id="one-char"),
        pytest.param("x" * MAX_ID_LENGTH, id="128-chars"),
        pytest.param(ID_ALPHABET, id="every-allowed-symbol"),
        pytest.param("rt-1", id="typical"),
        pytest.param("host.example:8080_worker-3", id="host-port"),
        pytest.param(":", id="colon-only"),
        pytest.param("...", id="dots-only"),
    ],
)
def test_valid_ids_are_accepted(runtime_id: str) -> None:
    assert is_valid_id(runtime_id)
    assert check_id(runtime_id) == runtime_id


@pytest.mark.parametrize(
    "runtime_id",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * (MAX_ID_LENGTH + 1), id="129-chars"),
        pytest.param("rt 1", id="space"),
        pytest.param("rt/1", id="slash"),
        pytest.param("rt+", id="plus-wildcard"),
        pytest.param("#", id="hash-wildcard"),
        pytest.param("rté", id="accented"),
        pytest.param("ｒｔ", id="fullwidth"),
        pytest.param("rt٣", id="arabic-indic-digit"),
        pytest.param("rt\n", id="trailing-newline"),
        pytest.param("rt\0", id="nul"),
        pytest.param("rt*", id="asterisk"),
    ],
)
def test_invalid_id_strings_are_rejected(runtime_id: str) -> None:
    assert not is_valid_id(runtime_id)
    assert reason_of(lambda: check_id(runtime_id)) == "bad_id"


@pytest.mark.parametrize("value", [None, 1, 1.5, b"rt-1", ["rt-1"], {"id": "rt-1"}, True])
def test_non_string_ids_are_rejected(value: object) -> None:
    assert not is_valid_id(value)
    assert reason_of(lambda: check_id(value)) == "bad_id"


def test_rejection_message_of_a_huge_id_is_truncated() -> None:
    with pytest.raises(ProtocolError) as info:
        check_id("/" * 10_000)

    assert len(str(info.value)) < 200
    assert "..." in str(info.value)


def test_protocol_error_is_a_value_error_with_a_reason() -> None:
    error = ProtocolError("bad_id", "nope")

    assert isinstance(error, ValueError)
    assert (error.reason, str(error)) == ("bad_id", "nope")


@given(valid_ids)
def test_every_id_from_the_allowed_alphabet_is_valid(runtime_id: str) -> None:
    assert check_id(runtime_id) == runtime_id


@given(st.text(min_size=1, max_size=MAX_ID_LENGTH).filter(lambda s: any(c not in ID_ALPHABET for c in s)))
def test_any_id_with_a_character_outside_the_alphabet_is_invalid(runtime_id: str) -> None:
    assert not is_valid_id(runtime_id)


# --- topics -------------------------------------------------------------------------------


def test_default_topics() -> None:
    topics = Topics()

    assert topics.prefix == DEFAULT_PREFIX == "heartbeat/v1"
    assert topics.interval("rt-1") == "heartbeat/v1/runtimes/rt-1/interval"
    assert topics.reply("rt-1") == "heartbeat/v1/runtimes/rt-1/interval/reply"
    assert topics.pulse("rt-1") == "heartbeat/v1/runtimes/rt-1/pulse"
    assert topics.state("rt-1") == "heartbeat/v1/runtimes/rt-1/state"
    assert topics.status("rt-1") == "heartbeat/v1/status/rt-1"
    assert topics.status_filter == "heartbeat/v1/status/+"
    assert topics.alerts == "heartbeat/v1/alerts"
    assert topics.orchestrator_state == "heartbeat/v1/orchestrator/state"


def test_orchestrator_subscriptions_and_their_qos() -> None:
    assert Topics().subscriptions() == [
        ("heartbeat/v1/runtimes/+/interval", 1),
        ("heartbeat/v1/runtimes/+/state", 1),
        ("heartbeat/v1/runtimes/+/pulse", 0),
        ("heartbeat/v1/orchestrator/command", 1),
    ]


@pytest.mark.parametrize("kind", ["interval", "pulse", "state"])
def test_parse_inverts_the_topic_builders(kind: str) -> None:
    topics = Topics()
    build: Callable[[str], str] = getattr(topics, kind)

    assert topics.parse(build("rt-1")) == (kind, "rt-1")


@given(runtime_id=valid_ids, kind=st.sampled_from(["interval", "pulse", "state"]), prefix=st.sampled_from(["a", "x/y"]))
def test_parse_round_trips_every_valid_id(runtime_id: str, kind: str, prefix: str) -> None:
    topics = Topics(prefix)

    assert topics.parse(getattr(topics, kind)(runtime_id)) == (kind, runtime_id)


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("other/v1/runtimes/rt-1/pulse", id="other-prefix"),
        pytest.param("heartbeat/v10/runtimes/rt-1/pulse", id="longer-version"),
        pytest.param("heartbeat/v1/runtimesX/rt-1/pulse", id="runtimes-suffix"),
        pytest.param("heartbeat/v1/status/rt-1", id="status-tree"),
        pytest.param("heartbeat/v1/alerts", id="alerts"),
        pytest.param("heartbeat/v1/runtimes/", id="nothing-after-runtimes"),
        pytest.param("heartbeat/v1/runtimes/rt-1", id="no-kind"),
        pytest.param("heartbeat/v1/runtimes//pulse", id="empty-id"),
        pytest.param("/heartbeat/v1/runtimes/rt-1/pulse", id="leading-slash"),
        pytest.param("", id="empty"),
    ],
)
def test_parse_rejects_topics_outside_the_runtimes_tree(topic: str) -> None:
    assert Topics().parse(topic) is None


@pytest.mark.parametrize(
    "topic",
    [
        "heartbeat/v1/runtimes/a/b/pulse",
        "heartbeat/v1/runtimes/rt-1/interval/reply",
        "heartbeat/v1/runtimes/rt+/pulse",
        "heartbeat/v1/runtimes/rt-1/",
    ],
)
def test_parse_never_yields_a_usable_id_and_kind_for_malformed_topics(topic: str) -> None:
    parsed = Topics().parse(topic)

    # parse leaves the ID unchecked; what it returns must fail the check or the kind.
    assert parsed is None or not is_valid_id(parsed[1]) or parsed[0] not in {"interval", "pulse", "state"}


def test_custom_prefix_is_used_everywhere() -> None:
    topics = Topics("acme/site-1/hb")

    assert topics.pulse("rt-1") == "acme/site-1/hb/runtimes/rt-1/pulse"
    assert topics.status("rt-1") == "acme/site-1/hb/status/rt-1"
    assert topics.alerts == "acme/site-1/hb/alerts"
    assert all(topic.startswith("acme/site-1/hb/") for topic, _ in topics.subscriptions())
    assert topics.command == "acme/site-1/hb/orchestrator/command"
    assert topics.command_reply("r1") == "acme/site-1/hb/orchestrator/command/reply/r1"
    assert topics.parse("acme/site-1/hb/runtimes/rt-1/state") == ("state", "rt-1")
    assert topics.parse("heartbeat/v1/runtimes/rt-1/state") is None
    assert Topics().parse(topics.pulse("rt-1")) is None


@pytest.mark.parametrize("prefix", ["", "/hb", "hb/", "/", "hb/+/x", "hb/#", "hb+", "h\0b"])
def test_invalid_prefix_raises(prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid topic prefix"):
        Topics(prefix)


# --- generic JSON object decoding ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(b"\xff\xfe", "bad_utf8", id="bad-utf8"),
        pytest.param(b'{"interval": "\xc3"}', "bad_utf8", id="truncated-utf8"),
        pytest.param(b"", "malformed_json", id="empty"),
        pytest.param(b"{", "malformed_json", id="unclosed"),
        pytest.param(b'{"a": 1,}', "malformed_json", id="trailing-comma"),
        pytest.param(b"{'a': 1}", "malformed_json", id="single-quotes"),
        pytest.param(b'{"a": NaN}', "malformed_json", id="nan"),
        pytest.param(b'{"a": Infinity}', "malformed_json", id="infinity"),
        pytest.param(b'{"a": -Infinity}', "malformed_json", id="minus-infinity"),
        pytest.param(b"[" * 30_000 + b"]" * 30_000, "malformed_json", id="too-deep"),
        pytest.param(b"[1]", "bad_type", id="array"),
        pytest.param(b"5", "bad_type", id="number"),
        pytest.param(b'"x"', "bad_type", id="string"),
        pytest.param(b"null", "bad_type", id="null"),
    ],
)
def test_decode_object_rejections(payload: bytes, reason: str) -> None:
    assert reason_of(lambda: decode_object(payload)) == reason


def test_decode_object_size_limit_is_inclusive() -> None:
    body = b'{"a": 1}'
    exact = body + b" " * (MAX_PAYLOAD - len(body))

    assert decode_object(exact) == {"a": 1}
    assert reason_of(lambda: decode_object(exact + b" ")) == "too_large"
    assert reason_of(lambda: decode_object(body, limit=len(body) - 1)) == "too_large"


def test_size_limit_is_checked_before_decoding() -> None:
    assert reason_of(lambda: decode_object(b"\xff" * (MAX_PAYLOAD + 1))) == "too_large"


# --- interval requests ---------------------------------------------------------------------------


def test_decode_interval_with_grace() -> None:
    assert decode_interval(b'{"interval": 5, "grace": 2.5}') == IntervalRequest(5.0, 2.5)


def test_decode_interval_grace_defaults_to_interval() -> None:
    assert decode_interval(b'{"interval": 7.5}') == IntervalRequest(7.5, 7.5)
    assert decode_interval(b'{"interval": 7.5, "grace": null}') == IntervalRequest(7.5, 7.5)


def test_decode_interval_returns_floats_for_integers() -> None:
    request = decode_interval(b'{"interval": 5, "grace": 3}')

    assert request is not None
    assert type(request.interval) is float
    assert type(request.grace) is float


def test_empty_interval_payload_means_deregister() -> None:
    assert decode_interval(b"") is None


@pytest.mark.parametrize("seconds", [MIN_INTERVAL, 0.1, 1, MAX_INTERVAL, 86400])
def test_interval_and_grace_bounds_are_inclusive(seconds: float) -> None:
    payload = json.dumps({"interval": seconds, "grace": seconds}).encode()

    assert decode_interval(payload) == IntervalRequest(float(seconds), float(seconds))


@pytest.mark.parametrize(
    "payload",
    [
        b'{"interval": 0.0999}',
        b'{"interval": 0}',
        b'{"interval": -1}',
        b'{"interval": 86400.001}',
        b'{"interval": 1e400}',
        b'{"interval": -1e400}',
        b'{"interval": 5, "grace": 0.05}',
        b'{"interval": 5, "grace": 86401}',
    ],
)
def test_interval_or_grace_out_of_bounds_is_out_of_range(payload: bytes) -> None:
    assert reason_of(lambda: decode_interval(payload)) == "out_of_range"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"interval": NaN}',
        b'{"interval": Infinity}',
        b'{"interval": 5, "grace": -Infinity}',
    ],
)
def test_nan_and_infinity_literals_are_malformed_json(payload: bytes) -> None:
    assert reason_of(lambda: decode_interval(payload)) == "malformed_json"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"interval": true}',
        b'{"interval": false}',
        b'{"interval": 5, "grace": true}',
        b'{"interval": "5"}',
        b'{"interval": 5, "grace": "1"}',
        b'{"interval": null}',
        b'{"interval": [5]}',
        b'{"interval": {"s": 5}}',
    ],
)
def test_non_numeric_interval_or_grace_is_bad_type(payload: bytes) -> None:
    assert reason_of(lambda: decode_interval(payload)) == "bad_type"


def test_unknown_field_is_rejected_and_named() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_interval(b'{"intervall": 5}')

    assert info.value.reason == "unknown_field"
    assert "'intervall'" in str(info.value)


def test_unknown_field_is_rejected_even_next_to_a_valid_interval() -> None:
    assert reason_of(lambda: decode_interval(b'{"interval": 5, "seq": 1}')) == "unknown_field"


def test_unknown_field_message_is_bounded() -> None:
    payload = json.dumps({f"field{i}": 1 for i in range(1000)}).encode()

    with pytest.raises(ProtocolError) as info:
        decode_interval(payload)

    assert info.value.reason == "unknown_field"
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("payload", [b"{}", b'{"grace": 5}'])
def test_missing_interval_is_missing_field(payload: bytes) -> None:
    assert reason_of(lambda: decode_interval(payload)) == "missing_field"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(b"[5]", "bad_type", id="array"),
        pytest.param(b"5", "bad_type", id="bare-number"),
        pytest.param(b"\x80", "bad_utf8", id="bad-utf8"),
        pytest.param(b"interval=5", "malformed_json", id="not-json"),
    ],
)
def test_interval_payload_that_is_not_a_json_object(payload: bytes, reason: str) -> None:
    assert reason_of(lambda: decode_interval(payload)) == reason


def test_oversized_interval_payload_is_too_large() -> None:
    payload = b'{"interval": 5}' + b" " * MAX_PAYLOAD

    assert reason_of(lambda: decode_interval(payload)) == "too_large"
    assert reason_of(lambda: decode_interval(b'{"interval": 5}', limit=4)) == "too_large"


def test_encode_interval_round_trips() -> None:
    assert decode_interval(encode_interval(5.0, 2.0)) == IntervalRequest(5.0, 2.0)
    assert decode_interval(encode_interval(5.0)) == IntervalRequest(5.0, 5.0)
    assert json.loads(encode_interval(5.0)) == {"interval": 5.0}


def test_check_seconds_names_the_field() -> None:
    with pytest.raises(ProtocolError, match="grace") as info:
        check_seconds("grace", 0)

    assert info.value.reason == "out_of_range"
    assert check_seconds("interval", 3) == 3.0


# --- state messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["online", "offline", "stopped"])
def test_decode_state_each_connection_state(state: str) -> None:
    payload = json.dumps({"state": state, "session": 42}).encode()

    assert decode_state(payload) == StateMessage(state, 42)  # type: ignore[arg-type]


def test_decode_state_session_is_optional() -> None:
    assert decode_state(b'{"state": "online"}') == StateMessage("online", None)
    assert decode_state(b'{"state": "online", "session": null}') == StateMessage("online", None)


def test_decode_state_ignores_extra_fields() -> None:
    assert decode_state(b'{"state": "stopped", "session": 1, "why": "deploy"}') == StateMessage("stopped", 1)


@pytest.mark.parametrize("payload", [b"{}", b'{"state": "dead"}', b'{"state": "ONLINE"}', b'{"state": 1}'])
def test_decode_state_rejects_unknown_state_as_bad_value(payload: bytes) -> None:
    assert reason_of(lambda: decode_state(payload)) == "bad_value"


def test_decode_state_bad_value_message_is_bounded() -> None:
    payload = json.dumps({"state": "x" * 10_000}).encode()

    with pytest.raises(ProtocolError) as info:
        decode_state(payload)

    assert len(str(info.value)) <= 200


@pytest.mark.parametrize("session", [True, -1, 2**63, 1.0, "1", [1]])
def test_decode_state_rejects_bad_session(session: Any) -> None:
    payload = json.dumps({"state": "online", "session": session}).encode()

    assert reason_of(lambda: decode_state(payload)) == "bad_type"


def test_decode_state_session_bounds() -> None:
    assert decode_state(b'{"state": "online", "session": 0}').session == 0
    assert decode_state(json.dumps({"state": "online", "session": 2**63 - 1}).encode()).session == 2**63 - 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"", "malformed_json"), (b'"online"', "bad_type"), (b"\xff", "bad_utf8")],
)
def test_decode_state_rejects_non_objects(payload: bytes, reason: str) -> None:
    assert reason_of(lambda: decode_state(payload)) == reason


def test_decode_state_respects_the_size_limit() -> None:
    assert reason_of(lambda: decode_state(b'{"state": "online"}', limit=5)) == "too_large"


def test_encode_state_round_trips() -> None:
    assert decode_state(encode_state("offline", 7)) == StateMessage("offline", 7)
    assert decode_state(encode_state("online")) == StateMessage("online", None)


# --- pulses --------------------------------------------------------------------------------------------


def test_empty_pulse_takes_the_fast_path() -> None:
    assert decode_pulse(b"") is EMPTY_PULSE
    assert Pulse(None, None) == EMPTY_PULSE


def test_decode_pulse_empty_object() -> None:
    assert decode_pulse(b"{}") == Pulse(None, None)


def test_decode_pulse_seq_and_session() -> None:
    assert decode_pulse(b'{"seq": 12, "session": 3}') == Pulse(12, 3)


def test_decode_pulse_ignores_extra_fields() -> None:
    assert decode_pulse(b'{"seq": 1, "load": 0.5, "tags": ["a"]}') == Pulse(1, None)


@pytest.mark.parametrize("seq", [True, 1.5, "1", [1], {"n": 1}])
def test_decode_pulse_rejects_bad_seq_type(seq: Any) -> None:
    payload = json.dumps({"seq": seq}).encode()

    assert reason_of(lambda: decode_pulse(payload)) == "bad_type"


def test_decode_pulse_accepts_any_integer_seq() -> None:
    assert decode_pulse(b'{"seq": -5}').seq == -5
    assert decode_pulse(b'{"seq": null}').seq is None


@pytest.mark.parametrize("session", [False, -3, 2**64, 0.5])
def test_decode_pulse_rejects_bad_session(session: Any) -> None:
    payload = json.dumps({"session": session}).encode()

    assert reason_of(lambda: decode_pulse(payload)) == "bad_type"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"1", "bad_type"), (b"{", "malformed_json"), (b"\xc0", "bad_utf8"), (b'{"seq": NaN}', "malformed_json")],
)
def test_malformed_pulse_is_rejected(payload: bytes, reason: str) -> None:
    assert reason_of(lambda: decode_pulse(payload)) == reason


def test_decode_pulse_respects_the_size_limit() -> None:
    assert reason_of(lambda: decode_pulse(b'{"seq": 1}', limit=3)) == "too_large"


def test_encode_pulse_round_trips() -> None:
    assert encode_pulse() == b""
    assert decode_pulse(encode_pulse()) is EMPTY_PULSE
    assert decode_pulse(encode_pulse(seq=9)) == Pulse(9, None)
    assert decode_pulse(encode_pulse(session=4)) == Pulse(None, 4)
    assert decode_pulse(encode_pulse(9, 4)) == Pulse(9, 4)
    assert encode_pulse(9, 4) == b'{"seq":9,"session":4}'


# --- interval replies -------------------------------------------------------------------------------


def test_ok_reply_round_trips() -> None:
    reply = decode_reply(encode_reply_ok("rt-1", IntervalRequest(5.0, 2.0)))

    assert reply == Reply(ok=True, id="rt-1", interval=5.0, grace=2.0)


def test_deregistered_reply_round_trips() -> None:
    payload = encode_reply_ok("rt-1", None)

    assert json.loads(payload) == {"ok": True, "id": "rt-1", "deregistered": True}
    assert decode_reply(payload) == Reply(ok=True, id="rt-1", deregistered=True)


def test_error_reply_round_trips() -> None:
    payload = encode_reply_error("rt-1", "interval must be between 0.1 and 86400 seconds, got -1")

    assert decode_reply(payload) == Reply(
        ok=False, id="rt-1", error="interval must be between 0.1 and 86400 seconds, got -1"
    )


def test_error_reply_without_a_usable_id() -> None:
    payload = encode_reply_error(None, "invalid runtime id")

    assert json.loads(payload)["id"] is None
    assert decode_reply(payload) == Reply(ok=False, id=None, error="invalid runtime id")


@pytest.mark.parametrize("payload", [b"{}", b'{"ok": "yes"}', b'{"ok": 1}', b'{"ok": null}'])
def test_reply_without_boolean_ok_is_bad_type(payload: bytes) -> None:
    assert reason_of(lambda: decode_reply(payload)) == "bad_type"


def test_reply_with_non_string_id_has_no_id() -> None:
    assert decode_reply(b'{"ok": true, "id": 5}').id is None


# --- times and published documents -------------------------------------------------------------------


def test_iso_formats_utc_with_milliseconds_and_z() -> None:
    assert iso(1795901711.123) == "2026-11-28T21:35:11.123Z"
    assert iso(0) == "1970-01-01T00:00:00.000Z"
    assert iso(0.9999) == "1970-01-01T00:00:00.999Z"


def test_iso_of_none_is_none() -> None:
    assert iso(None) is None


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_iso_always_has_the_documented_shape(wall: float) -> None:
    text = iso(wall)

    assert text is not None
    assert ISO_RE.fullmatch(text), text


def test_encode_status_document() -> None:
    payload = encode_status(
        "rt-1",
        state="dead",
        interval=5.0,
        grace=5.0,
        last_seen=1795901711.123,
        since=1795901721.5,
        reason="no pulse for 10.4 s (interval 5 s + grace 5 s)",
    )

    assert json.loads(payload) == {
        "id": "rt-1",
        "state": "dead",
        "interval": 5.0,
        "grace": 5.0,
        "last_seen": "2026-11-28T21:35:11.123Z",
        "since": "2026-11-28T21:35:21.500Z",
        "reason": "no pulse for 10.4 s (interval 5 s + grace 5 s)",
    }


def test_status_of_a_runtime_never_seen_has_null_times() -> None:
    document = status_dict("rt-1", "unknown", 1.0, 2.0, None, None, None)

    assert document == {
        "id": "rt-1",
        "state": "unknown",
        "interval": 1.0,
        "grace": 2.0,
        "last_seen": None,
        "since": None,
        "reason": None,
    }


def test_encode_alert_document() -> None:
    payload = encode_alert("dead", "rt-1", at=1795901721.5, last_seen=None, reason="connection lost")

    assert json.loads(payload) == {
        "event": "dead",
        "id": "rt-1",
        "at": "2026-11-28T21:35:21.500Z",
        "last_seen": None,
        "reason": "connection lost",
    }


# --- no decoder ever raises anything but ProtocolError -----------------------------------------------

DECODERS: list[Callable[[bytes], object]] = [decode_object, decode_interval, decode_state, decode_pulse, decode_reply]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
field_values = st.one_of(json_values, st.integers(-(2**70), 2**70), st.floats(), st.sampled_from(["online", "stopped"]))
protocol_like_objects = st.dictionaries(
    st.sampled_from(["interval", "grace", "state", "session", "seq", "ok", "id", "error", "deregistered", "x"]),
    field_values,
    max_size=5,
)


REASONS = frozenset(
    {
        "too_large",
        "bad_utf8",
        "malformed_json",
        "bad_type",
        "bad_value",
        "unknown_field",
        "missing_field",
        "out_of_range",
    }
)


def check_decoders(payload: bytes) -> None:
    """Each decoder returns or raises ProtocolError with a known reason; anything else propagates and fails."""
    for decode in DECODERS:
        reason = None
        try:
            decode(payload)
        except ProtocolError as error:
            reason = error.reason
        assert reason is None or reason in REASONS, reason


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decoders_raise_only_protocol_errors_on_arbitrary_bytes(payload: bytes) -> None:
    check_decoders(payload)


@settings(max_examples=300)
@given(json_values)
def test_decoders_raise_only_protocol_errors_on_arbitrary_json(value: object) -> None:
    check_decoders(json.dumps(value).encode())


@settings(max_examples=300)
@given(protocol_like_objects)
def test_decoders_raise_only_protocol_errors_on_protocol_like_objects(value: dict[str, Any]) -> None:
    check_decoders(json.dumps(value).encode())


@given(
    interval=st.floats(min_value=MIN_INTERVAL, max_value=MAX_INTERVAL),
    grace=st.none() | st.floats(min_value=MIN_INTERVAL, max_value=MAX_INTERVAL),
)
def test_every_in_bounds_interval_round_trips(interval: float, grace: float | None) -> None:
    expected = IntervalRequest(interval, interval if grace is None else grace)

    assert decode_interval(encode_interval(interval, grace)) == expected


# --- maintenance commands ---------------------------------------------------------

COMMAND_REASONS = REASONS | {"unknown_command", "bad_target", "bad_id", "bad_request_id", "too_long"}


def command(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_command_topics() -> None:
    topics = Topics()
    assert topics.command == "heartbeat/v1/orchestrator/command"
    assert topics.command_reply("req-1") == "heartbeat/v1/orchestrator/command/reply/req-1"
    assert topics.parse(topics.command) is None  # not a runtime's topic


def test_silence_command_decodes_with_all_its_fields() -> None:
    payload = command(command="silence", target="db-*", reason="patching", request_id="r1", **{"for": 900})
    assert decode_command(payload) == Command("silence", "r1", target="db-*", seconds=900.0, reason="patching")


def test_silence_command_reason_is_optional_and_empty_means_none() -> None:
    assert decode_command(command(command="silence", target="rt-1", **{"for": 1})).reason is None
    assert decode_command(command(command="silence", target="rt-1", reason="", **{"for": 1})).reason is None


@pytest.mark.parametrize(
    "cmd",
    [
        Command("silence", "r-1", target="web-[0-9]?", seconds=MAX_SILENCE, reason="why"),
        Command("silence", None, target="rt-1", seconds=MIN_SILENCE),
        Command("unsilence", "r-2", target="*"),
        Command("deregister", "r-3", id="rt-1"),
        Command("silences", "r-4"),
        Command("silences"),
    ],
)
def test_every_command_round_trips(cmd: Command) -> None:
    assert decode_command(encode_command(cmd)) == cmd


@pytest.mark.parametrize(
    ("fields", "reason", "says"),
    [
        ({}, "missing_field", "'command'"),
        ({"command": 7}, "bad_type", "string"),
        ({"command": "reboot"}, "unknown_command", "unknown command 'reboot'"),
        ({"command": "silences", "target": "x"}, "unknown_field", "'target'"),
        ({"command": "deregister", "id": "rt-1", "force": True}, "unknown_field", "'force'"),
        ({"command": "silence", "target": "rt-1"}, "missing_field", "'for'"),
        ({"command": "silence", "for": 60}, "missing_field", "'target'"),
        ({"command": "unsilence"}, "missing_field", "'target'"),
        ({"command": "deregister"}, "missing_field", "'id'"),
        ({"command": "silence", "target": "rt-1", "for": 0.5}, "out_of_range", "between 1 and"),
        ({"command": "silence", "target": "rt-1", "for": 366 * 86400 + 1}, "out_of_range", "366 days"),
        ({"command": "silence", "target": "rt-1", "for": "1h"}, "bad_type", "number of seconds"),
        ({"command": "silence", "target": "rt-1", "for": True}, "bad_type", "number of seconds"),
        ({"command": "silence", "target": "rt-1", "for": 60, "reason": 5}, "bad_type", "reason"),
        ({"command": "silence", "target": "rt-1", "for": 60, "reason": "x" * 501}, "too_long", "500"),
        ({"command": "silence", "target": "rt 1", "for": 60}, "bad_target", "invalid target"),
        ({"command": "silence", "target": "db/#", "for": 60}, "bad_target", "invalid target"),
        ({"command": "silence", "target": "[!a]*", "for": 60}, "bad_target", "invalid target"),
        ({"command": "silence", "target": "", "for": 60}, "bad_target", "invalid target"),
        ({"command": "silence", "target": "*" * 257, "for": 60}, "bad_target", "invalid target"),
        ({"command": "silence", "target": "a" * 129, "for": 60}, "bad_target", "1-128 characters"),
        ({"command": "silence", "target": "]", "for": 60}, "bad_target", "runtime ID"),
        ({"command": "silence", "target": ["rt-1"], "for": 60}, "bad_target", "list"),
        ({"command": "unsilence", "target": None}, "bad_target", "NoneType"),
        ({"command": "deregister", "id": "db-*"}, "bad_id", "invalid runtime id"),
        ({"command": "silences", "request_id": "a/b"}, "bad_request_id", "request_id"),
    ],
)
def test_bad_commands_are_rejected_with_a_reason(fields: dict[str, Any], reason: str, says: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_command(command(**fields))
    assert caught.value.reason == reason
    assert says in str(caught.value)


def test_a_glob_target_may_be_longer_than_an_id() -> None:
    target = "[ab]" * 64
    assert decode_command(command(command="unsilence", target=target)).target == target


def test_request_id_is_found_even_in_a_bad_command() -> None:
    assert peek_request_id(command(command="reboot", request_id="r-9")) == "r-9"
    assert peek_request_id(command(command="silences", request_id="no spaces")) is None
    assert peek_request_id(b"not json") is None


def test_command_reply_codec() -> None:
    ok = decode_command_reply(encode_command_reply(True, "deregister", "r1", id="rt-1", deregistered=True))
    assert ok == {"ok": True, "command": "deregister", "request_id": "r1", "id": "rt-1", "deregistered": True}
    error = decode_command_reply(encode_command_reply(False, None, None, error="unknown command 'x'"))
    assert error == {"ok": False, "command": None, "error": "unknown command 'x'"}
    with pytest.raises(ProtocolError):
        decode_command_reply(b'{"ok": false}')
    with pytest.raises(ProtocolError):
        decode_command_reply(b'{"ok": "yes"}')


@settings(max_examples=300)
@given(protocol_like_objects | json_values)
def test_command_decoder_raises_only_protocol_errors(value: object) -> None:
    for payload in (json.dumps(value).encode(), json.dumps({"command": "silence", "value": value}).encode()):
        reason = None
        try:
            decode_command(payload)
        except ProtocolError as error:
            reason = error.reason
        assert reason is None or reason in COMMAND_REASONS, reason


@settings(max_examples=200)
@given(
    target=st.text(alphabet="abz09._:-*?[]", min_size=1, max_size=MAX_TARGET_LENGTH),
    seconds=st.floats(min_value=MIN_SILENCE, max_value=MAX_SILENCE),
)
def test_in_bounds_silences_round_trip(target: str, seconds: float) -> None:
    assume(any(c in target for c in "*?[") or is_valid_id(target))
    cmd = Command("silence", None, target=target, seconds=seconds)
    assert decode_command(encode_command(cmd)) == cmd

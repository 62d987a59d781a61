"""Broker URL parsing (the one spelling both the agent and the orchestrator accept), and the one URL redaction."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime_agent.url import PASSWORD_ENV, BrokerAddress, parse_broker_url, redact_url, with_env_password


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker", BrokerAddress("broker", 1883)),
        ("mqtt://broker:1884", BrokerAddress("broker", 1884)),
        ("mqtts://broker", BrokerAddress("broker", 8883, tls=True)),
        ("mqtts://broker:8884", BrokerAddress("broker", 8884, tls=True)),
        ("mqtt://127.0.0.1:1883", BrokerAddress("127.0.0.1", 1883)),
        ("mqtt://[::1]:1884", BrokerAddress("::1", 1884)),
        ("MQTT://Broker", BrokerAddress("broker", 1883)),
        ("mqtt://broker/", BrokerAddress("broker", 1883)),
        ("mqtt://alice@broker", BrokerAddress("broker", 1883, username="alice")),
        ("mqtt://alice:secret@broker:1", BrokerAddress("broker", 1, username="alice", password="secret")),
    ],
)
def test_valid_urls_parse(url: str, expected: BrokerAddress) -> None:
    assert parse_broker_url(url) == expected


def test_user_and_password_are_percent_decoded() -> None:
    address = parse_broker_url("mqtts://al%40ce:p%3As%2Fs%20word@broker")
    assert (address.username, address.password) == ("al@ce", "p:s/s word")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty broker URL"),
        ("broker:1883", "did you mean 'mqtt://broker:1883'"),
        ("http://broker", "expected mqtt://"),
        ("tcp://broker:1883", "expected mqtt://"),
        ("mqtt://", "expected mqtt://"),
        ("mqtt://:1883", "missing host"),
        ("mqtt://broker:0", "port must be 1-65535"),
        ("mqtt://broker:65536", "out of range"),
        ("mqtt://broker:port", "invalid broker URL"),
        ("mqtt://broker/topic", "no path, query or fragment"),
        ("mqtt://broker?x=1", "no path, query or fragment"),
    ],
)
def test_invalid_urls_raise_value_error_saying_why(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_broker_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "mqtt://alice:hunter2@broker/path",
        "alice:hunter2@broker",  # missing scheme: the message suggests mqtt://alice:***@broker
        "mqtt://alice:hunt/er2@broker",  # a bare "/" makes urlsplit read "hunt" as the port
        "http://alice:hunter2@broker",
    ],
)
def test_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="invalid broker URL") as caught:
        parse_broker_url(url)
    assert "hunt" not in str(caught.value)


def test_repr_and_url_leave_out_the_password() -> None:
    address = parse_broker_url("mqtt://alice:hunter2@broker:1884")
    assert "hunter2" not in repr(address)
    assert address.url == "mqtt://alice@broker:1884"
    assert str(parse_broker_url("mqtts://[::1]")) == "mqtts://[::1]:8883"


def test_address_is_frozen() -> None:
    address = parse_broker_url("mqtt://broker")
    with pytest.raises(AttributeError):
        address.port = 1  # type: ignore[misc]


def test_password_from_the_environment_fills_a_url_with_only_a_user() -> None:
    address = with_env_password(parse_broker_url("mqtts://rt-a@broker"), {PASSWORD_ENV: "s3cret"})
    assert (address.username, address.password) == ("rt-a", "s3cret")


def test_password_from_the_environment_needs_a_user_in_the_url() -> None:
    assert with_env_password(parse_broker_url("mqtts://broker"), {PASSWORD_ENV: "s3cret"}).password is None


def test_password_in_the_url_wins_over_the_environment() -> None:
    address = with_env_password(parse_broker_url("mqtts://rt-a:mine@broker"), {PASSWORD_ENV: "s3cret"})
    assert address.password == "mine"


# --- redact_url: every URL the agent or the orchestrator may show ------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # broker URLs: only the password goes
        ("mqtt://broker:1883", "mqtt://broker:1883"),
        ("mqtts://rt-a:hunter2@broker:8883", "mqtts://rt-a:***@broker:8883"),
        ("mqtt://alice:p@ss/w:rd@broker", "mqtt://alice:***@broker"),  # unencoded @ and / stay in the password
        ("mqtt://:hunter2@broker", "mqtt://:***@broker"),
        ("mqtt://alice@broker", "mqtt://alice@broker"),
        ("alice:hunter2@broker:1883", "alice:***@broker:1883"),  # a broker URL missing its scheme
        ("broker:1883", "broker:1883"),
        # database URLs: the database and file stay, passwords go from the user part and the query
        ("sqlite:///var/lib/heartbeat/heartbeat.db", "sqlite:///var/lib/heartbeat/heartbeat.db"),
        ("postgresql://hb:s3cret@db.internal:5432/heartbeat", "postgresql://hb:***@db.internal:5432/heartbeat"),
        (
            "postgres://hb@db/heartbeat?password=s3cret&sslmode=require",
            "postgres://hb@db/heartbeat?password=***&sslmode=require",
        ),
        ("postgresql+pool://hb:s3cret@db/heartbeat", "postgresql+pool://hb:***@db/heartbeat"),
        ("mysql://hb:s3cret@db/heartbeat", "mysql://hb:***@db/heartbeat"),
        # webhooks and anything else: scheme://host:port, since paths, queries and user parts carry tokens
        ("https://hooks.slack.com/services/T000/B000/XXXX", "https://hooks.slack.com"),
        ("http://127.0.0.1:8080/hook/T0KEN?token=abc#frag", "http://127.0.0.1:8080"),
        ("https://bot:s3cret@Example.COM:8443/x", "https://example.com:8443"),
        ("http://[::1]:8080/hook", "http://[::1]:8080"),
        ("mailto://me:s3cret@mail.example.com", "mailto://mail.example.com"),
        ("tcp://alice:hunter2@broker:1883", "tcp://broker:1883"),  # a broker URL with a wrong scheme
        # a host part that is not a host may be a token: hidden
        ("tgram://123456789:AAsecret/12315544", "tgram://***"),
        ("http://alice:hunt/er2@host/x", "http://***"),
        ("", ""),
    ],
)
def test_redact_url_shows_all_but_the_secrets(url: str, shown: str) -> None:
    assert redact_url(url) == shown


_PLAIN = st.text(string.ascii_lowercase + string.digits + ".-", max_size=10)
_SECRET = st.text(string.ascii_uppercase + "@/:?#&=%!", min_size=1).filter(lambda s: any(c.isupper() for c in s))


@given(
    scheme=st.sampled_from(["mqtt", "mqtts", "sqlite", "postgresql", "postgres+pool", "https", "json", "slack", "x"]),
    user=_PLAIN,
    secret=_SECRET,
    host=_PLAIN,
    tail=st.sampled_from(["", "/", ":1883", "/heartbeat", "/hook/x?y=1", "/a@b"]),
)
def test_redact_url_never_shows_a_password(scheme: str, user: str, secret: str, host: str, tail: str) -> None:
    """Whatever the password holds (@, /, ?, #...), none of its letters (the only capitals) is shown."""
    shown = redact_url(f"{scheme}://{user}:{secret}@{host}{tail}")
    assert not any(c.isupper() for c in shown), shown


@given(st.text())
def test_redact_url_never_raises(url: str) -> None:
    assert isinstance(redact_url(url), str)

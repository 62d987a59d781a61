"""Broker URL parsing: the one spelling both the agent and the orchestrator accept."""

from __future__ import annotations

import re

import pytest

from runtime_agent.url import PASSWORD_ENV, BrokerAddress, parse_broker_url, with_env_password


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


def test_errors_never_show_the_password() -> None:
    with pytest.raises(ValueError, match="invalid broker URL") as caught:
        parse_broker_url("mqtt://alice:hunter2@broker/path")
    assert "hunter2" not in str(caught.value)


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

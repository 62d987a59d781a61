"""Broker URLs: ``mqtt://[user:pass@]host[:port]`` and ``mqtts://...``.

One parser for the agent and the orchestrator, so both accept exactly the
same spelling and report mistakes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where and how to connect; the password is kept out of ``repr`` so it never reaches a log."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The URL without the password, for messages and logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}@" if self.username is not None else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse a broker URL, raising ValueError that says what is wrong and what is expected.

    User and password are percent-decoded, so ``p%40ss`` means ``p@ss``.
    """
    expected = "expected mqtt://[user:password@]host[:port] or mqtts://..."
    if not url:
        raise ValueError(f"empty broker URL: {expected}")
    if "://" not in url:
        raise ValueError(
            f"invalid broker URL {_redact(url)!r}: missing scheme, did you mean {_redact('mqtt://' + url)!r}?"
        )
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid broker URL {_redact(url)!r} ({exc}): {expected}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.netloc:
        raise ValueError(f"invalid broker URL {_redact(url)!r}: {expected}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"invalid broker URL {_redact(url)!r}: no path, query or fragment allowed; {expected}")
    host = parts.hostname
    if not host:
        raise ValueError(f"invalid broker URL {_redact(url)!r}: missing host; {expected}")
    if port == 0:
        raise ValueError(f"invalid broker URL {_redact(url)!r}: port must be 1-65535")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return BrokerAddress(
        host=host,
        port=port if port is not None else DEFAULT_PORTS[scheme],
        tls=scheme == "mqtts",
        username=username,
        password=password,
    )


def _redact(url: str) -> str:
    """The URL with any password replaced, so error messages can quote it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"

"""Broker URLs: ``mqtt://[user:pass@]host[:port]`` and ``mqtts://...``; and :func:`redact_url` for any URL.

One parser for the agent and the orchestrator, so both accept exactly the
same spelling and report mistakes the same way. Here too (the agent must not
import the orchestrator, the orchestrator may import this) is the one
function that decides what of a URL a log line or an error may show.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import unquote, urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
PASSWORD_ENV: Final = "HEARTBEAT_BROKER_PASSWORD"
"""Where a broker password can come from instead of the URL, which every process list shows."""


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
            f"invalid broker URL {redact_url(url)!r}: missing scheme, did you mean {redact_url('mqtt://' + url)!r}?"
        )
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        # "Port could not be cast to integer value as 'x'": x may be a password holding a bare "/".
        reason = str(exc).partition(" as ")[0]
        raise ValueError(f"invalid broker URL {redact_url(url)!r} ({reason}): {expected}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.netloc:
        raise ValueError(f"invalid broker URL {redact_url(url)!r}: {expected}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"invalid broker URL {redact_url(url)!r}: no path, query or fragment allowed; {expected}")
    host = parts.hostname
    if not host:
        raise ValueError(f"invalid broker URL {redact_url(url)!r}: missing host; {expected}")
    if port == 0:
        raise ValueError(f"invalid broker URL {redact_url(url)!r}: port must be 1-65535")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return BrokerAddress(
        host=host,
        port=port if port is not None else DEFAULT_PORTS[scheme],
        tls=scheme == "mqtts",
        username=username,
        password=password,
    )


def with_env_password(address: BrokerAddress, environ: Mapping[str, str] | None = None) -> BrokerAddress:
    """The address with its password taken from ``HEARTBEAT_BROKER_PASSWORD`` if the URL names a user but no password.

    A password in a URL on a command line is visible to every local user
    (``ps``); the environment is not. A password in the URL wins, as in libpq.
    """
    password = (os.environ if environ is None else environ).get(PASSWORD_ENV)
    if address.username is None or address.password is not None or password is None:
        return address
    return dataclasses.replace(address, password=password)


def check_tls_files(address: BrokerAddress, ca: str | None, cert: str | None, key: str | None) -> None:
    """Raise ValueError, naming the option, unless the TLS files fit the URL and exist.

    Checked before connecting so a typo is one clear message instead of a
    retry loop of SSL errors. A client certificate needs its key (and vice
    versa); all of them need an ``mqtts://`` URL.
    """
    given = {name: value for name, value in (("tls_ca", ca), ("tls_cert", cert), ("tls_key", key)) if value is not None}
    if given and not address.tls:
        raise ValueError(f"{', '.join(given)} set but the broker URL {address.url} is not mqtts://")
    if (cert is None) != (key is None):
        raise ValueError("tls_cert and tls_key go together: give both (client certificate and its key) or neither")
    for name, value in given.items():
        if not Path(value).is_file():
            raise ValueError(f"{name}: no such file: {value}")


PLAIN_SCHEMES: Final = frozenset(
    {"mqtt", "mqtts", "sqlite", "sqliteext", "apsw", "postgres", "postgresql", "postgresext", "postgresqlext"}
    | {"mysql", "mysqldb", "cockroachdb"}
)
"""Broker and database schemes (peewee's too, ``+pool`` aside): nothing but the password is secret in them."""

_SECRET_PARAMETER: Final = re.compile(r"([?&;][^=&#;]*(?:pass|pwd|secret|token|key)[^=&#;]*=)[^&#;]*", re.IGNORECASE)
_HOST_PORT: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[\w.~%-]+)(?::\d*)?")


def redact_url(url: str) -> str:
    """``url`` with nothing secret left in it, for logs and error messages; never raises.

    - Broker and database URLs (:data:`PLAIN_SCHEMES`), or text without a
      scheme (a broker URL missing it): only passwords go, as ``user:***@``
      or ``?password=***``; host, port, database and file are what a reader needs.
    - Any other scheme (webhooks, apprise): ``scheme://host[:port]`` only,
      since the path or query of such a URL is often the token itself
      (Slack, Discord, Telegram...); a host part that does not read as a
      host (``tgram://123:SECRET/...``) is hidden too.

    Both keep a password whose ``@`` or ``/`` was not percent-encoded out:
    user information ends at the *last* ``@``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _without_passwords(url)
    if scheme.lower().partition("+")[0] in PLAIN_SCHEMES:
        return f"{scheme}://{_without_passwords(rest)}"
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[2]
    shown = authority.lower().removesuffix(":") if _HOST_PORT.fullmatch(authority) else "***"
    return f"{scheme.lower()}://{shown}"


def _without_passwords(rest: str) -> str:
    """``user:pass@host...`` with the password, and the values of password-like query parameters, as ``***``."""
    userinfo, at, after = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:***@{after}"
    return _SECRET_PARAMETER.sub(r"\1***", rest)

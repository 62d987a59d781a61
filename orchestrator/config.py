"""Settings: loaded once (YAML file, then command-line overrides), validated, frozen."""

from __future__ import annotations

import dataclasses
import logging
import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from runtime_agent.protocol import DEFAULT_PREFIX, Topics
from runtime_agent.url import BrokerAddress, check_tls_files, parse_broker_url, redact_url, with_env_password

from .notify import EVENTS


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which option and why."""


MQTT_VERSIONS = ("auto", "5", "3.1.1")


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """One ``notify`` entry: where to send notices (``url`` or ``command``) and which ones."""

    url: str | None = None
    """``http(s)://`` posts JSON (webhook); any other scheme is an apprise URL (Slack, ntfy, mailto, ...)."""
    command: str | tuple[str, ...] | None = None
    """A program run per notice (split like a shell would, but no shell runs)."""
    events: tuple[str, ...] | None = None
    """Only these events; all when omitted."""
    runtimes: tuple[str, ...] = ()
    """Only runtimes matching one of these IDs or globs; all when empty."""
    timeout: float = 10.0
    name: str | None = None
    """Shown in logs and counters; derived from the URL or command when omitted."""

    def __post_init__(self) -> None:
        if (self.url is None) == (self.command is None):
            raise ConfigError("notify: each entry needs exactly one of url or command")
        if self.url is not None and "://" not in self.url:
            raise ConfigError(f"notify: url must look like SCHEME://..., got {self.url.partition(':')[0]!r}...")
        if self.command is not None and not self.command:
            raise ConfigError("notify: command is empty")
        unknown = sorted(set(self.events or ()) - set(EVENTS))
        if unknown:
            raise ConfigError(f"notify: unknown event(s) {', '.join(unknown)} (known: {', '.join(EVENTS)})")
        if self.events is not None and not self.events:
            raise ConfigError("notify: events is empty (leave it out for all events)")
        if not 0.1 <= self.timeout <= 600:
            raise ConfigError("notify: timeout between 0.1 and 600 seconds")
        if self.name is not None and not self.name.strip():
            raise ConfigError("notify: name is empty")


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the orchestrator needs to run. See config/orchestrator.example.yaml."""

    broker: str | None = None
    """MQTT broker URL; None starts the embedded amqtt broker on ``listen``."""
    listen: str = "127.0.0.1:1883"
    """Where the embedded broker listens (only without ``broker``)."""
    db: str = "sqlite:///heartbeat.db"
    """Peewee database URL: ``sqlite:///path`` or ``postgresql://user@host:port/name``."""
    prefix: str = DEFAULT_PREFIX
    client_id: str = field(default_factory=lambda: f"heartbeat-orchestrator-{uuid.uuid4().hex[:8]}")
    mqtt_version: str = "auto"
    """``auto`` tries MQTT 5 (reply via Response Topic) and falls back to 3.1.1."""
    pulse_connection: str = "auto"
    """``auto``: read pulses on a lean second connection when the broker speaks MQTT 5;
    ``shared``: read them on the one general connection."""
    keepalive: int = 30
    tls_ca: str | None = None
    """CA file for ``mqtts://`` brokers; the system store when omitted."""
    tls_cert: str | None = None
    """Client certificate (PEM) for brokers that authenticate clients by certificate; needs ``tls_key``."""
    tls_key: str | None = None
    """Private key (PEM) of ``tls_cert``."""
    flush_interval: float = 5.0
    """Seconds between batched writes of last-seen times (and of the record that the orchestrator is running)."""
    last_seen_every: float = 60.0
    """How far a live runtime's last-seen time in the database may fall behind (plus one interval + grace and
    a flush): it is written once in each period of this many seconds (at the first check of its deadline in
    the period; each runtime has its own phase), not once per pulse. A change of state and a clean stop
    write it exactly. The web API and the alerts have it live; a retained status has it as of its last change."""
    db_timeout: float = 2.0
    """How long a verdict waits for the database before it is published from memory."""
    echo_timeout: float = 2.0
    """Before a verdict the orchestrator proves its link with a round trip through the broker;
    no echo within this many seconds means the link, not the runtimes, is down."""
    stall_threshold: float = 1.0
    """The event loop stopped this long over a deadline means the process itself stalled: judge nobody for it."""
    stats_interval: float = 10.0
    """Seconds between publications of the counters on ``{prefix}/orchestrator/stats``."""
    outbox_lease: float = 10.0
    """Seconds a notice being sent is reserved for its sender; after a crash, whoever finds
    it unsent once the lease has run out sends it (at least once, never lost)."""
    outbox_interval: float = 5.0
    """Seconds between looks for notices owed from before (a crash, another orchestrator's)."""
    max_payload: int = 65_536
    max_queued_messages: int = 100_000
    """Control messages (interval requests, states; pulses too on MQTT 3.1.1) waiting to be read; beyond it
    they are discarded and counted (``dropped.queue_full``), so a flood cannot exhaust memory."""
    max_runtimes: int = 1_000_000
    """Registrations beyond this many runtimes are refused (``too_many_runtimes``)."""
    max_requests_per_minute: int = 30
    """Live interval requests per runtime ID per minute; more are refused (``rate_limited``)."""
    reconnect_max: float = 10.0
    reconnect_allowance: float = 7.5
    """Seconds added to the first window after the broker may have restarted (the embedded one starts with us;
    an external one after a lost link): the agents reconnect with backoff, by default at most 5 s x 1.5 of
    jitter apart. A runtime that died meanwhile is reported this much later, never falsely."""
    log_level: str = "INFO"
    http: str | None = None
    """``HOST:PORT`` of the web dashboard, ``/metrics`` and ``/healthz``; None serves nothing."""
    notify: tuple[ChannelConfig, ...] = ()
    """Notification channels besides the MQTT alert topic (see docs/notifications.md)."""
    storm_window: float = 10.0
    """Storm control: seconds over which deaths (or recoveries) are counted; 0 turns it off."""
    storm_count: int = 20
    """More than this many deaths within ``storm_window`` are one ``outage`` notice."""
    storm_share: float = 0.1
    """... or more than this share of all runtimes (but always more than 2)."""
    storm_max_ids: int = 20
    """How many runtime IDs an ``outage`` notice names."""
    reminder_interval: float | None = None
    """Seconds between ``reminder`` notices while a runtime stays dead; None: no reminders."""
    notify_retries: int = 4
    """Retries per notice and channel after a failed attempt (jittered exponential backoff, 0.5 s to 60 s)."""

    def __post_init__(self) -> None:
        if self.broker is not None:
            try:
                address = parse_broker_url(self.broker)
            except ValueError as exc:
                raise ConfigError(f"broker: {exc}") from None
            try:
                check_tls_files(address, self.tls_ca, self.tls_cert, self.tls_key)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        elif self.tls_cert is not None or self.tls_key is not None:
            raise ConfigError("tls_cert and tls_key need an mqtts:// broker; the embedded broker has no TLS")
        _host_port("listen", self.listen)
        if self.http is not None:
            _host_port("http", self.http)
        if not self.db.startswith(("sqlite:///", "postgres://", "postgresql://")):
            raise ConfigError(
                f"db: expected a file path, sqlite:///PATH or postgresql://..., got {redact_url(self.db)!r}"
            )
        try:
            Topics(self.prefix)
        except ValueError as exc:
            raise ConfigError(f"prefix: {exc}") from None
        if self.mqtt_version not in MQTT_VERSIONS:
            raise ConfigError(f"mqtt_version: one of {', '.join(MQTT_VERSIONS)}, got {self.mqtt_version!r}")
        if self.pulse_connection not in ("auto", "shared"):
            raise ConfigError(f"pulse_connection: auto or shared, got {self.pulse_connection!r}")
        if not 5 <= self.keepalive <= 3600:
            raise ConfigError("keepalive: between 5 and 3600 seconds")
        if not 0.1 <= self.flush_interval <= 3600:
            raise ConfigError("flush_interval: between 0.1 and 3600 seconds")
        if not 0.0 <= self.last_seen_every <= 86400:
            raise ConfigError("last_seen_every: between 0 and 86400 seconds")
        if not 0.0 < self.db_timeout <= 60:
            raise ConfigError("db_timeout: between 0 and 60 seconds")
        if not 0.05 <= self.echo_timeout <= 60:
            raise ConfigError("echo_timeout: between 0.05 and 60 seconds")
        if not 0.05 <= self.stall_threshold <= 3600:
            raise ConfigError("stall_threshold: between 0.05 and 3600 seconds")
        if not 0.1 <= self.stats_interval <= 3600:
            raise ConfigError("stats_interval: between 0.1 and 3600 seconds")
        if not 1.0 <= self.outbox_lease <= 3600:
            raise ConfigError("outbox_lease: between 1 and 3600 seconds")
        if not 0.1 <= self.outbox_interval <= 3600:
            raise ConfigError("outbox_interval: between 0.1 and 3600 seconds")
        if not 100 <= self.max_queued_messages <= 10_000_000:
            raise ConfigError("max_queued_messages: between 100 and 10,000,000")
        if not 1 <= self.max_runtimes <= 100_000_000:
            raise ConfigError("max_runtimes: between 1 and 100,000,000")
        if not 1 <= self.max_requests_per_minute <= 100_000:
            raise ConfigError("max_requests_per_minute: between 1 and 100,000")
        if not 256 <= self.max_payload <= 16 * 1024 * 1024:
            raise ConfigError("max_payload: between 256 bytes and 16 MiB")
        if not 0.5 <= self.reconnect_max <= 300:
            raise ConfigError("reconnect_max: between 0.5 and 300 seconds")
        if not 0 <= self.reconnect_allowance <= 300:
            raise ConfigError("reconnect_allowance: between 0 and 300 seconds")
        if logging.getLevelName(self.log_level.upper()) not in (10, 20, 30, 40, 50):
            raise ConfigError(f"log_level: DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if not all(isinstance(c, ChannelConfig) for c in self.notify):
            raise ConfigError("notify: expected ChannelConfig entries")
        if not 0 <= self.storm_window <= 3600:
            raise ConfigError("storm_window: between 0 (off) and 3600 seconds")
        if not 1 <= self.storm_count <= 1_000_000:
            raise ConfigError("storm_count: between 1 and 1000000")
        if not 0 < self.storm_share <= 1:
            raise ConfigError("storm_share: above 0 and at most 1")
        if not 1 <= self.storm_max_ids <= 1000:
            raise ConfigError("storm_max_ids: between 1 and 1000")
        if self.reminder_interval is not None and not 1 <= self.reminder_interval <= 30 * 86_400:
            raise ConfigError("reminder_interval: between 1 second and 30 days, or null for none")
        if not 0 <= self.notify_retries <= 20:
            raise ConfigError("notify_retries: between 0 and 20")

    @property
    def listen_address(self) -> tuple[str, int]:
        return _host_port("listen", self.listen)

    def broker_address(self, url: str) -> BrokerAddress:
        """Where to connect, with the password from ``HEARTBEAT_BROKER_PASSWORD`` if the URL names only a user."""
        return with_env_password(parse_broker_url(url))

    def client_address(self) -> BrokerAddress:
        """Where a client on this host reaches the orchestrator's broker: ``broker``, else the embedded ``listen``.

        A broker listening on every address is reached on loopback.
        """
        if self.broker is not None:
            return self.broker_address(self.broker)
        host, port = self.listen_address
        if host in ("0.0.0.0", "::", ""):
            host = "::1" if host == "::" else "127.0.0.1"
        return BrokerAddress(host=host, port=port)

    def ssl_context(self) -> ssl.SSLContext:
        """``mqtts://`` TLS settings as an SSLContext, for the lean connection (the general client takes paths)."""
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    @property
    def http_address(self) -> tuple[str, int] | None:
        return None if self.http is None else _host_port("http", self.http)


def _host_port(name: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def load_config(path: str | Path | None = None, *, found: Mapping[str, Any] | None = None, **overrides: Any) -> Config:
    """Read the YAML file (if any), apply non-None overrides, validate once.

    ``found`` is what a running orchestrator's note says (see
    :mod:`orchestrator.discovery`): it fills only what neither the file nor
    the overrides set, and its broker is dropped when they name a broker or
    an embedded ``listen`` address (those two say together where to connect).
    Unknown keys are an error, so a typo in the file never silently falls
    back to a default.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config file {path}: expected a mapping of options at the top level")
        values.update(raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if found:
        skip = {"broker"} if values.keys() & {"broker", "listen"} else set()
        values = {**{k: v for k, v in found.items() if k not in skip}, **values}
    if isinstance(values.get("db"), str) and values["db"] and "://" not in values["db"]:
        values["db"] = "sqlite:///" + values["db"]  # a plain path, as --db heartbeat.db reads
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(unknown)} (known: {', '.join(_FIELDS)})")
    mqtt_version = values.get("mqtt_version")
    if isinstance(mqtt_version, int | float) and not isinstance(mqtt_version, bool):
        values["mqtt_version"] = f"{mqtt_version:g}"  # YAML reads `mqtt_version: 5` as the int 5
    for name, value in values.items():
        if name != "notify":
            _check_type(name, value)
    if "notify" in values:
        values["notify"] = parse_channels(values["notify"])
    return Config(**values)


ENVIRONMENT: Final = ("broker", "listen", "db", "prefix", "http", "log_level", "tls_ca", "tls_cert", "tls_key")
"""Options that ``HEARTBEAT_{NAME}`` variables set (``HEARTBEAT_CONFIG`` names the file): where things are,
for containers and service units; the rest belong in the file."""


def from_environment(environ: Mapping[str, str]) -> tuple[str | None, dict[str, str]]:
    """``(config file, options)`` from ``HEARTBEAT_CONFIG`` and the ``HEARTBEAT_*`` variables of :data:`ENVIRONMENT`.

    An empty variable counts as unset, as a shell's ``VAR=`` usually means.
    """
    options = {name: environ.get(f"HEARTBEAT_{name.upper()}", "") for name in ENVIRONMENT}
    return environ.get("HEARTBEAT_CONFIG") or None, {k: v for k, v in options.items() if v}


_EXPECTED: dict[str, tuple[type, ...]] = {
    "client_id": (str,),
    "reminder_interval": (int, float, type(None)),
}


def _check_type(name: str, value: Any) -> None:
    default = _FIELDS[name].default
    if name in _EXPECTED:
        expected = _EXPECTED[name]
    elif default is dataclasses.MISSING:
        expected = (str,)
    elif default is None:
        expected = (str, type(None))
    elif isinstance(default, bool):
        expected = (bool,)
    elif isinstance(default, float):
        expected = (int, float)
    else:
        expected = (type(default),)
    if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
        raise ConfigError(f"{name}: expected {names}, got {type(value).__name__} {value!r}")


_CHANNEL_FIELDS = {f.name: f for f in dataclasses.fields(ChannelConfig)}


def parse_channels(value: Any) -> tuple[ChannelConfig, ...]:
    """The ``notify`` list: mappings as in the YAML file, or bare URL strings (``run --notify URL``)."""
    if value is None:
        return ()
    if isinstance(value, str | Mapping) or not isinstance(value, list | tuple):
        raise ConfigError(f"notify: expected a list of channels, got {type(value).__name__}")
    return tuple(_channel(f"notify[{number}]", item) for number, item in enumerate(value))


def _channel(where: str, item: Any) -> ChannelConfig:
    if isinstance(item, ChannelConfig):
        return item
    if isinstance(item, str):
        item = {"url": item}
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected a mapping with url or command, got {type(item).__name__}")
    unknown = sorted(set(item) - set(_CHANNEL_FIELDS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(_CHANNEL_FIELDS)})"
        )
    fields: dict[str, Any] = {}
    for key, raw in item.items():
        if key in ("events", "runtimes"):
            if isinstance(raw, str):
                raw = [raw]
            if not isinstance(raw, list | tuple) or not all(isinstance(v, str) and v for v in raw):
                raise ConfigError(f"{where}: {key}: expected a list of strings, got {raw!r}")
            fields[key] = tuple(raw)
        elif key == "command":
            is_list = isinstance(raw, list | tuple) and all(isinstance(v, str) for v in raw)
            if not isinstance(raw, str) and not is_list:
                raise ConfigError(f"{where}: command: expected a string or a list of strings, got {raw!r}")
            fields[key] = raw if isinstance(raw, str) else tuple(raw)
        elif key == "timeout":
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise ConfigError(f"{where}: timeout: expected a number of seconds, got {raw!r}")
            fields[key] = float(raw)
        else:  # url, name
            if not isinstance(raw, str):
                raise ConfigError(f"{where}: {key}: expected str, got {type(raw).__name__} {raw!r}")
            fields[key] = raw
    try:
        return ChannelConfig(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{where}{str(exc).removeprefix('notify')}") from None

"""load_config: YAML file, then flag overrides, validated once into a frozen Config."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.config import ChannelConfig, Config, ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "orchestrator.example.yaml"

WriteConfig = Callable[[str], Path]


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """Writes the given YAML text to a config file in the test's directory and returns its path."""

    def write(text: str) -> Path:
        path = tmp_path / "orchestrator.yaml"
        path.write_text(text)
        return path

    return write


def _without_client_id(config: Config) -> Config:
    return dataclasses.replace(config, client_id="fixed")


# --- defaults and sources ------------------------------------------------------


def test_defaults_without_file_or_flags() -> None:
    config = load_config()
    assert config.broker is None
    assert config.listen == "127.0.0.1:1883"
    assert config.db == "sqlite:///heartbeat.db"
    assert config.prefix == "heartbeat/v1"
    assert config.mqtt_version == "auto"
    assert config.keepalive == 30
    assert config.tls_ca is None
    assert config.flush_interval == 5.0
    assert config.db_timeout == 2.0
    assert config.max_payload == 65_536
    assert config.reconnect_max == 10.0
    assert config.log_level == "INFO"
    assert config.http is None
    assert config.notify == ()
    assert (config.storm_window, config.storm_count, config.storm_share, config.storm_max_ids) == (10.0, 20, 0.1, 20)
    assert config.reminder_interval is None
    assert config.notify_retries == 4


def test_default_client_id_is_a_fresh_orchestrator_name_per_load() -> None:
    first, second = load_config().client_id, load_config().client_id
    assert first.startswith("heartbeat-orchestrator-")
    assert second.startswith("heartbeat-orchestrator-")
    assert first != second


def test_file_values_are_used(write_config: WriteConfig) -> None:
    path = write_config(
        "broker: mqtt://user:secret@mqtt.internal:1884\n"
        "db: postgresql://heartbeat@db.internal:5432/heartbeat\n"
        "prefix: site-a/heartbeat\n"
        "client_id: orchestrator-1\n"
        "keepalive: 60\n"
        "flush_interval: 0.5\n"
        "max_payload: 1024\n"
        "log_level: debug\n"
    )
    config = load_config(path)
    assert config.broker == "mqtt://user:secret@mqtt.internal:1884"
    assert config.db == "postgresql://heartbeat@db.internal:5432/heartbeat"
    assert config.prefix == "site-a/heartbeat"
    assert config.client_id == "orchestrator-1"
    assert config.keepalive == 60
    assert config.flush_interval == 0.5
    assert config.max_payload == 1024
    assert config.log_level == "debug"


def test_file_accepts_a_path_given_as_a_string(write_config: WriteConfig) -> None:
    path = write_config("keepalive: 45\n")
    assert load_config(str(path)).keepalive == 45


def test_float_option_accepts_an_integer(write_config: WriteConfig) -> None:
    assert load_config(write_config("flush_interval: 2\n")).flush_interval == 2


def test_flags_override_the_file(write_config: WriteConfig) -> None:
    path = write_config("broker: mqtt://from-file:1883\ndb: sqlite:///file.db\n")
    config = load_config(path, broker="mqtt://from-flag:1883", db="sqlite:///flag.db")
    assert config.broker == "mqtt://from-flag:1883"
    assert config.db == "sqlite:///flag.db"


def test_none_overrides_leave_the_file_value(write_config: WriteConfig) -> None:
    path = write_config("db: sqlite:///file.db\nlisten: 127.0.0.1:18830\n")
    config = load_config(path, db=None, listen=None, broker=None)
    assert config.db == "sqlite:///file.db"
    assert config.listen == "127.0.0.1:18830"
    assert config.broker is None


def test_none_override_leaves_the_default() -> None:
    assert load_config(None, prefix=None).prefix == "heartbeat/v1"


def test_empty_file_gives_the_defaults(write_config: WriteConfig) -> None:
    assert _without_client_id(load_config(write_config(""))) == _without_client_id(load_config())


def test_comment_only_file_gives_the_defaults(write_config: WriteConfig) -> None:
    assert _without_client_id(load_config(write_config("# nothing yet\n"))) == _without_client_id(load_config())


# --- the example file -----------------------------------------------------------


def test_example_file_loads_to_the_defaults_except_client_id() -> None:
    assert _without_client_id(load_config(EXAMPLE)) == _without_client_id(load_config())


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Config)])
def test_example_file_describes_every_option(name: str) -> None:
    assert re.search(rf"^(# )?{name}:", EXAMPLE.read_text(), re.MULTILINE), f"{name} is missing from {EXAMPLE.name}"


# --- file-level errors ------------------------------------------------------------


def test_unknown_key_is_an_error_naming_it(write_config: WriteConfig) -> None:
    with pytest.raises(ConfigError, match=r"unknown option.*flush_intervall"):
        load_config(write_config("flush_intervall: 5\n"))


def test_unknown_override_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"unknown option.*brokr"):
        load_config(brokr="mqtt://localhost:1883")


def test_top_level_list_is_an_error(write_config: WriteConfig) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write_config("- broker: mqtt://localhost:1883\n"))


def test_top_level_scalar_is_an_error(write_config: WriteConfig) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write_config("mqtt://localhost:1883\n"))


def test_invalid_yaml_is_an_error(write_config: WriteConfig) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_config("broker: {mqtt://localhost:1883\n"))


def test_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config(missing)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="keepalive"):
        load_config(keepalive=1)


# --- types ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "option"),
    [
        ("flush_interval: '5'\n", "flush_interval"),
        ("keepalive: true\n", "keepalive"),
        ("keepalive: 30.5\n", "keepalive"),
        ("db: [sqlite:///a.db]\n", "db"),
        ("broker: 1883\n", "broker"),
        ("tls_ca: 5\n", "tls_ca"),
        ("client_id: 17\n", "client_id"),
        ("client_id: null\n", "client_id"),
        ("max_payload: 64 KiB\n", "max_payload"),
        ("log_level: 10\n", "log_level"),
        ("mqtt_version: true\n", "mqtt_version"),
        ("prefix: {a: b}\n", "prefix"),
        ("storm_count: 2.5\n", "storm_count"),
        ("storm_share: '10%'\n", "storm_share"),
        ("reminder_interval: 1h\n", "reminder_interval"),
        ("reminder_interval: true\n", "reminder_interval"),
        ("notify_retries: null\n", "notify_retries"),
    ],
)
def test_wrong_type_is_an_error_naming_the_option(write_config: WriteConfig, yaml_text: str, option: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{option}: expected"):
        load_config(write_config(yaml_text))


def test_wrong_type_in_an_override_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^keepalive: expected int"):
        load_config(keepalive="30")


# --- values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("keepalive", 4),
        ("keepalive", 3601),
        ("flush_interval", 0.05),
        ("flush_interval", 3601.0),
        ("last_seen_every", -1.0),
        ("last_seen_every", 86401.0),
        ("db_timeout", 0.0),
        ("db_timeout", 61.0),
        ("max_payload", 255),
        ("max_payload", 16 * 1024 * 1024 + 1),
        ("reconnect_max", 0.4),
        ("reconnect_max", 301.0),
        ("log_level", "LOUD"),
        ("storm_window", -1.0),
        ("storm_count", 0),
        ("storm_share", 0.0),
        ("storm_share", 1.5),
        ("storm_max_ids", 0),
        ("reminder_interval", 0.5),
        ("notify_retries", -1),
        ("notify_retries", 21),
    ],
)
def test_out_of_range_value_is_an_error_naming_the_option(option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{option}:"):
        load_config(None, **{option: value})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("keepalive", 5),
        ("keepalive", 3600),
        ("flush_interval", 0.1),
        ("last_seen_every", 0.0),
        ("last_seen_every", 86400.0),
        ("db_timeout", 60.0),
        ("max_payload", 256),
        ("max_payload", 16 * 1024 * 1024),
        ("reconnect_max", 0.5),
        ("reconnect_max", 300.0),
        ("log_level", "warning"),
        ("storm_window", 0.0),
        ("storm_share", 1.0),
        ("reminder_interval", 1.0),
        ("notify_retries", 0),
    ],
)
def test_boundary_value_is_accepted(option: str, value: object) -> None:
    assert getattr(load_config(None, **{option: value}), option) == value


@pytest.mark.parametrize("url", ["nonsense", "http://localhost:1883", "mqtt://", "mqtt://localhost:99999"])
def test_bad_broker_url_is_an_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^broker:"):
        load_config(broker=url)


def test_bad_broker_url_error_hides_the_password() -> None:
    with pytest.raises(ConfigError, match=r"^broker:") as raised:
        load_config(broker="mqtt://admin:s3cret@mqtt.internal:1883/path")
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize("url", ["mqtt://localhost:1883", "mqtts://user:pw@broker.example:8883", "mqtt://[::1]:1883"])
def test_good_broker_url_is_accepted(url: str) -> None:
    assert load_config(broker=url).broker == url


@pytest.mark.parametrize("listen", ["localhost", ":1883", "127.0.0.1:", "127.0.0.1:port", "127.0.0.1:0", "h:65536"])
def test_bad_listen_address_is_an_error(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^listen: expected HOST:PORT"):
        load_config(listen=listen)


def test_ipv6_listen_address_is_split_into_host_and_port() -> None:
    assert load_config(listen="[::1]:18830").listen_address == ("::1", 18830)


def test_http_is_off_by_default() -> None:
    assert load_config().http_address is None


def test_http_address_is_split_into_host_and_port() -> None:
    assert load_config(http="127.0.0.1:8080").http_address == ("127.0.0.1", 8080)


def test_http_is_read_from_the_file(write_config: WriteConfig) -> None:
    assert load_config(write_config("http: 0.0.0.0:9100\n")).http == "0.0.0.0:9100"


@pytest.mark.parametrize("http", ["8080", ":8080", "localhost:", "127.0.0.1:0", "127.0.0.1:http"])
def test_bad_http_address_is_an_error(http: str) -> None:
    with pytest.raises(ConfigError, match=r"^http: expected HOST:PORT"):
        load_config(http=http)


@pytest.mark.parametrize("db", ["mysql://user@host/db", "sqlite://relative.db", ""])
def test_bad_database_url_scheme_is_an_error(db: str) -> None:
    """A plain path is a SQLite file (``--db heartbeat.db``): test_discovery.py; any other scheme is refused."""
    with pytest.raises(ConfigError, match=r"^db: expected a file path, sqlite:///PATH or postgresql://"):
        load_config(db=db)


@pytest.mark.parametrize("db", ["sqlite:///x.db", "postgres://u@h/d", "postgresql://u:p@h:5432/d"])
def test_supported_database_url_is_accepted(db: str) -> None:
    assert load_config(db=db).db == db


@pytest.mark.parametrize("prefix", ["site/+", "site/#", "/site", "site/", "", "a\0b"])
def test_bad_prefix_is_an_error(prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"^prefix:"):
        load_config(prefix=prefix)


@pytest.mark.parametrize("version", ["4", "3.1", "v5", "AUTO"])
def test_bad_mqtt_version_is_an_error(version: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("mqtt_version: one of auto, 5, 3.1.1")):
        load_config(mqtt_version=version)


@pytest.mark.parametrize(("yaml_text", "expected"), [("mqtt_version: 5\n", "5"), ("mqtt_version: 5.0\n", "5")])
def test_unquoted_mqtt_version_5_in_yaml_is_accepted(write_config: WriteConfig, yaml_text: str, expected: str) -> None:
    assert load_config(write_config(yaml_text)).mqtt_version == expected


def test_unquoted_mqtt_version_3_1_1_in_yaml_is_accepted(write_config: WriteConfig) -> None:
    assert load_config(write_config("mqtt_version: 3.1.1\n")).mqtt_version == "3.1.1"


def test_unquoted_unsupported_mqtt_version_in_yaml_is_an_error(write_config: WriteConfig) -> None:
    with pytest.raises(ConfigError, match=r"^mqtt_version: one of .* got '4'$"):
        load_config(write_config("mqtt_version: 4\n"))


# --- notify channels ----------------------------------------------------------------


def test_notify_entries_are_read_with_their_filters(write_config: WriteConfig) -> None:
    path = write_config(
        "notify:\n"
        "  - url: https://hooks.example.com/heartbeat\n"
        "  - url: ntfy://ntfy.sh/topic\n"
        "    events: [dead, outage]\n"
        "    runtimes: ['db-*', worker-7]\n"
        "    timeout: 3\n"
        "    name: ops chat\n"
        "  - command: /usr/local/bin/page --team infra\n"
        "  - command: [/usr/local/bin/page, --team, infra]\n"
    )
    hook, chat, shell_string, shell_list = load_config(path).notify
    assert hook == ChannelConfig(url="https://hooks.example.com/heartbeat")
    assert chat == ChannelConfig(
        url="ntfy://ntfy.sh/topic",
        events=("dead", "outage"),
        runtimes=("db-*", "worker-7"),
        timeout=3.0,
        name="ops chat",
    )
    assert shell_string.command == "/usr/local/bin/page --team infra"
    assert shell_list.command == ("/usr/local/bin/page", "--team", "infra")


def test_notify_accepts_bare_urls_from_the_command_line() -> None:
    assert load_config(notify=["json://127.0.0.1:9/"]).notify == (ChannelConfig(url="json://127.0.0.1:9/"),)


def test_notify_null_means_no_channels(write_config: WriteConfig) -> None:
    assert load_config(write_config("notify: null\n")).notify == ()


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("notify: https://hooks.example.com/x\n", r"^notify: expected a list of channels"),
        ("notify: {url: https://x}\n", r"^notify: expected a list of channels"),
        ("notify: [17]\n", r"^notify\[0\]: expected a mapping with url or command"),
        ("notify:\n  - url: https://x\n    evnts: [dead]\n", r"^notify\[0\]: unknown key\(s\) evnts"),
        ("notify:\n  - url: https://x\n    events: [deadd]\n", r"^notify\[0\]: unknown event\(s\) deadd"),
        ("notify:\n  - url: https://x\n    events: []\n", r"^notify\[0\]: events is empty"),
        ("notify:\n  - url: https://x\n    events: [1]\n", r"^notify\[0\]: events: expected a list of strings"),
        ("notify:\n  - url: https://x\n    runtimes: {a: b}\n", r"^notify\[0\]: runtimes: expected a list"),
        ("notify:\n  - url: https://x\n    command: /bin/true\n", r"^notify\[0\]: .*exactly one of url or command"),
        ("notify:\n  - name: lonely\n", r"^notify\[0\]: .*exactly one of url or command"),
        ("notify:\n  - url: https://x\n  - url: 5\n", r"^notify\[1\]: url: expected str"),
        ("notify:\n  - url: hooks.example.com\n", r"^notify\[0\]: url must look like SCHEME://"),
        ("notify:\n  - command: [ls, 3]\n", r"^notify\[0\]: command: expected a string or a list"),
        ("notify:\n  - command: ''\n", r"^notify\[0\]: command is empty"),
        ("notify:\n  - url: https://x\n    timeout: soon\n", r"^notify\[0\]: timeout: expected a number"),
        ("notify:\n  - url: https://x\n    timeout: 0\n", r"^notify\[0\]: timeout between"),
    ],
)
def test_bad_notify_entry_is_an_error_naming_it(write_config: WriteConfig, yaml_text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(yaml_text))


def test_reminder_interval_accepts_null_and_numbers(write_config: WriteConfig) -> None:
    assert load_config(write_config("reminder_interval: null\n")).reminder_interval is None
    assert load_config(write_config("reminder_interval: 3600\n")).reminder_interval == 3600


# --- frozen -------------------------------------------------------------------------


def test_config_is_frozen() -> None:
    config = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.keepalive = 60  # type: ignore[misc]


def test_config_validates_on_direct_construction() -> None:
    with pytest.raises(ConfigError, match=r"^keepalive:"):
        Config(keepalive=1)


# --- TLS files and the broker password --------------------------------------------

TLS_BROKER = "mqtts://hb~orchestrator@broker.example:8885"


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, str]:
    """Existing files standing in for CA, certificate and key: their content is read only on connect."""
    files = {}
    for name in ("tls_ca", "tls_cert", "tls_key"):
        path = tmp_path / f"{name}.pem"
        path.write_text("-----BEGIN PLACEHOLDER-----\n")
        files[name] = str(path)
    return files


def test_tls_client_certificate_options_are_read_from_the_file(
    write_config: WriteConfig, pem_files: dict[str, str]
) -> None:
    path = write_config("".join(f"{name}: {value}\n" for name, value in pem_files.items()) + f"broker: {TLS_BROKER}\n")
    config = load_config(path)
    assert (config.tls_ca, config.tls_cert, config.tls_key) == (
        pem_files["tls_ca"],
        pem_files["tls_cert"],
        pem_files["tls_key"],
    )


@pytest.mark.parametrize("option", ["tls_ca", "tls_cert", "tls_key"])
def test_missing_tls_file_is_an_error_naming_option_and_path(
    tmp_path: Path, pem_files: dict[str, str], option: str
) -> None:
    missing = str(tmp_path / "nowhere.pem")
    with pytest.raises(ConfigError, match=rf"^{option}: no such file: {re.escape(missing)}"):
        load_config(broker=TLS_BROKER, **{**pem_files, option: missing})


@pytest.mark.parametrize("alone", ["tls_cert", "tls_key"])
def test_client_certificate_and_key_go_together(pem_files: dict[str, str], alone: str) -> None:
    with pytest.raises(ConfigError, match=r"^tls_cert and tls_key go together"):
        load_config(broker=TLS_BROKER, **{alone: pem_files[alone]})


def test_tls_files_with_a_plaintext_broker_are_an_error(pem_files: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"not mqtts://"):
        load_config(broker="mqtt://broker.example:1883", tls_cert=pem_files["tls_cert"], tls_key=pem_files["tls_key"])


def test_client_certificate_without_a_broker_is_an_error(pem_files: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="embedded broker has no TLS"):
        load_config(tls_cert=pem_files["tls_cert"], tls_key=pem_files["tls_key"])


def test_broker_password_comes_from_the_environment_when_the_url_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEARTBEAT_BROKER_PASSWORD", "from-env")
    config = load_config(broker=TLS_BROKER)
    address = config.broker_address(TLS_BROKER)
    assert (address.username, address.password) == ("hb~orchestrator", "from-env")


def test_password_in_the_url_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEARTBEAT_BROKER_PASSWORD", "from-env")
    url = "mqtts://hb~orchestrator:in-url@broker.example:8885"
    assert load_config(broker=url).broker_address(url).password == "in-url"


def test_environment_password_is_not_in_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEARTBEAT_BROKER_PASSWORD", "from-env")
    assert "from-env" not in repr(load_config(broker=TLS_BROKER))

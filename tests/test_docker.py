"""The container files agree with the code, checked without a Docker engine.

A Dockerfile or compose file that passes a flag the CLI no longer has, or a
YAML key Config does not know, only fails once deployed; these tests make it
fail here instead. The health check module is exercised against a real
Mosquitto, since the image's health depends on it.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import io
import json
import re
import shlex
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest
import yaml

from orchestrator import healthcheck
from orchestrator.broker import free_port
from orchestrator.cli import build_parser as orchestrator_parser
from orchestrator.config import load_config
from runtime_agent.protocol import DEFAULT_PREFIX, Topics

from .harness import MosquittoBroker

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"


# --- helpers -------------------------------------------------------------------


def parse_or_fail(parser: argparse.ArgumentParser, argv: Sequence[str], what: str) -> argparse.Namespace:
    """``parser.parse_args``, turning argparse's SystemExit into a readable test failure."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(list(argv))
    except SystemExit:
        pytest.fail(f"{what}: {shlex.join(argv)!r} is rejected by {parser.prog}: {stderr.getvalue().strip()}")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends with a line continuation"
    return instructions


def instruction(name: str) -> list[str]:
    return [rest for keyword, rest in dockerfile_instructions() if keyword == name]


def last_exec_form(name: str) -> list[str]:
    """The last ENTRYPOINT or CMD, which must be in exec (JSON) form so signals reach our process."""
    values = instruction(name)
    assert values, f"Dockerfile has no {name}"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list), f"{name} must be in exec form (a JSON list)"
    assert all(isinstance(item, str) for item in parsed)
    return parsed


def expand_shell_defaults(text: str, env: dict[str, str]) -> str:
    """Expand ``${VAR:-default}`` and ``${VAR}`` the way /bin/sh would for the HEALTHCHECK."""

    def expand(match: re.Match[str]) -> str:
        value = env.get(match["name"])
        return value if value else (match["default"] or "")

    return re.sub(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}", expand, text)


def healthcheck_argv(env: dict[str, str]) -> list[str]:
    """The arguments the image's HEALTHCHECK passes to ``python -m orchestrator.healthcheck``."""
    (line,) = instruction("HEALTHCHECK")
    _, sep, command = line.partition("CMD ")
    assert sep, "HEALTHCHECK needs a CMD"
    words = shlex.split(expand_shell_defaults(command, env))
    assert words[:3] == ["python", "-m", "orchestrator.healthcheck"], f"unexpected HEALTHCHECK command {words}"
    return words[3:]


def console_scripts() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return {line.split("=", 1)[0].strip() for line in lines if line.strip()}


def option(argv: Sequence[str], flag: str) -> str:
    index = list(argv).index(flag)
    return argv[index + 1]


# --- compose ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    result = compose["services"]
    assert isinstance(result, dict)
    return result


def mounted_source(service: dict[str, Any], target: str) -> Path:
    """The file on this side of a ``./file:/target[:ro]`` bind mount, resolved like compose does."""
    volumes: list[str] = service.get("volumes", [])
    for volume in volumes:
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target and source.startswith("."):
            return (DOCKER / source).resolve()
    pytest.fail(f"nothing is mounted on {target}")


def test_compose_has_the_four_services(services: dict[str, Any]) -> None:
    assert set(services) == {"mosquitto", "postgres", "orchestrator", "agent"}


def test_orchestrator_command_parses_and_configures(services: dict[str, Any]) -> None:
    service = services["orchestrator"]
    assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    args = parse_or_fail(orchestrator_parser(), service["command"], "compose orchestrator command")
    assert args.command == "run"
    assert args.broker == "mqtt://mosquitto:1883"
    assert args.db.startswith("postgresql://heartbeat:heartbeat@postgres:5432/heartbeat")

    config_file = mounted_source(service, args.config)
    config = load_config(config_file, broker=args.broker, db=args.db, prefix=args.prefix, log_level=args.log_level)
    assert config.broker == args.broker
    assert config.db == args.db


def test_orchestrator_depends_on_ready_backends(services: dict[str, Any]) -> None:
    depends = services["orchestrator"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["mosquitto"]["condition"] == "service_started"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["orchestrator"]["restart"] == "unless-stopped"


def test_postgres_credentials_match_the_orchestrator_url(services: dict[str, Any]) -> None:
    env = services["postgres"]["environment"]
    db = option(services["orchestrator"]["command"], "--db")
    expected = f"postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}"
    assert db == expected


def test_agent_command_parses(services: dict[str, Any]) -> None:
    from runtime_agent.cli import build_parser as agent_parser

    service = services["agent"]
    assert service["image"] == services["orchestrator"]["image"]
    entrypoint = service["entrypoint"]
    assert entrypoint == ["heartbeat-agent"]
    assert entrypoint[0] in console_scripts()
    args = parse_or_fail(agent_parser(), service["command"], "compose agent command")
    assert args.id == "example-1"
    assert float(args.interval) == 5
    assert args.broker == option(services["orchestrator"]["command"], "--broker")
    run = parse_or_fail(orchestrator_parser(), services["orchestrator"]["command"], "compose orchestrator command")
    assert args.prefix == load_config(mounted_source(services["orchestrator"], run.config)).prefix
    assert service["depends_on"]["orchestrator"]["condition"] == "service_healthy"
    # The image's HEALTHCHECK watches the orchestrator, so it would say nothing true about the agent.
    assert service["healthcheck"] == {"disable": True}


def test_orchestrator_healthcheck_targets_what_it_runs(services: dict[str, Any]) -> None:
    """The image's HEALTHCHECK, with compose's environment, reads the broker and prefix the orchestrator uses."""
    service = services["orchestrator"]
    args = parse_or_fail(
        healthcheck.build_parser(), healthcheck_argv(service.get("environment", {})), "HEALTHCHECK under compose"
    )
    run = parse_or_fail(orchestrator_parser(), service["command"], "compose orchestrator command")
    config = load_config(mounted_source(service, run.config), broker=run.broker, prefix=run.prefix)
    assert args.broker == config.broker
    assert args.prefix == config.prefix


def test_mosquitto_config_is_mounted(services: dict[str, Any]) -> None:
    service = services["mosquitto"]
    assert service["image"].startswith("eclipse-mosquitto:2")
    conf = mounted_source(service, "/mosquitto/config/mosquitto.conf")
    lines = [line.split("#")[0].split() for line in conf.read_text().splitlines()]
    settings = {words[0]: words[1:] for words in lines if words}
    assert settings["listener"] == ["1883"]
    assert settings["allow_anonymous"] == ["true"]
    assert settings["persistence"] == ["true"]


# --- Dockerfile ------------------------------------------------------------------


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = instruction("USER")
    assert users, "Dockerfile has no USER: the orchestrator would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert "10001" in " ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "RUN")


def test_dockerfile_base_and_workdir() -> None:
    assert all(base.split()[0] == "python:3.11-slim" for base in instruction("FROM"))
    assert instruction("WORKDIR")[-1] == "/data"


def test_dockerfile_entrypoint_is_a_declared_console_script() -> None:
    entrypoint = last_exec_form("ENTRYPOINT")
    assert entrypoint[0] in console_scripts()
    assert entrypoint == ["heartbeat-orchestrator"]


def test_dockerfile_default_command_parses_and_its_config_is_baked_in() -> None:
    args = parse_or_fail(orchestrator_parser(), last_exec_form("CMD"), "Dockerfile CMD")
    assert args.command == "run"
    copies = [rest.split() for rest in instruction("COPY")]
    sources = [words[-2] for words in copies if words[-1] == args.config and not words[0].startswith("--from")]
    assert sources, f"the CMD reads {args.config}, which no COPY puts in the image"
    load_config(ROOT / sources[0])


def test_dockerfile_healthcheck_parses_with_defaults() -> None:
    args = parse_or_fail(healthcheck.build_parser(), healthcheck_argv({}), "HEALTHCHECK with its defaults")
    assert args.broker == "mqtt://mosquitto:1883"
    assert args.prefix == DEFAULT_PREFIX
    (line,) = instruction("HEALTHCHECK")
    docker_timeout = re.search(r"--timeout=(\d+)s", line)
    assert docker_timeout, "HEALTHCHECK needs an explicit --timeout"
    assert args.timeout < int(docker_timeout[1]), "the check must give up before Docker kills it"


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``**`` spans directories, ``*`` and ``?`` do not."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; a matched directory excludes its contents."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = dockerignore_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_build_needs() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ("setup.cfg", "pyproject.toml", "orchestrator/cli.py", "runtime_agent/protocol.py"):
        assert not dockerignored(needed, patterns), f".dockerignore excludes {needed}, which the build needs"
    for copy in instruction("COPY"):
        words = copy.split()
        if words[0].startswith("--from") or words[0] == ".":
            continue
        assert (ROOT / words[0]).exists(), f"COPY {words[0]}: no such file in the build context"
        assert not dockerignored(words[0], patterns), f"COPY {words[0]} is excluded by .dockerignore"
    for junk in (".git/HEAD", "venv/bin/python", "orchestrator/__pycache__/cli.pyc", "heartbeat.db", "data/x.db"):
        assert dockerignored(junk, patterns), f".dockerignore lets {junk} into the build context"


# --- orchestrator.healthcheck against a real broker ---------------------------------


@pytest.fixture
def state_topic() -> str:
    return Topics(DEFAULT_PREFIX).orchestrator_state


def retain(broker: MosquittoBroker, topic: str, payload: bytes) -> None:
    mqtt_publish.single(topic, payload, qos=1, retain=True, hostname="127.0.0.1", port=broker.port)


@contextlib.contextmanager
def quick(limit: float) -> Iterator[None]:
    started = time.monotonic()
    yield
    elapsed = time.monotonic() - started
    assert elapsed < limit, f"took {elapsed:.1f} s, more than {limit} s"


def run_check(broker_url: str, *extra: str, timeout: float = 0.5) -> int:
    return healthcheck.main(["--broker", broker_url, "--timeout", str(timeout), *extra])


def test_healthcheck_unhealthy_when_nothing_is_retained(
    mosquitto: MosquittoBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    with quick(3):
        assert run_check(mosquitto.url) == 1
    assert "no retained state" in capsys.readouterr().err


def test_healthcheck_follows_the_retained_state(
    mosquitto: MosquittoBroker, state_topic: str, capsys: pytest.CaptureFixture[str]
) -> None:
    retain(mosquitto, state_topic, b'{"state": "online"}')
    with quick(2):
        assert run_check(mosquitto.url, timeout=2) == 0
    assert "online" in capsys.readouterr().out

    retain(mosquitto, state_topic, b'{"state": "offline"}')
    with quick(2):
        assert run_check(mosquitto.url, timeout=2) == 1
    assert "offline" in capsys.readouterr().err

    retain(mosquitto, state_topic, b"not json")
    with quick(2):
        assert run_check(mosquitto.url, timeout=2) == 1
    assert "unreadable" in capsys.readouterr().err


def test_healthcheck_reads_its_own_prefix(mosquitto: MosquittoBroker, capsys: pytest.CaptureFixture[str]) -> None:
    retain(mosquitto, Topics("site-a/hb").orchestrator_state, b'{"state": "online"}')
    assert run_check(mosquitto.url) == 1
    assert run_check(mosquitto.url, "--prefix", "site-a/hb", timeout=2) == 0


def test_healthcheck_unhealthy_against_a_closed_port(capsys: pytest.CaptureFixture[str]) -> None:
    with quick(2):
        assert run_check(f"mqtt://127.0.0.1:{free_port()}") == 1
    assert "cannot connect" in capsys.readouterr().err


def test_healthcheck_rejects_a_bad_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check("127.0.0.1:1883") == 1
    assert "missing scheme" in capsys.readouterr().err

"""The agent installs on its own: paho-mqtt and aiomqtt, nothing of the orchestrator.

An agent host runs ``pip install heartbeat-monitor`` (README, "Agent-only
install"); the orchestrator's dependencies come only with the
``orchestrator`` extra. The slow tests install this checkout that way into
a fresh venv (no system site-packages) and run what an agent host runs. The
fast ones read the sources and setup.cfg, so that an import or a dependency
that would break the light install fails here at once, with its file and line.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
OWN_PACKAGES = {"orchestrator", "runtime_agent"}
AGENT_DISTRIBUTIONS = {"paho-mqtt", "aiomqtt"}
AGENT_IMPORTS = {"paho", "aiomqtt"}
ORCHESTRATOR_ONLY_MODULES = (
    "amqtt",
    "apprise",
    "aiohttp",
    "peewee",
    "playhouse",
    "psycopg2",
    "prometheus_client",
    "mqtt5",
    "yaml",
)
"""What the orchestrator extra brings (import names); none of it may be importable on an agent host."""

PROJECT_FILES = ("setup.cfg", "pyproject.toml", "README.md", "orchestrator", "runtime_agent")
"""What a build of the project reads: copied, so that pip builds there and never in this work tree."""


# --- the sources and setup.cfg (fast) ----------------------------------------------


def third_party_imports(package: str) -> dict[str, list[str]]:
    """Top-level modules that ``package`` imports from outside the standard library and this project, with where."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top != package:
                    found.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def requirement_names(lines: str) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in lines.splitlines() if line.strip()}


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def test_the_agent_imports_only_the_standard_library_paho_and_aiomqtt() -> None:
    outside = {m: where for m, where in third_party_imports("runtime_agent").items() if m not in AGENT_IMPORTS}
    assert not outside, f"runtime_agent/ imports what an agent host does not install: {outside}"


def test_the_projects_own_dependencies_are_the_agents_only() -> None:
    assert requirement_names(setup_cfg()["options"]["install_requires"]) == AGENT_DISTRIBUTIONS, (
        "install_requires is what every agent host installs: put the orchestrator's dependencies "
        "in the orchestrator extra instead"
    )


def test_the_orchestrator_extra_declares_what_the_orchestrator_imports() -> None:
    cfg = setup_cfg()
    declared = requirement_names(cfg["options"]["install_requires"])
    declared |= requirement_names(cfg["options.extras_require"]["orchestrator"])
    distributions = importlib.metadata.packages_distributions()
    missing = {
        module: where
        for module, where in third_party_imports("orchestrator").items()
        if module not in OWN_PACKAGES
        and not {canonicalize_name(d) for d in distributions.get(module, [module])} & declared
    }
    assert not missing, f"orchestrator/ imports what neither install_requires nor the orchestrator extra has: {missing}"


def test_the_test_extra_brings_the_orchestrator() -> None:
    """./run-tests installs ``.[test]`` and the suite runs the orchestrator."""
    assert "heartbeat-monitor[orchestrator]" in setup_cfg()["options.extras_require"]["test"].split()


# --- a real agent-only install (slow) -----------------------------------------------


@dataclass(frozen=True)
class AgentHost:
    venv: Path
    cwd: Path
    env: dict[str, str]

    def run(self, *argv: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def checked(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def agent_host(tmp_path_factory: pytest.TempPathFactory) -> AgentHost:
    """A fresh venv with this checkout installed as the README's agent-only install does (``pip install .``)."""
    base = tmp_path_factory.mktemp("agent-host")
    source = base / "source"
    for name in PROJECT_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # Nothing of this test run's environment: no PYTHONPATH to this checkout, no active venv.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    env |= {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    cwd = base / "elsewhere"  # not the source: `python -c` puts its cwd first on sys.path
    cwd.mkdir()
    host = AgentHost(venv=base / "venv", cwd=cwd, env=env)
    checked(host.run(sys.executable, "-m", "venv", host.venv))
    checked(host.run(host.python, "-m", "pip", "install", "--quiet", source, timeout=120))
    return host


PROBE = f"""
import importlib.util, json, sys
import runtime_agent
from runtime_agent import Agent, AsyncAgent
import runtime_agent.cli
print(json.dumps({{
    "file": runtime_agent.__file__,
    "agents": [Agent.__name__, AsyncAgent.__name__],
    "loaded": sorted({{m.split(".")[0] for m in sys.modules}} & set({[*ORCHESTRATOR_ONLY_MODULES, "orchestrator"]!r})),
    "importable": [m for m in {ORCHESTRATOR_ONLY_MODULES!r} if importlib.util.find_spec(m) is not None],
}}))
"""


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_an_agent_only_install_has_both_agents_and_nothing_of_the_orchestrator(agent_host: AgentHost) -> None:
    # -I: no user site-packages, no PYTHONPATH, no cwd on sys.path; only the venv.
    probe = json.loads(checked(agent_host.run(agent_host.python, "-I", "-c", PROBE)).stdout)
    assert Path(probe["file"]).is_relative_to(agent_host.venv), probe["file"]
    assert probe["agents"] == ["Agent", "AsyncAgent"]
    assert probe["loaded"] == [], "importing the agent loaded orchestrator code or its dependencies"
    installed = agent_host.run(agent_host.python, "-m", "pip", "list", "--format=freeze").stdout
    assert probe["importable"] == [], f"the orchestrator's dependencies are installed:\n{installed}"


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_an_agent_only_install_is_consistent(agent_host: AgentHost) -> None:
    """No requirement of the project or its dependencies is missing (as with ``pip install --no-deps``)."""
    checked(agent_host.run(agent_host.python, "-m", "pip", "check"))


@pytest.mark.e2e
@pytest.mark.timeout(180)
@pytest.mark.parametrize("command", [["heartbeat-agent"], ["python", "-m", "runtime_agent"]])
def test_an_agent_only_install_runs_the_agent_cli(agent_host: AgentHost, command: list[str]) -> None:
    executable, *args = command
    result = checked(agent_host.run(agent_host.venv / "bin" / executable, *args, "--help"))
    assert result.stdout.startswith("usage: heartbeat-agent "), result.stdout
    assert "--broker" in result.stdout


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_the_orchestrator_in_an_agent_only_install_says_how_to_install_it(agent_host: AgentHost) -> None:
    result = agent_host.run(agent_host.venv / "bin" / "heartbeat-orchestrator", "run")
    assert result.returncode == 1
    assert "pip install 'heartbeat-monitor[orchestrator]'" in result.stderr
    assert "Traceback" not in result.stderr

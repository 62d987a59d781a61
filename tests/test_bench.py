"""``python -m bench --quick --json`` runs every scenario and prints its figures.

A smoke test for the benchmark itself (it starts Mosquitto, orchestrators,
load generators, amqtt): every scenario must print one JSON line with its
keys and no error. No timing is asserted: CI machines are too noisy for that,
and the figures belong in docs/performance.md, from a full run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

KEYS = {
    "generator": {"unpaced_per_s", "cpu_at_100k", "end_to_end_per_s"},
    "ingest": {"pulses_per_s", "baseline_per_s", "ratio", "ceiling_per_s", "ceiling_ratio"},
    "startup": {"ready_s"},
    "memory": {"bytes_per_runtime"},
    "steady_writes": {"tx_per_s"},
    "latency": {"p50_ms", "p99_ms", "max_ms", "false_dead"},
    "mass_death": {"all_dead_after_s", "db_transactions"},
    "scaling": {"us_per_pulse", "growth"},
    "will_storm": {"all_dead_after_s"},
    "embedded": {"pulses_per_s", "baseline_per_s", "ratio"},
    "registration": {"lost", "max_reply_s"},
}


def _run(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` from the checkout, output captured."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_quick_bench_prints_every_scenario_with_its_keys() -> None:
    from bench.__main__ import SCENARIOS

    assert set(SCENARIOS) == set(KEYS), "a new scenario needs its keys listed here"
    done = _run("bench", "--quick", "--json", timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {}
    for line in done.stdout.splitlines():
        doc = json.loads(line)
        results[doc["scenario"]] = doc
    assert list(results) == SCENARIOS, done.stderr[-3000:]
    for name, doc in results.items():
        assert "error" not in doc, f"{name}: {doc.get('error')}\n{done.stderr[-3000:]}"
        missing = KEYS[name] - doc.keys()
        assert not missing, f"{name} did not print {sorted(missing)}"
        assert set(doc["targets"]) <= doc.keys()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_broker_cost_prints_the_brokers_share_for_one_consumer() -> None:
    done = _run("bench.broker_cost", "mosquitto_sub", "20000", "3", timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mosquitto_sub at 20,000/s" in done.stdout
    assert "all received" in done.stdout, done.stdout
    for figure in ("µs/pulse", "reads and", "bytes per TCP segment", "bytes retransmitted", "consumer:"):
        assert figure in done.stdout, done.stdout

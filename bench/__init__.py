"""Benchmarks for the heartbeat orchestrator at scale: ``python -m bench`` (see ``python -m bench --help``).

Every scenario starts its own Mosquitto on a free loopback port, its own
orchestrator process and its own SQLite database, measures, and prints the
figures next to their targets. Nothing here asserts: a benchmark reports.
"""

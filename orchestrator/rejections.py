"""Rejected input is counted by reason and logged once per runtime ID, never once per message."""

from __future__ import annotations

import collections
import logging

from runtime_agent import protocol

log = logging.getLogger("orchestrator")

_MAX_LOGGED_IDS = 10_000
"""IDs remembered as logged; past that, rejections are only counted (random IDs must not grow memory)."""


class Rejections:
    """Counts ``rejected.{reason}`` in the shared stats and logs the first rejection of each key."""

    def __init__(self, stats: collections.Counter[str]) -> None:
        self.stats = stats
        self._logged: set[str] = set()

    def __call__(self, reason: str, key: str, what: str | None = None) -> None:
        self.stats[f"rejected.{reason}"] += 1
        key = key[: protocol.MAX_ID_LENGTH + 1]  # remembered by a bounded prefix: topics may hold 64 kB IDs
        if key in self._logged or len(self._logged) >= _MAX_LOGGED_IDS:
            return
        self._logged.add(key)
        log.warning("rejected %s: %s (logged once per ID)", (what or reason), shown(key))


def shown(value: str) -> str:
    """A value from the wire, quoted and cut to a readable length for a log line."""
    return repr(value if len(value) <= 80 else value[:77] + "...")


def shown_id(value: str) -> str:
    """A runtime ID cut to 200 characters, for a reply (an invalid ID may be 64 kB)."""
    return value if len(value) <= 200 else value[:200]

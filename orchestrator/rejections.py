"""Rejected input is counted by reason and logged once per runtime ID, never once per message."""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping

from runtime_agent import protocol

log = logging.getLogger("orchestrator")

_MAX_LOGGED_IDS = 10_000
"""IDs remembered as logged; past that, rejections are only counted (random IDs must not grow memory)."""
_COMMAND_KEY = "command:"
"""How the keys of rejected commands begin: one per reason, ours rather than anything the sender named."""
_UNREGISTERED = " from unregistered runtime"
"""How the intake words a message from an unknown ID, which a malformed ID always is."""


class Rejections:
    """Counts ``rejected.{reason}`` in the shared stats and logs the first rejection of each key."""

    def __init__(self, stats: collections.Counter[str]) -> None:
        self.stats = stats
        self._logged: set[str] = set()

    def __call__(self, reason: str, key: str, what: str | None = None) -> None:
        """Count a rejection; log it if it is the first of ``key`` (a runtime ID, a topic, or ``command:...``).

        ``what`` says what was rejected and why (``pulse: ...``, ``state from
        unregistered runtime``); without it the line gives ``reason``.
        """
        self.stats[f"rejected.{reason}"] += 1
        key = key[: protocol.MAX_ID_LENGTH + 1]  # remembered by a bounded prefix: topics may hold 64 kB IDs
        if key in self._logged or len(self._logged) >= _MAX_LOGGED_IDS:
            return
        self._logged.add(key)
        log.warning("rejected %s (logged once per ID)", describe(reason, key, what))


def describe(reason: str, key: str, what: str | None = None) -> str:
    """What a rejection's log line says: what was rejected and why, naming the runtime ID (or topic) once.

    A malformed runtime ID is called that, after the kind of message it came
    with (``pulse: bad runtime id 'x y'``): the protocol's error for it quotes
    the ID and ends in the ID alphabet's ``:``, and with the ID appended the
    line read ``... . _ - :: 'x y'``. A command's key is our own, not worth
    showing: its ``what`` names the fault.
    """
    if what is None:
        return f"{reason}: {shown(key)}"
    if key.startswith(_COMMAND_KEY) and what.startswith(("command", "retained command")):
        return what
    if reason == "bad_id" or (reason == "unregistered" and not protocol.is_valid_id(key)):
        kind = what.partition(":")[0].removesuffix(_UNREGISTERED)
        return f"{kind}: bad runtime id {shown(key)}"
    return f"{what}: {shown(key)}"


def summary(stats: Mapping[str, int]) -> str:
    """The rejections counted so far as ``reason=count`` pairs by reason (``none`` if none), for a log line."""
    counts = sorted((k.removeprefix("rejected."), n) for k, n in stats.items() if k.startswith("rejected.") and n)
    return " ".join(f"{reason}={n}" for reason, n in counts) or "none"


def shown(value: str) -> str:
    """A value from the wire, quoted and cut to a readable length for a log line."""
    return repr(value if len(value) <= 80 else value[:77] + "...")


def shown_id(value: str) -> str:
    """A runtime ID cut to 200 characters, for a reply (an invalid ID may be 64 kB)."""
    return value if len(value) <= 200 else value[:200]

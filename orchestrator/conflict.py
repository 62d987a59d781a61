"""Two connections claiming one runtime ID: noticed from sessions, without a clock or I/O.

Every connection of an agent has its own session number (in its birth,
will and pulses). One runtime normally changes session only when it
reconnects. When two processes share an ID, sessions keep changing: with the
same MQTT client ID the broker hands the connection back and forth; with
different ones, pulses of two sessions interleave. Either way the detector
must not flap between dead and alive, and people must hear of it once.
"""

from __future__ import annotations

from typing import Final

SIGNS: Final = 3
"""Session changes (or pulses from a session that is not the newest) within a window that make a conflict.

A reconnect gives one change, and at most one pulse of the new session may
arrive before its birth (they travel on different connections): two signs.
"""
_MAX_TRACKED: Final = 50_000


class ConflictWatch:
    """Counts signs of a shared runtime ID per runtime; says when to raise ``conflict``.

    ``window`` for a runtime is chosen by the caller (a multiple of its
    interval + grace). While a runtime is in conflict its wills are ignored:
    the other claimant may still be alive, and silence (the deadline) decides.
    """

    def __init__(self) -> None:
        self._signs: dict[str, tuple[float, int]] = {}
        self._raised: dict[str, float] = {}

    def sign(self, runtime_id: str, now: float, window: float) -> bool:
        """Record one sign; True when this one makes a conflict worth announcing (once per quiet spell)."""
        start, count = self._signs.get(runtime_id, (now, 0))
        if now - start > window:
            start, count = now, 0
        count += 1
        if count < SIGNS:
            if len(self._signs) >= _MAX_TRACKED:
                self._signs.clear()  # a mass reconnect: forget, never grow without bound
            self._signs[runtime_id] = (start, count)
            return False
        self._signs.pop(runtime_id, None)
        last = self._raised.get(runtime_id)
        self._raised[runtime_id] = now
        if len(self._raised) > _MAX_TRACKED:
            self._raised.pop(next(iter(self._raised)))
        return last is None or now - last > window

    def in_conflict(self, runtime_id: str, now: float, window: float) -> bool:
        """Whether a conflict was seen within ``window``."""
        last = self._raised.get(runtime_id)
        return last is not None and now - last <= window

    def forget(self, runtime_id: str) -> None:
        self._signs.pop(runtime_id, None)
        self._raised.pop(runtime_id, None)

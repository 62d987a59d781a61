"""Wall-clock times for display and storage, derived from the monotonic clock liveness is judged on."""

from __future__ import annotations

import time


class WallClock:
    """Maps monotonic readings to wall-clock Unix seconds through one anchor taken at start.

    A wall-clock jump after start moves neither verdicts nor displayed times.
    """

    def __init__(self) -> None:
        self.mono0 = time.monotonic()
        self.offset = time.time() - self.mono0
        """Wall-clock minus monotonic seconds: one addition maps a whole batch (the last-seen flush)."""

    def wall(self, mono: float) -> float:
        return mono + self.offset

    def wall_or_none(self, mono: float | None) -> float | None:
        return None if mono is None else self.wall(mono)

    def mono(self, wall: float) -> float:
        return wall - self.offset

"""What every command prints through, so all of them read alike: durations and ages for people, colour
only where it helps, errors on stderr."""

from __future__ import annotations

import os
import sys
from typing import TextIO

COLORS = {"alive": "32", "dead": "1;31", "stopped": "33", "unknown": "2", "recovered": "32"}
"""ANSI SGR codes per state (and alert event)."""


def error(message: object) -> int:
    print(f"heartbeat-orchestrator: error: {message}", file=sys.stderr)
    return 1


def use_color(mode: str, stream: TextIO) -> bool:
    """``always``/``never`` as said; ``auto`` colours a terminal unless NO_COLOR is set (https://no-color.org)."""
    if mode != "auto":
        return mode == "always"
    return stream.isatty() and not os.environ.get("NO_COLOR")


def paint(text: str, key: str | None, color: bool) -> str:
    code = COLORS.get(key or "")
    return f"\x1b[{code}m{text}\x1b[0m" if color and code else text


def duration(seconds: float, *, whole_seconds: bool = False) -> str:
    """'3.2 s' (or '3 s'), '5 min', '1.5 h', '2.0 d'."""
    if seconds < 60:
        return f"{seconds:.0f} s" if whole_seconds else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def ago(then: float | None, now: float) -> str:
    """'3 s ago', '5 min ago', 'never'."""
    if then is None:
        return "never"
    return f"{duration(max(0.0, now - then), whole_seconds=True)} ago"

"""What a scenario is told: quick or full, and what earlier scenarios of the same run found."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Context:
    quick: bool
    found: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Scenario name -> its JSON figures, for scenarios that build on an earlier one (latency on ingest)."""

    @property
    def idle_hold(self) -> float:
        """Seconds a process must stay idle to count as settled (shorter in quick runs)."""
        return 0.3 if self.quick else 1.0

    def say(self, message: str) -> None:
        """Progress, on stderr (stdout carries the table or the JSON lines)."""
        print(f"  {message}", file=sys.stderr, flush=True)

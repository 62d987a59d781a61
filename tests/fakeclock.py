"""A fake clock and a detector on it, for the pure modules' tests (the detector, the last-seen policy)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from orchestrator.detector import Detector


@dataclass
class FakeClock:
    """A plain float ``now`` that only moves when the test says so."""

    now: float = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at 1000.0."""
    return FakeClock()


@pytest.fixture
def det(clock: FakeClock) -> Detector:
    """A detector watching from the fake clock's now."""
    return Detector(now=clock.now)

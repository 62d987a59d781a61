"""Self-healing registration: a runtime that pulses unregistered gets its retained request fetched.

An interval request can miss the orchestrator (a broker queue overflowed, the
orchestrator was reconnecting) while its retained copy still sits on the
broker. Such a runtime pulses, every pulse is refused as unregistered, and
nobody would be told when it dies. A pulse from an unregistered runtime is
therefore a request to fetch its registration: the service subscribes to
that runtime's ``interval`` topic for a moment, the broker delivers the
retained copy, and the registrar registers it like any retained request.

This module is the bookkeeping, pure (``now`` is passed in): which IDs to
fetch, in batches, never the same one again within ``retry_after``, a
bounded number at once (pulses from random IDs must not grow memory), and
which registrations were such fetches (counted as healed).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tally:
    """Pulses from unregistered runtimes over one period, for the log line of that period."""

    pulses: int
    runtimes: int
    examples: tuple[str, ...]


class RegistrationHealer:
    """Decides which unregistered runtimes' retained registrations to fetch."""

    def __init__(
        self,
        *,
        retry_after: float = 60.0,
        batch: int = 5_000,
        max_wanted: int = 10_000,
        fetch_window: float = 30.0,
        examples: int = 5,
    ) -> None:
        self.retry_after = retry_after
        """Seconds before the same runtime's registration is fetched again (it may have none on the broker)."""
        self.batch = batch
        self.max_wanted = max_wanted
        self.fetch_window = fetch_window
        """Seconds after a fetch during which a retained registration of that runtime counts as healed."""
        self._wanted: dict[str, None] = {}
        """IDs waiting for a fetch, in order of their first unregistered pulse (an ordered set)."""
        self._tried: dict[str, float] = {}
        """ID -> when its registration was last fetched."""
        self._fetching: dict[str, float] = {}
        """ID -> until when a registration of it is the result of our fetch."""
        self._period_pulses = 0
        self._period_ids: dict[str, None] = {}
        self._examples = examples
        self.healed = 0
        self.fetched = 0

    def __len__(self) -> int:
        """How many runtimes wait for a fetch."""
        return len(self._wanted)

    def unregistered_pulse(self, runtime_id: str, now: float) -> bool:
        """Note a pulse from an unregistered (valid) ID; True if it now waits for a fetch (wake the fetcher)."""
        self._period_pulses += 1
        if len(self._period_ids) < self.max_wanted:
            self._period_ids[runtime_id] = None
        if runtime_id in self._wanted or len(self._wanted) >= self.max_wanted:
            return False
        tried = self._tried.get(runtime_id)
        if tried is not None and now - tried < self.retry_after:
            return False
        self._wanted[runtime_id] = None
        return True

    def take(self, now: float) -> list[str]:
        """The next batch of IDs to fetch; each is then not wanted again for ``retry_after`` seconds."""
        ids = list(itertools.islice(self._wanted, self.batch))
        for runtime_id in ids:
            del self._wanted[runtime_id]
            self._tried[runtime_id] = now
            self._fetching[runtime_id] = now + self.fetch_window
        self.fetched += len(ids)
        self._prune(now)
        return ids

    def registered(self, runtime_id: str, now: float) -> bool:
        """A runtime was registered from a retained request: True (and counted) if our fetch brought it."""
        self._wanted.pop(runtime_id, None)
        if not self.claim(runtime_id, now):
            return False
        self.healed += 1
        return True

    def claim(self, runtime_id: str, now: float) -> bool:
        """Whether a retained request of this runtime is the copy our fetch brought (asked once per fetch)."""
        until = self._fetching.pop(runtime_id, None)
        return until is not None and now <= until

    def tally(self) -> Tally | None:
        """The pulses from unregistered runtimes since the last call (None if there were none); starts a new period."""
        if not self._period_pulses:
            return None
        out = Tally(self._period_pulses, len(self._period_ids), tuple(list(self._period_ids)[: self._examples]))
        self._period_pulses = 0
        self._period_ids = {}
        return out

    def _prune(self, now: float) -> None:
        if len(self._tried) > 10 * self.max_wanted:
            self._tried = {k: t for k, t in self._tried.items() if now - t < self.retry_after}
        if len(self._fetching) > 10 * self.max_wanted:
            self._fetching = {k: t for k, t in self._fetching.items() if t >= now}

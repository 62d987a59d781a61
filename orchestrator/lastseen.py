"""Which runtimes' last-seen times go to the database, and when.

Pure, like the detector that feeds it: no clock, no I/O. The detector judges
liveness from every pulse, but the database does not need to hear of every
pulse. This policy picks a runtime's time only at moments when the detector
already does work for that runtime, so a pulse costs the database nothing:

* a re-arm of its deadline (about once per ``interval + grace``) picks the
  newest time once the runtime has entered a new period of ``every``
  seconds since the time picked before. 100,000 runtimes pulsing every 2 s
  make some 1,700 rows a second (``every`` 60 s), not 20,000.
* a change of state, or a first sign of life, forces the exact time. A dead
  runtime's stored last-seen is then its last pulse, and the database stops
  saying 'never' as soon as that is no longer true.

Each runtime's periods start at its own phase, so runtimes registered or
restored together are not all picked in the same flush, period after
period. The phase comes from the CRC-32 of the ID, not from ``hash()``:
``hash()`` of a string is salted per process, so every restart (and every
orchestrator of a pair) moved the period boundaries.

Both things the policy keeps per runtime live in the detector's record, in
``__slots__`` slots that only this module reads or writes. The time last
handed out is ``stored``: 8 B a runtime, where a dict of its own would
cost 40-80 B and a second lookup. The phase is ``phase``, a float shared
from a table of :data:`PHASES`: 16 B a runtime (the record grows to the
next 16-byte size class), 2 % of the orchestrator's 830 B. Computing it at
each re-arm instead (encode, CRC) made a re-arm about 100 ns (6 %) slower;
cached, a re-arm's last-seen check takes 135 ns instead of the 225 it took
with the salted ``hash()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol
from zlib import crc32

PHASES = 1024
"""How many distinct phases a period has: 59 ms apart when ``every`` is 60 s."""


class Record(Protocol):
    """What the policy reads and keeps in the detector's record of one runtime."""

    last_seen: float | None
    """The runtime's newest sign of life (the detector's)."""
    stored: float | None
    """The time last handed out for the database (the policy's); None if none was."""
    phase: float
    """Where in each period of ``every`` seconds the runtime's periods start (the policy's)."""


def phase_index(runtime_id: str) -> int:
    """The runtime's phase, as one of :data:`PHASES` steps: the same in every process, run and version."""
    return crc32(runtime_id.encode()) % PHASES


class LastSeen:
    """Picks last-seen times for the database as the detector reports what it did; the writer takes them.

    ``records`` is the detector's own mapping of runtime ID to record. The
    policy reads it for :meth:`take_all` and :meth:`give_back` but never
    adds or removes entries.
    """

    def __init__(self, records: Mapping[str, Record], every: float) -> None:
        self.every = every
        """A live runtime's time is picked once in each period of this many seconds (0: at every re-arm); fixed."""
        self._records = records
        self._picked: dict[str, float] = {}
        self._phases = tuple(i * every / PHASES for i in range(PHASES)) if every > 0 else (0.0,) * PHASES
        """Each phase's offset in seconds: one float object per phase, not one per runtime."""

    def phase(self, runtime_id: str) -> float:
        """Where in each period the runtime's periods start: in [0, every), the same in every process."""
        return self._phases[phase_index(runtime_id)]

    # --- fed by the detector ---------------------------------------------------

    def added(self, runtime_id: str, rec: Record) -> None:
        """A new record (registered, or restored with the database's last-seen time, which is then stored)."""
        rec.phase = self._phases[phase_index(runtime_id)]
        rec.stored = rec.last_seen

    def rearmed(self, runtime_id: str, rec: Record) -> None:
        """The runtime's deadline was re-armed: pick its time if it entered a new period since the last pick."""
        seen = rec.last_seen
        if seen is None:
            return
        stored = rec.stored
        if stored is not None:
            every = self.every
            if every <= 0:
                if seen == stored:
                    return
            elif (seen + rec.phase) // every == (stored + rec.phase) // every:
                return
        self._picked[runtime_id] = rec.stored = seen

    def force(self, runtime_id: str, rec: Record) -> None:
        """Pick the runtime's exact time now unless it was handed out: for a change of state or a first sign of life."""
        seen = rec.last_seen
        if seen is not None and seen != rec.stored:
            self._picked[runtime_id] = rec.stored = seen

    def forget(self, runtime_id: str) -> None:
        """The runtime was deregistered: its picked time is not to be stored."""
        self._picked.pop(runtime_id, None)

    # --- for the writer ----------------------------------------------------------

    def take(self) -> dict[str, float]:
        """The times picked since the previous take, runtime ID to last seen (monotonic), for one batched write."""
        picked, self._picked = self._picked, {}
        return picked

    def take_all(self) -> dict[str, float]:
        """Every time not yet handed out, picked or not, for a clean stop (walks every runtime)."""
        picked, self._picked = self._picked, {}
        for runtime_id, rec in self._records.items():
            seen = rec.last_seen
            if seen is not None and seen != rec.stored:
                picked[runtime_id] = rec.stored = seen
        return picked

    def give_back(self, seen: Mapping[str, float]) -> None:
        """Times taken but not stored (a failed write): each runtime still registered is picked again, at its newest."""
        records, picked = self._records, self._picked
        for runtime_id in seen:
            rec = records.get(runtime_id)
            if rec is not None and rec.last_seen is not None:
                picked[runtime_id] = rec.stored = rec.last_seen

"""The silence book: which runtimes nobody wants to hear about, and until when.

Pure bookkeeping on the caller's wall clock, no I/O: the dispatcher asks it
and the service persists it as plain rows (``to_rows``/``from_rows``).
A pattern is a runtime ID or an ``fnmatch`` glob; IDs cannot contain glob
characters (see docs/protocol.md), so the two never overlap.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

SilenceRow = tuple[str, float, str | None]
"""``(pattern, until, reason)``: what the database stores."""

_GLOB_CHARS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    return not _GLOB_CHARS.isdisjoint(pattern)


@dataclass(frozen=True, slots=True)
class Silence:
    pattern: str
    until: float
    reason: str | None = None

    def matches(self, runtime_id: str) -> bool:
        return fnmatch.fnmatchcase(runtime_id, self.pattern) if is_glob(self.pattern) else runtime_id == self.pattern


class SilenceBook:
    """Silences by pattern; a later silence for the same pattern replaces the earlier one.

    Exact IDs are a dict lookup; globs (few, in practice) are scanned as
    compiled regular expressions, so asking about one of 100,000 runtimes
    stays cheap.
    """

    def __init__(self, silences: Iterable[Silence] = ()) -> None:
        self._exact: dict[str, Silence] = {}
        self._globs: dict[str, tuple[Silence, re.Pattern[str]]] = {}
        for entry in silences:
            self._put(entry)

    def __len__(self) -> int:
        return len(self._exact) + len(self._globs)

    def silence(self, pattern: str, until: float, reason: str | None = None) -> Silence:
        """Silence ``pattern`` until wall-clock time ``until``; returns the entry."""
        if not pattern or not isinstance(pattern, str):
            raise ValueError("silence pattern must be a runtime ID or a glob such as 'db-*'")
        if not math.isfinite(until):
            raise ValueError(f"silence end must be a finite time, got {until!r}")
        entry = Silence(pattern, float(until), reason)
        self._put(entry)
        return entry

    def _put(self, entry: Silence) -> None:
        if is_glob(entry.pattern):
            self._globs[entry.pattern] = (entry, re.compile(fnmatch.translate(entry.pattern)))
        else:
            self._exact[entry.pattern] = entry

    def unsilence(self, pattern: str) -> bool:
        """Lift the silence on exactly ``pattern``; False if there was none."""
        if is_glob(pattern):
            return self._globs.pop(pattern, None) is not None
        return self._exact.pop(pattern, None) is not None

    def get(self, pattern: str) -> Silence | None:
        if is_glob(pattern):
            found = self._globs.get(pattern)
            return None if found is None else found[0]
        return self._exact.get(pattern)

    def is_silenced(self, runtime_id: str, now: float) -> bool:
        """True while an unexpired silence covers ``runtime_id``."""
        exact = self._exact.get(runtime_id)
        if exact is not None and exact.until > now:
            return True
        return any(entry.until > now and regex.match(runtime_id) for entry, regex in self._globs.values())

    def covering(self, runtime_id: str, now: float) -> list[Silence]:
        """Every unexpired silence that covers ``runtime_id``."""
        found = [entry for entry, regex in self._globs.values() if entry.until > now and regex.match(runtime_id)]
        exact = self._exact.get(runtime_id)
        if exact is not None and exact.until > now:
            found.insert(0, exact)
        return found

    def expired(self, now: float) -> list[Silence]:
        """Remove and return the silences whose end is at or before ``now``, earliest first."""
        gone = [e for e in self._exact.values() if e.until <= now]
        gone += [e for e, _ in self._globs.values() if e.until <= now]
        for entry in gone:
            self.unsilence(entry.pattern)
        return sorted(gone, key=lambda e: (e.until, e.pattern))

    def next_expiry(self) -> float | None:
        """When the next silence ends, for the caller's timer."""
        ends = [e.until for e in self._exact.values()] + [e.until for e, _ in self._globs.values()]
        return min(ends, default=None)

    def entries(self) -> list[Silence]:
        """Every silence, by pattern."""
        return sorted([*self._exact.values(), *(e for e, _ in self._globs.values())], key=lambda e: e.pattern)

    def to_rows(self) -> list[SilenceRow]:
        return [(e.pattern, e.until, e.reason) for e in self.entries()]

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, float, str | None]]) -> SilenceBook:
        book = cls()
        for pattern, until, reason in rows:
            book.silence(pattern, until, reason)
        return book

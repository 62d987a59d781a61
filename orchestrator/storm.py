"""Storm control and retry timing: the dispatcher's decisions that need no I/O, tested on a fake clock.

A mass death (a host, a switch, a rack) must reach people as one outage
notice, not thousands; a failing channel must be retried on a jittered
schedule that respects its Retry-After. Both are pure: ``now`` comes in.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from runtime_agent.backoff import backoff_delays

from .notify import Notice

OWN: Final = object()
"""The key of notices the dispatcher makes itself (reminders, silence ends): nobody's outbox row."""


@dataclass(frozen=True, slots=True)
class StormPolicy:
    """When many runtimes change at once, one summary instead of one notice each.

    A storm is more than ``count`` runtimes, or more than ``share`` of the
    population (but never ``floor`` or fewer), within ``window`` seconds.
    ``window`` 0 turns storm control off.
    """

    window: float = 10.0
    count: int = 20
    share: float = 0.1
    max_ids: int = 20
    floor: int = 2

    def limit(self, population: int) -> int:
        """The most runtimes that may change within the window without it being a storm."""
        return min(self.count, max(math.floor(self.share * population), self.floor))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` tries per notice and channel, ``base * 2**n`` seconds apart (times 1 ± ``jitter``), at most ``max``.

    The jitter is that of every reconnect loop
    (:func:`runtime_agent.backoff.backoff_delays`): when an endpoint that
    several routes share goes down, their notices fail together and would
    otherwise all retry at the same instants. ``rng`` is for tests (a seeded
    ``random.Random().random``). ``attempt_timeout`` bounds one attempt even
    if a channel forgets to.
    """

    attempts: int = 5
    base: float = 1.0
    max: float = 60.0
    attempt_timeout: float = 120.0
    jitter: float = 0.5
    rng: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.delays()  # bad numbers fail here, not at a lane's first retry

    def delays(self) -> Iterator[float]:
        """The waits after each failed attempt of one notice (a fresh sequence per notice), never above ``max``."""
        return (min(delay, self.max) for delay in backoff_delays(self.base, self.max, jitter=self.jitter, rng=self.rng))

    def wait(self, delay: float, retry_after: float | None = None) -> float:
        """``delay`` (from :meth:`delays`), or longer if the channel asked for it (``Retry-After``), up to ``max``."""
        return delay if retry_after is None else max(delay, min(retry_after, self.max))


@dataclass(frozen=True, slots=True)
class Emission:
    """A notice to route, the submitted notices it answers for, and every runtime of a group notice."""

    notice: Notice
    covers: tuple[Notice, ...]
    members: tuple[str, ...] = ()


class StormGate:
    """Decides, per batch, between one notice per runtime and one summary for the lot.

    Below the limit every notice passes at once (no added latency). The batch
    that crosses it is replaced by one summary naming everyone in the window
    (including those already reported one by one). While the storm lasts,
    later notices are gathered into at most one update per window; the storm
    ends after a window with no new notice.
    """

    def __init__(self, policy: StormPolicy, summary_event: str, verb: str) -> None:
        self.policy = policy
        self.summary_event = summary_event
        self.verb = verb
        self._recent: OrderedDict[str, float] = OrderedDict()  # runtime -> time of its latest notice
        self._storm = False
        self._last_notice = -math.inf
        self._last_summary = -math.inf
        self._absorbed: list[Notice] = []

    @property
    def in_storm(self) -> bool:
        return self._storm

    def admit(self, notices: Sequence[Notice], now: float, population: int) -> tuple[bool, list[Emission]]:
        """``(absorbed, emissions)``: if absorbed, send ``emissions`` instead of ``notices``.

        When not absorbed, ``notices`` go out one by one and ``emissions`` may
        still hold a due update of an earlier storm.
        """
        due = self.poll(now)
        emissions = [due] if due is not None else []
        if not notices or self.policy.window <= 0:
            return False, emissions
        horizon = now - self.policy.window
        while self._recent and next(iter(self._recent.values())) <= horizon:
            self._recent.popitem(last=False)
        for notice in notices:
            assert notice.runtime_id is not None
            self._recent[notice.runtime_id] = now
            self._recent.move_to_end(notice.runtime_id)
        self._last_notice = now
        if self._storm:
            self._absorbed.extend(notices)
            return True, emissions
        limit = self.policy.limit(population)
        if len(self._recent) <= limit:
            return False, emissions
        self._storm = True
        self._last_summary = now
        members = tuple(self._recent)
        reason = f"more than {limit} runtimes {self.verb} within {self.policy.window:g} s"
        emissions.append(Emission(self._summary(now, members, reason), tuple(notices), members))
        return True, emissions

    def poll(self, now: float) -> Emission | None:
        """The storm's update, once a window after the last summary, if anything was gathered since."""
        if not self._storm:
            return None
        if self._absorbed and now >= self._last_summary + self.policy.window:
            absorbed, self._absorbed = self._absorbed, []
            self._last_summary = now
            members = tuple(dict.fromkeys(n.runtime_id for n in absorbed if n.runtime_id is not None))
            reason = f"more runtimes {self.verb} since the last {self.summary_event} notice"
            return Emission(self._summary(now, members, reason), tuple(absorbed), members)
        if not self._absorbed and now >= self._last_notice + self.policy.window:
            self._storm = False
        return None

    def flush(self, now: float) -> Emission | None:
        """Whatever is gathered, now (at shutdown)."""
        if not self._absorbed:
            return None
        self._last_summary = -math.inf
        return self.poll(now)

    def next_deadline(self) -> float | None:
        """When :meth:`poll` has something to send."""
        return self._last_summary + self.policy.window if self._storm and self._absorbed else None

    def _summary(self, now: float, members: tuple[str, ...], reason: str) -> Notice:
        ids = members[: self.policy.max_ids]
        return Notice(self.summary_event, None, now, None, reason, ids, len(members), key=OWN)

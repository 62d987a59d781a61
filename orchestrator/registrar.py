"""The registrar: interval requests validated, stored in batches, then put into the detector and answered.

The database is told first: a registration the orchestrator confirmed is one
a restart loads. Replies go out at QoS 0 from a task of their own while the
registrar takes the next batch (an agent re-sends until it has one). A runtime
that pulses unregistered gets its retained request fetched from the broker
(:mod:`orchestrator.healing`): a request lost on the way heals by itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from runtime_agent import protocol
from runtime_agent.protocol import ProtocolError, Topics

from .conflict import ConflictWatch
from .database import Database
from .detector import Transition
from .healing import RegistrationHealer
from .intake import Births, Common, InputRoom, Request
from .link import BrokerLink, LinkError
from .rejections import shown, shown_id

log = logging.getLogger("orchestrator")

_REQUEST_BATCH = 1_000
_HEAL_GATHER = 0.2
"""Seconds the fetcher waits after the first unregistered pulse, so a burst of them makes one SUBSCRIBE."""
_HEAL_HOLD = 1.0
"""Seconds a fetch's connection waits for the retained copies (amqtt sends them from a task of its own)."""
_CLEAR_ECHO = 30.0
"""Seconds an empty message on a topic we cleared is taken for the echo of our own clear."""
_MAX_CLEARED = 10_000
_TALLY_PERIOD = 60.0
"""Pulses from unregistered runtimes are logged as one line per this many seconds."""

Reply = tuple[Request, bytes]


class Registrar(InputRoom):
    """Owns the request queue, the per-ID rate limit and the registration replies."""

    def __init__(
        self,
        common: Common,
        *,
        db: Database,
        link: BrokerLink,
        healer: RegistrationHealer,
        births: Births,
        conflicts: ConflictWatch,
        emit: Callable[[Transition], None],
        publish_status: Callable[[str], None],
        rearm: Callable[[], None],
    ) -> None:
        super().__init__(common)
        self._db = db
        self._link = link
        self.healer = healer
        self._births = births
        self._conflicts = conflicts
        self._emit = emit
        self._publish_status = publish_status
        self._rearm = rearm
        self.max_runtimes = common.config.max_runtimes
        self.max_requests_per_minute = common.config.max_requests_per_minute
        self._requests: asyncio.Queue[Request] = asyncio.Queue()
        self._replies: asyncio.Queue[list[Reply]] = asyncio.Queue()
        """Each batch's replies, sent by ``run_replies`` while the registrar goes on to the next batch."""
        self._request_counts: dict[str, tuple[float, int]] = {}
        """Runtime -> (start of its current minute, interval requests in it), for the rate limit."""
        self._cleared: dict[str, float] = {}
        """Retained topics we just cleared (deregistration) -> until when their echo is ours to drop."""

    def submit(self, request: Request) -> None:
        """An interval request from the intake."""
        self._requests.put_nowait(request)

    async def run(self) -> None:
        while True:
            batch = [await self._requests.get()]
            while len(batch) < _REQUEST_BATCH and not self._requests.empty():
                batch.append(self._requests.get_nowait())
            self.stats["registration.received"] += len(batch)
            replies: list[Reply] = []
            try:
                await self.register_batch(batch, replies)
            except Exception:
                log.exception("registration batch failed")
            # Replies go after the whole batch is in the detector, and are sent by run_replies while
            # this goes on to the next batch: awaited here, each batch's QoS 1 round trips (20 in
            # flight on Mosquitto's defaults) held back the next, 20,000 registrations took 9 s.
            if replies:
                self._replies.put_nowait(replies)

    async def register_batch(self, batch: list[Request], replies: list[Reply]) -> None:
        """Store and apply a batch of interval requests; the replies they owe are appended to ``replies``."""
        accepted: list[tuple[Request, protocol.IntervalRequest | None]] = []
        new_in_batch: set[str] = set()
        for req in batch:
            try:
                interval = self._decode(req)
            except ProtocolError as exc:
                self._refuse(req, exc.reason, str(exc), replies)
                continue
            if req.retained and interval is not None and req.runtime_id in self.detector:
                view = self.detector.view(req.runtime_id)
                if (view.interval, view.grace) == (interval.interval, interval.grace):
                    continue  # the re-delivered copy of what the database already has
            refusal = self._over_limit(req, interval, new_in_batch)
            if refusal is not None:
                self._refuse(req, *refusal, replies)
                continue
            if interval is not None and req.runtime_id not in self.detector:
                new_in_batch.add(req.runtime_id)
            accepted.append((req, interval))
        if not accepted:
            return
        registrations = {r.runtime_id: (r.runtime_id, i.interval, i.grace) for r, i in accepted if i is not None}
        removals = [r.runtime_id for r, i in accepted if i is None]
        try:
            if registrations:
                await self._db(self._db.store.register, list(registrations.values()), time.time())
            if removals:
                await self._db(self._db.store.deregister, removals)
        except Exception as exc:
            self.stats["rejected.database"] += len(accepted)
            self.stats["registration.rejected"] += len(accepted)
            log.error("database refused %d registrations: %s", len(accepted), exc)
            for req, _ in accepted:
                if not req.retained:
                    error = "the orchestrator's database is unavailable; try again"
                    replies.append((req, protocol.encode_reply_error(req.runtime_id, error)))
            return
        self._apply(accepted, replies)

    def _decode(self, req: Request) -> protocol.IntervalRequest | None:
        protocol.check_id(req.runtime_id)
        try:
            return protocol.decode_interval(req.payload, limit=self.max_payload)
        except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            if isinstance(exc, ProtocolError):
                raise
            log.exception("unexpected error decoding an interval request")  # a codec bug: one request lost
            raise ProtocolError("malformed", "the request could not be decoded") from exc

    def _refuse(self, req: Request, reason: str, error: str, replies: list[Reply]) -> None:
        """Count and log a refused request, and answer it if it was live."""
        if self._refetched(req):
            return
        self._reject(reason, req.runtime_id, f"interval request: {error}")
        self.stats["registration.rejected"] += 1
        if not req.retained:
            replies.append((req, protocol.encode_reply_error(shown_id(req.runtime_id), error)))

    def _apply(self, accepted: list[tuple[Request, protocol.IntervalRequest | None]], replies: list[Reply]) -> None:
        """Put stored registrations (None: a removal) into the detector; the replies they owe go to ``replies``."""
        now = time.monotonic()
        for req, interval in accepted:
            rid = req.runtime_id
            answer = not req.retained
            if interval is None:
                if self.detector.deregister(rid):
                    log.info("%s deregistered", rid)
                self._conflicts.forget(rid)
                self._publish_status(rid)
            else:
                if req.retained and rid not in self.detector and self.healer.registered(rid, now):
                    # A retained copy gets no reply, but this runtime is pulsing: tell it now, not at its next re-send.
                    answer = True
                    self.stats["registration.healed"] += 1
                    log.info("%s registered from its retained request, fetched after it pulsed unregistered", rid)
                changed = self._changes_status(rid, interval)
                transition = self.detector.register(rid, interval.interval, interval.grace, now, live=not req.retained)
                transition = self._apply_early_state(rid, now, transition)
                if transition is not None:
                    self._emit(transition)  # its status follows it
                elif changed:
                    self._publish_status(rid)
            if answer:
                self.stats["registrations"] += 1
                self.stats["registration.confirmed"] += 1
                replies.append((req, protocol.encode_reply_ok(rid, interval)))
        self._rearm()

    def _apply_early_state(self, runtime_id: str, now: float, transition: Transition | None) -> Transition | None:
        """Apply a state that came before the registration; return the transition whose status goes out last.

        A birth only records its session. A stop stops the runtime (quietly,
        if it never ran); the registration's own transition, if any, goes out
        first.
        """
        early = self._births.take(runtime_id)
        if early is None:
            return transition
        stopped, session = early
        if not stopped:
            self.detector.online(runtime_id, now, session, live=False)
            return transition
        stop = self.detector.stopped(runtime_id, now, session)
        if stop is None:
            return transition
        if transition is not None:
            self._emit(transition)
        return stop

    def _changes_status(self, runtime_id: str, interval: protocol.IntervalRequest) -> bool:
        """Whether registering ``interval`` changes what the runtime's status shows: it is new, or its times are.

        An agent sends its birth, then its request: the birth revives a dead
        runtime (the status goes with that transition), and the request, the
        same as before, had every registration publish the status a second
        time, and every agent reconnecting after a broker restart one more.
        """
        if runtime_id not in self.detector:
            return True
        view = self.detector.view(runtime_id)
        return (view.interval, view.grace) != (interval.interval, interval.grace)

    def _refetched(self, req: Request) -> bool:
        """A refused request that is the copy a fetch brought back: counted apart, not as a second rejection.

        The broker keeps a refused retained request, and the runtime's pulses
        make us fetch it again (once a minute at most): it was counted and
        logged when it came, and every fetch would count it once more.
        """
        if not (req.retained and self.healer.claim(req.runtime_id, time.monotonic())):
            return False
        self.stats["registration.fetched_refused"] += 1
        return True

    def _over_limit(
        self, req: Request, interval: protocol.IntervalRequest | None, new_in_batch: set[str]
    ) -> tuple[str, str] | None:
        """``(reason, error)`` if the request exceeds a limit: runtimes watched, or requests per ID per minute.

        Retained copies re-delivered at subscribe are not counted against the
        rate: they are the broker's doing, not the runtime's.
        """
        rid = req.runtime_id
        new = interval is not None and rid not in self.detector and rid not in new_in_batch
        if new and len(self.detector) + len(new_in_batch) >= self.max_runtimes:
            return "too_many_runtimes", f"the orchestrator already watches its maximum of {self.max_runtimes}"
        if req.retained:
            return None
        now = time.monotonic()
        start, count = self._request_counts.get(rid, (now, 0))
        if now - start >= 60.0:
            start, count = now, 0
        if count >= self.max_requests_per_minute:
            return "rate_limited", (
                f"too many interval requests for {rid}: at most {self.max_requests_per_minute} a minute"
            )
        if len(self._request_counts) >= 100_000:  # many IDs: drop the windows that are over
            self._request_counts = {k: v for k, v in self._request_counts.items() if now - v[0] < 60.0}
        self._request_counts[rid] = (start, count + 1)
        return None

    # --- replies ---------------------------------------------------------------

    async def run_replies(self) -> None:
        """Send registration replies, as many as have queued up, in one go."""
        while True:
            replies = await self._replies.get()
            while not self._replies.empty():
                replies += self._replies.get_nowait()
            await self.send_replies(replies)

    async def send_replies(self, replies: list[Reply]) -> None:
        """Publish each reply on its runtime's reply topic (and Response Topic, if it gave one), at QoS 0.

        QoS 0, because a reply matters only to an agent connected now, and an
        agent re-sends its request until it has one; QoS 1 would cost a
        round trip per 20 replies (Mosquitto's in-flight window), 10 s for a
        fleet of 100,000 registering at once. On the lean connection where
        there is one; Response Topics need properties, so they take the
        general client.
        """
        if not self._link.connected:
            return
        plain = [(self.topics.reply(r.runtime_id), p, False) for r, p in replies if protocol.is_valid_id(r.runtime_id)]
        targeted = [
            (req, payload)
            for req, payload in replies
            if req.response_topic is not None and self._may_reply_on(req.response_topic, req.runtime_id)
        ]
        try:
            await self._link.send_qos0(plain)
            await asyncio.gather(
                *(
                    self._link.publish(req.response_topic, payload, qos=0, correlation=req.correlation, response=True)
                    for req, payload in targeted
                    if req.response_topic is not None
                )
            )
        except LinkError as exc:
            log.warning("could not send %d registration replies: %s", len(replies), exc)
            return
        self.stats["registration.replies"] += len(replies)

    def _may_reply_on(self, topic: str, runtime_id: str) -> bool:
        """A Response Topic must not aim our rights elsewhere: outside our prefix, under
        ``{prefix}/replies/``, or in the requester's own subtree; never status, alerts or another runtime."""
        root = self.topics.prefix + "/"
        if not topic.startswith(root) or topic.startswith(root + "replies/"):
            return True
        if protocol.is_valid_id(runtime_id) and topic.startswith(
            self.topics.interval(runtime_id).rsplit("/", 1)[0] + "/"
        ):
            return True
        self._reject("response_topic", runtime_id, f"response topic {shown(topic)} not allowed")
        return False

    async def deregister(self, runtime_id: str) -> bool:
        """Forget a runtime for good: its record, and every retained message that would bring it back.

        False if it is not registered. The database is told first, as for a
        registration; the retained status is also cleared by the outbox,
        should the clears here not reach the broker.
        """
        if runtime_id not in self.detector:
            return False
        await self._db(self._db.store.deregister, [runtime_id])
        self.detector.deregister(runtime_id)
        self._births.take(runtime_id)
        self._publish_status(runtime_id)
        self._rearm()
        log.warning("%s deregistered", runtime_id)
        if self._link.connected:
            try:
                await self._clear_retained(runtime_id)
            except LinkError as exc:
                log.warning("could not clear the retained messages of %s: %s", runtime_id, exc)
        return True

    async def _clear_retained(self, runtime_id: str) -> None:
        """Clear a deregistered runtime's retained status, interval request and state.

        Without the interval request an orchestrator restart would register it
        again. We are subscribed to the last two: the echo of each clear is
        recognised (:meth:`our_clear`) rather than taken for a deregistration
        or rejected as a malformed state.
        """
        now = time.monotonic()
        if len(self._cleared) > _MAX_CLEARED:
            self._cleared = {t: until for t, until in self._cleared.items() if until > now}
        topics = (self.topics.interval(runtime_id), self.topics.state(runtime_id))
        for topic in topics:
            self._cleared[topic] = now + _CLEAR_ECHO
        await asyncio.gather(
            *(self._link.publish(topic, b"", qos=1, retain=True) for topic in (self.topics.status(runtime_id), *topics))
        )

    def our_clear(self, topic: str, now: float) -> bool:
        """True (once) for the echo of an empty retained message we published on ``topic``."""
        if not self._cleared:
            return False
        until = self._cleared.pop(topic, None)
        return until is not None and until >= now


class Refetcher:
    """Fetches the retained registrations of runtimes that pulse unregistered (see :mod:`orchestrator.healing`).

    Also says, once a period, how many pulses came from unregistered
    runtimes: the warning per ID is logged once, this goes on.
    """

    def __init__(
        self,
        *,
        healer: RegistrationHealer,
        link: BrokerLink,
        topics: Topics,
        deliver: Callable[[str, Any, bool], None],
        stats: collections.Counter[str],
    ) -> None:
        self.healer = healer
        self._link = link
        self.topics = topics
        self._deliver = deliver
        self.stats = stats
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """A runtime now waits for a fetch."""
        self._wake.set()

    async def run(self) -> None:
        next_tally = time.monotonic() + _TALLY_PERIOD
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_tally - time.monotonic())):
                    await self._wake.wait()
            if time.monotonic() >= next_tally:
                next_tally = time.monotonic() + _TALLY_PERIOD
                self._log_tally()
            if not self._wake.is_set():
                continue
            self._wake.clear()
            await asyncio.sleep(_HEAL_GATHER)
            if not self._link.connected:  # cut off from the broker: try again once connected
                await asyncio.sleep(_HEAL_HOLD)
                self._wake.set()
                continue
            ids = self.healer.take(time.monotonic())
            if not ids:
                continue
            self.stats["registration.fetched"] += len(ids)
            try:
                await self._fetch([self.topics.interval(rid) for rid in ids])
            except LinkError as exc:
                log.warning("could not fetch %d retained registrations: %s", len(ids), exc)
            if len(self.healer):
                self._wake.set()

    async def _fetch(self, topics: list[str]) -> None:
        """Take the retained copies the broker sends for ``topics``, for a moment."""
        async with self._link.fetching(topics) as messages:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_HEAL_HOLD):
                    async for message in messages:
                        if message.retain:  # a live message also reaches the general path: not twice
                            self._deliver(message.topic.value, message.payload, True)

    def _log_tally(self) -> None:
        tally = self.healer.tally()
        if tally is not None:
            log.warning(
                "%d pulses from %d unregistered runtimes in the last %.0f s (e.g. %s); "
                "registrations fetched from the broker so far: %d, of which registered: %d",
                tally.pulses,
                tally.runtimes,
                _TALLY_PERIOD,
                ", ".join(map(shown, tally.examples)),
                self.healer.fetched,
                self.healer.healed,
            )

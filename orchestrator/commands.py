"""Maintenance commands from administrators: silence, unsilence, deregister, list silences.

They come on ``{prefix}/orchestrator/command`` and run one at a time:
database first, then memory, then the reply (on the MQTT 5 Response Topic,
else on ``.../command/reply/{request_id}``). A person's commands, not a
fleet's: at most a thousand wait, the rest are refused as ``busy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from runtime_agent import protocol
from runtime_agent.protocol import ProtocolError

from .database import Database
from .detector import State
from .dispatch import Dispatcher
from .intake import CommandRequest, Common, InputRoom
from .link import BrokerLink, LinkError
from .rejections import shown
from .silence import Silence, SilenceBook
from .store import database_error

log = logging.getLogger("orchestrator")

_COMMAND_QUEUE = 1_000
"""Maintenance commands waiting to run; more are refused (``busy``): they are a person's, not a fleet's."""


class CommandFailed(Exception):
    """A well-formed command that cannot be done (nothing to lift, not registered): the reply says why."""


class Commander(InputRoom):
    """Runs the commands; owns the silences' persistence (the registrar does the deregistering)."""

    def __init__(
        self,
        common: Common,
        *,
        db: Database,
        dispatcher: Dispatcher,
        link: BrokerLink,
        deregister: Callable[[str], Awaitable[bool]],
    ) -> None:
        super().__init__(common)
        self._db = db
        self.dispatcher = dispatcher
        self._link = link
        self._deregister_runtime = deregister
        self._queue: asyncio.Queue[CommandRequest] = asyncio.Queue(maxsize=_COMMAND_QUEUE)

    def submit(self, request: CommandRequest) -> None:
        """A command from the intake; raises ``asyncio.QueueFull`` when too many wait."""
        self._queue.put_nowait(request)

    async def load_silences(self, db_url: str) -> None:
        """Put the stored silences into the dispatcher (the expired ones are deleted), then hold the dead.

        A runtime already dead under a silence is re-checked when the silence
        ends, as if its notice had been held by this process.
        """
        try:
            pruned = await self._db(self._db.store.prune_silences, time.time())
            rows = await self._db(self._db.store.silences)
        except Exception as exc:
            raise RuntimeError(database_error("cannot read the silences from", db_url, exc)) from exc
        self.dispatcher.silences = SilenceBook.from_rows(rows)
        if rows:  # a View per runtime for nothing otherwise: 100,000 of them at start-up
            self.dispatcher.restore_held(v.runtime_id for v in self.detector.views() if v.state is State.DEAD)
        if rows or pruned:
            log.info("loaded %d silences (%d expired ones deleted)", len(rows), pruned)

    async def run(self) -> None:
        """Run the commands one at a time."""
        while True:
            req = await self._queue.get()
            try:
                await self.execute(req)
            except Exception:  # one command must never stop the others
                self.stats["errors"] += 1
                log.exception("command failed")

    async def execute(self, req: CommandRequest) -> None:
        if req.retained:
            # The live copy ran when it was sent; a retained one would run again at every (re)subscribe.
            self._reject("retained_command", "command:retained", "retained command (not run, not answered)")
            return
        request_id = protocol.peek_request_id(req.payload, limit=self.max_payload)
        try:
            command = protocol.decode_command(req.payload, limit=self.max_payload)
        except ProtocolError as exc:
            self._reject(exc.reason, f"command:{exc.reason}", f"command: {exc}")
            reply = protocol.encode_command_reply(False, None, request_id, error=str(exc))
            await self._reply(req, request_id, reply)
            return
        run = {
            "silence": self._silence,
            "unsilence": self._unsilence,
            "deregister": self._deregister,
            "silences": self._silences,
        }[command.command]
        try:
            fields = await run(command)
        except CommandFailed as exc:
            log.info("command %s refused: %s", command.command, exc)
            reply = protocol.encode_command_reply(False, command.command, command.request_id, error=str(exc))
        except Exception as exc:
            self.stats["rejected.database"] += 1
            log.error("command %s failed: database: %s", command.command, exc)
            error = "the orchestrator's database is unavailable; try again"
            reply = protocol.encode_command_reply(False, command.command, command.request_id, error=error)
        else:
            self.stats["commands"] += 1
            reply = protocol.encode_command_reply(True, command.command, command.request_id, **fields)
        await self._reply(req, command.request_id, reply)
        with contextlib.suppress(Exception):  # expired silences are only clutter: deleted when convenient
            await self._db(self._db.store.prune_silences, time.time())

    async def _silence(self, command: protocol.Command) -> dict[str, Any]:
        assert command.target is not None
        assert command.seconds is not None
        until = time.time() + command.seconds
        await self._db(self._db.store.save_silence, command.target, until, command.reason)
        self.dispatcher.silence(command.target, until, command.reason)
        why = f" ({command.reason})" if command.reason else ""
        log.warning("silenced %s for %.0f s%s", command.target, command.seconds, why)
        return self._silence_fields(Silence(command.target, until, command.reason))

    async def _unsilence(self, command: protocol.Command) -> dict[str, Any]:
        assert command.target is not None
        entry = self.dispatcher.silences.get(command.target)
        if entry is None or entry.until <= time.time():
            raise CommandFailed(f"no silence on {command.target!r}")
        await self._db(self._db.store.delete_silence, command.target)
        self.dispatcher.unsilence(command.target)
        log.warning("lifted the silence on %s", command.target)
        return {"target": command.target, "lifted": True}

    async def _silences(self, command: protocol.Command) -> dict[str, Any]:
        now = time.time()
        return {"silences": [self._silence_fields(e) for e in self.dispatcher.silences.entries() if e.until > now]}

    def _silence_fields(self, entry: Silence) -> dict[str, Any]:
        matches = sum(1 for rid in self.detector.ids() if entry.matches(rid))
        return {"target": entry.pattern, "until": protocol.iso(entry.until), "reason": entry.reason, "matches": matches}

    async def _deregister(self, command: protocol.Command) -> dict[str, Any]:
        """Forget a runtime for good (see :meth:`Registrar.deregister`)."""
        rid = command.id
        assert rid is not None
        if not await self._deregister_runtime(rid):
            raise CommandFailed(f"{rid} is not registered")
        return {"id": rid, "deregistered": True}

    def _may_reply_on(self, topic: str) -> bool:
        """As for interval requests: outside our prefix, under ``{prefix}/replies/``,
        or under ``{prefix}/orchestrator/command/reply/``; never status, alerts or a runtime's topics."""
        root = self.topics.prefix + "/"
        if not topic.startswith(root) or topic.startswith((root + "replies/", self.topics.command + "/reply/")):
            return True
        self._reject("response_topic", "command:response_topic", f"command response topic {shown(topic)} not allowed")
        return False

    async def _reply(self, req: CommandRequest, request_id: str | None, payload: bytes) -> None:
        """Answer on the MQTT 5 Response Topic if usable, else on ``.../command/reply/{request_id}``, else not."""
        if not self._link.connected:
            return
        try:
            if req.response_topic is not None and self._may_reply_on(req.response_topic):
                await self._link.publish(req.response_topic, payload, correlation=req.correlation, response=True)
            elif request_id is not None:
                await self._link.publish(self.topics.command_reply(request_id), payload)
        except LinkError as exc:
            log.warning("could not reply to a command: %s", exc)

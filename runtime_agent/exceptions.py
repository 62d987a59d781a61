"""Every error the runtime agent raises, in one module (as aiomqtt does).

Callers catch :class:`HeartbeatError` for "the agent could not start" and the
subclasses when they want to react differently, e.g. retry on
:class:`ConnectError` but give up on :class:`RegistrationRejected`.
"""

from __future__ import annotations


class HeartbeatError(Exception):
    """Base class of the agent's runtime failures (not of bad arguments: those are ValueError)."""


class ConnectError(HeartbeatError):
    """The broker could not be reached, or refused the connection, within the start timeout."""


class RegistrationTimeout(HeartbeatError):
    """No reply to the interval request within the time given to ``wait_registered()``.

    ``start()`` does not raise it: without a reply it returns after its
    timeout and the agent keeps re-sending the request in the background.
    """


class RegistrationRejected(HeartbeatError):
    """The orchestrator answered the interval request with an error.

    ``error`` is the orchestrator's own text, kept separately so callers can
    show or match it without parsing the message.
    """

    def __init__(self, error: str) -> None:
        super().__init__(f"the orchestrator rejected the registration: {error}")
        self.error = error

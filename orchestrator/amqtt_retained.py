"""amqtt, patched to send a client only the retained messages that its own subscriptions match.

After a client connects, amqtt 0.12.1 replays the retained messages of
every topic filter that *any* client holds (``for topic in
self._subscriptions`` in ``Broker._handle_client_session``), a loop meant for
the subscriptions of a persistent session that reconnects (upstream commit
d4d5e1c, unchanged on upstream's main when this was written). So a client
subscribed to ``{p}/alerts`` alone received every retained status document,
and ``alerts --follow`` printed them as alerts (issue 20).

The patch is the narrowest one: the hook that loop calls, which SUBSCRIBE
also calls, publishes only for a filter the session itself holds. SUBSCRIBE
records the subscription before it calls the hook, so a new subscription
still gets its retained messages [MQTT-3.3.1-6], and a persistent session
that reconnects still gets those of its own subscriptions. It relies on
amqtt's private names and that order; tests/test_broker.py checks them, so
an amqtt upgrade that changes them fails there, by name, not silently.

Imported only in the embedded broker's own process.
"""

from __future__ import annotations

from amqtt.broker import Broker
from amqtt.session import Session

HOOK = "_publish_retained_messages_for_subscription"
"""The amqtt method overridden here: ``(self, subscription: (filter, qos), session)``."""


class OwnSubscriptionsBroker(Broker):  # type: ignore[misc]  # amqtt has no type hints
    """An amqtt broker that sends a session retained messages only for filters it subscribed to itself."""

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        if holds(self, session, subscription[0]):
            await super()._publish_retained_messages_for_subscription(subscription, session)


def holds(broker: Broker, session: Session, topic_filter: str) -> bool:
    """Whether ``session`` subscribed to exactly ``topic_filter``.

    amqtt keeps ``{filter: [(session, qos), ...]}`` and tells sessions apart
    by client ID (``Broker.add_subscription``, ``_del_subscription``).
    """
    return any(held.client_id == session.client_id for held, _qos in broker._subscriptions.get(topic_filter, ()))

"""Prometheus metrics, read from the orchestrator at scrape time.

Nothing here is on the pulse hot path: the collector asks its source for the
counters it already keeps when Prometheus scrapes, and the one histogram is
observed once per dead verdict.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime_agent import protocol

STATES = protocol.RUNTIME_STATES

LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds from a runtime's deadline to its verdict: milliseconds when healthy, seconds when the broker lags."""


class LatencyHistogram:
    """A plain histogram the service observes at each dead verdict; read (not reset) at each scrape.

    Kept outside prometheus-client so the service owns no registry and a scrape
    never locks the event loop's data.
    """

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)
        """Per bucket, not cumulative; the last one is +Inf."""
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus wants them, ending with ``+Inf``."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class MetricsSource(Protocol):
    """What the collector reads; the orchestrator provides it (see :class:`orchestrator.web.DashboardSource`)."""

    verdict_latency: LatencyHistogram

    def counters(self) -> dict[str, Any]: ...

    def is_ready(self) -> bool: ...

    def notification_stats(self) -> Mapping[tuple[str, str], int]: ...

    def outbox_backlog(self) -> int: ...


class HeartbeatCollector(Collector):
    """Turns the source's counters into metric families at each scrape."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        source = self.source
        counters = source.counters()
        runtimes = GaugeMetricFamily("heartbeat_runtimes", "Registered runtimes by state.", labels=["state"])
        states: Mapping[str, int] = counters.get("states", {})
        for state in (*STATES, *sorted(set(states) - set(STATES))):
            runtimes.add_metric([state], states.get(state, 0))
        yield runtimes
        yield CounterMetricFamily(
            "heartbeat_pulses_received", "Pulses accepted from registered runtimes.", value=counters.get("pulses", 0)
        )
        rejected = CounterMetricFamily(
            "heartbeat_pulses_rejected",
            "Messages rejected (pulses, state messages, interval requests), by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(counters.get("rejected", {}).items()):
            rejected.add_metric([reason], n)
        yield rejected
        registrations = CounterMetricFamily(
            "heartbeat_registrations",
            "Interval requests by outcome: received (live or retained), confirmed, rejected, "
            "healed (registered from a retained request fetched after the runtime pulsed unregistered).",
            labels=["outcome"],
        )
        registration: Mapping[str, int] = counters.get("registration", {})
        for outcome in ("received", "confirmed", "rejected", "healed"):
            registrations.add_metric([outcome], registration.get(outcome, 0))
        yield registrations
        yield CounterMetricFamily(
            "heartbeat_registration_fetches",
            "Retained registrations fetched from the broker for runtimes that pulsed unregistered.",
            value=registration.get("fetched", 0),
        )
        yield CounterMetricFamily(
            "heartbeat_unregistered_pulses",
            "Pulses from runtimes not (yet) registered.",
            value=counters.get("unregistered_pulses", 0),
        )
        latency = source.verdict_latency
        yield HistogramMetricFamily(
            "heartbeat_verdict_latency_seconds",
            "Time from a runtime's deadline to its dead verdict.",
            buckets=latency.cumulative(),
            sum_value=latency.sum,
        )
        notifications = CounterMetricFamily(
            "heartbeat_notifications", "Notifications sent, by channel and outcome.", labels=["channel", "outcome"]
        )
        for (channel, outcome), n in sorted(source.notification_stats().items()):
            notifications.add_metric([channel, outcome], n)
        yield notifications
        yield GaugeMetricFamily(
            "heartbeat_outbox_backlog", "Transitions not yet stored or published.", value=source.outbox_backlog()
        )
        yield CounterMetricFamily(
            "heartbeat_db_transactions",
            "Committed database write transactions.",
            value=counters.get("db_transactions", 0),
        )
        yield GaugeMetricFamily(
            "heartbeat_up", "1 while the orchestrator is connected and judging, else 0.", value=int(source.is_ready())
        )


def registry_for(source: MetricsSource) -> CollectorRegistry:
    """A private registry (never the global one), so several servers or tests never share metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HeartbeatCollector(source))
    return registry

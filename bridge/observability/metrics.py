"""The daemon's Prometheus series: counters the pipeline feeds, gauges read at scrape time.

Counters and the latency histogram are prometheus-client objects updated on the hot
path (a dict lookup and an add). Everything that is a level rather than an event (outbox
depth, cursor lag, bucket tokens, token expiry) is read from the live objects when
``/metrics`` is scraped, through one :class:`Snapshot` callable, so there is nothing to
keep in step. Each run has its own registry: tests can run many daemons in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge.ratelimit import BucketState

__all__ = ["CONTENT_TYPE", "Metrics", "Snapshot"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Op calls are one to a few HTTP requests; a call waiting out a 429 pause lands high.
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The levels of one moment, as the app sees them."""

    ready: bool
    outbox: Mapping[str, int]  # open ops by target
    cursor_lag: Mapping[str, float]  # seconds since each stream was last caught up
    poll_interval: Mapping[str, float]
    buckets: Iterable[BucketState]
    location_up: Mapping[str, bool]
    token_expires_at: Mapping[str, float]  # wall time, OAuth locations only
    token_refreshes: Mapping[str, int]


class Metrics:
    """Every series the daemon exports, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.records_read = Counter(
            "bridge_records_read",
            "Source records read, by stream.",
            ["stream"],
            registry=self.registry,
        )
        self.ops_sent = Counter(
            "bridge_ops_sent",
            "Ops completed at their target (sent, reconciled or found unchanged).",
            ["stream", "target"],
            registry=self.registry,
        )
        self.ops_retried = Counter(
            "bridge_ops_retried",
            "Op attempts that failed and were scheduled again, by target.",
            ["target"],
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            "bridge_dead_lettered",
            "Records and ops moved to the dead-letter table, by stream.",
            ["stream"],
            registry=self.registry,
        )
        self.op_latency = Histogram(
            "bridge_op_latency_seconds",
            "Time one op's call to its target took, including waits for the budget.",
            ["target"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._snapshot: Callable[[], Snapshot] | None = None
        self.registry.register(_Levels(self))

    def watch(self, snapshot: Callable[[], Snapshot]) -> None:
        """Read the levels from ``snapshot`` at every scrape."""
        self._snapshot = snapshot

    def levels(self) -> Snapshot | None:
        return None if self._snapshot is None else self._snapshot()

    def render(self) -> bytes:
        """The text exposition format, for ``/metrics``."""
        return generate_latest(self.registry)


class _Levels(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        # Nothing to describe up front: the series exist once the app is watched.
        return []

    def collect(self) -> Iterable[Metric]:
        snap = self._metrics.levels()
        if snap is None:
            return
        yield GaugeMetricFamily("bridge_ready", "1 once the daemon is ready.", value=snap.ready)
        yield _family(
            GaugeMetricFamily,
            "bridge_outbox_open_ops",
            "Ops pending, in flight or in doubt, by target.",
            "target",
            snap.outbox,
        )
        yield _family(
            GaugeMetricFamily,
            "bridge_cursor_lag_seconds",
            "Seconds since the stream was last caught up with its source.",
            "stream",
            snap.cursor_lag,
        )
        yield _family(
            GaugeMetricFamily,
            "bridge_poll_interval_seconds",
            "Each stream's poll interval (alerts compare the lag with it).",
            "stream",
            snap.poll_interval,
        )
        yield from _bucket_series(snap.buckets)
        yield _family(
            GaugeMetricFamily,
            "bridge_location_up",
            "1 while the GHL location is in service, 0 while it is down (auth, scope).",
            "location",
            {location: float(is_up) for location, is_up in snap.location_up.items()},
        )
        yield _family(
            GaugeMetricFamily,
            "bridge_token_expires_at_seconds",
            "Unix time the OAuth access token in use expires, by location.",
            "location",
            snap.token_expires_at,
        )
        yield _family(
            CounterMetricFamily,
            "bridge_token_refreshes",
            "OAuth token refreshes since the start, by location.",
            "location",
            snap.token_refreshes,
        )


def _family(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    documentation: str,
    label: str,
    values: Mapping[str, float],
) -> Metric:
    """One series per key of ``values``, labelled ``label``."""
    family = kind(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _bucket_series(buckets: Iterable[BucketState]) -> Iterable[Metric]:
    labels = ["api", "tenant"]
    tokens = GaugeMetricFamily(
        "bridge_bucket_tokens", "Requests the budget allows right now.", labels=labels
    )
    capacity = GaugeMetricFamily(
        "bridge_bucket_capacity", "Requests the budget allows per window.", labels=labels
    )
    paused = GaugeMetricFamily(
        "bridge_bucket_paused", "1 while the budget is paused after a 429.", labels=labels
    )
    used = GaugeMetricFamily(
        "bridge_bucket_used_today", "Requests spent this UTC day.", labels=labels
    )
    daily = GaugeMetricFamily(
        "bridge_bucket_daily_cap", "Requests allowed per UTC day, where capped.", labels=labels
    )
    throttled = CounterMetricFamily(
        "bridge_rate_limited", "429 replies received, by budget.", labels=labels
    )
    for b in buckets:
        key = [b.api, b.tenant]
        tokens.add_metric(key, b.available)
        capacity.add_metric(key, b.capacity)
        paused.add_metric(key, 0 if b.paused_until is None else 1)
        used.add_metric(key, b.used_today)
        if b.daily_cap is not None:
            daily.add_metric(key, b.daily_cap)
        if not b.tenant.endswith("/share"):  # a share's 429s are counted on its parent
            throttled.add_metric(key, b.throttled)
    yield from (tokens, capacity, paused, used, daily, throttled)

"""Prometheus metrics of one sidecar app, in a registry of its own (tests run several apps at once).

Hot-path updates are per group commit, not per request: a batch of 300 requests costs one
``inc(300)``; requests in flight and pending events are read from plain ints at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REFUSAL_REASONS = ("invalid_json", "invalid_events", "invalid_request", "unreadable_body", "payload_too_large",
                   "unsupported_media_type", "redis_unavailable", "redis_full", "overloaded", "internal_error")
AMBIGUOUS_OUTCOMES = ("applied", "fenced", "unknown")


class SidecarMetrics:
    """Every metric the sidecar exports, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_accepted = Counter("analytics_sidecar_events_accepted", "Events counted in Redis", registry=r)
        self.events_duplicate = Counter("analytics_sidecar_events_duplicate",
                                        "Events skipped because their message_id was already seen", registry=r)
        self.requests_accepted = Counter("analytics_sidecar_requests_accepted", "Requests answered 202", registry=r)
        self.requests_refused = Counter("analytics_sidecar_requests_refused", "Requests refused, by reason",
                                        ["reason"], registry=r)
        self.events_refused = Counter("analytics_sidecar_events_refused",
                                      "Events in refused requests (when the body could be parsed), by reason",
                                      ["reason"], registry=r)
        self.redis_write_seconds = Histogram(
            "analytics_sidecar_redis_write_seconds", "Latency of one group-commit write to Redis", registry=r,
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.commit_events = Histogram(
            "analytics_sidecar_group_commit_events", "Events per group commit", registry=r,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2500, 5000, 10000, 50000))
        self.commit_requests = Histogram(
            "analytics_sidecar_group_commit_requests", "Requests per group commit", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.commit_failures = Counter("analytics_sidecar_group_commit_failures",
                                       "Group commits that were not applied, by reason", ["reason"], registry=r)
        self.ambiguous_writes = Counter(
            "analytics_sidecar_ambiguous_writes",
            "Writes whose reply was lost (timeout/connection error), by what the fence found out", ["outcome"],
            registry=r)
        self.config_reloads = Counter("analytics_sidecar_config_reloads", "Config file reloads, by result",
                                      ["result"], registry=r)
        self.requests_in_flight = Gauge("analytics_sidecar_requests_in_flight", "Ingest requests being handled",
                                        registry=r)
        self.pending_events = Gauge("analytics_sidecar_pending_events",
                                    "Validated events waiting for their group commit", registry=r)
        self.writes_in_flight = Gauge("analytics_sidecar_writes_in_flight", "Group commits being written",
                                      registry=r)
        for reason in REFUSAL_REASONS:
            self.requests_refused.labels(reason)
            self.events_refused.labels(reason)
        for outcome in AMBIGUOUS_OUTCOMES:
            self.ambiguous_writes.labels(outcome)
        self._refused = {reason: self.requests_refused.labels(reason) for reason in REFUSAL_REASONS}

    def refused(self, reason: str, events: int = 0) -> None:
        """Count one refused request (and how many events it held, when known)."""
        child = self._refused.get(reason)
        if child is None:
            child = self._refused[reason] = self.requests_refused.labels(reason)
        child.inc()
        if events:
            self.events_refused.labels(reason).inc(events)

    def watch(self, in_flight: Callable[[], float], pending: Callable[[], float],
              writes: Callable[[], float]) -> None:
        """Read the gauges from live state at scrape time (no per-request cost)."""
        self.requests_in_flight.set_function(in_flight)
        self.pending_events.set_function(pending)
        self.writes_in_flight.set_function(writes)

"""Prometheus metrics of one sidecar app, in a registry of its own (tests run several apps at once).

Hot-path updates are per group commit, not per request: a batch of 300 requests costs one
``inc(300)``; requests in flight and pending events are read from plain ints at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from analytics_pipeline.core.events import Event, FieldError

REFUSAL_REASONS = ("invalid_json", "invalid_events", "invalid_request", "unreadable_body", "payload_too_large",
                   "unsupported_media_type", "unsupported_encoding", "redis_unavailable", "redis_full", "overloaded",
                   "internal_error")
AMBIGUOUS_OUTCOMES = ("applied", "fenced", "unknown")
# Why one event of a partly accepted batch was rejected (label of events_rejected_total).
REJECTION_REASONS = ("not_an_object", "too_large", "too_deep", "event_name", "call_type", "user_id", "message_id",
                     "timestamp_invalid", "timestamp_future", "timestamp_past", "properties")
_FIELD_REASONS = {"(event)": "not_an_object", "event": "event_name", "type": "call_type", "properties": "properties",
                  "user_id": "user_id", "userId": "user_id", "distinct_id": "user_id", "anonymousId": "user_id",
                  "properties.distinct_id": "user_id", "message_id": "message_id", "messageId": "message_id",
                  "uuid": "message_id"}


def rejection_reason(error: FieldError) -> str:
    """The metric label for one event's rejection (a small fixed set, whatever the reason's text)."""
    reason = error.reason
    if reason.startswith("event is"):
        return "too_large"
    if reason.startswith("nested more than"):
        return "too_deep"
    if error.field == "timestamp":
        if "in the future" in reason:
            return "timestamp_future"
        return "timestamp_past" if "in the past" in reason else "timestamp_invalid"
    return _FIELD_REASONS.get(error.field, "not_an_object")


class SidecarMetrics:
    """Every metric the sidecar exports, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_accepted = Counter("analytics_sidecar_events_accepted", "Events counted in Redis", registry=r)
        self.events_duplicate = Counter("analytics_sidecar_events_duplicate",
                                        "Events skipped because their message_id was already seen", registry=r)
        self.requests_accepted = Counter("analytics_sidecar_requests_accepted", "Requests answered 200 (stored)",
                                         registry=r)
        self.requests_refused = Counter("analytics_sidecar_requests_refused", "Requests refused, by reason",
                                        ["reason"], registry=r)
        self.events_refused = Counter("analytics_sidecar_events_refused",
                                      "Events in refused requests (when the body could be parsed), by reason",
                                      ["reason"], registry=r)
        self.events_rejected = Counter(
            "analytics_sidecar_events_rejected",
            "Invalid events of partly accepted batches (not counted; the rest of the batch was), by reason",
            ["reason"], registry=r)
        self.events_not_counted = Counter(
            "analytics_sidecar_events_not_counted",
            "Calls acknowledged but not counted (ingest.uncounted_events: identify, group, alias, ...), by event",
            ["event"], registry=r)
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
        self.redirects = Counter(
            "analytics_sidecar_redis_redirects",
            "Redis Cluster redirections followed by the write path (moved: slot map reloaded; ask: ASKING)", ["kind"],
            registry=r)
        self.wait_seconds = Histogram(
            "analytics_sidecar_wait_replicas_seconds", "Time of the WAIT after a group commit (server.wait_replicas)",
            registry=r, buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.in_doubt = Counter(
            "analytics_sidecar_replication_in_doubt",
            "Applied writes that fewer than server.wait_replicas replicas confirmed in time, by how they were settled "
            "(applied: confirmed later, 200; fenced: lost in a failover, 503; unknown: 503 at the fence deadline)",
            ["outcome"], registry=r)
        self.shard = Gauge("analytics_sidecar_shard", "1 for the shard tag (counters.shards) this sidecar writes to",
                           ["tag"], registry=r)
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
        for reason in REJECTION_REASONS:
            self.events_rejected.labels(reason)
        for outcome in AMBIGUOUS_OUTCOMES:
            self.ambiguous_writes.labels(outcome)
            self.in_doubt.labels(outcome)
        for kind in ("moved", "ask"):
            self.redirects.labels(kind)
        self._refused = {reason: self.requests_refused.labels(reason) for reason in REFUSAL_REASONS}

    def refused(self, reason: str, events: int = 0) -> None:
        """Count one refused request (and how many events it held, when known)."""
        child = self._refused.get(reason)
        if child is None:
            child = self._refused[reason] = self.requests_refused.labels(reason)
        child.inc()
        if events:
            self.events_refused.labels(reason).inc(events)

    def rejected(self, errors: list[FieldError]) -> None:
        """Count the events a partly accepted batch rejected (once each, by its first reason)."""
        seen: set[int | None] = set()
        for error in errors:
            if error.index not in seen:
                seen.add(error.index)
                self.events_rejected.labels(rejection_reason(error)).inc()

    def not_counted(self, events: list[Event], uncounted: frozenset[str]) -> None:
        """Count acknowledged-but-not-counted calls by event type (bounded: the names are from config)."""
        for event in events:
            if event.event_type in uncounted:
                self.events_not_counted.labels(event.event_type).inc()

    def watch(self, in_flight: Callable[[], float], pending: Callable[[], float],
              writes: Callable[[], float]) -> None:
        """Read the gauges from live state at scrape time (no per-request cost)."""
        self.requests_in_flight.set_function(in_flight)
        self.pending_events.set_function(pending)
        self.writes_in_flight.set_function(writes)

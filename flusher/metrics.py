"""Push a flush run's figures to a Prometheus Pushgateway (one group per pipeline)."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

from analytics_pipeline.core.redis_requirements import PolicyCheck

from .run import PipelineStats

JOB = "analytics-pipeline-flush"


def registry_for(stats: PipelineStats, policy: PolicyCheck | None = None) -> CollectorRegistry:
    """The gauges of one pipeline's run (``last_success`` only when it succeeded, so POST keeps the old one)."""
    registry = CollectorRegistry()

    def gauge(name: str, doc: str, value: float) -> None:
        Gauge(name, doc, registry=registry).set(value)

    ok = stats.error is None
    gauge("analytics_flush_success", "1 if the last flush run succeeded, else 0", 1 if ok else 0)
    gauge("analytics_flush_buckets", "buckets flushed by the last run", stats.buckets)
    gauge("analytics_flush_rows", "PostgreSQL rows upserted by the last run", stats.rows)
    gauge("analytics_flush_units", "flush units committed by the last run", stats.units)
    gauge("analytics_flush_duration_seconds", "duration of the last run", stats.duration_s)
    gauge("analytics_flush_recovered_runs", "dead runs recovered by the last run", stats.recovered_runs)
    gauge("analytics_flush_oldest_unflushed_age_seconds",
          "age of the oldest bucket still waiting in Redis after the last run", stats.oldest_unflushed_age_s)
    gauge("analytics_flush_unflushed_buckets", "dirty buckets waiting in Redis after the last run",
          stats.unflushed_buckets)
    gauge("analytics_flush_dead_lettered_units", "units the last run set aside as dead letters",
          stats.dead_lettered_units)
    gauge("analytics_flush_dead_letter_units", "dead-lettered units waiting for 'deadletter retry' or 'discard'",
          stats.dead_letter_units)
    gauge("analytics_flush_last_run_timestamp_seconds", "when the last run ended", time.time())
    if stats.shards:  # the backlog per shard: one shard falling behind shows, whatever the totals say
        age = Gauge("analytics_flush_shard_oldest_unflushed_age_seconds", "age of the oldest bucket still waiting "
                    "in Redis after the last run, per shard", ["shard"], registry=registry)
        waiting = Gauge("analytics_flush_shard_unflushed_buckets", "dirty buckets waiting in Redis after the last "
                        "run, per shard", ["shard"], registry=registry)
        for tag, shard in stats.shards.items():
            age.labels(tag).set(shard.oldest_unflushed_age_s)
            waiting.labels(tag).set(shard.unflushed_buckets)
    if policy is not None:
        gauge("analytics_flush_redis_policy_unchecked",
              "1 if Redis refused CONFIG GET maxmemory-policy (managed Redis/ACL): noeviction is not verified",
              1 if policy.policy is None else 0)
        gauge("analytics_flush_redis_policy_evicting", "1 if Redis runs an evicting maxmemory-policy (allowed "
              "by redis.allow_eviction)", 1 if policy.evicting else 0)
    if ok:
        gauge("analytics_flush_last_success_timestamp_seconds", "when a run last succeeded", time.time())
    return registry


async def push(gateway: str, stats: PipelineStats, policy: PolicyCheck | None = None,
               http_timeout_s: float = 10.0) -> None:
    """POST (push-add) the run's gauges under job ``analytics-pipeline-flush``, grouped by pipeline."""
    registry = registry_for(stats, policy)
    await asyncio.to_thread(pushadd_to_gateway, gateway, job=JOB, registry=registry,
                            grouping_key={"pipeline": stats.pipeline}, timeout=http_timeout_s)

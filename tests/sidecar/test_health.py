"""Health, readiness and metrics endpoints."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sidecar_helpers import Sidecar, SidecarFactory

from analytics_pipeline.core.services import RedisServer
from analytics_pipeline.sidecar.appkeys import STATE


async def test_healthz_and_readyz(sidecar: Sidecar) -> None:
    assert (await sidecar.get("/healthz")).body == {"status": "ok"}
    ready = await sidecar.get("/readyz")
    assert ready.status == 200 and ready.body["status"] == "ready"
    assert ready.body["pipeline"] == sidecar.app[STATE].config.pipeline


async def test_not_ready_while_draining(sidecar: Sidecar) -> None:
    await sidecar.app.shutdown()  # what aiohttp runs first on SIGTERM
    ready = await sidecar.get("/readyz")
    assert ready.status == 503 and ready.body["status"] == "draining"
    assert (await sidecar.get("/healthz")).status == 200


async def test_not_ready_when_redis_is_down(start_sidecar: SidecarFactory, sidecar_config,
                                           private_redis: RedisServer) -> None:
    sidecar = await start_sidecar(sidecar_config(redis_url=private_redis.url, server={"redis_timeout_seconds": 0.3}))
    assert (await sidecar.get("/readyz")).status == 200
    private_redis.pause()
    try:
        ready = await sidecar.get("/readyz")
        assert ready.status == 503 and "Redis does not answer" in ready.body["reason"]
    finally:
        private_redis.resume()
    assert (await sidecar.get("/readyz")).status == 200


async def test_metrics_exposition(sidecar: Sidecar) -> None:
    assert (await sidecar.post("/v1/events", [{"event": "a", "message_id": "x"}, {"event": "a", "message_id": "x"},
                                              {"event": "b"}])).status == 200
    assert (await sidecar.post("/v1/events", raw=b"{")).status == 400
    assert (await sidecar.post("/v1/events", {"event": "a"}, content_type="text/html")).status == 415
    answer = await sidecar.get("/metrics")
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(answer.body) for s in family.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("analytics_sidecar_events_accepted_total") == 2
    assert value("analytics_sidecar_events_duplicate_total") == 1
    assert value("analytics_sidecar_requests_accepted_total") == 1
    assert value("analytics_sidecar_requests_refused_total", reason="invalid_json") == 1
    assert value("analytics_sidecar_requests_refused_total", reason="unsupported_media_type") == 1
    assert value("analytics_sidecar_requests_refused_total", reason="redis_unavailable") == 0
    assert value("analytics_sidecar_redis_write_seconds_count") == 1
    assert value("analytics_sidecar_group_commit_events_sum") == 3
    assert value("analytics_sidecar_group_commit_events_bucket", le="5.0") == 1
    assert value("analytics_sidecar_group_commit_requests_count") == 1
    assert value("analytics_sidecar_requests_in_flight") == 0
    assert value("analytics_sidecar_pending_events") == 0
    assert value("analytics_sidecar_writes_in_flight") == 0
    for outcome in ("applied", "fenced", "unknown"):
        assert value("analytics_sidecar_ambiguous_writes_total", outcome=outcome) == 0


async def test_two_apps_have_separate_registries(start_sidecar: SidecarFactory, sidecar_config) -> None:
    first, second = await start_sidecar(sidecar_config()), await start_sidecar(sidecar_config())
    assert (await first.post("/v1/events", {"event": "a"})).status == 200
    assert first.metrics.events_accepted._value.get() == 1
    assert second.metrics.events_accepted._value.get() == 0


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_probe_endpoints_refuse_post(sidecar: Sidecar, path: str) -> None:
    assert (await sidecar.post(path, {})).status == 405




"""Redis stopped, frozen or paused under load: every answer is 200 (counted) or 503 + Retry-After (not counted).

Empirical basis of the fence (see sidecar/committer.py), checked on Redis 7.0: a command sent to a
SIGSTOPped Redis on a connection that the client then closes (FIN) still runs when Redis resumes,
before the fence sent later on another connection (closed with RST it would be discarded instead);
under CLIENT PAUSE WRITE the postponed command of a client that disconnects is dropped, and the
fence itself waits for the pause to end. Either way the fence (SET token NX on a fresh connection)
decides, and the tests below check both that the answer matches what Redis holds and which way it went.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import redis.asyncio as aioredis
from cluster_load import Tally, closed_loop
from sidecar_helpers import Sidecar, SidecarFactory, grand_total, kind_totals, pipeline_keys

from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys
from analytics_pipeline.core.services import RedisServer
from analytics_pipeline.sidecar.committer import SCRIPT


async def run_load(sidecar: Sidecar, stop: asyncio.Event, clients: int = 16) -> Tally:
    """Closed-loop clients until ``stop`` (cluster_load.closed_loop): 200s tallied, 503s with Retry-After."""
    return await closed_loop(sidecar, stop, clients)


@contextlib.asynccontextmanager
async def client_for(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def fast_failure_config(sidecar_config, url: str):  # type: ignore[no-untyped-def]
    return sidecar_config(redis_url=url, server={"redis_timeout_seconds": 0.3, "retry_after_seconds": 2})


async def _assert_totals(url: str, keys: PipelineKeys, result: Tally) -> None:
    async with client_for(url) as client:
        assert await kind_totals(client, keys, "d") == result.acked
        assert await kind_totals(client, keys, "h") == result.acked
        assert await grand_total(client, keys, "u") == sum(result.acked.values())


async def test_redis_stopped_and_restarted_under_load(
        start_sidecar: SidecarFactory, sidecar_config, aof_redis: RedisServer, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(fast_failure_config(sidecar_config, aof_redis.url), fence_deadline_seconds=20)
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(sidecar, stop))
    await asyncio.sleep(0.4)
    await asyncio.to_thread(aof_redis.stop)
    # Writes that were in flight wait for their fence (they may have been applied before the
    # shutdown); a request arriving now is refused at once: nothing can have been written.
    probe = await sidecar.post("/v1/events", {"event": "probe"})
    assert probe.status == 503 and probe.headers["Retry-After"] == "2", probe.body
    ready = await sidecar.get("/readyz")
    assert ready.status == 503 and "Redis" in ready.body["reason"]
    await asyncio.sleep(0.3)
    await asyncio.to_thread(aof_redis.start)
    await asyncio.sleep(0.4)
    stop.set()
    result = await load
    assert result.answers.get(200, 0) > 0, result.answers
    await _assert_totals(aof_redis.url, keys, result)
    assert (await sidecar.get("/readyz")).status == 200


async def test_redis_frozen_with_sigstop_under_load(
        start_sidecar: SidecarFactory, sidecar_config, private_redis: RedisServer, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(fast_failure_config(sidecar_config, private_redis.url), fence_deadline_seconds=20)
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(sidecar, stop))
    await asyncio.sleep(0.4)
    private_redis.pause()
    await asyncio.sleep(1.2)
    private_redis.resume()
    await asyncio.sleep(0.4)
    stop.set()
    result = await load
    ambiguous = sidecar.metrics.ambiguous_writes
    decided = ambiguous.labels("applied")._value.get() + ambiguous.labels("fenced")._value.get()
    assert decided > 0, "the freeze should have left writes without reply"
    assert ambiguous.labels("unknown")._value.get() == 0
    await _assert_totals(private_redis.url, keys, result)


async def test_client_pause_write_under_load(
        start_sidecar: SidecarFactory, sidecar_config, private_redis: RedisServer, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(fast_failure_config(sidecar_config, private_redis.url), fence_deadline_seconds=20)
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(sidecar, stop))
    async with client_for(private_redis.url) as admin:
        await asyncio.sleep(0.4)
        await admin.execute_command("CLIENT", "PAUSE", 1200, "WRITE")
        await asyncio.sleep(1.6)
        stop.set()
        result = await load
    assert result.answers.get(503, 0) > 0, result.answers
    assert sidecar.metrics.ambiguous_writes.labels("fenced")._value.get() > 0
    await _assert_totals(private_redis.url, keys, result)


async def _one_request_during(sidecar: Sidecar, hold: float, freeze, thaw) -> object:  # type: ignore[no-untyped-def]
    """Send one request while Redis is held, release it after ``hold`` s, return the answer."""
    await freeze()
    request = asyncio.create_task(sidecar.post("/v1/events", {"event": "held", "user_id": "u"}))
    await asyncio.sleep(hold)
    await thaw()
    return await request


async def test_single_write_to_sigstopped_redis_is_decided_exactly(
        start_sidecar: SidecarFactory, sidecar_config, private_redis: RedisServer, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(fast_failure_config(sidecar_config, private_redis.url), fence_deadline_seconds=20)
    assert (await sidecar.post("/v1/events", {"event": "warm"})).status == 200  # script loaded, lane connected

    async def freeze() -> None:
        private_redis.pause()

    async def thaw() -> None:
        private_redis.resume()

    answer = await _one_request_during(sidecar, 1.0, freeze, thaw)
    # The lane timed out and closed its socket (FIN) while Redis was frozen; on SIGCONT Redis still
    # runs the script it had received, then the fence finds the token: applied, so 200, counted once.
    assert answer.status == 200, answer.body
    assert answer.body == {"accepted": 1, "duplicates": 0}
    assert sidecar.metrics.ambiguous_writes.labels("applied")._value.get() == 1
    assert sidecar.metrics.ambiguous_writes.labels("fenced")._value.get() == 0
    async with client_for(private_redis.url) as client:
        assert await kind_totals(client, keys, "d") == {"warm": 1, "held": 1}
    assert (await sidecar.post("/v1/events", {"event": "after"})).status == 200


async def test_single_write_under_client_pause_is_fenced_exactly(
        start_sidecar: SidecarFactory, sidecar_config, private_redis: RedisServer, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(fast_failure_config(sidecar_config, private_redis.url), fence_deadline_seconds=20)
    assert (await sidecar.post("/v1/events", {"event": "warm"})).status == 200
    async with client_for(private_redis.url) as admin:
        async def freeze() -> None:
            await admin.execute_command("CLIENT", "PAUSE", 1000, "WRITE")

        async def thaw() -> None:
            pass  # the pause ends by itself; the fence is postponed until then, and wins

        answer = await _one_request_during(sidecar, 0.2, freeze, thaw)
        assert answer.status == 503
        assert sidecar.metrics.ambiguous_writes.labels("fenced")._value.get() == 1
        assert await kind_totals(admin, keys, "d") == {"warm": 1}
        fences = [key for key in await pipeline_keys(admin, keys) if ":gc:" in key]
        assert "fenced" in [await admin.get(key) for key in fences]


class ReplyDroppingProxy:
    """A TCP proxy to Redis that swallows every reply but the first on the first connection that writes (the
    lane's; the sidecar's Redis watch, which only reads CONFIG and INFO, passes untouched)."""

    def __init__(self, port: int) -> None:
        self.target_port = port
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(65536)
        watch = b"CONFIG" in first or b"INFO" in first
        if not watch:
            self.connections += 1
        drop = not watch and self.connections == 1
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        upstream_writer.write(first)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, swallow: bool) -> None:
            passed = 0
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    # The first reply (the committer's SADD ap:pipelines, sent before its script) passes.
                    if not swallow or passed == 0:
                        passed += 1
                        sink.write(data)
                        await sink.drain()
            with contextlib.suppress(Exception):
                sink.close()

        for task in (asyncio.create_task(pump(reader, upstream_writer, False)),
                     asyncio.create_task(pump(upstream_reader, writer, drop))):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()


async def test_lost_reply_of_an_applied_write_is_answered_200_exactly(
        start_sidecar: SidecarFactory, sidecar_config, private_redis: RedisServer, keys: PipelineKeys) -> None:
    proxy = ReplyDroppingProxy(private_redis.port)
    url = await proxy.start()
    try:
        async with client_for(private_redis.url) as admin:
            await admin.script_load(SCRIPT)  # so the lane's first EVALSHA runs (its NOSCRIPT would be lost too)
            await admin.set(keys.message("seen"), 1)
            sidecar = await start_sidecar(fast_failure_config(sidecar_config, url), fence_deadline_seconds=20)
            answer = await sidecar.post("/v1/events", [{"event": "lost-reply", "message_id": "seen"},
                                                       {"event": "lost-reply", "message_id": "new"},
                                                       {"event": "lost-reply"}])
            # The script ran (its reply was swallowed); the fence found its token and its duplicate list.
            assert answer.status == 200, answer.body
            assert answer.body == {"accepted": 2, "duplicates": 1}
            assert sidecar.metrics.ambiguous_writes.labels("applied")._value.get() == 1
            assert await admin.hgetall(keys.daily(datetime.now(UTC))) == {"lost-reply": "2"}
    finally:
        await proxy.close()


async def test_stopped_redis_answers_503_fast_and_counts_nothing(
        start_sidecar: SidecarFactory, sidecar_config, private_redis: RedisServer, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(fast_failure_config(sidecar_config, private_redis.url))
    await asyncio.to_thread(private_redis.stop)
    answer = await sidecar.post("/v1/events", {"event": "a"})
    assert answer.status == 503
    assert answer.headers["Retry-After"] == "2"
    assert answer.body["error"] == "redis_unavailable" and "nothing of this request was counted" in answer.body[
        "message"]
    assert (await sidecar.get("/readyz")).status == 503
    assert (await sidecar.get("/healthz")).status == 200
    await asyncio.to_thread(private_redis.start)
    assert (await sidecar.post("/v1/events", {"event": "a"})).status == 200
    async with client_for(private_redis.url) as client:
        assert await kind_totals(client, keys, "d") == {"a": 1}


async def test_script_flushed_is_reloaded(start_sidecar: SidecarFactory, sidecar_config,
                                          private_redis: RedisServer, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(sidecar_config(redis_url=private_redis.url))
    assert (await sidecar.post("/v1/events", {"event": "a"})).status == 200
    async with client_for(private_redis.url) as client:
        await client.script_flush()
        assert (await sidecar.post("/v1/events", {"event": "a"})).status == 200
        assert await kind_totals(client, keys, "d") == {"a": 2}


async def test_foreign_key_type_refuses_the_whole_commit(
        start_sidecar: SidecarFactory, sidecar_config, private_redis: RedisServer, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(sidecar_config(redis_url=private_redis.url))
    now = datetime.now(UTC)
    async with client_for(private_redis.url) as client:
        await client.set(keys.hourly(now), "not a hash")
        answer = await sidecar.post("/v1/events", [{"event": "a", "message_id": "m1", "user_id": "u"}])
        assert answer.status == 503
        # Nothing at all was counted: no daily bucket, no dedup marker, no dirty entry (the pipeline's
        # ap:pipelines entry is written before the script, and harmless: there is nothing to flush).
        assert await pipeline_keys(client, keys) == [keys.hourly(now)]
        assert sidecar.metrics.commit_failures.labels("redis_error")._value.get() == 1


async def test_pipeline_is_registered_again_after_redis_restarts_empty(
        start_sidecar: SidecarFactory, sidecar_config, private_redis: RedisServer, keys: PipelineKeys) -> None:
    """``flush --all`` finds pipelines through ap:pipelines: a Redis that lost it gets it back with the next write."""
    sidecar = await start_sidecar(sidecar_config(redis_url=private_redis.url))
    assert (await sidecar.post("/v1/events", {"event": "a"})).status == 200
    async with client_for(private_redis.url) as client:
        assert await client.smembers(PIPELINES_SET) == {keys.pipeline}
    private_redis.stop()
    private_redis.start()  # no persistence: it comes back empty
    statuses = [(await sidecar.post("/v1/events", {"event": "a"})).status for _ in range(3)]
    assert 200 in statuses and set(statuses) <= {200, 503}
    async with client_for(private_redis.url) as client:
        assert await client.smembers(PIPELINES_SET) == {keys.pipeline}
        assert await kind_totals(client, keys, "d") == {"a": statuses.count(200)}

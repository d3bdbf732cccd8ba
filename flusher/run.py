"""One flush run for one pipeline shard: lock, recover dead units, claim → apply → clean up batch by batch,
retention (the per-pipeline steps: skipped when flusher/shards.py runs them once for all shards).

The protocol (docs/flush-protocol.md): a unit (run id + batch number) is claimed atomically in Redis,
written to PostgreSQL in one transaction together with its ledger row, and only then removed from
Redis. Whatever kills the process, the unit stays in the in-flight set and the next run re-applies it;
the ledger turns a re-apply of a committed unit into a no-op. The lock only avoids wasted work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys

from . import deadletter, faults
from .errors import (
    POSTGRES_CONNECTION_ERRORS,
    REDIS_CONNECTION_ERRORS,
    FlushError,
    SchemaMissing,
    ServiceUnreachable,
    describe,
)
from .partitions import ensure_partitions, months_ahead
from .replication import claim_link
from .staging import Claim, ClaimHeld, Staging, new_run_id, run_id_of, unit_id_of
from .store import apply_retention, apply_unit

log = logging.getLogger(__name__)

Hook = Callable[[str], Awaitable[None]]

CLAIM_HOLD_WAIT_S = 120.0
# A claim answered with MOVED/ASK/TRYAGAIN/READONLY on the claim link (slot migrating, replica promoted)
# never ran: reload the slot map and try again, this many times.
CLAIM_REDIRECTS = 50
PROGRESS_EVERY_S = 5.0


@dataclass
class PipelineStats:
    """What one run did for one pipeline (the flush command's JSON output is built from these)."""

    pipeline: str
    shard: str | None = None  # the shard's tag (None: the pipeline's totals over its shards)
    run_id: str = ""
    units: int = 0
    buckets: int = 0
    rows: int = 0
    skipped_units: int = 0
    recovered_units: int = 0
    recovered_runs: int = 0
    retention_deleted_rows: int = 0
    oldest_unflushed_age_s: float = 0.0
    unflushed_buckets: int = 0
    inflight_units: int = 0
    dead_lettered_units: int = 0  # units this run set aside
    dead_letter_units: int = 0  # dead letters of the pipeline waiting for `deadletter retry|discard`
    replicas_required: int = 0  # replicas each claim had to reach before its unit was applied (0: no WAIT)
    unreplicated_units: list[str] = field(default_factory=list)  # left in flight: too few replicas had the claim
    locked: bool = False
    lock_lost: bool = False
    lock_skipped: str | None = None  # why the run went on without the Redis lock (correctness never needs it)
    interrupted: bool = False
    duration_s: float = 0.0
    error: str | None = None
    exit_code: int = field(default=0, repr=False)
    shards: dict[str, PipelineStats] = field(default_factory=dict, repr=False)  # per shard (pipeline totals only)

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("exit_code")
        data["shards"] = {tag: stats.as_dict() for tag, stats in self.shards.items()}
        if self.shard is None:
            data.pop("shard")
        else:
            data.pop("shards")
        return data


class PipelineFlush:
    """Runs the protocol for one pipeline shard over one Redis client and one PostgreSQL connection.

    ``tag`` picks the shard (None: shard 0, the whole pipeline when it has one shard). With
    ``pipeline_steps=False`` the per-pipeline steps (retention, dead-letter count) are skipped: of a
    sharded pipeline's runs only shard 0's does them (flusher/shards.py), with ``keep_units`` listing
    the in-flight units of every shard (their ledger rows survive retention).
    """

    def __init__(self, client: aioredis.Redis, conn: asyncpg.Connection, config: Config, pipeline: str, *,
                 batch_size: int | None = None, use_lock: bool = True, stop: asyncio.Event | None = None,
                 hook: Hook | None = None, tag: str | None = None, pipeline_steps: bool = True,
                 keep_units: Callable[[], Awaitable[list[str]]] | None = None) -> None:
        self.keys = PipelineKeys(pipeline, tag)
        self.pipeline_steps = pipeline_steps
        self.keep_units = keep_units
        self.staging = Staging(client, self.keys)
        self.link = claim_link(client, self.keys, config)
        self.conn = conn
        self.config = config
        self.batch_size = batch_size or config.flush.batch_size
        self.use_lock = use_lock
        self.stop = stop or asyncio.Event()
        self.hook = hook
        self.stats = PipelineStats(pipeline, shard=tag)
        self._last_progress = time.monotonic()

    async def step(self, name: str) -> None:
        """A named protocol step: the fault-injection checkpoint and the test hook."""
        faults.checkpoint(name)
        if self.hook is not None:
            await self.hook(name)

    async def run(self) -> PipelineStats:
        """Do the whole run; errors become ``stats.error`` / ``stats.exit_code`` (never raised)."""
        started = time.monotonic()
        await self.guarded(self._run_locked)
        self.stats.duration_s = round(time.monotonic() - started, 3)
        return self.stats

    async def guarded(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work``; its errors become ``stats.error`` / ``stats.exit_code`` (never raised)."""
        try:
            await work()
        except FlushError as error:
            self._fail(error.exit_code, str(error))
        except REDIS_CONNECTION_ERRORS as error:
            self._fail(2, f"Redis unreachable: {describe(error)}")
        except redis.exceptions.AskError as error:  # MOVED/ASK to a plain client: redis.cluster is 'off'
            self._fail(2, f"Redis refused a command: {describe(error)}")
        except redis.exceptions.RedisError as error:
            self._fail(1, f"Redis refused a command: {describe(error)}")
        except asyncpg.exceptions.UndefinedTableError as error:
            self._fail(SchemaMissing.exit_code,
                       f"schema missing ({describe(error)}): run 'analytics-pipeline migrate' or 'flush --migrate'")
        except POSTGRES_CONNECTION_ERRORS as error:
            self._fail(2, f"PostgreSQL unreachable: {describe(error)}")
        except (asyncpg.PostgresError, ValueError) as error:
            self._fail(1, f"PostgreSQL: {describe(error)}" if isinstance(error, asyncpg.PostgresError)
                       else describe(error))

    def _fail(self, code: int, message: str) -> None:
        self.stats.exit_code = code
        self.stats.error = message
        log.error("pipeline %s: flush failed: %s", self.keys.tag, message)

    async def _run_locked(self) -> None:
        ttl_ms = self.config.flush.lock_ttl_seconds * 1000
        token = await self._acquire_lock(ttl_ms) if self.use_lock else None
        if self.use_lock and token is None and self.stats.lock_skipped is None:
            self.stats.locked = True
            log.info("pipeline %s: another flusher holds the lock; skipping", self.keys.tag)
            await self._report_backlog()
            if self.pipeline_steps:
                self.stats.dead_letter_units = await deadletter.count(self.conn, self.keys.pipeline)
            return
        extender = asyncio.create_task(self._keep_lock(token, ttl_ms)) if token else None
        try:
            await self.step("after_lock")
            await self._protocol()
        finally:
            if extender is not None:
                extender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await extender
            await self.link.close()
            if token is not None:
                with contextlib.suppress(*REDIS_CONNECTION_ERRORS):
                    if not await self.staging.release_lock(token):
                        self.stats.lock_lost = True

    async def _acquire_lock(self, ttl_ms: int) -> str | None:
        """The lock's token, None if another flusher holds it. A Redis that refuses even the allow-oom
        lock for memory gets a lock-free run: the ledger and the pipeline's advisory lock keep it exact,
        and a full Redis is exactly when the flush (which frees memory) must not be kept out."""
        try:
            return await self.staging.acquire_lock(ttl_ms)
        except redis.exceptions.OutOfMemoryError as error:
            self.stats.lock_skipped = f"Redis refused the lock for memory ({describe(error)})"
            log.warning("pipeline %s: %s; flushing without it (the ledger keeps the result exact)",
                        self.keys.pipeline, self.stats.lock_skipped)
            return None

    async def _keep_lock(self, token: str, ttl_ms: int) -> None:
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            try:
                if not await self.staging.extend_lock(token, ttl_ms):
                    self.stats.lock_lost = True
                    log.warning("pipeline %s: flush lock lost (expired or taken); continuing, the ledger "
                                "keeps the result exact", self.keys.pipeline)
                    return
            except REDIS_CONNECTION_ERRORS as error:
                log.warning("pipeline %s: could not extend the lock: %s", self.keys.tag, describe(error))

    async def _protocol(self) -> None:
        # 0. last month's, this month's and the next months' partitions (one catalog query when they exist; the months a
        #    unit writes are ensured again before it applies: late or old timestamps)
        await ensure_partitions(self.conn, months_ahead(datetime.now(UTC).date()))
        await self._claims_then_retention()

    async def _claims_then_retention(self) -> None:
        # 1. recover units a dead (or concurrent) flusher left in flight; with replicas, only once they
        #    hold those units' claims (a barrier write + WAIT on the claim link, flusher/replication.py)
        self.stats.replicas_required = await self.link.open()
        recovered = await self.staging.inflight_units()
        if recovered and not await self._replicated(recovered, await self._barrier()):
            recovered = []
        for unit_id in recovered:
            await self._process(unit_id, recovered=True)
        self.stats.recovered_units = len(recovered)
        self.stats.recovered_runs = len({run_id_of(unit_id) for unit_id in recovered})
        if recovered:
            log.info("pipeline %s: recovered %d unit(s) of %d earlier run(s)", self.keys.tag,
                     len(recovered), self.stats.recovered_runs)
        await self.step("after_recover")
        # 2. claim what is dirty now (not what gets re-dirtied meanwhile: the run must end under load)
        budget = await self.staging.dirty_count()
        self.stats.run_id = run_id = new_run_id()
        batch = 0
        while budget > 0 and not self.stop.is_set() and not self.stats.unreplicated_units:
            batch += 1
            unit_id = unit_id_of(run_id, batch)
            claim = await self._claim(unit_id, min(self.batch_size, budget))
            if claim.popped == 0:
                break
            budget -= claim.popped
            await self.step("after_claim")
            if claim.staged_keys and await self._claim_replicated(unit_id):
                await self._process(unit_id)
        if self.stop.is_set() and budget > 0:
            self.stats.interrupted = True
        # 3. retention (this pipeline's rows only; once per pipeline, not per shard)
        if self.pipeline_steps:
            keep = await (self.keep_units or self.staging.inflight_units)()
            self.stats.retention_deleted_rows = await apply_retention(
                self.conn, self.keys.pipeline, self.config.flush.retention_days, keep)
            await self.step("after_retention")
        await self._report_backlog()
        if not self.pipeline_steps:
            return
        self.stats.dead_letter_units = await deadletter.count(self.conn, self.keys.pipeline)
        if self.stats.dead_letter_units:
            log.warning("pipeline %s: %d dead-lettered unit(s) wait: see 'analytics-pipeline deadletter list'",
                        self.keys.pipeline, self.stats.dead_letter_units)

    async def _claim(self, unit_id: str, limit: int) -> Claim:
        deadline = time.monotonic() + CLAIM_HOLD_WAIT_S
        redirects = 0
        while True:
            try:
                return await self.staging.claim(unit_id, limit, on=self.link.link)
            except ClaimHeld:
                if time.monotonic() > deadline:
                    raise FlushError(f"queries held claims for more than {CLAIM_HOLD_WAIT_S:.0f}s") from None
                await asyncio.sleep(0.01)
            except (redis.exceptions.AskError, redis.exceptions.TryAgainError, redis.exceptions.ReadOnlyError):
                # only the claim link sees these (the cluster client follows them itself): the script did not run
                redirects += 1
                if not self.link.active or redirects > CLAIM_REDIRECTS:
                    raise
                await asyncio.sleep(min(0.01 * redirects, 0.5))
                await self.link.refresh()

    async def _claim_replicated(self, unit_id: str) -> bool:
        """Whether the unit just claimed may be applied: no replicas to wait for, or WAIT says they have it."""
        return not self.link.active or await self._replicated([unit_id], await self.link.wait())

    async def _barrier(self) -> int:
        """Replicas holding every earlier write of the slot's master (the required count without a link)."""
        return await self.link.barrier() if self.link.active else self.link.required

    async def _replicated(self, units: list[str], acked: int) -> bool:
        """True when ``acked`` replicas suffice; else the units stay in flight for a later run (no apply now:
        a failover could still lose their claims and flush the same counts again) and the run says so."""
        required = self.link.required
        if acked >= required:
            return True
        self.stats.unreplicated_units.extend(units)
        self._fail(1, f"claim of unit(s) {', '.join(units)} reached {acked} of {required} replica(s) of "
                      f"{self.link.node} within {self.link.timeout_s:g}s: left in flight, not applied (a failover "
                      "could lose the claim and the counts would be flushed twice); a later run applies them")
        return False

    async def _process(self, unit_id: str, *, recovered: bool = False) -> None:
        """Open → apply (one transaction, ledger-guarded, reading the unit in chunks) → clean up; the unit
        stays in flight until cleanup. A unit that keeps failing is set aside (:meth:`_unit_failed`)."""
        try:
            unit = await self.staging.open_unit(unit_id)  # its keys and sizes; counts are read chunk by chunk
            await self.step("after_read")
            result = await apply_unit(self.conn, self.keys.pipeline, unit_id, unit,
                                      in_transaction=lambda: self.step("in_transaction"))
        except Exception as error:
            if not deadletter.is_unit_failure(error):
                raise
            await self._unit_failed(unit_id, error)
            return
        await self.step("after_commit")
        await self.staging.cleanup(unit_id)
        if recovered:  # only a unit left in flight by an earlier run can have failures on record
            await deadletter.forget_failures(self.staging.client, self.keys, unit_id)
        await self.step("after_cleanup")
        if result.applied:
            self.stats.units += 1
            self.stats.buckets += result.buckets
            self.stats.rows += result.rows
        else:
            self.stats.skipped_units += 1
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            log.info("pipeline %s: %d units, %d buckets, %d rows flushed so far", self.keys.tag,
                     self.stats.units, self.stats.buckets, self.stats.rows)

    async def _unit_failed(self, unit_id: str, error: Exception) -> None:
        """Count a failed apply; below the limit the run stops with UnitFailed (the next run tries the unit
        first again), at the limit the unit moves to the dead letters and the run goes on."""
        pipeline = self.keys.pipeline
        reason = describe(error)
        try:
            failures = await deadletter.count_failure(self.staging.client, self.keys, unit_id)
        except redis.exceptions.ResponseError as refused:  # e.g. OOM: not counted, tried again next run
            raise deadletter.UnitFailed(f"unit {unit_id} failed ({reason}); Redis refused to count the failure "
                                        f"({describe(refused)})") from error
        limit = self.config.flush.dead_letter_after_failures
        if failures < limit:
            raise deadletter.UnitFailed(f"unit {unit_id} failed ({failures} of {limit} runs before it is set "
                                        f"aside as a dead letter): {reason}") from error
        moved = await deadletter.move_unit(self.conn, pipeline, unit_id, await self.staging.open_unit(unit_id),
                                           failures, reason)
        await self.staging.cleanup(unit_id)
        await deadletter.forget_failures(self.staging.client, self.keys, unit_id)
        if moved:
            self.stats.dead_lettered_units += 1
            log.error("pipeline %s: unit %s failed %d runs and was set aside as a dead letter (%s); the pipeline "
                      "goes on. Fix the cause, then 'analytics-pipeline deadletter retry %s' (or 'discard')",
                      pipeline, unit_id, failures, reason, unit_id)

    async def _report_backlog(self) -> None:
        backlog = await self.staging.backlog()
        self.stats.oldest_unflushed_age_s = backlog.oldest_age_s
        self.stats.unflushed_buckets = backlog.dirty_buckets
        self.stats.inflight_units = backlog.inflight_units


async def flush_pipeline(client: aioredis.Redis, conn: asyncpg.Connection, config: Config, pipeline: str,
                         **options: object) -> PipelineStats:
    """Run the flush protocol once for ``pipeline`` (options: see :class:`PipelineFlush`)."""
    return await PipelineFlush(client, conn, config, pipeline, **options).run()  # type: ignore[arg-type]


__all__ = ["FlushError", "PipelineFlush", "PipelineStats", "ServiceUnreachable", "flush_pipeline"]

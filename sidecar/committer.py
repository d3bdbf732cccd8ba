"""Group commit: the events of every request that arrived within a few ms go to Redis in ONE Lua call.

Requests hand their validated events to :meth:`GroupCommitter.submit` and await the returned future;
it resolves (to the number of duplicates among them) only once the script that counted them has
answered, or fails with :class:`CommitFailed`, in which case nothing of the request was counted.

Why this shape: the Python process, not Redis, is the bottleneck, so Redis work is amortised over
all requests of a window (one EVALSHA, identical increments summed in Python), while at most
``MAX_IN_FLIGHT`` writes are outstanding and the next batch accumulates behind them.

A reply that never came (timeout, connection lost after sending) is ambiguous: the script may or
may not have run. Every commit therefore carries a unique token that the script claims first
(``SET token NX``); after an ambiguous failure we *fence* on a fresh connection with the same
``SET NX``: if the fence wins, the script can never run any more (it would find the token), so the
requests get 503; if the token is there, the script ran, and its value tells which events were
duplicates, so the requests get 200.

On a Redis Cluster every command goes to the master owning its slot (``sidecar/cluster.py``) and the
fence goes to the slot's *current* owner, through a failover. With ``server.wait_replicas: k`` a
script's reply is followed by ``WAIT k`` on the same connection; fewer than k replicas means the write
is in doubt (a failover may still lose it): the fence decides again, and a token found is only taken
as applied once ``WAIT k`` after a write on that connection says the replicas have it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.events import Event
from analytics_pipeline.core.keys import (
    PIPELINES_SET,
    USER_FIELD_SEPARATOR,
    PipelineKeys,
    message_digest,
    sidecar_shard_tag,
)

from .buckets import BucketKeyCache, hour_number
from .cluster import REFUSED_PREFIXES, RoutedConnection, Topology
from .metrics import SidecarMetrics
from .resp import NoScriptError, RedisConnectFailed, RedisReplyError

log = logging.getLogger(__name__)

SCRIPT = resources.files(__package__).joinpath("commit.lua").read_text(encoding="utf-8")
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

MAX_IN_FLIGHT = 2  # writes outstanding at once; the next batch accumulates behind them
FENCE_TTL_MS = 600_000  # how long a token (and so a fence) outlives its commit
MAX_DONE_TOKENS = 256  # tokens of answered commits deleted by the next script
REGISTER_EVERY_SECONDS = 60.0  # how often the pipeline's ap:pipelines entry is re-written
# No answer (RespConnection raises OSErrors for these): the command may or may not have run.
_AMBIGUOUS = (OSError, asyncio.TimeoutError)


class CommitFailed(Exception):
    """Nothing of the request was counted; answer 503 (``reason`` says why, for logs and metrics)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CommitSettings:
    """The parts of the config a commit needs, read once per batch (replaced on config reload)."""

    ttl_seconds: int
    dedup_window_seconds: int
    daily: bool
    hourly: bool
    user_daily: bool
    max_events: int
    window_seconds: float
    timeout_seconds: float
    wait_replicas: int
    wait_timeout_seconds: float
    shards: int

    @classmethod
    def from_config(cls, config: Config) -> CommitSettings:
        granularities = set(config.counters.granularities)
        return cls(config.counters.ttl_seconds, config.ingest.dedup_window_seconds,
                   "daily" in granularities, "hourly" in granularities, "user_daily" in granularities,
                   config.server.group_commit_max_events, config.server.group_commit_window_ms / 1000.0,
                   config.server.redis_timeout_seconds, config.server.wait_replicas,
                   config.server.wait_replicas_timeout_seconds, config.counters.shards)


@dataclass(slots=True)
class _Plan:
    """Keys and arguments of one EVALSHA, plus which request owns each deduplicated event."""

    keys: list[str]
    args: list[str | int | bytes]
    msg_owner: list[int]
    events: int


_Pending = tuple[Sequence[Event], "asyncio.Future[int]"]


class GroupCommitter:
    """Batches submitted events into atomic Lua writes; see the module docstring for the protocol."""

    def __init__(self, config: Config, metrics: SidecarMetrics | None = None,
                 fence_deadline_seconds: float | None = None, tag: str | None = None,
                 pod_name: str | None = None) -> None:
        # tag: which shard (core/keys.py); None = shard 0, or with pod_name the pod's shard of counters.shards
        self._pod_name = pod_name
        if tag is None and pod_name is not None:
            tag = sidecar_shard_tag(config.pipeline, config.counters.shards, pod_name)
        self.keys = PipelineKeys(config.pipeline, tag)
        self.pipeline = config.pipeline
        self.metrics = metrics or SidecarMetrics()
        self.metrics.shard.labels(self.keys.tag).set(1)
        self.settings = CommitSettings.from_config(config)
        timeout = config.server.redis_timeout_seconds
        self.fence_deadline = fence_deadline_seconds or max(30.0, 10 * timeout)
        # Our own connections (never shared, never retried): a command is sent at most once.
        self.topology = Topology(config.redis_url, timeout, config.redis.cluster, self.metrics.redirects)
        self._lanes = [RoutedConnection(self.topology, self.keys.slot) for _ in range(MAX_IN_FLIGHT)]
        self._free_lanes: list[RoutedConnection] = list(self._lanes)
        self._buckets = BucketKeyCache(self.keys)
        self._pending: list[_Pending] = []
        self._pending_events = 0
        self._max_pending_events = max(50_000, 20 * self.settings.max_events)
        self._collecting = False  # a _tick is scheduled
        self._deadline = 0.0  # loop time by which the batch being collected goes out
        self._seen = 0  # requests pending at the last _tick
        self._writes: set[asyncio.Task[None]] = set()
        self._done_tokens: list[str] = []
        self._instance = uuid.uuid4().hex[:16]
        self._sequence = itertools.count(1)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._registered_until = 0.0  # monotonic time until which ap:pipelines surely holds us

    # -------------------------------------------------------------------------------- public API
    @property
    def pending_events(self) -> int:
        return self._pending_events

    @property
    def writes_in_flight(self) -> int:
        """Writes holding a lane (not counting those whose outcome a fence is deciding)."""
        return len(self._lanes) - len(self._free_lanes)

    def update(self, config: Config) -> None:
        """Apply a reloaded config (TTL, granularities, dedup window, window sizes, shards) to later batches."""
        self.settings = CommitSettings.from_config(config)
        if self._pod_name is not None:
            tag = sidecar_shard_tag(self.pipeline, config.counters.shards, self._pod_name)
            if tag != self.keys.tag:
                self._switch_shard(tag)

    def _switch_shard(self, tag: str) -> None:
        """Later batches write to shard ``tag``; batches already planned finish on the old one."""
        log.info("counters.shards changed: writing to shard %s (was %s)", tag, self.keys.tag,
                 extra={"pipeline": self.pipeline, "shard": tag})
        self.metrics.shard.remove(self.keys.tag)
        self.keys = PipelineKeys(self.pipeline, tag)
        self.metrics.shard.labels(tag).set(1)
        self._buckets = BucketKeyCache(self.keys)
        self._done_tokens = []  # another slot: they must not join the new shard's scripts (they expire)
        self._registered_until = 0.0
        for lane in self._lanes:
            lane.slot = self.keys.slot

    def submit(self, events: Sequence[Event]) -> asyncio.Future[int]:
        """Queue one request's events; the future yields its duplicate count once stored in Redis."""
        if self._closed:
            raise CommitFailed("closed", "the sidecar is shutting down")
        if self._pending_events >= self._max_pending_events:
            raise CommitFailed("overloaded", f"{self._pending_events} events already wait for Redis")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._pending.append((events, future))
        self._pending_events += len(events)
        if self._pending_events >= self.settings.max_events:
            self._dispatch()
        elif not self._collecting and self._free_lanes:
            self._collecting = True
            self._deadline = loop.time() + self.settings.window_seconds
            self._seen = len(self._pending)
            loop.call_soon(self._tick)
        return future

    async def commit(self, events: Sequence[Event]) -> int:
        """Submit and wait: the number of duplicates among ``events`` (CommitFailed if not stored)."""
        return await self.submit(events)

    async def close(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - a drain budget, not a cancel
        """Write what is pending, wait for writes in flight (at most ``timeout``), close connections."""
        self._closed = True
        deadline = time.monotonic() + timeout
        while self._pending or self._writes:
            self._dispatch()
            if self._writes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.wait(set(self._writes), timeout=remaining)
            elif self._pending:  # no lane free yet
                await asyncio.sleep(0.001)
        for task in list(self._writes):
            task.cancel()
        for _events, future in self._pending:
            if not future.done():
                future.set_exception(CommitFailed("closed", "the sidecar shut down before this was written"))
        self._pending.clear()
        for lane in self._lanes:
            lane.abort()

    # -------------------------------------------------------------------------------- batching
    def _tick(self) -> None:
        """Once per event-loop turn while collecting: go when arrivals stop, or at the window's end.

        Waiting out a fixed window would leave the CPU idle under a closed-loop load; going as soon
        as a loop turn brought no new request keeps batches as large as the arrival rate allows.
        """
        loop = self._loop
        assert loop is not None
        count = len(self._pending)
        if count != self._seen and loop.time() < self._deadline:
            self._seen = count
            loop.call_soon(self._tick)
            return
        self._collecting = False
        self._dispatch()

    def _dispatch(self) -> None:
        """Start writes for pending requests while a lane is free; each takes whole requests only."""
        max_events = self.settings.max_events
        while self._pending and self._free_lanes:
            pending = self._pending
            if self._pending_events <= max_events:
                batch, self._pending = pending, []
                self._pending_events = 0
            else:
                taken = count = 0
                for events, _ in pending:
                    if taken and count + len(events) > max_events:
                        break
                    count += len(events)
                    taken += 1
                batch, self._pending = pending[:taken], pending[taken:]
                self._pending_events -= count
            lane = self._free_lanes.pop()
            task = asyncio.get_running_loop().create_task(self._write(lane, batch))
            self._writes.add(task)
            task.add_done_callback(self._write_done)

    def _write_done(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if self._pending:
            self._dispatch()

    # -------------------------------------------------------------------------------- one write
    def _plan(self, batch: list[_Pending], token_key: str, done_tokens: list[str]) -> _Plan:
        """Turn a batch into the script's KEYS/ARGV: summed increments, then per-message-id events."""
        s = self.settings
        dedup = s.dedup_window_seconds > 0
        for_hour = self._buckets.for_hour
        message_key = self.keys.message
        wanted = (s.daily, s.hourly, s.user_daily)
        separator = USER_FIELD_SEPARATOR  # fields as keys.user_field() builds them, inlined
        bucket_index: dict[str, int] = {}
        bucket_keys: list[str] = []
        bucket_fields: list[dict[str, int]] = []  # summed increments, per bucket
        hour_slots: dict[int, tuple[Any, ...]] = {}
        msg_keys: list[str] = []
        msg_args: list[str | int | bytes] = []
        msg_owner: list[int] = []
        total = 0

        def slot(hour: int) -> tuple[Any, ...]:
            # (daily fields, hourly fields, user fields, their bucket numbers); None when switched off
            found: list[Any] = [None] * 6
            for position, key in enumerate(for_hour(hour)):
                if wanted[position]:
                    number = bucket_index.get(key)
                    if number is None:
                        bucket_keys.append(key)
                        bucket_fields.append({})
                        number = bucket_index[key] = len(bucket_keys)
                    found[position], found[position + 3] = bucket_fields[number - 1], number
            hour_slots[hour] = result = tuple(found)
            return result

        last_ts = None
        last_hour = -1
        d_fields = h_fields = u_fields = None
        d_number = h_number = u_number = 0
        for owner, (events, _) in enumerate(batch):
            total += len(events)
            for event in events:
                ts = event.timestamp
                if ts is not last_ts:
                    last_ts = ts
                    hour = hour_number(ts)
                    if hour != last_hour:
                        last_hour = hour
                        d_fields, h_fields, u_fields, d_number, h_number, u_number = (
                            hour_slots.get(hour) or slot(hour))
                name = event.event_type
                user = event.user_id
                if dedup and event.message_id is not None:
                    incs: list[str | int] = []
                    if d_fields is not None:
                        incs += (d_number, name)
                    if h_fields is not None:
                        incs += (h_number, name)
                    if u_fields is not None and user is not None:
                        incs += (u_number, f"{name}{separator}{user}")
                    msg_keys.append(message_key(event.message_id))
                    msg_args.append(message_digest(event.message_id))
                    msg_args.append(len(incs) // 2)
                    msg_args += incs
                    msg_owner.append(owner)
                    continue
                if d_fields is not None:
                    d_fields[name] = d_fields.get(name, 0) + 1
                if h_fields is not None:
                    h_fields[name] = h_fields.get(name, 0) + 1
                if u_fields is not None and user is not None:
                    field = f"{name}{separator}{user}"
                    u_fields[field] = u_fields.get(field, 0) + 1
        args: list[str | int | bytes] = [s.ttl_seconds, s.dedup_window_seconds or 1, len(done_tokens), len(bucket_keys),
                                         self.keys.dedup_prefix]
        for fields in bucket_fields:  # per bucket: how many summed fields, then field, increment, ...
            args.append(len(fields))
            for pair in fields.items():
                args += pair
        args += msg_args
        keys: list[str] = [self.keys.dirty, token_key, *done_tokens, *bucket_keys, *msg_keys]
        return _Plan(keys, args, msg_owner, total)

    async def _write(self, lane: RoutedConnection, batch: list[_Pending]) -> None:
        metrics = self.metrics
        keys = self.keys  # a shard switch (config reload) affects later batches only
        token_key = keys.group_commit(f"{self._instance}:{next(self._sequence)}")
        done_tokens, self._done_tokens = self._done_tokens[:MAX_DONE_TOKENS], self._done_tokens[MAX_DONE_TOKENS:]
        started = time.perf_counter()
        holding = True

        def release() -> None:
            # A write whose outcome is being decided by a fence does not hold its lane: later batches
            # go on (and fail fast while Redis refuses connections) instead of queueing behind it.
            nonlocal holding
            if holding:
                holding = False
                self._free_lanes.append(lane)
                if self._pending:
                    self._dispatch()

        try:
            plan = self._plan(batch, token_key, done_tokens)
            reply = await self._execute(lane, plan, token_key, release, keys)
        except CommitFailed as failure:
            self._keep_done_tokens(keys, done_tokens)
            metrics.commit_failures.labels(failure.reason).inc()
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            return
        except BaseException as error:  # cancelled at shutdown, or a bug: nobody may hang
            self._keep_done_tokens(keys, done_tokens)
            failure = CommitFailed("internal_error", f"write failed: {error!r}")
            if not isinstance(error, asyncio.CancelledError):
                log.exception("group commit failed unexpectedly")
                metrics.commit_failures.labels("internal_error").inc()
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        finally:
            release()
        metrics.redis_write_seconds.observe(time.perf_counter() - started)
        self._keep_done_tokens(keys, [token_key])
        duplicates = [0] * len(batch)
        for ordinal in reply:
            duplicates[plan.msg_owner[ordinal - 1]] += 1
        dup_total = len(reply)
        metrics.events_accepted.inc(plan.events - dup_total)
        if dup_total:
            metrics.events_duplicate.inc(dup_total)
        metrics.requests_accepted.inc(len(batch))
        metrics.commit_events.observe(plan.events)
        metrics.commit_requests.observe(len(batch))
        for (_, future), dups in zip(batch, duplicates, strict=True):
            if not future.done():
                future.set_result(dups)

    def _keep_done_tokens(self, keys: PipelineKeys, tokens: list[str]) -> None:
        """Tokens for the next script to delete, unless they belong to a shard we no longer write."""
        if keys is self.keys:
            self._done_tokens.extend(tokens)

    async def _execute(self, lane: RoutedConnection, plan: _Plan, token_key: str,
                       release: Callable[[], None], keys: PipelineKeys) -> list[int]:
        """Run the script once (reloading it on NOSCRIPT); the duplicate ordinals, or CommitFailed."""
        try:
            if not lane.connected:
                await lane.connect()  # a connection the server closed is seen as such: reconnects
                self._registered_until = 0.0  # Redis may have restarted empty
        except (RedisReplyError, OSError) as error:  # OSError: RedisUnavailable; RedisReplyError: AUTH/SELECT refused
            raise CommitFailed("redis_unavailable", f"cannot connect to Redis: {error}") from None
        if time.monotonic() >= self._registered_until:
            await self._register(lane, keys)
        for attempt in (1, 2):
            try:
                reply = await lane.execute("EVALSHA", SCRIPT_SHA, len(plan.keys), *plan.keys, *plan.args)
            except NoScriptError:
                if attempt == 2:
                    raise CommitFailed("redis_error", "Redis keeps forgetting the commit script") from None
                await self._load_script(lane)
                continue
            except RedisReplyError as error:
                if str(error).startswith(REFUSED_PREFIXES):  # cluster migrating/failing over, Redis loading
                    log.warning("Redis refused the group commit for now: %s", error, extra={"pipeline": self.pipeline})
                    raise CommitFailed("redis_unavailable", f"Redis refused the write for now: {error}") from None
                log.error("Redis refused the group commit: %s", error, extra={"pipeline": self.pipeline})
                raise CommitFailed("redis_error", f"Redis refused the write: {error}") from None
            except RedisConnectFailed as error:  # nothing was sent (a cluster node we had to connect to)
                raise CommitFailed("redis_unavailable", f"cannot connect to Redis: {error}") from None
            except _AMBIGUOUS as error:
                release()
                return await self._resolve_ambiguous(token_key, error)
            ordinals = self._parse_reply(reply)
            wait = self.settings.wait_replicas
            if wait and not await self._replicated(lane, wait):
                release()
                return await self._resolve_in_doubt(token_key, wait)
            return ordinals
        raise AssertionError("unreachable")  # pragma: no cover

    async def _replicated(self, lane: RoutedConnection, wait: int) -> bool:
        """``WAIT wait timeout`` on the connection that ran the script: did enough replicas get it?"""
        s = self.settings
        started = time.perf_counter()
        try:
            acked = await lane.execute_within(s.wait_timeout_seconds + s.timeout_seconds, "WAIT", wait,
                                              max(1, round(s.wait_timeout_seconds * 1000)))
        except (*_AMBIGUOUS, RedisReplyError) as error:
            log.warning("WAIT failed (%r): the write is in doubt", error, extra={"pipeline": self.pipeline})
            return False
        finally:
            self.metrics.wait_seconds.observe(time.perf_counter() - started)
        return int(acked) >= wait

    async def _resolve_in_doubt(self, token_key: str, wait: int) -> list[int]:
        """Applied, but fewer than ``wait`` replicas confirmed it: decide with fence + WAIT until the deadline."""
        log.warning("group commit %s not confirmed by %d replica(s) in time; resolving", token_key, wait,
                    extra={"pipeline": self.pipeline})
        found = await self.fence(token_key, wait)
        if found is _UNKNOWN:
            self.metrics.in_doubt.labels("unknown").inc()
            log.error("could not confirm group commit %s on %d replica(s) within %.0f s; answering 503 "
                      "(it may be counted)", token_key, wait, self.fence_deadline, extra={"pipeline": self.pipeline})
            raise CommitFailed("unknown_outcome", "the write was not confirmed by the replicas; its outcome is unknown")
        if found is None or found == b"fenced":
            self.metrics.in_doubt.labels("fenced").inc()
            log.warning("group commit %s was lost (a failover, most likely) and is fenced off", token_key,
                        extra={"pipeline": self.pipeline})
            raise CommitFailed("redis_unavailable", "the write was lost before the replicas had it; nothing counted")
        self.metrics.in_doubt.labels("applied").inc()
        return _ordinals(found)

    async def _register(self, lane: RoutedConnection, keys: PipelineKeys) -> None:
        """Add the pipeline to ap:pipelines (how ``flush --all`` finds it) before counting anything.

        A separate command, not part of the script: ap:pipelines lives in another Redis Cluster slot
        than the pipeline's keys. Idempotent, so any failure simply fails this commit (nothing counted).
        Re-done every REGISTER_EVERY_SECONDS and after a reconnect, in case Redis lost the set.
        """
        try:
            await lane.execute("SADD", PIPELINES_SET, keys.tag)
        except RedisReplyError as error:
            raise CommitFailed("redis_error", f"Redis refused to register the pipeline: {error}") from None
        except _AMBIGUOUS as error:
            raise CommitFailed("redis_unavailable", f"Redis unavailable: {error!r}") from None
        self._registered_until = time.monotonic() + REGISTER_EVERY_SECONDS

    async def _load_script(self, lane: RoutedConnection) -> None:
        try:
            await lane.execute("SCRIPT", "LOAD", SCRIPT)
        except RedisReplyError as error:
            raise CommitFailed("redis_error", f"cannot load the commit script: {error}") from None
        except _AMBIGUOUS as error:  # loading a script is idempotent: nothing was counted
            raise CommitFailed("redis_unavailable", f"Redis unavailable: {error!r}") from None

    @staticmethod
    def _parse_reply(reply: list[int]) -> list[int]:
        if not reply or int(reply[0]) != 1:
            # The token existed before this script ran: impossible for a fresh token unless a fence
            # from a previous life of this exact token won. Nothing was written by this call.
            raise CommitFailed("redis_error", "the commit was fenced off before it ran")
        return [int(ordinal) for ordinal in reply[1:]]

    # -------------------------------------------------------------------------------- fencing
    async def _resolve_ambiguous(self, token_key: str, error: BaseException) -> list[int]:
        """Decide whether an unanswered script ran: fence its token until Redis answers."""
        log.warning("Redis write outcome unknown (%r); fencing token %s", error, token_key,
                    extra={"pipeline": self.pipeline})
        found = await self.fence(token_key, self.settings.wait_replicas)
        if found is _UNKNOWN:
            self.metrics.ambiguous_writes.labels("unknown").inc()
            log.error("could not decide whether group commit %s was applied within %.0f s; answering 503 "
                      "(events without message_id may be counted twice if clients retry)", token_key,
                      self.fence_deadline, extra={"pipeline": self.pipeline})
            raise CommitFailed("unknown_outcome", "Redis did not answer; the outcome of the write is unknown")
        if found is None or found == b"fenced":
            self.metrics.ambiguous_writes.labels("fenced").inc()
            log.info("fence won for %s: the write will never apply", token_key, extra={"pipeline": self.pipeline})
            raise CommitFailed("redis_unavailable", f"Redis did not answer in time ({error!r}); nothing was counted")
        self.metrics.ambiguous_writes.labels("applied").inc()
        log.info("fence found %s applied", token_key, extra={"pipeline": self.pipeline})
        return _ordinals(found)

    async def fence(self, token_key: str, wait_replicas: int = 0) -> bytes | object | None:
        """``SET token fenced NX PX GET`` on fresh connections until Redis answers or the deadline.

        Returns None when the fence won (or an earlier fence of ours had), the token's value when the
        commit had run first, or ``_UNKNOWN`` when Redis never answered within the deadline. On a
        cluster each attempt goes to the token's slot's current master (the map is reloaded after a
        failure). With ``wait_replicas`` a token found counts only once ``PEXPIRE`` of it (a write on
        the same connection) is confirmed by ``WAIT``: then the replicas hold the commit too.
        """
        deadline = time.monotonic() + self.fence_deadline
        delay = 0.02
        s = self.settings
        while True:
            connection = RoutedConnection(self.topology, self.keys.slot)
            try:
                await connection.connect()
                try:
                    found = await connection.execute("SET", token_key, "fenced", "NX", "PX", FENCE_TTL_MS, "GET")
                except RedisReplyError as error:
                    if "syntax" not in str(error).lower():
                        raise
                    # Redis < 7 refuses NX together with GET: SET NX, and read the token if it lost.
                    won = await connection.execute("SET", token_key, "fenced", "NX", "PX", FENCE_TTL_MS)
                    found = None if won is not None else await connection.execute("GET", token_key)
                if found is None or found == b"fenced" or not wait_replicas:
                    return found  # type: ignore[no-any-return]
                await connection.execute("PEXPIRE", token_key, FENCE_TTL_MS)
                acked = await connection.execute_within(s.wait_timeout_seconds + s.timeout_seconds, "WAIT",
                                                        wait_replicas, max(1, round(s.wait_timeout_seconds * 1000)))
                if int(acked) >= wait_replicas:
                    return found  # type: ignore[no-any-return]
                log.debug("commit %s found but only %s replica(s) confirm it; asking again", token_key, acked)
            except (*_AMBIGUOUS, RedisReplyError) as error:
                # No answer, or a transient refusal (LOADING after a restart, BUSY, ...): ask again.
                log.debug("fence attempt for %s failed: %r", token_key, error)
                self.topology.invalidate()
            finally:
                connection.abort()
            if time.monotonic() >= deadline:
                return _UNKNOWN
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


_UNKNOWN = object()


def _ordinals(found: object) -> list[int]:
    """The duplicate ordinals a commit's token records (``ok:3,7``)."""
    text = found.decode() if isinstance(found, bytes) else str(found)
    return [int(part) for part in text.partition(":")[2].split(",") if part]

"""Run the whole pipeline on this machine and check that every number is exact.

Starts (or reuses, from REDIS_URL / DATABASE_URL) Redis and PostgreSQL, migrates, starts the real
sidecar for a fresh pipeline 'demo/shop-<random>', sends a shop's events of the last 48 hours over
HTTP (our format, Segment and PostHog shapes, batches and singles, client retries), runs the flusher
twice while events keep arriving, then compares what the query path reports (the dashboard's numbers)
with what was acknowledged, counting each message_id once. Exit 0 if equal, 1 with a diff if not,
3 if the demo could not run (the message says what to do).

Progress goes to stderr, the summary to stdout (--json: one JSON object). --keep-running leaves the
sidecar and its dashboard up (a trickle of live events, a flush every --flush-interval seconds) until
Ctrl-C. The demo pipeline's keys and rows are removed at the end (--keep-data keeps them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import asyncpg
import orjson
import redis.asyncio as aioredis

from analytics_pipeline.core.config import ENV_CONFIG_FILE, Config, load_config, read_config_file
from analytics_pipeline.core.postgres import connect, create_pool
from analytics_pipeline.core.redis_clients import RedisModeError, async_client
from analytics_pipeline.core.services import ServiceError, Services, local_services
from analytics_pipeline.flusher.errors import POSTGRES_CONNECTION_ERRORS, REDIS_CONNECTION_ERRORS, FlushError, describe
from analytics_pipeline.flusher.migrate import apply_schema, schema_objects
from analytics_pipeline.flusher.run import PipelineStats
from analytics_pipeline.flusher.shards import flush_pipeline_shards
from analytics_pipeline.reads.queries import Queries

from .demo_check import Tally, Window, compare, expected_tally, http_tally, observed_tally, storage_split
from .demo_report import day_table, marks, type_table
from .demo_sender import Sender
from .demo_stack import DemoError, SidecarProcess, choose_port, remove_pipeline_data, sidecar_env
from .demo_traffic import EVENT_WEIGHTS, WINDOW, DemoEvent, Plan, PlannedRequest, build_plan

DEFAULT_EVENTS = 30_000
DEFAULT_USERS = 2_500
QUICK_EVENTS = 2_000
QUICK_USERS = 200
FLUSH_AT = (0.35, 0.70)  # flushes start when these shares of the events have been sent
SAMPLE_EVERY_S = 0.1  # live queries while events arrive (every 20 ms while a flush runs)
FINAL_BATCH_SIZE = 4  # the final flush moves a few buckets per unit, so queries land between its commits
PROGRESS_EVERY_S = 1.0
MAX_DIFF_LINES = 25
EXIT_MISMATCH = 1
EXIT_CANNOT_RUN = 3


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.5 <= value <= 86400:
        raise argparse.ArgumentTypeError("must be between 0.5 and 86400 seconds")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be a TCP port (1-65535)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``analytics-pipeline demo``."""
    parser.add_argument("--events", type=_positive, metavar="N",
                        help=f"unique events to send (default {DEFAULT_EVENTS:,}; --quick: {QUICK_EVENTS:,})")
    parser.add_argument("--users", type=_positive, metavar="N",
                        help=f"distinct users (default {DEFAULT_USERS:,}; --quick: {QUICK_USERS:,})")
    parser.add_argument("--quick", action="store_true", help="a small run (a few seconds; used by the tests)")
    parser.add_argument("--seed", type=int, help="random seed: the same seed sends the same events (default: random)")
    parser.add_argument("--port", type=_port, metavar="PORT",
                        help="sidecar port on 127.0.0.1 (default 8787, or a free port if 8787 is taken)")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the sidecar and dashboard up (live trickle, periodic flush) until Ctrl-C")
    parser.add_argument("--flush-interval", type=_seconds, default=30.0, metavar="SECONDS",
                        help="with --keep-running: seconds between flushes (default 30)")
    parser.add_argument("--keep-data", action="store_true",
                        help="keep the demo pipeline's Redis keys and PostgreSQL rows afterwards")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    parser.add_argument("--concurrency", type=_positive, default=12, help=argparse.SUPPRESS)
    # Test hook (documented in docs/demo.md): send one event the bookkeeping does not record, so the
    # self-check must find a difference and exit 1.
    parser.add_argument("--inject-mismatch", action="store_true", help=argparse.SUPPRESS)


def say(message: str) -> None:
    """One progress line on stderr."""
    print(f"demo: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- flushes
@dataclass
class FlushRecord:
    """One flush run of the demo and what it moved."""

    number: int
    reason: str
    started_s: float
    acked_at_start: int
    stats: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        keep = ("run_id", "units", "buckets", "rows", "duration_s", "error", "locked")
        return {"number": self.number, "reason": self.reason, "started_s": round(self.started_s, 3),
                "acked_at_start": self.acked_at_start, **{k: self.stats.get(k) for k in keep}}


class Flushes:
    """Runs the real flush protocol (``flush_pipeline_shards``) for the demo pipeline, one run at a time."""

    def __init__(self, client: aioredis.Redis, conn: asyncpg.Connection, config: Config, clock: float, *,
                 first: int = 1, verbose: bool = True) -> None:
        self.first = first
        self.verbose = verbose
        self.client = client
        self.conn = conn
        self.config = config
        self.clock = clock
        self.records: list[FlushRecord] = []
        self.task: asyncio.Task[PipelineStats] | None = None
        self.started = asyncio.Event()  # set at every start (wakes the live sampler)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def start(self, reason: str, acked: int, batch_size: int | None = None) -> None:
        """Start a run (after the previous one ended) and return once it has claimed its first batch."""
        await self.wait()
        record = FlushRecord(self.first + len(self.records), reason, time.monotonic() - self.clock, acked)
        self.records.append(record)
        claimed = asyncio.Event()

        async def hook(step: str) -> None:
            if step in ("after_claim", "after_retention"):
                claimed.set()

        if self.verbose:
            say(f"flush #{record.number} started ({reason}; {acked:,} events acknowledged so far)")
        self.started.set()
        self.task = asyncio.create_task(flush_pipeline_shards(self.client, self.conn, self.config, self.config.pipeline,
                                                       hook=hook, batch_size=batch_size))
        self.task.add_done_callback(lambda task: self._finished(record, task))
        claim_wait = asyncio.create_task(claimed.wait())
        await asyncio.wait({self.task, claim_wait}, return_when=asyncio.FIRST_COMPLETED)
        claim_wait.cancel()

    def _finished(self, record: FlushRecord, task: asyncio.Task[PipelineStats]) -> None:
        if task.cancelled():
            record.stats = {"error": "cancelled"}
            return
        if task.exception() is not None:
            record.stats = {"error": describe(task.exception())}  # type: ignore[arg-type]
        else:
            record.stats = task.result().as_dict()
        _, _, arrow = marks()
        if record.stats.get("locked"):
            say(f"flush #{record.number} skipped: another flusher holds this pipeline's lock")
            return
        if record.stats.get("error"):
            say(f"flush #{record.number} FAILED: {record.stats['error']}")
        elif self.verbose:
            say(f"flush #{record.number} done in {record.stats['duration_s']:.2f}s: {record.stats['units']} unit(s), "
                f"{record.stats['buckets']} Redis buckets {arrow} {record.stats['rows']:,} PostgreSQL rows")

    async def wait(self) -> None:
        """Wait for the current run; DemoError if it failed."""
        if self.task is not None:
            with contextlib.suppress(Exception):
                await self.task
            failed = self.records[-1].stats.get("error")
            if failed:
                raise DemoError(f"flush #{self.records[-1].number} failed: {failed}")

    async def run(self, reason: str, acked: int, batch_size: int | None = None) -> FlushRecord:
        """One whole run (again, a moment later, while another flusher holds the pipeline's lock)."""
        await self.start(reason, acked, batch_size)
        await self.wait()
        deadline = time.monotonic() + 30
        while self.records[-1].stats.get("locked") and time.monotonic() < deadline:
            self.records.pop()
            await asyncio.sleep(0.2)
            await self.start(reason, acked, batch_size)
            await self.wait()
        return self.records[-1]


# -------------------------------------------------------------------------------------------- checks
@dataclass
class LiveSamples:
    """Queries taken while events arrive and flushes run: each must lie between acked and sent."""

    count: int = 0
    during_flush: int = 0
    violations: list[str] = field(default_factory=list)
    last: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"count": self.count, "during_flush": self.during_flush, "violations": self.violations}


async def sample_live(queries: Queries, sender: Sender, flushes: Flushes, window: Window, samples: LiveSamples,
                      stop: asyncio.Event) -> None:
    """Until ``stop``: acked-before <= query total <= sent-after, whatever the flusher is doing."""
    while not stop.is_set():
        lower, flushing = sender.acked_count, flushes.running
        series = await queries.counts(None, window.first_day, window.last_day, "day")
        upper = sender.dispatched_count
        flushing = flushing or flushes.running
        samples.count += 1
        samples.during_flush += int(flushing)
        ok, bad, _ = marks()
        if lower <= series.total <= upper:
            samples.last = f"query now {series.total:,} {ok}"
        else:
            problem = f"query total {series.total:,} outside [{lower:,} acked, {upper:,} sent]"
            samples.violations.append(problem)
            samples.last = f"{problem} {bad}"
        flushes.started.clear()
        wake = [asyncio.create_task(stop.wait()), asyncio.create_task(flushes.started.wait())]
        await asyncio.wait(wake, timeout=0.02 if flushes.running else SAMPLE_EVERY_S,
                           return_when=asyncio.FIRST_COMPLETED)
        for task in wake:
            task.cancel()


async def sample_steady(queries: Queries, window: Window, before: Tally, flushes: Flushes,
                        samples: LiveSamples) -> None:
    """While a flush runs and nothing is sent, every query must equal ``before`` (no dip, no spike).

    Samples alternate between the grand total and the whole tally (all types, days, hours, users).
    """
    while flushes.running:
        if samples.count % 2 == 0:
            total = (await queries.counts(None, window.first_day, window.last_day, "day")).total
            problems = [] if total == before.total else [
                f"total {total:,} while the flush ran, {before.total:,} before it"]
        else:
            problems = compare(before, await observed_tally(queries, window), "query while the flush ran")
        samples.count += 1
        samples.during_flush += 1
        samples.violations += [p for p in problems if p not in samples.violations]
        await asyncio.sleep(0.005)


async def report_progress(sender: Sender, total: int, samples: LiveSamples, stop: asyncio.Event) -> None:
    """A progress line every second while sending."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PROGRESS_EVERY_S)
        if stop.is_set():
            return
        say(f"  {sender.dispatched_count:>8,} / {total:,} events sent ({sender.stats.rate():,.0f} events/s), "
            f"{sender.acked_count:,} acknowledged; {samples.last}")


# ---------------------------------------------------------------------------------------------- demo
@dataclass
class Outcome:
    """What the demo found, for the summary and the exit code."""

    summary: dict[str, Any]
    diff: list[str]


class Demo:
    """One demo run against ``services`` (see the module docstring for the steps)."""

    def __init__(self, args: argparse.Namespace, base: Config, services: Services, clock: float) -> None:
        self.args = args
        self.services = services
        self.clock = clock
        self.pipeline = f"demo/shop-{secrets.token_hex(3)}"
        self.config = base.replace(pipeline=self.pipeline, redis_url=services.redis_url,
                                   database_url=services.database_url)
        self.events = args.events or (QUICK_EVENTS if args.quick else DEFAULT_EVENTS)
        self.users = args.users or (QUICK_USERS if args.quick else DEFAULT_USERS)
        self.seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
        self.timings: dict[str, float] = {}
        self.keep_data = bool(args.keep_data)
        self.crashed = False
        self.workdir = Path(tempfile.mkdtemp(prefix="analytics-pipeline-demo-"))

    def lap(self, name: str, since: float) -> None:
        self.timings[name] = round(time.monotonic() - since, 3)

    async def main(self) -> int:
        client = cast(aioredis.Redis, await async_client(self.config.redis_url, self.config.redis.cluster, timeout=10))
        conn: asyncpg.Connection | None = None
        pool: asyncpg.Pool | None = None
        sidecar: SidecarProcess | None = None
        failed = False
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.args.concurrency + 4),
                                             timeout=aiohttp.ClientTimeout(total=30)) as session:
                started = time.monotonic()
                conn = await connect(self.config, "analytics-pipeline demo")
                created = await apply_schema(conn)
                self.lap("migrate_s", started)
                say(f"schema: created {', '.join(name for _, name in created)}" if created else
                    f"schema: up to date ({len(schema_objects())} tables and indexes)")
                pool = await create_pool(self.config, "analytics-pipeline demo queries")

                started = time.monotonic()
                port = choose_port(self.args.port)
                sidecar = SidecarProcess(port, sidecar_env(self.config.redis_url, self.config.database_url,
                                                           self.pipeline), self.workdir / "sidecar.log",
                                         self.args.config or os.environ.get(ENV_CONFIG_FILE))
                await sidecar.start(session)
                self.lap("sidecar_start_s", started)
                say(f"sidecar: 'analytics-pipeline sidecar' (pid {sidecar.pid}) ready on {sidecar.url} "
                    f"for the fresh pipeline {self.pipeline}")

                outcome = await self.exercise(session, client, conn, pool, sidecar)
                failed = bool(outcome.diff)
                self.print_summary(outcome)
                if self.args.keep_running:
                    failed = await self.keep_running(session, client, conn, pool, sidecar, outcome) or failed
                return EXIT_MISMATCH if failed else 0
        except Exception:
            self.crashed = True
            raise
        finally:
            await self.shutdown(client, conn, pool, sidecar, failed)

    async def exercise(self, session: aiohttp.ClientSession, client: aioredis.Redis, conn: asyncpg.Connection,
                       pool: asyncpg.Pool, sidecar: SidecarProcess) -> Outcome:
        """Send with flushes in between, then check twice (split between the stores, then all flushed)."""
        plan = build_plan(self.events, self.users, self.seed)
        window = Window.around(plan.now - WINDOW, plan.now)
        say(f"sending {len(plan.events):,} events of {self.users:,} users (seed {self.seed}), timestamps "
            f"{(plan.now - WINDOW):%Y-%m-%d %H:%M} .. {plan.now:%Y-%m-%d %H:%M} UTC, in {len(plan.requests):,} "
            f"requests incl. {plan.duplicate_sends:,} retried duplicates")
        queries = Queries.for_config(client, pool, self.config)
        flushes = Flushes(client, conn, self.config, self.clock)
        sender = Sender(session, sidecar.url, concurrency=self.args.concurrency)

        def checkpoint(share: float) -> tuple[int, Any]:
            async def start() -> None:
                await flushes.start(f"during ingest, at {share:.0%} of the events", sender.acked_count)
            return int(len(plan.events) * share), start

        samples = LiveSamples()
        stop = asyncio.Event()
        background = [asyncio.create_task(sample_live(queries, sender, flushes, window, samples, stop)),
                      asyncio.create_task(report_progress(sender, len(plan.events), samples, stop))]
        started = time.monotonic()
        try:
            stats = await sender.run(plan, [checkpoint(share) for share in FLUSH_AT])
        finally:
            stop.set()
            await asyncio.gather(*background, return_exceptions=True)
        self.lap("send_s", started)
        unique = len(sender.acked)
        say(f"sent {stats.event_sends:,} events ({unique:,} unique + {stats.event_sends - unique:,} retried duplicates)"
            f" in {stats.requests:,} requests in {self.timings['send_s']:.1f}s "
            f"({stats.rate():,.0f} events/s); sidecar answered accepted {stats.accepted:,}, "
            f"duplicates {stats.duplicates:,}")
        if self.args.inject_mismatch:
            await self.inject_mismatch(session, sidecar.url, plan)
        await flushes.wait()

        started = time.monotonic()
        expected = expected_tally(sender.acked.values())
        split = await storage_split(client, conn, self.pipeline, window)
        observed = await observed_tally(queries, window)
        over_http = await http_tally(session, sidecar.url, window)
        async with session.get(sidecar.url + "/") as response:
            dashboard_status = response.status
        self.lap("check_s", started)
        ok, bad, _ = marks()
        say(f"check: {split.postgresql:,} counts in PostgreSQL + {split.redis_live:,} still live in Redis; "
            f"the query path adds both")

        final_samples = LiveSamples()
        reason = f"final, all events sent, {FINAL_BATCH_SIZE} buckets per unit"
        await flushes.start(reason, sender.acked_count, batch_size=FINAL_BATCH_SIZE)
        await sample_steady(queries, window, observed, flushes, final_samples)
        await flushes.wait()
        if flushes.records[-1].stats.get("locked"):  # another flusher ran: ours did nothing, run it again
            flushes.records.pop()
            await flushes.run(reason, sender.acked_count, batch_size=FINAL_BATCH_SIZE)
        final = flushes.records[-1]
        split_after = await storage_split(client, conn, self.pipeline, window)
        observed_after = await observed_tally(queries, window)

        diff = self.self_check(plan, sender, expected, observed, over_http, observed_after, split, split_after,
                               samples, dashboard_status)
        diff += [f"during the final flush: {v}" for v in final_samples.violations]
        say(f"self-check: {'PASS ' + ok if not diff else f'FAIL {bad} ({len(diff)} differences)'}")
        summary = self.summary(plan, sender, flushes, samples, expected, observed, split, split_after, final,
                               dashboard_status, sidecar, diff)
        summary["final_flush_samples"] = final_samples.as_json()
        return Outcome(summary, diff)

    async def inject_mismatch(self, session: aiohttp.ClientSession, url: str, plan: Plan) -> None:
        """Test hook: one event the bookkeeping does not know about (the self-check must catch it)."""
        body = {"event": "purchase", "user_id": "user-00001", "timestamp": plan.now.isoformat(),
                "message_id": f"injected-{uuid.uuid4()}"}
        async with session.post(url + "/v1/events", json=body) as response:
            say(f"--inject-mismatch: sent 1 unrecorded event ({response.status})")

    @staticmethod
    def self_check(plan: Plan, sender: Sender, expected: Tally, observed: Tally, over_http: Tally,
                   observed_after: Tally, split: Any, split_after: Any, samples: LiveSamples,
                   dashboard_status: int) -> list[str]:
        """Every way the run could be wrong, as readable lines (empty: exact)."""
        stats = sender.stats
        diff = compare(expected, observed, "query")
        diff += compare(expected, over_http, "HTTP /v1")
        diff += compare(expected, observed_after, "query after the final flush")
        if len(sender.acked) != len(plan.events):
            diff.append(f"sender: {len(plan.events) - len(sender.acked):,} events were never acknowledged")
        if stats.accepted != len(sender.acked):
            diff.append(f"sidecar: accepted {stats.accepted:,} events but {len(sender.acked):,} unique ones were sent")
        if stats.duplicates != plan.duplicate_sends:
            diff.append(f"sidecar: reported {stats.duplicates:,} duplicates but {plan.duplicate_sends:,} were re-sent")
        if split.total != observed.total:
            diff.append(f"stores: PostgreSQL {split.postgresql:,} + Redis {split.redis_live:,} = {split.total:,}, "
                        f"but the query said {observed.total:,}")
        if split_after.redis_live or split_after.postgresql != observed_after.total:
            diff.append(f"after the final flush: PostgreSQL {split_after.postgresql:,}, "
                        f"Redis {split_after.redis_live:,}; expected all {observed_after.total:,} in PostgreSQL")
        diff += [f"live: {v}" for v in samples.violations]
        if dashboard_status != 200:
            diff.append(f"dashboard: GET / answered {dashboard_status}")
        return diff

    def summary(self, plan: Plan, sender: Sender, flushes: Flushes, samples: LiveSamples, expected: Tally,
                observed: Tally, split: Any, split_after: Any, final: FlushRecord, dashboard_status: int,
                sidecar: SidecarProcess, diff: list[str]) -> dict[str, Any]:
        """The machine-readable summary (``--json``); the text summary is printed from it."""
        stats = sender.stats
        self.timings["total_s"] = round(time.monotonic() - self.clock, 3)
        return {
            "ok": not diff,
            "pipeline": self.pipeline,
            "seed": self.seed,
            "dashboard_url": sidecar.url + "/",
            "services": {"redis_url": self.services.redis_url, "database_url": self.services.database_url,
                         "redis": "throwaway" if self.services.redis_started else "from REDIS_URL",
                         "postgresql": "throwaway" if self.services.postgres_started else "from DATABASE_URL"},
            "window": {"from": (plan.now - WINDOW).isoformat(), "to": plan.now.isoformat()},
            "sent": {"unique_events": len(plan.events), "users": plan.users, "requests": len(plan.requests),
                     "requests_by_style": plan.styles(), "requests_by_path": dict(stats.by_path),
                     "event_sends": stats.event_sends, "duplicate_sends": plan.duplicate_sends,
                     "acked_unique": len(sender.acked), "accepted": stats.accepted,
                     "duplicates_reported": stats.duplicates, "client_retries": stats.client_retries,
                     "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
                     "events_per_second": round(stats.rate(), 1), "seconds": self.timings.get("send_s")},
            "expected": expected.as_json(),
            "observed": observed.as_json(),
            "storage": {"at_check": split.as_json(), "after_final_flush": split_after.as_json()},
            "flushes": [r.as_json() for r in flushes.records],
            "live_samples": samples.as_json(),
            "dashboard_status": dashboard_status,
            "timings": self.timings,
            "diff": diff,
        }

    def print_summary(self, outcome: Outcome) -> None:
        """Boxed tables and a few lines on stdout, or the JSON object with --json."""
        s = outcome.summary
        if self.args.json:
            sys.stdout.write(orjson.dumps(s).decode() + "\n")
            sys.stdout.flush()
            return
        ok, bad, arrow = marks()
        expected = _tally(s["expected"])
        observed = _tally(s["observed"])
        sent, at_check, after = s["sent"], s["storage"]["at_check"], s["storage"]["after_final_flush"]
        styles = sent["requests_by_style"]
        lines = [
            "",
            f"analytics-pipeline demo: pipeline {s['pipeline']}, seed {s['seed']}, "
            f"events of {s['window']['from'][:16]} .. {s['window']['to'][:16]} UTC",
            "",
            "Events by type (numbers from reads.queries, PostgreSQL + Redis, one consistent snapshot)",
            type_table(expected, observed),
            "",
            "By UTC day ('all days' users: distinct over the whole range, not a sum)",
            day_table(expected, observed),
            "",
            f"Sent       {sent['unique_events']:,} unique events of {sent['users']:,} users in {sent['requests']:,} "
            f"requests: {styles.get('single', 0):,} single /v1/events, {styles.get('track', 0):,} /v1/track, "
            f"{styles.get('array', 0) + styles.get('wrapped', 0):,} /v1/events batches, "
            f"{styles.get('segment', 0):,} Segment /v1/batch, {styles.get('posthog', 0):,} PostHog /batch",
            f"Retries    {sent['duplicate_sends']:,} events sent again with the same message_id; the sidecar "
            f"reported {sent['duplicates_reported']:,} duplicates and accepted {sent['accepted']:,} "
            f"{arrow} each counted once {ok if sent['accepted'] == sent['unique_events'] else bad}",
            f"Throughput {sent['event_sends']:,} events in {sent['seconds']:.1f}s = {sent['events_per_second']:,.0f} "
            f"events/s over HTTP (sidecar and load generator sharing this machine)",
        ]
        for flush in s["flushes"]:
            lines.append(f"Flush #{flush['number']}   {flush['reason']}: {flush['buckets']} buckets {arrow} "
                         f"{flush['rows']:,} rows in {flush['units']} transaction(s), {flush['duration_s']:.2f}s")
        during = s["final_flush_samples"]
        live = s["live_samples"]
        lines += [
            f"Live       {live['count']} queries while events arrived ({live['during_flush']} during a flush): "
            f"each between acknowledged and sent {ok if not live['violations'] else bad}",
            f"Mid-flush  {during['count']} queries while flush #{len(s['flushes'])} committed unit after unit: "
            f"each the same as before it ({observed.total:,}) {ok if not during['violations'] else bad}",
            f"At check   {at_check['postgresql']:,} in PostgreSQL + {at_check['redis_live']:,} live in Redis = "
            f"{at_check['total']:,}: the query adds both {ok if at_check['total'] == observed.total else bad}",
            f"Final      after the last flush {after['postgresql']:,} in PostgreSQL, {after['redis_live']:,} in Redis, "
            f"same numbers {ok if after['redis_live'] == 0 and after['postgresql'] == observed.total else bad}",
            f"HTTP       /v1/events, /v1/counts, /v1/uniques agree; dashboard GET / {s['dashboard_status']}",
            f"Services   Redis {s['services']['redis']}, PostgreSQL {s['services']['postgresql']}; "
            f"total time {s['timings']['total_s']:.1f}s",
            f"Dashboard  {s['dashboard_url']}" + ("" if self.args.keep_running else
                                                  "  (stops with the demo: add --keep-running to browse it)"),
            "",
        ]
        if outcome.diff:
            shown = outcome.diff[:MAX_DIFF_LINES]
            lines += [f"RESULT     FAIL {bad}: {len(outcome.diff)} difference(s):", *(f"  - {d}" for d in shown)]
            if len(outcome.diff) > len(shown):
                lines.append(f"  ... and {len(outcome.diff) - len(shown)} more (--json lists all)")
            lines.append("An exact pipeline never differs: please report this with the lines above. "
                         + ("The data was kept for inspection: analytics-pipeline query events --pipeline "
                            f"{s['pipeline']}" if not (self.services.redis_started and self.services.postgres_started)
                            else "Rerun with REDIS_URL/DATABASE_URL set to keep the data for inspection."))
        else:
            lines.append(f"RESULT     PASS {ok}: every number equals what was acknowledged (each message_id once)")
        print("\n".join(lines), flush=True)

    async def keep_running(self, session: aiohttp.ClientSession, client: aioredis.Redis, conn: asyncpg.Connection,
                           pool: asyncpg.Pool, sidecar: SidecarProcess, outcome: Outcome) -> bool:
        """Trickle live events and flush every --flush-interval until Ctrl-C; True if a check failed."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        ok, bad, arrow = marks()
        say(f"dashboard: {sidecar.url}/  (running until Ctrl-C; a few live events per second, "
            f"a flush every {self.args.flush_interval:g}s)")
        rng = random.Random(self.seed + 1)
        names, weights = list(EVENT_WEIGHTS), list(EVENT_WEIGHTS.values())
        sender = Sender(session, sidecar.url)
        flushes = Flushes(client, conn, self.config, self.clock, first=len(outcome.summary["flushes"]) + 1,
                          verbose=False)
        queries = Queries.for_config(client, pool, self.config)
        base_expected = outcome.summary["sent"]["acked_unique"]
        window_start = datetime.fromisoformat(outcome.summary["window"]["from"])
        next_flush = time.monotonic() + self.args.flush_interval
        failed = False
        try:
            while not stop.is_set():
                event = DemoEvent(rng.choices(names, weights=weights)[0], f"user-{rng.randint(1, self.users):05d}",
                                  datetime.now(UTC).replace(microsecond=0), str(uuid.uuid4()))
                await sender.send(PlannedRequest(0, "single", [event]))
                if time.monotonic() >= next_flush:
                    expected = base_expected + sender.acked_count
                    window = Window.around(window_start, datetime.now(UTC))
                    split = await storage_split(client, conn, self.pipeline, window)
                    total = (await queries.counts(None, window.first_day, window.last_day, "day")).total
                    record = await flushes.run("periodic", expected)
                    extra = total - expected
                    verdict = ok if extra == 0 else (
                        f"+{extra:,} from other clients" if extra > 0 else f"{bad} MISSING")
                    failed = failed or extra < 0
                    say(f"[{datetime.now(UTC):%H:%M:%S}] query {total:,} = {split.postgresql:,} in PostgreSQL + "
                        f"{split.redis_live:,} live in Redis (demo sent {expected:,} {verdict}); "
                        f"flush #{record.number}: {record.stats['buckets']} buckets {arrow} "
                        f"{record.stats['rows']} rows")
                    next_flush = time.monotonic() + self.args.flush_interval
                if not sidecar.running():
                    code = sidecar.process.returncode if sidecar.process else "?"
                    raise DemoError(f"the sidecar exited (code {code}):\n{sidecar.log_tail()}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), rng.uniform(0.1, 0.5))
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        say("stopping")
        return failed

    async def shutdown(self, client: aioredis.Redis, conn: asyncpg.Connection | None, pool: asyncpg.Pool | None,
                       sidecar: SidecarProcess | None, failed: bool) -> None:
        """Stop the sidecar, remove the demo pipeline's data (unless kept), close connections."""
        if sidecar is not None:
            code = await sidecar.stop()
            say(f"sidecar stopped (exit code {code})")
        # After a failed self-check, shared stores keep the evidence; throwaway ones vanish anyway.
        keep = self.keep_data or (failed and not (self.services.redis_started and self.services.postgres_started))
        try:
            if conn is not None and not conn.is_closed():
                if keep:
                    say(f"kept the data of {self.pipeline}: analytics-pipeline query events --pipeline {self.pipeline}")
                else:
                    keys, rows = await remove_pipeline_data(client, conn, self.pipeline)
                    if keys or rows:
                        say(f"removed the demo pipeline's data ({keys:,} Redis keys, {rows:,} PostgreSQL rows)")
        except (*REDIS_CONNECTION_ERRORS, *POSTGRES_CONNECTION_ERRORS, asyncpg.PostgresError) as error:
            say(f"could not remove the demo pipeline's data: {describe(error)}")
        finally:
            if pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pool.close(), 5)
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 5)
            with contextlib.suppress(Exception):
                await client.aclose()
            if self.crashed and (self.workdir / "sidecar.log").exists():
                say(f"sidecar log kept: {self.workdir / 'sidecar.log'}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)


def _tally(data: dict[str, Any]) -> Tally:
    return Tally(types=data["types"], types_hourly=data["types_hourly"], days=data["days"], hours=data["hours"],
                 users=data["users"], distinct_users=data["distinct_users"])


def _service_env(config_path: str | None) -> dict[str, str]:
    """Where to look for Redis/PostgreSQL: REDIS_URL/DATABASE_URL, else the config file's URLs."""
    env = dict(os.environ)
    path = config_path or env.get(ENV_CONFIG_FILE)
    if path:
        data = read_config_file(path)
        for variable, key in (("REDIS_URL", "redis_url"), ("DATABASE_URL", "database_url")):
            if not env.get(variable) and isinstance(data.get(key), str):
                env[variable] = data[key]
    return env


def _quiet_libraries(level: str) -> None:
    if level != "debug":
        for name in ("analytics_pipeline.core.services", "analytics_pipeline.flusher"):
            logging.getLogger(name).setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``analytics-pipeline demo``: 0 exact, 1 self-check failed, 3 could not run."""
    clock = time.monotonic()
    _quiet_libraries(args.log_level)
    base = load_config(args.config)  # limits, TTL, granularities; a bad file is a ConfigError (exit 2)
    if set(base.counters.granularities) != {"daily", "hourly", "user_daily"}:
        say("error: the demo checks daily, hourly and per-user counts: use a config with all three "
            "counters.granularities (or no --config)")
        return EXIT_CANNOT_RUN
    env = _service_env(args.config)
    say("Redis and PostgreSQL: " + ("using REDIS_URL / DATABASE_URL if they answer, else " if
                                    env.get("REDIS_URL") or env.get("DATABASE_URL") else "REDIS_URL / DATABASE_URL "
                                    "not set: ") + "starting throwaway servers")
    try:
        started = time.monotonic()
        with local_services(env=env) as services:
            say(f"services ready in {time.monotonic() - started:.1f}s: {_describe(services)}")
            demo = Demo(args, base, services, clock)
            demo.timings["services_s"] = round(time.monotonic() - started, 3)
            try:
                return asyncio.run(demo.main())
            except KeyboardInterrupt:
                say("interrupted")
                return 130
        # leaving the with-block removed the throwaway servers
    except ServiceError as error:
        say(f"error: {error}")
        return EXIT_CANNOT_RUN
    except (DemoError, RedisModeError) as error:
        say(f"error: {error}")
        return EXIT_CANNOT_RUN
    except FlushError as error:
        say(f"error: {error}")
        return EXIT_CANNOT_RUN
    except (*REDIS_CONNECTION_ERRORS, *POSTGRES_CONNECTION_ERRORS, asyncpg.PostgresError) as error:
        say(f"error: {describe(error)}; check that Redis and PostgreSQL are up, or unset REDIS_URL / DATABASE_URL "
            "to let the demo start its own")
        return EXIT_CANNOT_RUN


def _describe(services: Services) -> str:
    redis_origin = "throwaway, removed at exit" if services.redis_started else "from REDIS_URL"
    pg_origin = "throwaway, removed at exit" if services.postgres_started else "from DATABASE_URL"
    return (f"Redis {services.redis_url} ({redis_origin}), PostgreSQL {_redact(services.database_url)} ({pg_origin})")


def _redact(url: str) -> str:
    from urllib.parse import urlsplit

    password = urlsplit(url).password
    return url.replace(f":{password}@", ":***@") if password else url

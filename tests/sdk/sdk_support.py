"""Helpers of the real-SDK tests: the sidecar they talk to, the workload they send, what it must count."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

SDK_DIR = Path(__file__).resolve().parent
FIXTURES = SDK_DIR / "fixtures"
NODE_RUNNER = SDK_DIR / "node_sdk.js"


# ------------------------------------------------------------------------------------ the sidecar
@dataclass
class Answered:
    """One request the sidecar answered: what was asked and what it said."""

    method: str
    path: str
    headers: dict[str, str]
    status: int
    body: Any


def answer_log(answers: list[Answered]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """An aiohttp middleware appending every answer (status, decoded JSON body) to ``answers``.

    It reads only the response: the request body stays the ingest handler's own stream."""

    @web.middleware
    async def log(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as error:
            response = error
        body: Any = None
        raw = getattr(response, "body", None)
        if isinstance(raw, bytes | bytearray) and raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = bytes(raw)
        headers = {k.lower(): v for k, v in request.headers.items()}
        answers.append(Answered(request.method, request.path_qs, headers, response.status, body))
        if isinstance(response, web.HTTPException):
            raise response
        return response

    return log


class LiveSidecar:
    """A sidecar served on a real loopback port (SDK threads and Node processes reach it over TCP)."""

    def __init__(self, app: web.Application, server: TestServer, answers: list[Answered]) -> None:
        self.app = app
        self.server = server
        self.answers = answers
        self.url = str(server.make_url("")).rstrip("/")

    def ingest_answers(self) -> list[Answered]:
        """The answers to event posts (not the tests' own reads)."""
        return [a for a in self.answers if a.method == "POST"]

    def events_answered(self) -> int:
        """Events the sidecar saw in all posts, as its answers account for them: accepted + duplicates +
        not_counted + rejected (by index). Equal to the SDK's calls when each was sent exactly once."""
        total = 0
        for answer in self.ingest_answers():
            body = answer.body if isinstance(answer.body, dict) else {}
            rejected = {r.get("index") for r in body.get("rejected") or []}
            total += body.get("accepted", 0) + body.get("duplicates", 0) + body.get("not_counted", 0) + len(rejected)
        return total

    def duplicates(self) -> int:
        """Events answered as duplicates: a batch an SDK sent again shows here (its message ids were seen)."""
        return sum(int(a.body.get("duplicates", 0)) for a in self.ingest_answers() if isinstance(a.body, dict))

    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in self.ingest_answers())

    async def event_totals(self) -> dict[str, int]:
        """Every event type with its total, through the query path (``GET /v1/events``: PostgreSQL + Redis)."""
        async with aiohttp.ClientSession() as session, session.get(self.url + "/v1/events") as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        return {row["event"]: row["count"] for row in body["events"]}

    async def wait_totals(self, expected: dict[str, int], attempts: int = 100) -> dict[str, int]:
        """The totals once they equal ``expected``, or the last ones read. SDKs answer their callers before the
        upload is done, so a count is read until it settles; no timing is asserted."""
        totals: dict[str, int] = {}
        for _ in range(attempts):
            totals = await self.event_totals()
            if totals == expected:
                break
            await asyncio.sleep(0.1)
        return totals


# -------------------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class Call:
    """One SDK call, in a form every SDK runner maps to its own API."""

    kind: str  # track | page | screen | identify | group | alias
    user: str
    at: str  # ISO-8601 UTC, in the past (explicit timestamps, as a backfill or a mobile queue sends)
    event: str | None = None  # track
    name: str | None = None  # page / screen
    target: str | None = None  # group id (group) or previous id (alias)


TRACKED = ("Signed Up", "Order Completed", "Video Played")
USERS = ("user-1", "user-2", "user-3", "user-4")


def workload(now: datetime | None = None) -> list[Call]:
    """A known mix: 30 track calls over 3 names and 4 users, 4 page, 3 screen, 2 identify, 2 group and
    1 alias call, timestamped over the last three days (on the hour, so UTC buckets are plain)."""
    base = (now or datetime.now(UTC)).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)

    def at(hours_ago: int) -> str:
        return (base - timedelta(hours=hours_ago)).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    calls = [Call("track", USERS[i % 4], at(i * 2), event=TRACKED[i % 3]) for i in range(30)]
    calls += [Call("page", USERS[i], at(i + 1), name=f"Page {i}") for i in range(4)]
    calls += [Call("screen", USERS[i], at(i + 3), name=f"Screen {i}") for i in range(3)]
    calls += [Call("identify", USERS[i], at(i + 5)) for i in range(2)]
    calls += [Call("group", USERS[i], at(i + 7), target=f"org-{i}") for i in range(2)]
    calls.append(Call("alias", USERS[0], at(9), target="anonymous-1"))
    return calls


def expected_segment(calls: Iterable[Call]) -> dict[str, int]:
    """What the default config counts of Segment-shaped calls: track by name, page_view, screen_view;
    identify, group and alias are acknowledged, not counted."""
    names = {"page": "page_view", "screen": "screen_view"}
    return dict(Counter(c.event if c.kind == "track" else names[c.kind] for c in calls
                        if c.kind in ("track", "page", "screen")))


def expected_posthog(calls: Iterable[Call]) -> dict[str, int]:
    """The same workload through PostHog's API: page is ``$pageview``, screen ``$screen``; ``$set``,
    ``$groupidentify`` and ``$create_alias`` are acknowledged, not counted."""
    names = {"page": "$pageview", "screen": "$screen"}
    return dict(Counter(c.event if c.kind == "track" else names[c.kind] for c in calls
                        if c.kind in ("track", "page", "screen")))


def parse_at(call: Call) -> datetime:
    return datetime.fromisoformat(call.at.replace("Z", "+00:00"))


# ---------------------------------------------------------------------------------- Node runner
@dataclass
class NodeRun:
    """What ``node_sdk.js`` reports: the SDK's error events, HTTP statuses it saw, calls it took."""

    errors: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    sent: int = 0
    stderr: str = ""


async def run_node(sdk: str, host: str, calls: list[Call], *, options: dict[str, Any] | None = None,
                   pace_ms: float = 0, limit_s: float = 240) -> NodeRun:
    """Run ``node_sdk.js`` (the real npm SDK) against ``host`` without blocking the event loop serving it."""
    node = shutil.which("node")
    assert node is not None
    job = {"sdk": sdk, "host": host, "calls": [asdict(c) for c in calls], "options": options or {},
           "pace_ms": pace_ms}
    process = await asyncio.create_subprocess_exec(
        node, str(NODE_RUNNER), cwd=SDK_DIR, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(json.dumps(job).encode()), limit_s)
    assert process.returncode == 0, f"node_sdk.js failed ({process.returncode}):\n{stderr.decode()[-3000:]}"
    report = json.loads(stdout.decode().strip().splitlines()[-1])
    return NodeRun(report["errors"], report["statuses"], report["sent"], stderr.decode())

"""Send the demo's plan to the sidecar over HTTP, like a fleet of app instances would.

Several requests are in flight at once. A request that gets 503 (or loses its connection) is sent
again after ``Retry-After``: every demo event carries a ``message_id``, so such a retry can never be
counted twice. Bookkeeping: which message ids were put on the wire (``dispatched``) and which were
acknowledged (``acked``): at any instant an exact pipeline reports a number between the two.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from .demo_stack import DemoError
from .demo_traffic import DemoEvent, Plan, PlannedRequest

Checkpoint = tuple[int, Callable[[], Awaitable[None]]]

GIVE_UP_AFTER_S = 20.0


@dataclass
class SendStats:
    """What the sender did and what the sidecar answered."""

    requests: int = 0
    event_sends: int = 0  # events in requests answered 2xx, duplicates included
    accepted: int = 0  # sum of the sidecar's "accepted"
    duplicates: int = 0  # sum of the sidecar's "duplicates"
    client_retries: int = 0  # re-sends after a 503 or a lost connection
    statuses: Counter[int] = field(default_factory=Counter)
    by_path: Counter[str] = field(default_factory=Counter)
    started: float = 0.0
    finished: float = 0.0

    def rate(self, now: float | None = None) -> float:
        """Event sends per second so far."""
        elapsed = (self.finished or now or time.monotonic()) - self.started
        return self.event_sends / elapsed if elapsed > 0 else 0.0


class Sender:
    """Posts planned requests to ``base_url`` with ``concurrency`` in flight; see the module docstring."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, *, concurrency: int = 12) -> None:
        self.session = session
        self.base_url = base_url
        self.concurrency = concurrency
        self.stats = SendStats()
        self.dispatched: set[str] = set()
        self.acked: dict[str, DemoEvent] = {}
        self.queued = 0  # unique events handed to requests so far (what checkpoints count)
        self._done: dict[int, asyncio.Event] = {}

    @property
    def acked_count(self) -> int:
        return len(self.acked)

    @property
    def dispatched_count(self) -> int:
        return len(self.dispatched)

    async def run(self, plan: Plan, checkpoints: list[Checkpoint] | None = None) -> SendStats:
        """Send every request of ``plan``; before passing each checkpoint's event count, await its callback."""
        pending = sorted(checkpoints or [], key=lambda item: item[0])
        self._done = {r.index: asyncio.Event() for r in plan.requests}
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        failure: list[BaseException] = []
        self.stats.started = time.monotonic()

        async def one(request: PlannedRequest) -> None:
            try:
                for dependency in request.waits_for:
                    await self._done[dependency].wait()
                await self.send(request)
            except BaseException as error:
                failure.append(error)
                raise
            finally:
                self._done[request.index].set()
                slots.release()

        try:
            for request in plan.requests:
                while pending and self.queued >= pending[0][0]:
                    await pending.pop(0)[1]()
                await slots.acquire()
                if failure:
                    slots.release()
                    break
                if not request.retry:
                    self.queued += len(request.events) - request.repeated
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if failure:
                raise failure[0]
            while pending:
                await pending.pop(0)[1]()
        finally:
            for task in list(tasks):
                task.cancel()
            self.stats.finished = time.monotonic()
        return self.stats

    async def send(self, request: PlannedRequest) -> None:
        """POST one request until the sidecar acknowledges it (retrying 503s and lost connections)."""
        body = request.body()
        for event in request.events:
            self.dispatched.add(event.message_id)
        deadline = time.monotonic() + GIVE_UP_AFTER_S
        last_problem = ""
        while True:
            try:
                async with self.session.post(self.base_url + request.path, data=body,
                                             headers={"Content-Type": "application/json"}) as response:
                    payload = await response.read()
                    self.stats.statuses[response.status] += 1
                    if response.status == 200:
                        answer = orjson.loads(payload)
                        self._acknowledged(request, int(answer["accepted"]), int(answer["duplicates"]))
                        return
                    if response.status != 503:
                        raise DemoError(f"the sidecar refused {request.path} ({response.status}): "
                                        f"{payload[:400].decode(errors='replace')}; if you passed --config, "
                                        "check its ingest limits")
                    last_problem = f"503 {payload[:200].decode(errors='replace')}"
                    wait = min(float(response.headers.get("Retry-After", "1")), 2.0)
            except (TimeoutError, aiohttp.ClientError, OSError) as error:
                last_problem = f"{type(error).__name__}: {error}"
                wait = 0.5
            if time.monotonic() + wait > deadline:
                raise DemoError(f"the sidecar did not acknowledge {request.path} for {GIVE_UP_AFTER_S:.0f}s "
                                f"(last answer: {last_problem}); is Redis still up? (sidecar log kept, see below)")
            self.stats.client_retries += 1
            await asyncio.sleep(wait)

    def _acknowledged(self, request: PlannedRequest, accepted: int, duplicates: int) -> None:
        self.stats.requests += 1
        self.stats.by_path[request.path] += 1
        self.stats.event_sends += len(request.events)
        self.stats.accepted += accepted
        self.stats.duplicates += duplicates
        for event in request.events:
            self.acked.setdefault(event.message_id, event)

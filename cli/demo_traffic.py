"""The demo's traffic: a reproducible shop's events and the HTTP requests that carry them.

``build_plan`` makes unique events (weighted event types, Zipf-like user activity, timestamps over
the 48 h before ``now`` with a daily rhythm) and packs them into requests of every shape the sidecar
takes: single events, ``/v1/events`` arrays and ``{"batch": ...}``, Segment ``/v1/track`` and
``/v1/batch``, PostHog ``/batch``. A few requests are client retries (the same ``message_id``\\ s
again, whole or mixed into a later batch) that must be counted once.
"""

from __future__ import annotations

import math
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson

# Event types of an online shop and how often each is sent (a funnel plus search and accounts).
EVENT_WEIGHTS: dict[str, float] = {
    "page_view": 44.0, "product_view": 20.0, "search": 11.0, "add_to_cart": 8.0, "login": 7.0,
    "checkout_started": 4.5, "purchase": 3.0, "signup": 2.5,
}
WINDOW = timedelta(hours=48)
# Share of events per request shape; the rest go in /v1/events batches.
SINGLE_SHARE = 0.08
SEGMENT_SHARE = 0.25
POSTHOG_SHARE = 0.07
BATCH_SIZES = {"events": (20, 200), "segment": (10, 100), "posthog": (10, 50)}
RETRY_SHARE = 0.01  # requests re-sent whole after their ack (a client that missed the answer)
MIXED_RETRY_SHARE = 0.005  # batches that also carry a few events of an earlier acknowledged request

_PATHS = ("/", "/sale", "/c/shoes", "/c/jackets", "/c/bags", "/about", "/help/shipping", "/blog/autumn")
_QUERIES = ("boots", "rain jacket", "tote bag", "running shoes", "gift card", "wool socks", "sale")


@dataclass(frozen=True, slots=True)
class DemoEvent:
    """One unique event as the sidecar will count it."""

    event: str
    user: str
    timestamp: datetime
    message_id: str

    @property
    def day(self) -> date:
        return self.timestamp.date()

    @property
    def hour(self) -> datetime:
        return self.timestamp.replace(minute=0, second=0, microsecond=0)


@dataclass
class PlannedRequest:
    """One HTTP request of the plan; ``waits_for`` are requests that must be answered first."""

    index: int
    style: str  # single | track | array | wrapped | segment | posthog
    events: list[DemoEvent]
    retry: bool = False  # every event of it was sent (and acknowledged) before
    repeated: int = 0  # how many of its events were sent before (mixed retries)
    waits_for: list[int] = field(default_factory=list)

    @property
    def path(self) -> str:
        return {"single": "/v1/events", "array": "/v1/events", "wrapped": "/v1/events", "track": "/v1/track",
                "segment": "/v1/batch", "posthog": "/batch"}[self.style]

    def body(self) -> bytes:
        """The JSON body, in the field names of the client this style imitates."""
        if self.style == "single":
            return orjson.dumps(_ours(self.events[0]))
        if self.style == "track":
            return orjson.dumps(_segment(self.events[0]))
        if self.style == "array":
            return orjson.dumps([_ours(e) for e in self.events])
        if self.style == "wrapped":
            return orjson.dumps({"batch": [_ours(e) for e in self.events]})
        if self.style == "segment":
            return orjson.dumps({"batch": [_segment(e) for e in self.events], "sentAt": _iso(datetime.now(UTC)),
                                 "context": {"library": {"name": "analytics-python", "version": "2.3.2"}}})
        return orjson.dumps({"api_key": "phc_demo", "batch": [_posthog(e) for e in self.events]})


@dataclass
class Plan:
    """Everything the demo sends: unique events and the requests (retries included), in send order."""

    seed: int
    now: datetime
    users: int
    events: list[DemoEvent]
    requests: list[PlannedRequest]

    @property
    def duplicate_sends(self) -> int:
        """Event sends that repeat a message_id already sent (each must be counted once)."""
        return sum(len(r.events) if r.retry else r.repeated for r in self.requests)

    def styles(self) -> dict[str, int]:
        """Requests per style (retries included)."""
        return dict(Counter(r.style for r in self.requests))


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _properties(event: DemoEvent) -> dict[str, Any]:
    # Derived from the message id so a retried event carries the very same body.
    n = int(event.message_id[:8], 16)
    if event.event == "page_view":
        return {"path": _PATHS[n % len(_PATHS)], "referrer": "" if n % 3 else "https://duckduckgo.com/"}
    if event.event in ("product_view", "add_to_cart"):
        return {"product_id": f"sku-{n % 400:03d}", "price": round(9.5 + (n % 170), 2)}
    if event.event == "search":
        return {"query": _QUERIES[n % len(_QUERIES)], "results": n % 60}
    if event.event == "purchase":
        return {"order_id": f"o-{n % 1_000_000:06d}", "revenue": round(20 + (n % 300) * 1.5, 2), "currency": "EUR"}
    return {}


def _ours(event: DemoEvent) -> dict[str, Any]:
    return {"event": event.event, "user_id": event.user, "timestamp": _iso(event.timestamp),
            "message_id": event.message_id, "properties": _properties(event)}


def _segment(event: DemoEvent) -> dict[str, Any]:
    body: dict[str, Any] = {"userId": event.user, "anonymousId": f"anon-{event.message_id[:12]}",
                            "messageId": event.message_id, "timestamp": _iso(event.timestamp),
                            "properties": _properties(event)}
    if event.event == "page_view":  # a Segment page() call: no event name, counted as page_view
        return {"type": "page", "name": "Shop", **body}
    return {"type": "track", "event": event.event, **body}


def _posthog(event: DemoEvent) -> dict[str, Any]:
    return {"event": event.event, "distinct_id": event.user, "uuid": event.message_id,
            "timestamp": _iso(event.timestamp), "properties": {"$lib": "posthog-python", **_properties(event)}}


def daily_rhythm(moment: datetime) -> float:
    """Relative traffic at a UTC time of day: quietest around 04:00, busiest around 16:00 (0.15..1)."""
    hour = moment.hour + moment.minute / 60
    return 0.15 + 0.85 * (0.5 - 0.5 * math.cos(2 * math.pi * (hour - 4) / 24))


def _timestamp(rng: random.Random, start: datetime) -> datetime:
    span_ms = int(WINDOW.total_seconds() * 1000)
    while True:  # rejection sampling against the daily rhythm
        moment = start + timedelta(milliseconds=rng.randrange(span_ms))
        if rng.random() < daily_rhythm(moment):
            return moment


def _chunks(rng: random.Random, events: list[DemoEvent], sizes: tuple[int, int]) -> list[list[DemoEvent]]:
    out, at = [], 0
    while at < len(events):
        size = rng.randint(*sizes)
        out.append(events[at:at + size])
        at += size
    return out


def build_plan(events: int, users: int, seed: int, now: datetime | None = None) -> Plan:
    """A reproducible plan (same seed, same events relative to ``now``) of ``events`` unique events."""
    if events < 1 or users < 1:
        raise ValueError("events and users must be at least 1")
    rng = random.Random(seed)
    now = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    start = now - WINDOW
    names = list(EVENT_WEIGHTS)
    weights = list(EVENT_WEIGHTS.values())
    user_ids = [f"user-{n:05d}" for n in range(1, users + 1)]
    activity = list(_zipf_cumulative(users))
    unique = [
        DemoEvent(event=name, user=rng.choices(user_ids, cum_weights=activity)[0], timestamp=_timestamp(rng, start),
                  message_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)))
        for name in rng.choices(names, weights=weights, k=events)
    ]
    requests = _pack(rng, unique)
    _add_retries(rng, requests)
    for index, request in enumerate(requests):
        request.index = index
    return Plan(seed=seed, now=now, users=users, events=unique, requests=requests)


def _zipf_cumulative(users: int, exponent: float = 0.8) -> list[float]:
    total, out = 0.0, []
    for rank in range(1, users + 1):
        total += 1 / rank**exponent
        out.append(total)
    return out


def _pack(rng: random.Random, unique: list[DemoEvent]) -> list[PlannedRequest]:
    n = len(unique)
    singles = round(n * SINGLE_SHARE)
    segment = round(n * SEGMENT_SHARE)
    posthog = round(n * POSTHOG_SHARE)
    requests: list[PlannedRequest] = []
    at = 0
    for event in unique[:singles]:
        requests.append(PlannedRequest(0, rng.choice(("single", "track")), [event]))
    at = singles
    for chunk in _chunks(rng, unique[at:at + segment], BATCH_SIZES["segment"]):
        requests.append(PlannedRequest(0, "segment", chunk))
    at += segment
    for chunk in _chunks(rng, unique[at:at + posthog], BATCH_SIZES["posthog"]):
        requests.append(PlannedRequest(0, "posthog", chunk))
    at += posthog
    for chunk in _chunks(rng, unique[at:], BATCH_SIZES["events"]):
        requests.append(PlannedRequest(0, rng.choice(("array", "wrapped")), chunk))
    rng.shuffle(requests)
    return requests


def _add_retries(rng: random.Random, requests: list[PlannedRequest]) -> None:
    """Re-send a few requests whole after their answer, and mix a few old events into later batches."""
    for _ in range(max(3, round(len(requests) * RETRY_SHARE))):
        original_at = rng.randrange(len(requests))
        original = requests[original_at]
        if original.retry or original.repeated:
            continue
        copy = PlannedRequest(0, original.style, list(original.events), retry=True, waits_for=[id(original)])
        requests.insert(min(len(requests), original_at + rng.randint(3, 40)), copy)
    for _ in range(max(2, round(len(requests) * MIXED_RETRY_SHARE))):
        earlier_at = rng.randrange(max(1, len(requests) - 1))
        earlier = requests[earlier_at]
        later_candidates = [r for r in requests[earlier_at + 1:earlier_at + 60]
                            if r.style in ("array", "wrapped", "segment", "posthog") and not r.retry and not r.repeated]
        if earlier.retry or not later_candidates:
            continue
        later = rng.choice(later_candidates)
        again = rng.sample(earlier.events, k=min(len(earlier.events), rng.randint(1, 3)))
        later.events = later.events + again
        later.repeated = len(again)
        later.waits_for.append(id(earlier))
    # Dependencies were recorded by identity before the final positions were known.
    position = {id(r): i for i, r in enumerate(requests)}
    for request in requests:
        request.waits_for = [position[dep] for dep in request.waits_for]

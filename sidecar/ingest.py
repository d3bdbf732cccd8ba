"""The ingest endpoints: ours (``/v1/events``) and the routes Segment, RudderStack and PostHog clients post to.

A request's body is read (size-limited, decoded: :mod:`.bodies`) and validated before anything is
counted, then its events are handed to the group committer; it is answered ``200`` only once they
are in Redis (the write is complete when we answer, which is what 200 means and what the SDKs
check). A batch whose events are partly invalid has its valid events counted and the others listed
in ``rejected`` (``ingest.all_or_nothing: true`` refuses it whole instead). Nothing here may answer
5xx except the deliberate 503 (Redis unavailable / shutting down), which always carries Retry-After.

Each protocol's clients read something of their own in the answer, so the body carries our fields
plus theirs: ``"success": true`` on Segment-shaped routes, ``"status": 1`` on PostHog's (and a
``results`` map on PostHog's capture v1); every error carries ``code``/``message`` (Segment,
RudderStack) and ``detail`` (PostHog) beside our ``error`` and ``errors``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from aiohttp import hdrs, web

from analytics_pipeline.core.events import ENGAGE, Event, FieldError, RequestRejected, Shape

from .accepted import AcceptedResponse
from .appkeys import STATE
from .bodies import decode_body, is_form, read_raw_body
from .committer import CommitFailed
from .state import SidecarState

log = logging.getLogger(__name__)

Protocol = Literal["ours", "segment", "posthog", "posthog_v1"]

_JSON = "application/json"
# The answer to a stored request without rejections or uncounted calls, by protocol: prebuilt bytes.
_STORED: dict[Protocol, bytes] = {
    "ours": b'{"accepted":%d,"duplicates":%d}',
    "segment": b'{"accepted":%d,"duplicates":%d,"success":true}',
    "posthog": b'{"accepted":%d,"duplicates":%d,"status":1}',
    "posthog_v1": b'{"accepted":%d,"duplicates":%d,"status":1,"results":{}}',
}
_EXTRA: dict[Protocol, dict[str, Any]] = {"ours": {}, "segment": {"success": True}, "posthog": {"status": 1},
                                          "posthog_v1": {"status": 1}}


@dataclass(frozen=True, slots=True)
class Route:
    """One ingest path: the body shape it takes, whose protocol it speaks, the call type it implies."""

    path: str
    shape: Shape
    protocol: Protocol
    call_type: str | None = None


def _segment_calls() -> list[Route]:
    routes = []
    for call in ("track", "identify", "page", "screen", "group", "alias"):
        routes.append(Route(f"/v1/{call}", "single", "segment", call))
        routes.append(Route(f"/v1/{call[0]}", "single", "segment", call))  # analytics.js's short forms
    return routes


def _both(path: str, shape: Shape, protocol: Protocol, call_type: str | None = None) -> list[Route]:
    """The path with and without its trailing slash (PostHog clients use either)."""
    return [Route(path, shape, protocol, call_type), Route(f"{path}/", shape, protocol, call_type)]


ROUTES: tuple[Route, ...] = (
    Route("/v1/events", "any", "ours"),
    *_segment_calls(),
    Route("/v1/batch", "batch", "segment"),
    Route("/v1/import", "batch", "segment"),
    *_both("/batch", "any", "posthog"),  # PostHog's /batch takes what /e takes: an event, an array or {"batch"}
    *_both("/capture", "any", "posthog"),
    *_both("/e", "any", "posthog"),
    *_both("/i/v0/e", "any", "posthog"),
    *_both("/track", "any", "posthog"),
    *_both("/engage", "any", "posthog", ENGAGE),
    Route("/i/v1/analytics/events", "batch", "posthog_v1"),
)


def refuse(state: SidecarState, rejected: RequestRejected) -> web.Response:
    """A 4xx answer whose JSON body names every bad event's index, field and reason."""
    state.metrics.refused(rejected.code, rejected.events)
    response = web.Response(status=rejected.status, body=orjson.dumps(rejected.as_body()), content_type=_JSON)
    if rejected.status == 413 or rejected.code == "unreadable_body":
        response.force_close()  # the rest of such a body is not worth reading
    return response


def unavailable(state: SidecarState, reason: str, message: str) -> web.Response:
    """The deliberate 503: nothing of the request was counted; retry after ``server.retry_after_seconds``."""
    state.metrics.refused(reason)
    text = f"{message}; nothing of this request was counted, retry later"
    body = {"error": reason, "code": reason, "message": text, "detail": text, "errors": []}
    return web.Response(status=503, body=orjson.dumps(body), content_type=_JSON,
                        headers={"Retry-After": str(state.config.server.retry_after_seconds)})


def stored_body(protocol: Protocol, accepted: int, duplicates: int, not_counted: int,
                rejected: list[FieldError], total: int, raw: bytes) -> bytes:
    """The 200 body when some events were rejected or acknowledged without being counted."""
    body: dict[str, Any] = {"accepted": accepted, "duplicates": duplicates}
    if not_counted:
        body["not_counted"] = not_counted
    if rejected:
        bad = len({error.index for error in rejected})
        body["rejected"] = [error.as_dict() for error in rejected]
        body["message"] = (f"{bad} of {total} events are invalid and were not counted (see 'rejected'); "
                           "the others were")
    body.update(_EXTRA[protocol])
    if protocol == "posthog_v1":
        body["results"] = _v1_results(rejected, raw)
    return orjson.dumps(body)


def _v1_results(rejected: list[FieldError], raw: bytes) -> dict[str, dict[str, str]]:
    """PostHog capture v1's per-event map: ``drop`` (with the reason) for each rejected event's uuid."""
    if not rejected:
        return {}
    try:
        batch = orjson.loads(raw)["batch"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return {}
    results: dict[str, dict[str, str]] = {}
    for error in rejected:
        index = error.index
        if index is None or not 0 <= index < len(batch) or not isinstance(batch[index], dict):
            continue
        uuid = batch[index].get("uuid")
        if isinstance(uuid, str) and uuid:
            entry = results.setdefault(uuid, {"result": "drop", "details": ""})
            entry["details"] = "; ".join(filter(None, (entry["details"], f"{error.field} {error.reason}")))
    return results


def _handler(route: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The ingest handler for one route (one coroutine per request: no wrapper to await)."""
    shape, call_type, protocol = route.shape, route.call_type, route.protocol
    stored = _STORED[protocol]
    takes_forms = protocol != "ours" and protocol != "segment"

    async def ingest(request: web.Request) -> web.Response:
        state = request.app[STATE]
        state.in_flight += 1
        rejected: list[FieldError] = []
        not_counted = 0
        try:
            if state.redis_full:  # headroom for the flusher: refuse before Redis has to (a flag, no I/O)
                return unavailable(state, "redis_full", "Redis memory is over redis.memory_high_water_ratio "
                                   "of maxmemory until the flusher frees some")
            validator = state.validator
            limit = validator.max_request_bytes
            headers = request.headers
            content_type = headers.get(hdrs.CONTENT_TYPE)
            form = False
            if content_type is not None and content_type != _JSON:
                if takes_forms and is_form(content_type):
                    form = True
                else:
                    validator.check_content_type(content_type)
            body = await read_raw_body(request, limit)
            encoding = headers.get(hdrs.CONTENT_ENCODING)
            compression = request.query.get("compression") if request.query_string else None
            if encoding is not None or compression is not None or form or body[:2] == b"\x1f\x8b":
                body = decode_body(body, content_encoding=encoding, compression=compression, form=form, limit=limit)
            if validator.all_or_nothing:
                events: list[Event] = validator.parse(body, shape=shape, call_type=call_type)
                total = len(events)
            else:
                events, rejected, total = validator.parse_partial(body, shape=shape, call_type=call_type)
            uncounted = validator.uncounted_events
            for event in events:  # usually one event that is counted: a loop that ends at once
                if event.event_type in uncounted:
                    state.metrics.not_counted(events, uncounted)
                    counted = [event for event in events if event.event_type not in uncounted]
                    not_counted = len(events) - len(counted)
                    events = counted
                    break
            duplicates = await state.committer.submit(events) if events else 0
        except RequestRejected as refused:
            return refuse(state, refused)
        except CommitFailed as failure:
            reason = "overloaded" if failure.reason == "overloaded" else "redis_unavailable"
            return unavailable(state, reason, str(failure))
        except Exception:
            log.exception("unexpected error while ingesting; answering 503")
            return unavailable(state, "internal_error", "internal error")
        finally:
            state.in_flight -= 1
        if rejected or not_counted:
            if rejected:
                state.metrics.rejected(rejected)
            return AcceptedResponse(stored_body(protocol, len(events) - duplicates, duplicates, not_counted,
                                                rejected, total, body))
        return AcceptedResponse(stored % (len(events) - duplicates, duplicates))

    ingest.__name__ = ingest.__qualname__ = f"ingest_{route.path.strip('/').replace('/', '_') or 'root'}"
    ingest.__doc__ = f"``POST {route.path}``: {protocol} protocol, {shape} body."
    return ingest


def setup_ingest_routes(app: web.Application) -> None:
    """Register every ingest route on ``app``."""
    for route in ROUTES:
        app.router.add_post(route.path, _handler(route))

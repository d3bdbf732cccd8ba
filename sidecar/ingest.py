"""The ingest endpoints: ``POST /v1/events`` (ours), ``/v1/track`` and ``/v1/batch`` (Segment/PostHog).

Every request is validated as a whole before anything is counted, then handed to the group
committer; it is answered 202 only once its events are in Redis. Nothing here may answer 5xx
except the deliberate 503 (Redis unavailable / shutting down), which always carries Retry-After.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from analytics_pipeline.core.events import FieldError, RequestRejected, Shape

from .appkeys import STATE
from .committer import CommitFailed
from .state import SidecarState

log = logging.getLogger(__name__)

_ACCEPTED = b'{"accepted":%d,"duplicates":%d}'
_JSON = "application/json"


def _too_large(size: int, limit: int) -> RequestRejected:
    return RequestRejected(413, f"request body is {size} bytes or more, over the {limit}-byte limit "
                           "(ingest.max_request_bytes); send smaller batches",
                           [FieldError(None, "body", "too large")], code="payload_too_large")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, reading at most ``limit + 1`` bytes: a huge body is refused, never buffered."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(length, limit)
    content = request.content
    try:
        first = await content.readany()
        if content.at_eof() or not first:
            if len(first) > limit:
                raise _too_large(len(first), limit)
            return first
        chunks = [first]
        size = len(first)
        while size <= limit:
            chunk = await content.readany()
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
    except (HttpProcessingError, RequestPayloadError) as error:  # bad chunking or Content-Encoding
        raise RequestRejected(400, f"the request body could not be read: {error}".replace("\n", " "),
                              [FieldError(None, "body", "unreadable (bad chunking or Content-Encoding)")],
                              code="unreadable_body") from None
    raise _too_large(size, limit)


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
    body = {"error": reason, "message": f"{message}; nothing of this request was counted, retry later",
            "errors": []}
    return web.Response(status=503, body=orjson.dumps(body), content_type=_JSON,
                        headers={"Retry-After": str(state.config.server.retry_after_seconds)})


async def _ingest(request: web.Request, shape: Shape) -> web.Response:
    state = request.app[STATE]
    state.in_flight += 1
    try:
        validator = state.validator
        content_type = request.headers.get("Content-Type")
        if content_type is not None and content_type != _JSON:
            validator.check_content_type(content_type)
        body = await read_body(request, validator.max_request_bytes)
        events = validator.parse(body, shape=shape)
        duplicates = await state.committer.submit(events)
    except RequestRejected as rejected:
        return refuse(state, rejected)
    except CommitFailed as failure:
        reason = "overloaded" if failure.reason == "overloaded" else "redis_unavailable"
        return unavailable(state, reason, str(failure))
    except Exception:
        log.exception("unexpected error while ingesting; answering 503")
        return unavailable(state, "internal_error", "internal error")
    finally:
        state.in_flight -= 1
    return web.Response(status=202, body=_ACCEPTED % (len(events) - duplicates, duplicates), content_type=_JSON)


async def post_events(request: web.Request) -> web.Response:
    """``POST /v1/events``: one event, a JSON array of events, or ``{"batch": [...]}``."""
    return await _ingest(request, "any")


async def post_track(request: web.Request) -> web.Response:
    """``POST /v1/track``: one Segment-style call (``event``, ``userId``/``anonymousId``, ``messageId``)."""
    return await _ingest(request, "single")


async def post_batch(request: web.Request) -> web.Response:
    """``POST /v1/batch`` (and PostHog's ``/batch``): ``{"batch": [...]}``, other top-level keys ignored."""
    return await _ingest(request, "batch")


def setup_ingest_routes(app: web.Application) -> None:
    """Register the ingest endpoints on ``app``."""
    app.router.add_post("/v1/events", post_events)
    app.router.add_post("/v1/track", post_track)
    app.router.add_post("/v1/batch", post_batch)
    app.router.add_post("/batch", post_batch)
    app.router.add_post("/batch/", post_batch)

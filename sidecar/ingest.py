"""The ingest endpoints: ``POST /v1/events`` (ours), ``/v1/track`` and ``/v1/batch`` (Segment/PostHog).

Every request is validated as a whole before anything is counted, then handed to the group
committer; it is answered 202 only once its events are in Redis. Nothing here may answer 5xx
except the deliberate 503 (Redis unavailable / shutting down), which always carries Retry-After.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from analytics_pipeline.core.events import FieldError, RequestRejected, Shape

from .accepted import AcceptedResponse
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
    content = request.content
    try:
        if content.is_eof():  # the whole body came with the headers (small requests): no waiting
            body = content.read_nowait()
            if len(body) > limit:
                raise _too_large(len(body), limit)
            return body
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(length, limit)
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


def _handler(shape: Shape) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The ingest handler for one body shape (one coroutine per request: no wrapper to await)."""

    async def ingest(request: web.Request) -> web.Response:
        state = request.app[STATE]
        state.in_flight += 1
        try:
            if state.redis_full:  # headroom for the flusher: refuse before Redis has to (a flag, no I/O)
                return unavailable(state, "redis_full", "Redis memory is over redis.memory_high_water_ratio "
                                   "of maxmemory until the flusher frees some")
            validator = state.validator
            content_type = request.headers.get(hdrs.CONTENT_TYPE)
            if content_type is not None and content_type != _JSON:
                validator.check_content_type(content_type)
            events = validator.parse(await read_body(request, validator.max_request_bytes), shape=shape)
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
        return AcceptedResponse(_ACCEPTED % (len(events) - duplicates, duplicates))

    return ingest


post_events = _handler("any")
post_events.__doc__ = """``POST /v1/events``: one event, a JSON array of events, or ``{"batch": [...]}``."""
post_track = _handler("single")
post_track.__doc__ = """``POST /v1/track``: one Segment-style call (``event``, ``userId``/``anonymousId``)."""
post_batch = _handler("batch")
post_batch.__doc__ = """``POST /v1/batch`` (and PostHog's ``/batch``): ``{"batch": [...]}``, other keys ignored."""


def setup_ingest_routes(app: web.Application) -> None:
    """Register the ingest endpoints on ``app``."""
    app.router.add_post("/v1/events", post_events)
    app.router.add_post("/v1/track", post_track)
    app.router.add_post("/v1/batch", post_batch)
    app.router.add_post("/batch", post_batch)
    app.router.add_post("/batch/", post_batch)

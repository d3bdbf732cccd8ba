"""The event validator: shapes, Segment/PostHog aliases, timestamps, limits, and all-or-nothing errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from analytics_pipeline.core.config import parse_config
from analytics_pipeline.core.events import Event, EventValidator, RequestRejected, parse_timestamp

NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


@pytest.fixture
def validator() -> EventValidator:
    return EventValidator(parse_config({}))


def parse(validator: EventValidator, document: object, **kwargs: object) -> list[Event]:
    return validator.parse(orjson.dumps(document), now=NOW, **kwargs)  # type: ignore[arg-type]


def rejected(validator: EventValidator, document: object | bytes, **kwargs: object) -> RequestRejected:
    body = document if isinstance(document, bytes) else orjson.dumps(document)
    with pytest.raises(RequestRejected) as error:
        validator.parse(body, now=NOW, **kwargs)  # type: ignore[arg-type]
    return error.value


def test_shapes(validator: EventValidator) -> None:
    one = {"event": "a"}
    assert parse(validator, one) == [Event("a", None, NOW)]
    assert len(parse(validator, [one, one])) == 2
    assert len(parse(validator, {"batch": [one, one, one], "api_key": "x"})) == 3
    assert len(parse(validator, one, shape="single")) == 1
    assert len(parse(validator, {"batch": [one]}, shape="batch")) == 1
    assert rejected(validator, [one], shape="single").status == 400
    assert rejected(validator, {"batch": [one]}, shape="single").errors[0].field == "batch"
    assert rejected(validator, one, shape="batch").errors[0].reason == "is required"


def test_aliases_and_precedence(validator: EventValidator) -> None:
    [event] = parse(validator, {"event": "a", "user_id": "ours", "userId": "segment", "distinct_id": "posthog",
                                "message_id": "m-ours", "messageId": "m-seg", "uuid": "m-ph"})
    assert (event.user_id, event.message_id) == ("ours", "m-ours")
    [event] = parse(validator, {"event": "a", "anonymousId": "anon", "messageId": "m"})
    assert (event.user_id, event.message_id) == ("anon", "m")
    [event] = parse(validator, {"event": "a", "userId": "known", "anonymousId": "anon"})
    assert event.user_id == "known"
    [event] = parse(validator, {"event": "$pageview", "uuid": "u-1", "properties": {"distinct_id": "ph"}})
    assert (event.event_type, event.user_id, event.message_id) == ("$pageview", "ph", "u-1")


def test_segment_call_types(validator: EventValidator) -> None:
    events = parse(validator, [{"type": "page"}, {"type": "screen"}, {"type": "identify"}, {"type": "group"},
                               {"type": "alias"}, {"type": "track", "event": "Bought"},
                               {"type": "page", "event": "Named Page"}, {"type": "capture", "event": "c"}])
    assert [e.event_type for e in events] == ["page_view", "screen_view", "identify", "group", "alias", "Bought",
                                              "Named Page", "c"]
    error = rejected(validator, {"type": "track"})
    assert (error.errors[0].field, error.errors[0].reason) == ("event", error.errors[0].reason)
    assert "is required" in error.errors[0].reason
    assert rejected(validator, {"type": 3, "event": "a"}).errors[0].field == "type"


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-27T10:00:00Z", datetime(2026, 11, 27, 10, tzinfo=UTC)),
    ("2026-11-27T10:00:00.123Z", datetime(2026, 11, 27, 10, 0, 0, 123000, tzinfo=UTC)),
    ("2026-11-27T10:00:00+05:30", datetime(2026, 11, 27, 4, 30, tzinfo=UTC)),
    ("2026-11-27T02:00:00-08:00", datetime(2026, 11, 27, 10, tzinfo=UTC)),
    ("2026-11-27T10:00:00", datetime(2026, 11, 27, 10, tzinfo=UTC)),
    ("2026-11-27 10:00:00+00:00", datetime(2026, 11, 27, 10, tzinfo=UTC)),
    ("2026-11-27", None), ("now", None), ("", None), ("2026-13-01T00:00:00Z", None), ("x" * 65, None),
    ("0001-01-01T00:00:00+05:30", None),
])
def test_parse_timestamp(text: str, expected: datetime | None) -> None:
    assert parse_timestamp(text) == expected


def test_timestamp_window(validator: EventValidator) -> None:
    ok = parse(validator, [{"event": "a", "timestamp": (NOW + timedelta(minutes=4)).isoformat()},
                           {"event": "a", "timestamp": (NOW - timedelta(days=6)).isoformat()}])
    assert ok[0].timestamp == NOW + timedelta(minutes=4)
    error = rejected(validator, [{"event": "a", "timestamp": (NOW + timedelta(minutes=6)).isoformat()},
                                 {"event": "a", "timestamp": (NOW - timedelta(days=8)).isoformat()}])
    assert [(e.index, e.field) for e in error.errors] == [(0, "timestamp"), (1, "timestamp")]
    assert "future" in error.errors[0].reason and "past" in error.errors[1].reason
    narrow = EventValidator(parse_config({"ingest": {"max_past_seconds": 3600, "max_future_seconds": 0}}))
    assert narrow.parse(orjson.dumps({"event": "a", "timestamp": (NOW - timedelta(minutes=59)).isoformat()}),
                        now=NOW)
    with pytest.raises(RequestRejected):
        narrow.parse(orjson.dumps({"event": "a", "timestamp": (NOW + timedelta(seconds=1)).isoformat()}), now=NOW)


def test_all_errors_of_all_events_are_collected(validator: EventValidator) -> None:
    error = rejected(validator, [{"event": "ok"}, {"event": 1, "user_id": [], "timestamp": 5, "properties": 3},
                                 None, {"event": "a\nb"}])
    assert error.status == 400 and error.code == "invalid_events" and error.events == 4
    assert [(e.index, e.field) for e in error.errors] == [
        (1, "event"), (1, "user_id"), (1, "timestamp"), (1, "properties"), (2, "(event)"), (3, "event")]
    body = error.as_body()
    assert body["error"] == "invalid_events" and "3 of 4 events are invalid" in body["message"]
    assert body["errors"][0] == {"index": 1, "field": "event", "reason": "must be a string, not a number"}


def test_limits() -> None:
    validator = EventValidator(parse_config({"ingest": {"max_batch_events": 2, "max_request_bytes": 1024,
                                                        "max_event_bytes": 256, "max_name_length": 5,
                                                        "max_id_length": 3}}))
    assert rejected(validator, [{"event": "a"}] * 3).status == 413
    assert rejected(validator, b"[" + b" " * 1100 + b"]").status == 413
    big = rejected(validator, [{"event": "a"}, {"event": "a", "properties": {"x": "y" * 300}}])
    assert big.status == 413 and big.errors[0].index == 1 and "256-byte" in big.errors[0].reason
    assert rejected(validator, {"event": "abcdef"}).errors[0].reason == "is 6 bytes in UTF-8, over the limit of 5 bytes"
    assert rejected(validator, {"event": "a", "uuid": "abcd"}).errors[0].field == "uuid"
    assert parse(validator, {"event": "abcde", "user_id": "abc"})[0].user_id == "abc"


def test_body_level_errors(validator: EventValidator) -> None:
    assert rejected(validator, b"").errors[0].reason == "is empty"
    assert rejected(validator, b"{").code == "invalid_json"
    assert rejected(validator, b"[]").errors[0].field == "batch"
    assert rejected(validator, b"null").errors[0].reason == "must be an object or array, not null"
    assert rejected(validator, {"batch": "x"}).errors[0].reason == "must be an array"


@pytest.mark.parametrize(("header", "ok"), [
    (None, True), ("application/json", True), ("application/json; charset=utf-8", True), ("text/plain", True),
    ("application/vnd.api+json", True), ("APPLICATION/JSON", True), ("text/html", False),
    ("application/x-www-form-urlencoded", False), ("multipart/form-data; boundary=x", False),
])
def test_content_type(validator: EventValidator, header: str | None, ok: bool) -> None:
    if ok:
        validator.check_content_type(header)
    else:
        with pytest.raises(RequestRejected) as error:
            validator.check_content_type(header)
        assert error.value.status == 415 and error.value.errors[0].field == "Content-Type"

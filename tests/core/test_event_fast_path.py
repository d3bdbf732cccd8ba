"""The validator's hot path accepts exactly what the detailed path accepts, and builds the same events.

``EventValidator.parse`` first tries ``_valid_event`` on each event and falls back to the detailed,
error-collecting ``_event`` at the first doubt. If the fast path ever accepted an event the detailed
path refuses (or built a different Event), bad input would be counted: these properties would fail.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analytics_pipeline.core.config import parse_config
from analytics_pipeline.core.events import Event, EventValidator, FieldError, RequestRejected

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
VALIDATOR = EventValidator(parse_config({"ingest": {"max_name_length": 12, "max_id_length": 10,
                                                    "max_event_bytes": 300, "max_future_seconds": 300},
                                         "counters": {"ttl_seconds": 7200}}))

texts = st.one_of(st.text(max_size=14), st.sampled_from(["", " ", "\t", "page_view", "a\x00b", "é", "\u2028",
                                                         "x" * 12, "x" * 13, "u1", "  a  ", "\u3000"]))
values = st.one_of(st.none(), texts, st.integers(-2, 2), st.booleans(),
                   st.floats(allow_nan=False, allow_infinity=False), st.lists(st.integers(-5, 5), max_size=2),
                   st.dictionaries(st.sampled_from(["distinct_id", "k"]), st.one_of(st.none(), texts), max_size=2))
good_names = st.sampled_from(["page_view", "e", "x" * 12, "signup done"])
names = st.one_of(good_names, good_names, good_names, texts, values)
good_ids = st.sampled_from(["u1", "user-0001", "x" * 10, "é"])
ids = st.one_of(good_ids, good_ids, texts, values)
moments = st.sampled_from([NOW, NOW - timedelta(minutes=30), NOW + timedelta(minutes=4),
                           NOW + timedelta(minutes=6), NOW - timedelta(hours=3), NOW - timedelta(seconds=7199)])
timestamps = st.one_of(
    st.none(), values, moments.map(lambda m: m.strftime("%Y-%m-%dT%H:%M:%SZ")),
    moments.map(lambda m: m.astimezone(UTC).replace(tzinfo=None).isoformat()),
    moments.map(lambda m: m.astimezone(timezone(timedelta(hours=2))).isoformat()),
    st.sampled_from(["2026-11-27", "yesterday", "2026-11-27T12:00:00+25:00", "2026-13-01T00:00:00Z"]))
call_types = st.one_of(st.sampled_from(["track", "capture", "page", "screen", "identify", "group", "alias", "bogus"]),
                       values)
properties = st.one_of(st.none(), st.just({}), st.just({"plan": "pro"}), st.just({"distinct_id": "d1"}),
                       st.just({"distinct_id": 5}), values)
OPTIONAL = {"type": call_types, "user_id": ids, "userId": ids, "distinct_id": ids, "anonymousId": ids,
            "message_id": ids, "messageId": ids, "uuid": ids, "properties": properties, "timestamp": timestamps,
            "padding": st.text(min_size=200, max_size=320)}


def named_with(*keys: str) -> st.SearchStrategy[dict[str, Any]]:
    """An event with a name and exactly these fields: one rule at a time gets exercised often."""
    return st.fixed_dictionaries({"event": names, **{key: OPTIONAL[key] for key in keys}})


events = st.one_of(
    named_with(), named_with("timestamp"), named_with("user_id", "timestamp"), named_with("type"),
    named_with("type", "userId"), named_with("properties"), named_with("userId", "messageId"),
    named_with("anonymousId", "uuid", "properties"), named_with("distinct_id", "message_id"),
    named_with("padding", "user_id"), named_with("user_id", "properties"),
    st.fixed_dictionaries({"event": names}, optional=OPTIONAL),
    st.fixed_dictionaries({}, optional={"event": names, **OPTIONAL}),
    values)


def detailed(raw_events: list[Any], check_size: bool) -> tuple[list[Event] | None, list[FieldError]]:
    """The reference: the detailed path alone, event by event."""
    errors: list[FieldError] = []
    found = [VALIDATOR._event(i, raw, NOW, check_size, errors) for i, raw in enumerate(raw_events)]
    return (None if errors else [e for e in found if e is not None]), errors


@settings(max_examples=3000, deadline=None)
@given(raw=events, check_size=st.booleans())
def test_fast_path_never_accepts_what_the_detailed_path_refuses(raw: Any, check_size: bool) -> None:
    accepted, _ = detailed([raw], check_size)
    fast = VALIDATOR._valid_event(raw, NOW, check_size)
    if fast is not None:
        assert accepted == [fast]
        assert type(fast) is Event and fast.timestamp.tzinfo is not None


@settings(max_examples=500, deadline=None)
@given(raw_events=st.lists(events, min_size=1, max_size=5))
def test_parse_answers_as_the_detailed_path_does(raw_events: list[Any]) -> None:
    body = orjson.dumps(raw_events)
    accepted, errors = detailed(raw_events, len(body) > VALIDATOR.max_event_bytes)
    try:
        parsed = VALIDATOR.parse(body, now=NOW)
    except RequestRejected as rejected:
        assert accepted is None and rejected.errors == errors
    else:
        assert parsed == accepted


def test_common_events_take_the_fast_path() -> None:
    # The shapes real clients send must not fall back (the fallback is correct, just slower).
    for raw in ({"event": "page_view", "user_id": "u1"}, {"event": "e", "userId": "u", "messageId": "m"},
                {"event": "e", "distinct_id": "u", "uuid": "m", "properties": {"a": 1}},
                {"event": "e", "type": "track", "anonymousId": "a", "timestamp": "2026-11-27T11:59:00Z"}):
        assert VALIDATOR._valid_event(raw, NOW, False) is not None, raw


def _at(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


EDGES: list[Any] = [
    *({"event": "e", "timestamp": _at(NOW + timedelta(seconds=offset))} for offset in (300, 301, -7200, -7201)),
    {"event": "e", "timestamp": "2026-11-27T14:00:00+02:00"}, {"event": "e", "timestamp": "2026-11-27T12:00:00"},
    {"event": "e", "timestamp": "2026-11-27"}, {"event": "e", "timestamp": 1764244800},
    *({"event": "e", "type": kind} for kind in ("track", "capture", "page", "screen", "identify", "group", "alias",
                                                "bogus", "", None, 1, ["track"])),
    *({"type": kind} for kind in ("track", "page", "screen", "identify", "group", "alias")),
    {"event": "e", "properties": {"distinct_id": "d"}}, {"event": "e", "properties": {"distinct_id": 7}},
    {"event": "e", "user_id": "u", "properties": {"distinct_id": 7}}, {"event": "e", "properties": []},
    {"event": "e", "user_id": None, "userId": "u"}, {"event": "e", "user_id": "", "userId": "u"},
    {"event": "e", "user_id": 5}, {"event": "e", "anonymousId": "x" * 11}, {"event": "e", "uuid": "x" * 10},
    {"event": "e", "message_id": None, "uuid": "\x1f"}, {"event": " "}, {"event": "\u3000"}, {"event": "x" * 13},
    {"event": "a\x1fb"}, {"event": "e", "padding": "p" * 260}, {"event": "e", "padding": "é" * 140},
]


@pytest.mark.parametrize("raw", EDGES)
@pytest.mark.parametrize("check_size", [False, True])
def test_edges_are_decided_alike(raw: Any, check_size: bool) -> None:
    accepted, _ = detailed([raw], check_size)
    fast = VALIDATOR._valid_event(raw, NOW, check_size)
    assert fast is None or accepted == [fast]
    if accepted is not None and "type" not in raw and "distinct_id" not in raw.get("properties", {}):
        assert fast == accepted[0]  # plainly valid: taken by the fast path

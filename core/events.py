"""The event model: what the sidecar accepts, and the validation that runs before anything counts.

A request is one event object, a JSON array of events, or ``{"batch": [...]}``. Field names from
Segment (``userId``, ``anonymousId``, ``messageId``, ``type``) and PostHog (``distinct_id``,
``uuid``) are accepted beside our own (``user_id``, ``message_id``), so their SDKs can point at the
sidecar. Every problem of every event is collected. :meth:`EventValidator.parse` refuses a request
with any problem as a whole; :meth:`EventValidator.parse_partial` (what the sidecar uses unless
``ingest.all_or_nothing``) keeps the valid events of a batch and lists the invalid ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple

import orjson

from .config import Config

Shape = Literal["any", "single", "batch"]

# Segment call types and the event type they are counted as when no "event" name is given.
_IMPLIED_EVENT = {"page": "page_view", "screen": "screen_view", "identify": "identify", "group": "group",
                  "alias": "alias"}
_NAMED_TYPES = frozenset({"track", "capture"})
_KNOWN_TYPES = ", ".join(sorted(_NAMED_TYPES | _IMPLIED_EVENT.keys()))

# First-match-wins aliases: our name, then Segment's, then PostHog's.
_USER_FIELDS = ("user_id", "userId", "distinct_id", "anonymousId")
_MESSAGE_FIELDS = ("message_id", "messageId", "uuid")


class Event(NamedTuple):
    """One validated event, normalised: UTC timestamp, canonical field names.

    Immutable; a NamedTuple rather than a frozen dataclass because one is created per event on the
    ingest hot path, and a frozen dataclass costs 4x as much to create (0.48 vs 0.12 µs).
    """

    event_type: str
    user_id: str | None
    timestamp: datetime
    message_id: str | None = None


_new_event = tuple.__new__  # Event(...) without the generated __new__'s argument handling


@dataclass(frozen=True, slots=True)
class FieldError:
    """One reason an event (or the body, when ``index`` is None) was refused."""

    index: int | None
    field: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "reason": self.reason}


@dataclass
class RequestRejected(Exception):
    """The whole request is refused; nothing of it is counted."""

    status: int
    message: str
    errors: list[FieldError] = field(default_factory=list)
    code: str = "invalid_request"
    events: int = 0  # how many events the refused request held, when it could be parsed

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def as_body(self) -> dict[str, Any]:
        # "code"/"message" are what Segment and RudderStack clients read, "detail" what PostHog's read.
        return {"error": self.code, "code": self.code, "message": self.message, "detail": self.message,
                "errors": [e.as_dict() for e in self.errors]}


_NO_ERRORS: list[FieldError] = []  # shared, never appended to: what a batch without errors returns


def _has_control(text: str) -> bool:
    return not text.isprintable()


def _utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (limits are in bytes: what PostgreSQL indexes); no copy for ASCII."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class EventValidator:
    """Validates request bodies against one config's limits."""

    def __init__(self, config: Config) -> None:
        ingest = config.ingest
        self.max_event_bytes = ingest.max_event_bytes
        self.max_request_bytes = ingest.max_request_bytes
        self.max_batch_events = ingest.max_batch_events
        self.max_name_length = ingest.max_name_length
        self.max_id_length = ingest.max_id_length
        self.max_future = timedelta(seconds=ingest.max_future_seconds)
        self.max_past = timedelta(seconds=config.max_past_seconds)
        self.all_or_nothing = ingest.all_or_nothing
        self.uncounted_events = frozenset(ingest.uncounted_events)

    # body ---------------------------------------------------------------------------------------
    def check_content_type(self, content_type: str | None) -> None:
        """Only JSON is accepted (an absent type is tolerated: curl and some SDKs omit it)."""
        if not content_type:
            return
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json") and media != "text/plain":
            raise RequestRejected(415, f"Content-Type must be application/json, not {media!r} "
                                  "(with curl: -H 'Content-Type: application/json')",
                                  [FieldError(None, "Content-Type", "must be application/json")],
                                  code="unsupported_media_type")

    def parse(self, body: bytes, *, shape: Shape = "any", now: datetime | None = None,
              call_type: str | None = None) -> list[Event]:
        """Parse and validate a whole request body; RequestRejected if anything is wrong.

        Hot path: each event goes through :meth:`_valid_event`, which only says "valid, here it is" or
        "look closer"; at the first "look closer" the whole request is validated again by the
        detailed path (:meth:`_validate`), which collects every error. Both accept exactly the same
        events (``tests/core/test_event_fast_path.py`` checks it on generated events).
        ``call_type`` is the Segment call a route stands for (``/v1/identify``: "identify"), used for
        events that carry no ``type`` of their own.
        """
        return self._parse(body, shape, now, call_type, partial=False)[0]

    def parse_partial(self, body: bytes, *, shape: Shape = "any", now: datetime | None = None,
                      call_type: str | None = None) -> tuple[list[Event], list[FieldError], int]:
        """Like :meth:`parse`, but a batch's valid events are kept and its invalid ones listed:
        (valid events, the refused events' errors, how many events the request held).

        Still RequestRejected when the request itself is unreadable (not JSON, too large, wrong shape)
        or when not one of its events is valid.
        """
        return self._parse(body, shape, now, call_type, partial=True)

    def _parse(self, body: bytes, shape: Shape, now: datetime | None, call_type: str | None,
               partial: bool) -> tuple[list[Event], list[FieldError], int]:
        if len(body) > self.max_request_bytes:
            raise RequestRejected(
                413, f"request body is {len(body)} bytes, over the {self.max_request_bytes}-byte limit; "
                "send smaller batches", [FieldError(None, "body", "too large")], code="payload_too_large")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as error:
            if not body.strip():
                raise RequestRejected(400, "request body is empty; send a JSON event, array or {\"batch\": [...]}",
                                      [FieldError(None, "body", "is empty")]) from None
            raise RequestRejected(400, f"request body is not valid JSON: {error}",
                                  [FieldError(None, "body", f"invalid JSON: {error}")], code="invalid_json") from None
        if document.__class__ is dict and shape != "batch" and "batch" not in document:
            raw_events: list[Any] = [document]  # one event: the common single-event request
            if call_type is not None:
                _apply_call_type(document, call_type)
        else:
            raw_events = self._unwrap(document, shape)
            if len(raw_events) > self.max_batch_events:
                raise RequestRejected(
                    413, f"{len(raw_events)} events in one request, over the limit of {self.max_batch_events}; "
                    "split the batch", [FieldError(None, "batch", "too many events")], code="payload_too_large",
                    events=len(raw_events))
            if not raw_events:
                raise RequestRejected(400, "the request holds no events", [FieldError(None, "batch", "is empty")])
            if call_type is not None:
                for raw in raw_events:
                    if raw.__class__ is dict:
                        _apply_call_type(raw, call_type)
        now = now or datetime.now(UTC)
        check_size = len(body) > self.max_event_bytes
        valid_event = self._valid_event
        events: list[Event] = []
        append = events.append
        for raw in raw_events:
            event = valid_event(raw, now, check_size)
            if event is None:
                return self._validate(raw_events, now, check_size, partial)
            append(event)
        return events, _NO_ERRORS, len(raw_events)

    def _validate(self, raw_events: list[Any], now: datetime, check_size: bool,
                  partial: bool) -> tuple[list[Event], list[FieldError], int]:
        """The detailed path: every event checked field by field, every problem collected."""
        events: list[Event] = []
        errors: list[FieldError] = []
        for index, raw in enumerate(raw_events):
            event = self._event(index, raw, now, check_size, errors)
            if event is not None:
                events.append(event)
        if errors and (not partial or not events):
            too_large = any(e.reason.startswith("event is") for e in errors)
            bad = len({e.index for e in errors})
            raise RequestRejected(
                413 if too_large else 400,
                f"{bad} of {len(raw_events)} events are invalid; nothing of this request was counted",
                errors, code="payload_too_large" if too_large else "invalid_events", events=len(raw_events))
        return events, errors, len(raw_events)

    def _valid_event(self, raw: Any, now: datetime, check_size: bool) -> Event | None:
        """The event if it is plainly valid; None when the detailed path must decide (and explain).

        Same rules as :meth:`_event`, in one function: this runs once per event on the hot path.
        """
        if raw.__class__ is not dict:
            return None
        get = raw.get
        call_type = get("type")
        if call_type is not None and (call_type.__class__ is not str or call_type not in _NAMED_TYPES):
            return None  # an implied event type ("page", ...) or a bad one: the detailed path
        name = get("event")
        if (name.__class__ is not str or not name or _utf8_len(name) > self.max_name_length or name.isspace()
                or not name.isprintable()):
            return None
        limit = self.max_id_length
        user = get("user_id")
        if user is None:
            user = get("userId")
            if user is None:
                user = get("distinct_id")
                if user is None:
                    user = get("anonymousId")
        properties = get("properties")
        if user is None:
            if properties.__class__ is dict and "distinct_id" in properties:
                return None  # PostHog's properties.distinct_id
        elif user.__class__ is not str or not user or _utf8_len(user) > limit or not user.isprintable():
            return None
        if properties is not None and properties.__class__ is not dict:
            return None
        message = get("message_id")
        if message is None:
            message = get("messageId")
            if message is None:
                message = get("uuid")
        if message is not None and (message.__class__ is not str or not message or _utf8_len(message) > limit
                                    or not message.isprintable()):
            return None
        value = get("timestamp")
        if value is None:
            moment = now
        elif value.__class__ is str:
            parsed = parse_timestamp(value)
            if parsed is None or parsed - now > self.max_future or now - parsed > self.max_past:
                return None
            moment = parsed
        else:
            return None
        if check_size:
            size = event_size(raw)
            if size is None or size > self.max_event_bytes:
                return None
        return _new_event(Event, (name, user, moment, message))

    @staticmethod
    def _unwrap(document: Any, shape: Shape) -> list[Any]:
        if isinstance(document, list):
            if shape == "single":
                raise RequestRejected(400, "this endpoint takes one event object; use /v1/batch for arrays",
                                      [FieldError(None, "body", "must be a JSON object")])
            return document
        if isinstance(document, dict):
            if "batch" in document:
                batch = document["batch"]
                if shape == "single":
                    raise RequestRejected(400, "this endpoint takes one event; use /v1/batch for batches",
                                          [FieldError(None, "batch", "not accepted here")])
                if not isinstance(batch, list):
                    raise RequestRejected(400, "\"batch\" must be a JSON array of events",
                                          [FieldError(None, "batch", "must be an array")])
                return batch
            if shape == "batch":
                raise RequestRejected(400, "this endpoint takes {\"batch\": [...]}",
                                      [FieldError(None, "batch", "is required")])
            return [document]
        raise RequestRejected(400, "request body must be a JSON object or array",
                              [FieldError(None, "body", f"must be an object or array, not {_json_type(document)}")])

    # one event ----------------------------------------------------------------------------------
    def _event(self, index: int, raw: Any, now: datetime, check_size: bool,
               errors: list[FieldError]) -> Event | None:
        if not isinstance(raw, dict):
            errors.append(FieldError(index, "(event)", f"must be a JSON object, not {_json_type(raw)}"))
            return None
        before = len(errors)
        if check_size:
            size = event_size(raw)
            if size is None:
                errors.append(FieldError(index, _too_deep_field(raw), f"nested more than {MAX_SERIALIZABLE_DEPTH} "
                                         "levels deep; flatten it"))
            elif size > self.max_event_bytes:
                errors.append(FieldError(index, "(event)",
                                         f"event is {size} bytes, over the {self.max_event_bytes}-byte limit"))
        event_type = self._event_type(index, raw, errors)
        user_id = self._identifier(index, raw, _USER_FIELDS, errors)
        if user_id is None:
            properties = raw.get("properties")
            if isinstance(properties, dict) and "distinct_id" in properties:
                user_id = self._identifier(index, properties, ("distinct_id",), errors, prefix="properties.")
        message_id = self._identifier(index, raw, _MESSAGE_FIELDS, errors)
        timestamp = self._timestamp(index, raw.get("timestamp"), now, errors)
        properties = raw.get("properties")
        if properties is not None and not isinstance(properties, dict):
            errors.append(FieldError(index, "properties", f"must be an object, not {_json_type(properties)}"))
        if len(errors) != before:
            return None
        return Event(event_type, user_id, timestamp, message_id)  # type: ignore[arg-type]

    def _event_type(self, index: int, raw: Mapping[str, Any], errors: list[FieldError]) -> str | None:
        call_type = raw.get("type")
        if call_type is not None and (not isinstance(call_type, str) or
                                      (call_type not in _NAMED_TYPES and call_type not in _IMPLIED_EVENT)):
            errors.append(FieldError(index, "type", f"must be one of {_KNOWN_TYPES}"))
            return None
        name = raw.get("event")
        if name is None:
            if call_type in _IMPLIED_EVENT:
                return _IMPLIED_EVENT[call_type]
            errors.append(FieldError(index, "event", "is required (the event type, e.g. \"page_view\")"))
            return None
        return self._name(index, "event", name, errors)

    def _name(self, index: int, field_name: str, value: Any, errors: list[FieldError]) -> str | None:
        if not isinstance(value, str):
            errors.append(FieldError(index, field_name, f"must be a string, not {_json_type(value)}"))
        elif not value.strip():
            errors.append(FieldError(index, field_name, "must not be empty"))
        elif _utf8_len(value) > self.max_name_length:
            errors.append(FieldError(index, field_name, f"is {_utf8_len(value)} bytes in UTF-8, over the limit of "
                                     f"{self.max_name_length} bytes"))
        elif _has_control(value):
            errors.append(FieldError(index, field_name, "must not contain control characters"))
        else:
            return value
        return None

    def _identifier(self, index: int, raw: Mapping[str, Any], names: tuple[str, ...],
                    errors: list[FieldError], prefix: str = "") -> str | None:
        for name in names:
            value = raw.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                errors.append(FieldError(index, prefix + name, f"must be a string, not {_json_type(value)}"))
            elif not value:
                errors.append(FieldError(index, prefix + name, "must not be empty"))
            elif _utf8_len(value) > self.max_id_length:
                errors.append(FieldError(index, prefix + name, f"is {_utf8_len(value)} bytes in UTF-8, over the "
                                         f"limit of {self.max_id_length} bytes"))
            elif _has_control(value):
                errors.append(FieldError(index, prefix + name, "must not contain control characters"))
            else:
                return value
            return None
        return None

    def _timestamp(self, index: int, value: Any, now: datetime, errors: list[FieldError]) -> datetime:
        if value is None:
            return now
        if not isinstance(value, str):
            errors.append(FieldError(index, "timestamp", "must be an ISO-8601 string like "
                                     f"\"2026-11-27T10:00:00Z\", not {_json_type(value)}"))
            return now
        moment = parse_timestamp(value)
        if moment is None:
            errors.append(FieldError(index, "timestamp",
                                     f"{value[:64]!r} is not an ISO-8601 time like \"2026-11-27T10:00:00Z\""))
            return now
        if moment - now > self.max_future:
            errors.append(FieldError(index, "timestamp",
                                     f"is more than {int(self.max_future.total_seconds())} s in the future "
                                     "(check the client's clock)"))
        elif now - moment > self.max_past:
            errors.append(FieldError(index, "timestamp",
                                     f"is more than {int(self.max_past.total_seconds())} s in the past "
                                     "(older than the counter TTL; such events cannot be counted)"))
        return moment


MAX_SERIALIZABLE_DEPTH = 254  # orjson.dumps refuses (RecursionError) deeper nesting than it can write


def event_size(raw: dict[str, Any]) -> int | None:
    """An event's size as compact JSON, in bytes; None when it is nested too deep to serialise.

    orjson reads nesting up to 1024 levels but writes at most 254: without this guard a deeply
    nested event in a body large enough to need the size check raised out of the validator (503).
    """
    try:
        return len(orjson.dumps(raw))
    except TypeError:  # orjson.JSONEncodeError("Recursion limit reached")
        return None


def _too_deep_field(raw: dict[str, Any]) -> str:
    """The first top-level field of a too-deeply nested event whose value cannot be serialised."""
    for name, value in raw.items():
        if isinstance(value, dict | list) and event_size({"v": value}) is None:
            return str(name)[:64]
    return "(event)"


def _apply_call_type(raw: dict[str, Any], call_type: str) -> None:
    """Give an event the call type its route stands for, unless it names one itself.

    ``"$engage"`` is PostHog's ``/engage/`` (people updates of old clients): counted as ``$identify``,
    the user in ``$distinct_id``.
    """
    if call_type == ENGAGE:
        if "event" not in raw:
            raw["event"] = "$identify"
        if "distinct_id" not in raw and "$distinct_id" in raw:
            raw["distinct_id"] = raw["$distinct_id"]
    elif "type" not in raw:
        raw["type"] = call_type


ENGAGE = "$engage"


def parse_timestamp(value: str) -> datetime | None:
    """An ISO-8601 date-time string as an aware UTC datetime (naive means UTC); None if unparseable.

    A time of day is required ("2026-11-27" alone is refused: it is more likely a bug than midnight).
    """
    if len(value) > 64 or ("T" not in value and "t" not in value and " " not in value):
        return None
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__

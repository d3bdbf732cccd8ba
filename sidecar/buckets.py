"""Bucket-key lookup for the hot path: key strings are built once per UTC hour, then cached.

Building ``ap:{ns/name}:h:2026112710`` with strftime for every event would cost more than the rest
of the per-event work together; events cluster in a few hours, so a small dict does it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from analytics_pipeline.core.keys import PipelineKeys

_EPOCH_ORDINAL = datetime(1970, 1, 1).toordinal()
_MAX_CACHED_HOURS = 4096


def hour_number(moment: datetime) -> int:
    """Hours since 1970-01-01T00Z of a UTC datetime (exact: no float rounding near midnight)."""
    return (moment.toordinal() - _EPOCH_ORDINAL) * 24 + moment.hour


class BucketKeyCache:
    """``(daily, hourly, user_daily)`` live bucket keys of a UTC hour, memoised."""

    __slots__ = ("_cache", "keys")

    def __init__(self, keys: PipelineKeys) -> None:
        self.keys = keys
        self._cache: dict[int, tuple[str, str, str]] = {}

    def for_hour(self, hour: int) -> tuple[str, str, str]:
        """The three bucket keys of hour number ``hour`` (see :func:`hour_number`)."""
        found = self._cache.get(hour)
        if found is None:
            if len(self._cache) >= _MAX_CACHED_HOURS:
                self._cache.clear()
            start = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(hours=hour)
            found = (self.keys.daily(start), self.keys.hourly(start), self.keys.user_daily(start))
            self._cache[hour] = found
        return found

    def for_moment(self, moment: datetime) -> tuple[str, str, str]:
        """The three bucket keys a UTC datetime falls into."""
        return self.for_hour(hour_number(moment))

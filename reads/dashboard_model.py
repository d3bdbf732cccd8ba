"""What the dashboard shows: the counted input (``DashboardData``) and its gap-free, chart-ready view.

The data provider only fills ``DashboardData`` with counts it read; this module lays them onto fixed
UTC windows (48 hourly buckets, 30 daily buckets, zero where nothing was counted) and works out the
totals, so the renderer draws and never counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

HOURS = 48
DAYS = 30
# Series drawn individually in a chart; the rest are merged into one "other" series.
MAX_SERIES = 8


@dataclass(frozen=True, slots=True)
class DashboardData:
    """Counts for one pipeline as of ``now`` (UTC), as read by the data provider.

    ``hourly``/``daily`` map event type -> ``[(bucket start, count), ...]`` (missing buckets are
    zero; ``None`` means that granularity is switched off in the config). ``uniques`` lists
    ``(day, distinct users)``; ``None`` when per-user counters are off.
    """

    pipeline: str
    now: datetime
    hourly: Mapping[str, Sequence[tuple[datetime, int]]] | None
    daily: Mapping[str, Sequence[tuple[date, int]]] | None
    uniques: Sequence[tuple[date, int]] | None
    hours: int = HOURS
    days: int = DAYS
    distinct_users: int | None = None  # distinct users over the whole daily window, when known


@dataclass(frozen=True, slots=True)
class Slot:
    """One time bucket on a chart's x axis."""

    start: datetime
    key: str  # stable ISO-8601 UTC id used in data attributes, e.g. 2026-11-27T10:00:00Z
    label: str  # long human label for tooltips and tables
    current: bool = False  # the bucket ``now`` falls in (still filling up)


@dataclass(frozen=True, slots=True)
class Series:
    """One line/area/bar series: an event type (``name``), or the merged rest (``name`` None)."""

    name: str | None
    label: str
    color: int  # palette index; -1 for the merged "other" series
    values: tuple[int, ...]
    members: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.values)


@dataclass(frozen=True, slots=True)
class Table:
    """Gap-free counts of every event type over one window (all types, none merged)."""

    slots: tuple[Slot, ...]
    columns: tuple[str, ...]
    rows: tuple[tuple[int, ...], ...]  # rows[slot][column]

    def column_total(self, index: int) -> int:
        return sum(row[index] for row in self.rows)

    def slot_totals(self) -> list[int]:
        return [sum(row) for row in self.rows]


@dataclass(frozen=True, slots=True)
class DashboardView:
    """Everything the renderer needs, derived from ``DashboardData`` once."""

    pipeline: str
    now: datetime
    hourly: Table | None
    daily: Table | None
    uniques: tuple[tuple[Slot, ...], tuple[int, ...]] | None
    event_types: tuple[str, ...]  # ordered by 30-day total (then 48 h total), descending
    colors: Mapping[str, int] = field(default_factory=dict)
    distinct_users: int | None = None

    @property
    def empty(self) -> bool:
        """True when nothing at all was counted in any window: the page shows how to start."""
        tables = [t for t in (self.hourly, self.daily) if t is not None]
        counted = any(any(row) for t in tables for row in t.rows)
        return not counted and not any(self.unique_values)

    @property
    def unique_values(self) -> tuple[int, ...]:
        return self.uniques[1] if self.uniques else ()

    def color_index(self, name: str) -> int:
        """The palette index of an event type in every chart (-1 when merged into "other")."""
        merged = len(self.event_types) > MAX_SERIES and self.colors[name] >= MAX_SERIES - 1
        return -1 if merged else self.colors[name]

    def series(self, table: Table) -> list[Series]:
        """The chart series of a table: the top ``MAX_SERIES`` event types, the rest merged."""
        index = {name: i for i, name in enumerate(table.columns)}
        shown = [name for name in self.event_types if name in index]
        if len(shown) > MAX_SERIES:
            shown, rest = shown[: MAX_SERIES - 1], shown[MAX_SERIES - 1 :]
        else:
            rest = []
        out = [
            Series(name, name, self.colors[name], tuple(row[index[name]] for row in table.rows))
            for name in shown
        ]
        if rest:
            values = tuple(sum(row[index[name]] for name in rest) for row in table.rows)
            out.append(Series(None, f"{len(rest)} other types", -1, values, tuple(rest)))
        return out


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def hour_slots(now: datetime, hours: int) -> tuple[Slot, ...]:
    """The ``hours`` UTC hour buckets ending with the one ``now`` falls in."""
    last = _utc(now).replace(minute=0, second=0, microsecond=0)
    starts = [last - timedelta(hours=n) for n in range(hours - 1, -1, -1)]
    out = []
    for start in starts:
        end = start + timedelta(hours=1)
        label = f"{start:%a %d %b %Y}, {start:%H}:00\u2013{end:%H}:00 UTC" + (" (so far)" if start == last else "")
        out.append(Slot(start, start.strftime("%Y-%m-%dT%H:00:00Z"), label, start == last))
    return tuple(out)


def day_slots(now: datetime, days: int) -> tuple[Slot, ...]:
    """The ``days`` UTC days ending with the day ``now`` falls in."""
    today = _utc(now).date()
    out = []
    for n in range(days - 1, -1, -1):
        day = today - timedelta(days=n)
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        out.append(Slot(start, f"{day:%Y-%m-%d}", f"{day:%a %d %b %Y}" + (" (today, so far)" if n == 0 else ""),
                        n == 0))
    return tuple(out)


def _slot_key_of(moment: datetime | date, hourly: bool) -> datetime:
    if isinstance(moment, datetime):
        moment = _utc(moment)
        return moment.replace(minute=0, second=0, microsecond=0) if hourly else datetime(
            moment.year, moment.month, moment.day, tzinfo=UTC)
    return datetime(moment.year, moment.month, moment.day, tzinfo=UTC)


def build_table(points: Mapping[str, Sequence[tuple[datetime | date, int]]], slots: tuple[Slot, ...],
                hourly: bool) -> Table:
    """Lay ``points`` onto ``slots``: buckets outside the window are dropped, duplicates summed."""
    position = {slot.start: i for i, slot in enumerate(slots)}
    columns = tuple(sorted(points))
    grid = [[0] * len(columns) for _ in slots]
    for column, name in enumerate(columns):
        for moment, count in points[name]:
            row = position.get(_slot_key_of(moment, hourly))
            if row is not None:
                grid[row][column] += int(count)
    return Table(slots, columns, tuple(tuple(row) for row in grid))


def build_view(data: DashboardData) -> DashboardView:
    """Derive the chart-ready view: windows filled with zeros, types ordered, colours fixed."""
    now = _utc(data.now)
    hourly = build_table(data.hourly, hour_slots(now, data.hours), True) if data.hourly is not None else None
    daily = build_table(data.daily, day_slots(now, data.days), False) if data.daily is not None else None
    uniques = None
    if data.uniques is not None:
        slots = day_slots(now, data.days)
        table = build_table({"users": data.uniques}, slots, False)
        uniques = (slots, tuple(row[0] for row in table.rows))

    totals: dict[str, tuple[int, int]] = {}
    for rank, table in enumerate((daily, hourly)):
        if table is None:
            continue
        for i, name in enumerate(table.columns):
            pair = list(totals.get(name, (0, 0)))
            pair[rank] += table.column_total(i)
            totals[name] = (pair[0], pair[1])
    # Types with nothing in either window are dropped: they would only add empty legend rows.
    ordered = sorted((n for n, t in totals.items() if t != (0, 0)), key=lambda n: (-totals[n][0], -totals[n][1], n))
    colors = {name: i for i, name in enumerate(ordered)}
    return DashboardView(data.pipeline, now, _drop_empty(hourly, ordered), _drop_empty(daily, ordered),
                         uniques, tuple(ordered), colors, data.distinct_users)


def _drop_empty(table: Table | None, keep: list[str]) -> Table | None:
    if table is None:
        return None
    wanted = set(keep)
    idx = [i for i, name in enumerate(table.columns) if name in wanted]
    return Table(table.slots, tuple(table.columns[i] for i in idx), tuple(tuple(row[i] for i in idx)
                                                                           for row in table.rows))

"""The demo's final summary for people: boxed tables (Unicode, or ASCII when stdout cannot encode it)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .demo_check import Tally

_UNICODE = "─│┌┬┐├┼┤└┴┘"
_ASCII = "-|+++++++++"


def _glyphs() -> str:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        (_UNICODE + "✓✗→").encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return _ASCII
    return _UNICODE


def marks() -> tuple[str, str, str]:
    """(ok, failed, arrow) in what stdout can print."""
    return ("✓", "✗", "→") if _glyphs() == _UNICODE else ("ok", "X", "->")


def box_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], footer: Sequence[Sequence[Any]] = (),
              *, glyphs: str | None = None) -> str:
    """A boxed table; numbers are right-aligned with thousands separators, text left-aligned."""
    h, v, tl, tm, tr, ml, mm, mr, bl, bm, br = glyphs or _glyphs()

    def cell(value: Any) -> str:
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)

    body = [[cell(c) for c in row] for row in rows]
    tail = [[cell(c) for c in row] for row in footer]
    texts = [list(headers), *body, *tail]
    widths = [max(len(row[i]) for row in texts) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], int) for row in [*rows, *footer] if row[i] != "") for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        cells = [f" {value:>{w}} " if num else f" {value:<{w}} " for value, w, num in zip(values, widths, numeric,
                                                                                            strict=True)]
        return v + v.join(cells) + v

    def rule(left: str, middle: str, right: str) -> str:
        return left + middle.join(h * (w + 2) for w in widths) + right

    out = [rule(tl, tm, tr), line(headers), rule(ml, mm, mr), *(line(r) for r in body)]
    if tail:
        out += [rule(ml, mm, mr), *(line(r) for r in tail)]
    out.append(rule(bl, bm, br))
    return "\n".join(out)


def type_table(expected: Tally, observed: Tally) -> str:
    """Per event type: acknowledged vs the query path's hourly and daily totals."""
    ok, bad, _ = marks()
    names = sorted(set(expected.types) | set(observed.types) | set(observed.types_hourly),
                   key=lambda n: (-expected.types.get(n, 0), n))
    rows = []
    for name in names:
        want = expected.types.get(name, 0)
        hourly, daily = observed.types_hourly.get(name, 0), observed.types.get(name, 0)
        rows.append([name, want, hourly, daily, ok if want == hourly == daily else bad])
    total_ok = expected.total == sum(observed.types_hourly.values()) == observed.total
    footer = [["total", expected.total, sum(observed.types_hourly.values()), observed.total, ok if total_ok else bad]]
    return box_table(["event type", "sent (acked, once)", "query: hourly", "query: daily", ""], rows, footer)


def day_table(expected: Tally, observed: Tally) -> str:
    """Per UTC day: events and unique users, acknowledged vs the query path."""
    ok, bad, _ = marks()
    days = sorted(set(expected.days) | set(observed.days) | set(expected.users) | set(observed.users))
    rows = []
    for day in days:
        values = [expected.days.get(day, 0), observed.days.get(day, 0), expected.users.get(day, 0),
                  observed.users.get(day, 0)]
        rows.append([day, *values, ok if values[0] == values[1] and values[2] == values[3] else bad])
    distinct_ok = expected.distinct_users == observed.distinct_users and expected.total == observed.total
    footer = [["all days", expected.total, observed.total, expected.distinct_users, observed.distinct_users,
               ok if distinct_ok else bad]]
    return box_table(["UTC day", "events sent", "query", "unique users sent", "query", ""], rows, footer)

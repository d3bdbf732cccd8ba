"""Server-side SVG charts for the dashboard: stacked areas, stacked bars and a single-series area.

Pure functions from slots and series to an SVG string. Every drawn datum carries stable data
attributes (``data-series``, ``data-bucket``, ``data-count``) and an SVG ``<title>`` tooltip, and
every piece of text is escaped, so hostile event names stay inert text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from .dashboard_model import Series, Slot

# Tableau 10 (first eight): distinct on white and on near-black, friendly to common colour blindness.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7")
OTHER_COLOR = "#9aa0a6"
USERS_COLOR = "#6d5ce8"


def color_of(index: int) -> str:
    """The palette colour of a series (index -1 is the merged "other" series)."""
    return OTHER_COLOR if index < 0 else PALETTE[index % len(PALETTE)]


def fmt_int(value: int) -> str:
    """``12,345``: exact counts for tooltips, tables and big numbers."""
    return f"{value:,}"


def fmt_compact(value: float) -> str:
    """``950``, ``1.5k``, ``12k``, ``3.4M``: short axis labels."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            scaled = value / factor
            text = f"{scaled:.1f}".rstrip("0").rstrip(".") if scaled < 10 else f"{scaled:.0f}"
            return text + suffix
    return f"{value:g}"


def nice_scale(maximum: int, ticks: int = 4) -> tuple[int, int]:
    """``(step, top)`` of a y axis with about ``ticks`` steps of 1, 2 or 5 x 10^n covering ``maximum``."""
    if maximum <= 0:
        return 1, ticks
    raw = maximum / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    step = max(1, math.ceil(step))
    return step, step * math.ceil(maximum / step)


@dataclass(frozen=True, slots=True)
class Frame:
    """Chart size (SVG user units) and the margins around the plot area."""

    width: int
    height: int
    left: int = 52
    right: int = 14
    top: int = 14
    bottom: int = 34

    @property
    def plot_w(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_h(self) -> float:
        return self.height - self.top - self.bottom

    @property
    def base(self) -> float:
        return self.top + self.plot_h


TickLabel = Callable[[int, Slot], tuple[str, bool] | None]


def hour_tick(index: int, slot: Slot) -> tuple[str, bool] | None:
    """x labels of an hourly axis: the date at midnight (major), the time every 6 hours."""
    hour = slot.start.hour
    if hour == 0:
        return f"{slot.start:%a %d %b}", True
    if hour % 6 == 0:
        return f"{hour:02d}:00", False
    return None


def day_tick_every(step: int, count: int) -> TickLabel:
    """x labels of a daily axis: every ``step``-th day counted back from the last one (today)."""
    def tick(index: int, slot: Slot) -> tuple[str, bool] | None:
        if (count - 1 - index) % step:
            return None
        return f"{slot.start:%d %b}", slot.start.day == 1
    return tick


def _f(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


class _Canvas:
    """Shared geometry of one time chart: scales, grid, axes and the svg wrapper."""

    def __init__(self, frame: Frame, slots: Sequence[Slot], top_value: int) -> None:
        self.frame = frame
        self.slots = slots
        self.step, self.top = nice_scale(top_value)
        self.slot_w = frame.plot_w / max(len(slots), 1)

    def x(self, index: int) -> float:
        return self.frame.left + self.slot_w * (index + 0.5)

    def y(self, value: float) -> float:
        return self.frame.base - self.frame.plot_h * (value / self.top)

    def grid(self) -> str:
        f = self.frame
        parts = ['<g class="grid" aria-hidden="true">']
        for value in range(0, self.top + 1, self.step):
            y = _f(self.y(value))
            cls = "zero" if value == 0 else "line"
            parts.append(f'<line class="{cls}" x1="{f.left}" x2="{f.width - f.right}" y1="{y}" y2="{y}"/>')
            parts.append(f'<text class="ytick" x="{f.left - 8}" y="{y}" dy="0.32em" text-anchor="end" '
                         f'data-value="{value}">{fmt_compact(value)}</text>')
        parts.append("</g>")
        return "".join(parts)

    def x_axis(self, tick: TickLabel) -> str:
        f = self.frame
        parts = ['<g class="xaxis" aria-hidden="true">']
        for i, slot in enumerate(self.slots):
            label = tick(i, slot)
            if label is None:
                continue
            text, major = label
            x = _f(self.x(i))
            cls = "xtick major" if major else "xtick"
            parts.append(f'<line class="tickmark" x1="{x}" x2="{x}" y1="{_f(f.base)}" y2="{_f(f.base + 5)}"/>')
            parts.append(f'<text class="{cls}" x="{x}" y="{_f(f.base + 20)}" text-anchor="middle" '
                         f'data-bucket="{slot.key}">{escape(text)}</text>')
        parts.append("</g>")
        return "".join(parts)

    def band(self, index: int, slot: Slot, tooltip: str, total: int) -> str:
        f = self.frame
        x = f.left + self.slot_w * index
        return (f'<rect class="band" x="{_f(x)}" y="{f.top}" width="{_f(self.slot_w)}" height="{_f(f.plot_h)}" '
                f'data-bucket="{slot.key}" data-total="{total}"><title>{escape(tooltip)}</title></rect>')

    def svg(self, chart_id: str, title: str, desc: str, body: Sequence[str], kind: str) -> str:
        f = self.frame
        return (f'<svg class="chart {kind}" id="{chart_id}" viewBox="0 0 {f.width} {f.height}" '
                f'preserveAspectRatio="xMidYMid meet" role="img" aria-labelledby="{chart_id}-t {chart_id}-d" '
                f'data-chart="{chart_id}" data-ymax="{self.top}">'
                f'<title id="{chart_id}-t">{escape(title)}</title><desc id="{chart_id}-d">{escape(desc)}</desc>'
                + "".join(body) + "</svg>")

    def no_data(self, message: str) -> str:
        f = self.frame
        return (f'<text class="nodata" x="{_f(f.left + f.plot_w / 2)}" y="{_f(f.top + f.plot_h / 2)}" '
                f'text-anchor="middle">{escape(message)}</text>')


def _series_attr(series: Series) -> str:
    if series.name is None:
        return f'data-series-other="{escape(", ".join(series.members))}"'
    return f'data-series="{escape(series.name)}"'


def _tooltip(slot: Slot, series: Sequence[Series], index: int) -> tuple[str, int]:
    total = sum(s.values[index] for s in series)
    lines = [slot.label] + [f"{s.label}: {fmt_int(s.values[index])}" for s in series]
    if len(series) > 1:
        lines.append(f"Total: {fmt_int(total)}")
    return "\n".join(lines), total


def _outline(points: Sequence[str], values: Sequence[int]) -> str:
    """The top edge of a stacked layer, leaving out stretches where the layer is empty: there it would
    lie on the edge of the layer below and draw that layer's peaks in this layer's colour."""
    parts: list[str] = []
    pen_down = False
    for i in range(len(points) - 1):
        if values[i] == 0 and values[i + 1] == 0:
            pen_down = False
            continue
        if not pen_down:
            parts.append(f"M{points[i]}")
            pen_down = True
        parts.append(f"L{points[i + 1]}")
    if len(points) == 1 and values[0]:
        parts.append(f"M{points[0]} h0.01")
    return " ".join(parts)


def stacked_area_chart(chart_id: str, title: str, slots: Sequence[Slot], series: Sequence[Series],
                       frame: Frame, tick: TickLabel, empty_message: str) -> str:
    """Stacked areas (first series at the bottom) with a hover column and a dot per series per slot."""
    n = len(slots)
    totals = [sum(s.values[i] for s in series) for i in range(n)]
    canvas = _Canvas(frame, slots, max(totals, default=0))
    body = [canvas.grid()]
    lower = [0] * n
    layers = []
    for s in series:
        upper = [lower[i] + s.values[i] for i in range(n)]
        top_pts = [f"{_f(canvas.x(i))},{_f(canvas.y(upper[i]))}" for i in range(n)]
        bottom_pts = [f"{_f(canvas.x(i))},{_f(canvas.y(lower[i]))}" for i in reversed(range(n))]
        color = color_of(s.color)
        attr = _series_attr(s)
        layers.append(f'<path class="area" {attr} d="M{" L".join(top_pts)} L{" L".join(bottom_pts)} Z" '
                      f'fill="{color}"/>')
        outline = _outline(top_pts, s.values)
        if outline:
            layers.append(f'<path class="line" {attr} d="{outline}" stroke="{color}"/>')
        lower = upper
    body.append('<g class="layers">' + "".join(layers) + "</g>")
    body.append(canvas.x_axis(tick))
    slots_svg = []
    for i, slot in enumerate(slots):
        tooltip, total = _tooltip(slot, series, i)
        cumulative = 0
        dots = []
        for s in series:
            count = s.values[i]
            cumulative += count
            dots.append(f'<circle class="dot" {_series_attr(s)} data-bucket="{slot.key}" data-count="{count}" '
                        f'cx="{_f(canvas.x(i))}" cy="{_f(canvas.y(cumulative))}" r="3.5" '
                        f'fill="{color_of(s.color)}"><title>{escape(f"{s.label} · {slot.label}: {fmt_int(count)}")}'
                        f'</title></circle>')
        cls = "slot current" if slot.current else "slot"
        slots_svg.append(f'<g class="{cls}">{canvas.band(i, slot, tooltip, total)}{"".join(dots)}</g>')
    body.append('<g class="slots">' + "".join(slots_svg) + "</g>")
    if not any(totals):
        body.append(canvas.no_data(empty_message))
    desc = (f"Stacked area chart, {len(series)} series over {n} buckets, {fmt_int(sum(totals))} events in total. "
            "The exact numbers are in the data tables below.")
    return canvas.svg(chart_id, title, desc, body, "area-chart")


def stacked_bar_chart(chart_id: str, title: str, slots: Sequence[Slot], series: Sequence[Series],
                      frame: Frame, tick: TickLabel, empty_message: str) -> str:
    """Stacked bars, one per slot, one segment per series with a count above zero."""
    n = len(slots)
    totals = [sum(s.values[i] for s in series) for i in range(n)]
    canvas = _Canvas(frame, slots, max(totals, default=0))
    body = [canvas.grid()]
    gap = min(6.0, canvas.slot_w * 0.25)
    width = canvas.slot_w - gap
    columns = []
    for i, slot in enumerate(slots):
        tooltip, total = _tooltip(slot, series, i)
        x = frame.left + canvas.slot_w * i + gap / 2
        cumulative = 0
        segments = []
        for s in series:
            count = s.values[i]
            if count <= 0:
                continue
            y_top, y_bottom = canvas.y(cumulative + count), canvas.y(cumulative)
            cumulative += count
            segments.append(
                f'<rect class="bar" {_series_attr(s)} data-bucket="{slot.key}" data-count="{count}" '
                f'x="{_f(x)}" y="{_f(y_top)}" width="{_f(width)}" height="{_f(max(y_bottom - y_top, 0.5))}" '
                f'fill="{color_of(s.color)}"><title>{escape(f"{s.label} · {slot.label}: {fmt_int(count)}")}'
                f'</title></rect>')
        cls = "slot current" if slot.current else "slot"
        columns.append(f'<g class="{cls}">{canvas.band(i, slot, tooltip, total)}{"".join(segments)}</g>')
    body.append('<g class="slots">' + "".join(columns) + "</g>")
    body.append(canvas.x_axis(tick))
    if not any(totals):
        body.append(canvas.no_data(empty_message))
    desc = (f"Stacked bar chart, {len(series)} series over {n} days, {fmt_int(sum(totals))} events in total. "
            "The exact numbers are in the data tables below.")
    return canvas.svg(chart_id, title, desc, body, "bar-chart")


def single_area_chart(chart_id: str, title: str, slots: Sequence[Slot], values: Sequence[int], name: str,
                      frame: Frame, tick: TickLabel, empty_message: str) -> str:
    """One series as a line over a soft area, with a dot per slot (daily unique users)."""
    n = len(slots)
    canvas = _Canvas(frame, slots, max(values, default=0))
    points = [f"{_f(canvas.x(i))},{_f(canvas.y(v))}" for i, v in enumerate(values)]
    base = _f(frame.base)
    body = [canvas.grid()]
    if points:
        area = f"M{_f(canvas.x(0))},{base} L{' L'.join(points)} L{_f(canvas.x(n - 1))},{base} Z"
        body.append(f'<path class="area single" data-series="{escape(name)}" d="{area}" fill="{USERS_COLOR}"/>')
        body.append(f'<path class="line" data-series="{escape(name)}" d="M{" L".join(points)}" '
                    f'stroke="{USERS_COLOR}"/>')
    body.append(canvas.x_axis(tick))
    slots_svg = []
    for i, slot in enumerate(slots):
        count = values[i]
        tooltip = f"{slot.label}\n{fmt_int(count)} unique users"
        visible = " always" if count else ""
        dot = (f'<circle class="dot{visible}" data-series="{escape(name)}" data-bucket="{slot.key}" '
               f'data-count="{count}" cx="{_f(canvas.x(i))}" cy="{_f(canvas.y(count))}" r="3.5" '
               f'fill="{USERS_COLOR}"><title>{escape(tooltip)}</title></circle>')
        cls = "slot current" if slot.current else "slot"
        slots_svg.append(f'<g class="{cls}">{canvas.band(i, slot, tooltip, count)}{dot}</g>')
    body.append('<g class="slots">' + "".join(slots_svg) + "</g>")
    if not any(values):
        body.append(canvas.no_data(empty_message))
    desc = (f"Line chart of daily unique users over {n} days, peak {fmt_int(max(values, default=0))}. "
            "The exact numbers are in the data tables below.")
    return canvas.svg(chart_id, title, desc, body, "line-chart")

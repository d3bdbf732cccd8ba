"""The dashboard page as one self-contained HTML document (inline CSS, SVG and a tiny script).

Pure rendering: ``render_dashboard(data, options)`` turns counted ``DashboardData`` into HTML with
no I/O, so it is unit-tested with known numbers. Nothing is loaded from a CDN; every string that
came from an event is escaped.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Literal

from .dashboard_charts import (
    USERS_COLOR,
    Frame,
    color_of,
    day_tick_every,
    fmt_int,
    hour_tick,
    single_area_chart,
    stacked_area_chart,
    stacked_bar_chart,
)
from .dashboard_model import DashboardData, DashboardView, Series, Table, build_view

Theme = Literal["auto", "light", "dark"]
TOP_EVENTS_ROWS = 12


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """How to render: auto-refresh period (0 = off), the ingest URL shown in examples, colour theme."""

    refresh_seconds: int = 30
    ingest_url: str = "http://localhost:8787/v1/events"
    theme: Theme = "auto"


# The only script on the page: fetch-and-swap auto-refresh (paused while the tab is hidden) and
# the copy button of the example command. Its hash goes into the Content-Security-Policy.
SCRIPT = """(() => {
  const period = Number(document.body.dataset.refresh || 0);
  document.addEventListener("click", (event) => {
    const button = event.target.closest("[data-copy]");
    const source = button && document.getElementById(button.dataset.copy);
    if (!source || !navigator.clipboard) return;
    navigator.clipboard.writeText(source.textContent).then(() => {
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
  });
  if (!period) return;
  const tick = async () => {
    if (document.visibilityState !== "hidden") {
      try {
        const response = await fetch(location.href, { cache: "no-store" });
        if (!response.ok) throw new Error(String(response.status));
        const page = new DOMParser().parseFromString(await response.text(), "text/html");
        const next = page.getElementById("app");
        if (!next) throw new Error("no #app in the response");
        const open = [...document.querySelectorAll("details[open][id]")].map((d) => d.id);
        document.getElementById("app").replaceWith(document.adoptNode(next));
        open.forEach((id) => { const d = document.getElementById(id); if (d) d.open = true; });
        document.documentElement.classList.remove("stale");
      } catch (error) {
        document.documentElement.classList.add("stale");
      }
    }
    setTimeout(tick, period * 1000);
  };
  setTimeout(tick, period * 1000);
})();"""

SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()

CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src '{SCRIPT_HASH}'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

CSS = """
:root{--bg:#f5f6f8;--card:#fff;--text:#1b2130;--muted:#667085;--faint:#98a2b3;--grid:#eaecf0;--axis:#c4c9d2;
--border:#e4e7ec;--accent:#6d5ce8;--good:#12a150;--bad:#d92d20;--code:#f2f4f7;--shadow:0 1px 2px rgba(16,24,40,.06);
color-scheme:light dark}
@media (prefers-color-scheme:dark){:root:not([data-theme=light]){--bg:#0e1014;--card:#171a20;--text:#e7e9ee;
--muted:#9aa3b2;--faint:#6b7383;--grid:#252a33;--axis:#3a414d;--border:#262b34;--accent:#8b7cf6;--good:#3ccb7f;
--bad:#f97066;--code:#1f232b;--shadow:none}}
:root[data-theme=dark]{--bg:#0e1014;--card:#171a20;--text:#e7e9ee;--muted:#9aa3b2;--faint:#6b7383;--grid:#252a33;
--axis:#3a414d;--border:#262b34;--accent:#8b7cf6;--good:#3ccb7f;--bad:#f97066;--code:#1f232b;--shadow:none}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--text);font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif;-webkit-font-smoothing:antialiased}
#app{max-width:1440px;margin:0 auto;padding:24px 28px 40px}
a{color:var(--accent)}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
.top{display:flex;flex-wrap:wrap;gap:12px 24px;align-items:center;justify-content:space-between;margin-bottom:20px}
.brand{display:flex;gap:12px;align-items:center;min-width:0}
.brand h1{font-size:20px;margin:0;font-weight:650;letter-spacing:-.01em;overflow-wrap:anywhere}
.brand .sub{margin:0;color:var(--muted);font-size:13px}
.logo{width:36px;height:36px;flex:none}
.status{color:var(--muted);font-size:13px;display:flex;align-items:center;gap:8px;flex-wrap:wrap}
.live{width:8px;height:8px;border-radius:50%;background:var(--good);box-shadow:0 0 0 0 var(--good);
animation:pulse 2s infinite}
.live.off{background:var(--faint);animation:none}
@keyframes pulse{0%{box-shadow:0 0 0 0 rgba(18,161,80,.5)}70%{box-shadow:0 0 0 7px rgba(18,161,80,0)}
100%{box-shadow:0 0 0 0 rgba(18,161,80,0)}}
@media (prefers-reduced-motion:reduce){.live{animation:none}}
.stale-msg{display:none;color:var(--bad);font-weight:600}
html.stale .stale-msg{display:inline}html.stale .live{background:var(--bad);animation:none}
.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(210px,1fr));gap:16px;margin-bottom:16px}
.card,.stat{background:var(--card);border:1px solid var(--border);border-radius:12px;box-shadow:var(--shadow)}
.stat{padding:16px 18px}
.stat .label{color:var(--muted);font-size:13px;font-weight:500}
.stat .value{font-size:32px;font-weight:650;letter-spacing:-.02em;line-height:1.2;margin:4px 0 2px;
font-variant-numeric:tabular-nums}
.stat .note{color:var(--muted);font-size:12.5px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.up{color:var(--good);font-weight:600}.down{color:var(--bad);font-weight:600}
.card{padding:18px 20px;margin-bottom:16px;min-width:0}
.card h2{font-size:15px;font-weight:620;margin:0}
.card .hint{color:var(--muted);font-size:12.5px;margin:2px 0 0}
.card-head{display:flex;flex-wrap:wrap;gap:8px 20px;align-items:flex-start;justify-content:space-between;
margin-bottom:10px}
.row{display:grid;grid-template-columns:minmax(0,2fr) minmax(0,1fr);gap:16px}
.row>.card{margin-bottom:16px}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin:0;padding:0;list-style:none;font-size:12.5px}
.legend li{display:flex;align-items:center;gap:6px;max-width:240px;min-width:0}
.legend .name{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.legend .num{color:var(--muted);font-variant-numeric:tabular-nums}
.swatch{width:10px;height:10px;border-radius:3px;flex:none}
.chart-wrap{overflow-x:auto}
.chart{display:block;width:100%;height:auto;font-family:inherit}
.chart text{fill:var(--muted);font-size:12px;font-variant-numeric:tabular-nums}
.chart .xtick.major{fill:var(--text);font-weight:600}
.chart .grid .line{stroke:var(--grid)}.chart .grid .zero,.chart .tickmark{stroke:var(--axis)}
.chart .area{fill-opacity:.30}.chart .area.single{fill-opacity:.14}
.chart .line{fill:none;stroke-width:2;stroke-linejoin:round;stroke-linecap:round}
.chart .band{fill:var(--text);fill-opacity:0}
.chart .slot:hover .band{fill-opacity:.06}
.chart .dot{opacity:0;stroke:var(--card);stroke-width:1.5}
.chart .slot:hover .dot,.chart .dot.always{opacity:1}
.chart .slot:hover .bar{filter:brightness(1.12)}
.chart .slot.current .bar{fill-opacity:.72}
.chart .nodata{fill:var(--faint);font-size:15px}
.top-events{width:100%;border-collapse:collapse;font-size:13px}
.top-events td,.top-events th{padding:6px 0;text-align:left;vertical-align:middle}
.top-events th{color:var(--muted);font-weight:500;font-size:12px}
.top-events .n{text-align:right;font-variant-numeric:tabular-nums;padding-left:12px;white-space:nowrap}
.top-events .ev{max-width:0;width:100%}
.ev-name{display:flex;align-items:center;gap:8px;min-width:0}
.ev-name span:last-child{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.share{height:4px;border-radius:2px;background:var(--grid);margin-top:4px;overflow:hidden}
.share i{display:block;height:100%;border-radius:2px}
.more{color:var(--muted);font-size:12.5px;margin:8px 0 0}
.info dl{margin:0;display:grid;grid-template-columns:auto 1fr;gap:6px 14px;font-size:13px}
.info dt{color:var(--muted)}.info dd{margin:0;overflow-wrap:anywhere}
.snippet{position:relative;margin:12px 0 0}
.snippet pre{background:var(--code);border:1px solid var(--border);border-radius:8px;padding:12px 70px 12px 14px;
margin:0;white-space:pre-wrap;overflow-wrap:anywhere}
.snippet button{position:absolute;top:8px;right:8px;font:inherit;font-size:12px;border:1px solid var(--border);
background:var(--card);color:var(--text);border-radius:6px;padding:2px 8px;cursor:pointer}
details.card>summary{cursor:pointer;font-weight:620;font-size:15px}
details.card>summary span{color:var(--muted);font-weight:400;font-size:12.5px;margin-left:8px}
.tables{display:grid;grid-template-columns:minmax(0,1fr);gap:20px;margin-top:14px}
.table-wrap{overflow:auto;max-height:420px;border:1px solid var(--border);border-radius:8px}
table.data{border-collapse:collapse;font-size:12.5px;width:100%}
table.data caption{text-align:left;font-weight:600;padding:8px 10px;caption-side:top}
table.data th,table.data td{padding:4px 10px;border-bottom:1px solid var(--grid);white-space:nowrap}
table.data thead th{position:sticky;top:0;background:var(--card);color:var(--muted);font-weight:500;
max-width:180px;overflow:hidden;text-overflow:ellipsis}
table.data td{text-align:right;font-variant-numeric:tabular-nums}
table.data th[scope=row]{text-align:left;font-weight:400;color:var(--muted)}
table.data td.zero{color:var(--faint)}table.data .total{font-weight:600}
.empty{text-align:center;padding:48px 24px 40px}
.empty .art{width:220px;height:auto;margin:0 auto 8px;display:block}
.empty h2{font-size:22px;margin:8px 0 6px}
.empty p{color:var(--muted);max-width:560px;margin:6px auto}
.empty .snippet{max-width:760px;margin:20px auto 10px;text-align:left}
.off-card{color:var(--muted);padding:28px 20px;text-align:center}
footer{color:var(--faint);font-size:12px;margin-top:8px;display:flex;justify-content:space-between;flex-wrap:wrap;
gap:8px}
@media (max-width:1000px){.row{grid-template-columns:1fr}}
@media (max-width:700px){#app{padding:16px 12px 32px}.stats{grid-template-columns:repeat(2,minmax(0,1fr))}
.chart.area-chart{min-width:1100px}
.chart.bar-chart,.chart.line-chart{min-width:720px}
.chart-wrap{direction:rtl}.chart-wrap>.chart{direction:ltr}.stat .value{font-size:26px}}
"""

LOGO = ('<svg class="logo" viewBox="0 0 36 36" aria-hidden="true"><rect width="36" height="36" rx="9" '
        'fill="var(--accent)"/><path d="M9 25l6-7 5 4 7-10" fill="none" stroke="#fff" stroke-width="2.6" '
        'stroke-linecap="round" stroke-linejoin="round"/></svg>')

EMPTY_ART = (
    '<svg class="art" viewBox="0 0 220 120" aria-hidden="true"><rect x="1" y="1" width="218" height="118" rx="12" '
    'fill="var(--bg)" stroke="var(--border)"/><g stroke="var(--grid)" stroke-width="1.5">'
    '<line x1="20" y1="30" x2="200" y2="30"/><line x1="20" y1="55" x2="200" y2="55"/>'
    '<line x1="20" y1="80" x2="200" y2="80"/></g><line x1="20" y1="100" x2="200" y2="100" stroke="var(--axis)" '
    'stroke-width="1.5"/><path d="M22 96 C60 96 70 70 100 74 S150 40 198 36" fill="none" stroke="var(--accent)" '
    'stroke-width="3" stroke-dasharray="6 7" stroke-linecap="round" opacity=".75"/>'
    '<circle cx="198" cy="36" r="5" fill="var(--accent)"/></svg>')


def _now_label(moment: datetime) -> str:
    return f"{moment:%a %d %b %Y, %H:%M:%S} UTC"


def _delta(current: int, previous: int, what: str) -> str:
    if previous == 0:
        return f"none in the {what} before" if current == 0 else f'<span class="up">new</span> vs the {what} before'
    change = (current - previous) / previous * 100
    if round(change) == 0:
        return f"same as the {what} before"
    arrow, cls = ("▲", "up") if change > 0 else ("▼", "down")
    return f'<span class="{cls}">{arrow} {abs(change):.0f}%</span> vs the {what} before'


def _stat(key: str, label: str, value: int | None, note: str) -> str:
    shown = "—" if value is None else fmt_int(value)
    data = "" if value is None else f' data-value="{value}"'
    return (f'<div class="stat" data-stat="{key}"{data}><div class="label">{escape(label)}</div>'
            f'<div class="value">{shown}</div><div class="note">{note}</div></div>')


def _stats(view: DashboardView) -> str:
    cards = []
    if view.hourly is not None:
        per_hour = view.hourly.slot_totals()
        last, before = sum(per_hour[-24:]), sum(per_hour[-48:-24])
        cards.append(_stat("events_24h", "Events · last 24 h", last, _delta(last, before, "24 h")))
    else:
        cards.append(_stat("events_24h", "Events · last 24 h", None, "hourly counters are off"))
    if view.daily is not None:
        per_day = view.daily.slot_totals()
        total = sum(per_day)
        days = len(per_day)
        cards.append(_stat("events_30d", f"Events · last {days} days", total,
                           f"≈ {fmt_int(round(total / max(days, 1)))} per day"))
    else:
        cards.append(_stat("events_30d", "Events · last 30 days", None, "daily counters are off"))
    if view.uniques is not None:
        values = view.unique_values
        today, yesterday = values[-1] if values else 0, values[-2] if len(values) > 1 else 0
        cards.append(_stat("users_today", "Unique users · today", today,
                           f"yesterday {fmt_int(yesterday)} · peak {fmt_int(max(values, default=0))}"))
        if view.distinct_users is not None:
            days = len(values)
            cards.append(_stat("users_window", f"Unique users · {days} days", view.distinct_users,
                               "distinct user ids"))
    else:
        cards.append(_stat("users_today", "Unique users · today", None, "per-user counters are off"))
    top = view.event_types[0] if view.event_types else None
    note = f"most frequent: <b>{escape(top)}</b>" if top is not None else "none yet"
    cards.append(_stat("event_types", "Event types", len(view.event_types), note))
    return '<section class="stats" aria-label="Totals">' + "".join(cards) + "</section>"


def _legend(series: Sequence[Series]) -> str:
    items = []
    for s in series:
        attr = f'data-legend="{escape(s.name)}"' if s.name is not None else 'data-legend-other=""'
        title = s.label if s.name is not None else ", ".join(s.members)
        items.append(f'<li {attr} title="{escape(title)}"><span class="swatch" style="background:{color_of(s.color)}">'
                     f'</span><span class="name">{escape(s.label)}</span>'
                     f'<span class="num">{fmt_int(s.total)}</span></li>')
    return '<ul class="legend" aria-label="Legend">' + "".join(items) + "</ul>"


def _card(card_id: str, title: str, hint: str, legend: str, chart: str) -> str:
    return (f'<section class="card" id="{card_id}" aria-labelledby="{card_id}-h"><div class="card-head"><div>'
            f'<h2 id="{card_id}-h">{escape(title)}</h2><p class="hint">{escape(hint)}</p></div>{legend}</div>'
            f'<div class="chart-wrap">{chart}</div></section>')


def _off(card_id: str, title: str, granularity: str) -> str:
    return (f'<section class="card" id="{card_id}" data-off="{granularity}"><h2>{escape(title)}</h2>'
            f'<p class="off-card">The <code>{granularity}</code> counters are switched off for this pipeline '
            f'(<code>counters.granularities</code> in its config), so there is nothing to draw here.</p></section>')


def _hourly_card(view: DashboardView) -> str:
    title = f"Events per hour · last {len(view.hourly.slots) if view.hourly else 48} hours"
    if view.hourly is None:
        return _off("hourly", title, "hourly")
    series = view.series(view.hourly)
    chart = stacked_area_chart("chart-hourly", title + " (UTC)", view.hourly.slots, series, Frame(1360, 300),
                               hour_tick, "No events in the last 48 hours")
    return _card("hourly", title, "Stacked by event type · UTC · hover for exact counts", _legend(series), chart)


def _daily_card(view: DashboardView) -> str:
    days = len(view.daily.slots) if view.daily else 30
    title = f"Events per day · last {days} days"
    if view.daily is None:
        return _off("daily", title, "daily")
    series = view.series(view.daily)
    chart = stacked_bar_chart("chart-daily", title + " (UTC)", view.daily.slots, series, Frame(880, 300),
                              day_tick_every(5, days), f"No events in the last {days} days")
    return _card("daily", title, "Stacked by event type · UTC days · today is still filling up",
                 _legend(series), chart)


def _uniques_card(view: DashboardView) -> str:
    days = len(view.uniques[0]) if view.uniques else 30
    title = f"Unique users per day · last {days} days"
    if view.uniques is None:
        return _off("uniques", title, "user_daily")
    slots, values = view.uniques
    chart = single_area_chart("chart-uniques", title + " (UTC)", slots, values, "unique_users", Frame(880, 260),
                              day_tick_every(5, days), f"No users seen in the last {days} days")
    legend = (f'<ul class="legend"><li data-legend="unique_users"><span class="swatch" '
              f'style="background:{USERS_COLOR}"></span><span class="name">Distinct user ids per UTC day</span>'
              '</li></ul>')
    return _card("uniques", title, "Users with at least one event that day", legend, chart)


def _top_events(view: DashboardView) -> str:
    daily = view.daily
    hourly = view.hourly
    d_totals = {n: daily.column_total(i) for i, n in enumerate(daily.columns)} if daily else {}
    h_totals: dict[str, int] = {}
    if hourly:
        for i, n in enumerate(hourly.columns):
            h_totals[n] = sum(row[i] for row in hourly.rows[-24:])
    peak = max(d_totals.values(), default=0) or 1
    total = sum(d_totals.values()) or 1
    rows = []
    for name in view.event_types[:TOP_EVENTS_ROWS]:
        color = color_of(view.color_index(name))
        month = d_totals.get(name, 0)
        rows.append(
            f'<tr data-event-type="{escape(name)}"><td class="ev"><div class="ev-name" title="{escape(name)}">'
            f'<span class="swatch" style="background:{color}"></span><span>{escape(name)}</span></div>'
            f'<div class="share" aria-hidden="true"><i style="width:{month / peak * 100:.1f}%;background:{color}">'
            f'</i></div></td><td class="n" data-window="24h">{fmt_int(h_totals.get(name, 0))}</td>'
            f'<td class="n" data-window="30d">{fmt_int(month)}<br><small style="color:var(--muted)">'
            f'{month / total * 100:.1f}%</small></td></tr>')
    more = len(view.event_types) - TOP_EVENTS_ROWS
    extra = f'<p class="more">+ {more} more in the data tables below</p>' if more > 0 else ""
    return ('<section class="card" id="top-events" aria-labelledby="top-events-h"><div class="card-head"><div>'
            '<h2 id="top-events-h">Top events</h2><p class="hint">By count over the last 30 days</p></div></div>'
            '<table class="top-events"><thead><tr><th scope="col">Event type</th><th class="n" scope="col">24 h</th>'
            '<th class="n" scope="col">30 d</th></tr></thead><tbody>' + "".join(rows) + f"</tbody></table>{extra}"
            "</section>")


def _snippet(options: RenderOptions, snippet_id: str) -> str:
    command = (f"curl -X POST {options.ingest_url} \\\n  -H 'Content-Type: application/json' \\\n  "
               """-d '{"event":"page_view","user_id":"u1"}'""")
    return (f'<div class="snippet"><pre><code id="{snippet_id}">{escape(command)}</code></pre>'
            f'<button type="button" data-copy="{snippet_id}">Copy</button></div>')


def _info(view: DashboardView, options: RenderOptions) -> str:
    return ('<section class="card info" id="about" aria-labelledby="about-h"><div class="card-head"><div>'
            '<h2 id="about-h">About these numbers</h2></div></div><dl>'
            f'<dt>Pipeline</dt><dd><code>{escape(view.pipeline)}</code></dd>'
            f'<dt>As of</dt><dd><time datetime="{view.now:%Y-%m-%dT%H:%M:%SZ}">{_now_label(view.now)}</time></dd>'
            '<dt>Source</dt><dd>PostgreSQL totals plus the counts still in Redis, so the charts neither dip nor '
            'jump when the flusher runs.</dd><dt>Time zone</dt><dd>UTC for every bucket and label.</dd></dl>'
            f'<p class="hint" style="margin-top:14px">Send a test event:</p>{_snippet(options, "send-cmd")}</section>')


def _data_table(caption: str, table_id: str, first: str, slots: Sequence, columns: Sequence[str],
                rows: Sequence[Sequence[int]], with_total: bool) -> str:
    head = "".join(f'<th scope="col" title="{escape(c)}">{escape(c)}</th>' for c in columns)
    if with_total:
        head += '<th scope="col">Total</th>'
    body = []
    for slot, row in reversed(list(zip(slots, rows, strict=True))):
        cells = "".join(f'<td{" class=zero" if v == 0 else ""}>{fmt_int(v)}</td>' for v in row)
        if with_total:
            cells += f'<td class="total">{fmt_int(sum(row))}</td>'
        body.append(f'<tr data-bucket="{slot.key}"><th scope="row">{escape(slot.label)}</th>{cells}</tr>')
    return (f'<div class="table-wrap"><table class="data" id="{table_id}"><caption>{escape(caption)}</caption>'
            f'<thead><tr><th scope="col">{escape(first)}</th>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>")


def _tables(view: DashboardView) -> str:
    parts = []
    if view.hourly is not None:
        t: Table = view.hourly
        parts.append(_data_table("Events per hour (UTC), newest first", "table-hourly", "Hour (UTC)", t.slots,
                                 t.columns, t.rows, True))
    if view.daily is not None:
        t = view.daily
        parts.append(_data_table("Events per day (UTC), newest first", "table-daily", "Day (UTC)", t.slots,
                                 t.columns, t.rows, True))
    if view.uniques is not None:
        slots, values = view.uniques
        parts.append(_data_table("Unique users per day (UTC), newest first", "table-uniques", "Day (UTC)", slots,
                                 ["Unique users"], [(v,) for v in values], False))
    return ('<details class="card" id="data-tables"><summary>Data tables<span>every number behind the charts'
            '</span></summary><div class="tables">' + "".join(parts) + "</div></details>")


def _header(view: DashboardView, options: RenderOptions) -> str:
    if options.refresh_seconds:
        link = _query(0, options.theme)
        refresh = (f'<span class="live" aria-hidden="true"></span><span>Live · refreshes every '
                   f'{options.refresh_seconds} s</span> · <a href="{link}" data-action="pause">Pause</a>'
                   '<span class="stale-msg">· connection lost, retrying</span>')
    else:
        link = _query(RenderOptions.refresh_seconds, options.theme)
        refresh = (f'<span class="live off" aria-hidden="true"></span><span>Auto-refresh off</span> · '
                   f'<a href="{link}" data-action="resume">Resume</a>')
    return (f'<header class="top"><div class="brand">{LOGO}<div><h1>{escape(view.pipeline)}</h1>'
            f'<p class="sub">Event analytics · updated <time datetime="{view.now:%Y-%m-%dT%H:%M:%SZ}">'
            f"{view.now:%H:%M:%S} UTC</time></p></div></div>"
            f'<div class="status">{refresh}</div></header>')


def _query(refresh: int, theme: Theme) -> str:
    params = [] if refresh == RenderOptions.refresh_seconds else [f"refresh={refresh}"]
    if theme != "auto":
        params.append(f"theme={theme}")
    return "?" + "&amp;".join(params) if params else "?"


def _empty(view: DashboardView, options: RenderOptions) -> str:
    wait = (f"This page checks again every {options.refresh_seconds} s, so keep it open."
            if options.refresh_seconds else "Reload this page after sending it.")
    return ('<section class="card empty" id="empty-state" data-empty="true">' + EMPTY_ART +
            "<h2>No events yet</h2>"
            f"<p>Nothing has been counted for <code>{escape(view.pipeline)}</code> in the last 30 days. "
            "Send a first event to the sidecar and it shows up here within seconds:</p>"
            + _snippet(options, "first-event-cmd") +
            f"<p>{wait}</p><p>One event, a JSON array of events or <code>{{\"batch\": [...]}}</code> per "
            "request; Segment and PostHog field names (<code>userId</code>, <code>distinct_id</code>, "
            "<code>messageId</code>) work too.</p></section>")


def _document(title: str, body: str, options: RenderOptions, app_attrs: str) -> str:
    theme = f' data-theme="{options.theme}"' if options.theme != "auto" else ""
    meta_refresh = (f'<noscript><meta http-equiv="refresh" content="{options.refresh_seconds}"></noscript>'
                    if options.refresh_seconds else "")
    return ("<!doctype html>\n"
            f'<html lang="en"{theme}><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="color-scheme" content="light dark">'
            f"<title>{escape(title)}</title>{meta_refresh}<style>{CSS}</style></head>"
            f'<body data-refresh="{options.refresh_seconds}"><div id="app"{app_attrs}>{body}</div>'
            f"<script>{SCRIPT}</script></body></html>")


def render_dashboard(data: DashboardData, options: RenderOptions | None = None) -> str:
    """The whole dashboard page for ``data``: totals, three charts, top events, data tables."""
    options = options or RenderOptions()
    view = build_view(data)
    parts = [_header(view, options)]
    if view.empty:
        parts.append(_empty(view, options))
    else:
        parts.append(_stats(view))
        parts.append(_hourly_card(view))
        parts.append('<div class="row">' + _daily_card(view) + _top_events(view) + "</div>")
        parts.append('<div class="row">' + _uniques_card(view) + _info(view, options) + "</div>")
        parts.append(_tables(view))
    parts.append(f'<footer><span>analytics-pipeline · {escape(view.pipeline)}</span>'
                 f"<span>Generated {_now_label(view.now)}</span></footer>")
    attrs = (f' data-generated="{view.now:%Y-%m-%dT%H:%M:%SZ}" data-empty="{str(view.empty).lower()}"'
             f' data-pipeline="{escape(view.pipeline)}"')
    return _document(f"{view.pipeline} · analytics", "".join(parts), options, attrs)


def render_error(title: str, message: str, options: RenderOptions | None = None,
                 now: datetime | None = None) -> str:
    """A page in the dashboard's style saying why no data can be shown (it keeps refreshing)."""
    options = options or RenderOptions()
    now = now or datetime.now(UTC)
    body = (f'<section class="card empty" id="error-state" data-error="true">{EMPTY_ART}<h2>{escape(title)}</h2>'
            f"<p>{escape(message)}</p><p>Checked {_now_label(now)}.</p></section>")
    return _document(f"{title} · analytics", body, options, ' data-error="true"')

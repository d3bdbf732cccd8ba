"""The dashboard renderer with known numbers: exact points, bars, totals, axes, empty state, escaping."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from analytics_pipeline.reads.dashboard_charts import fmt_compact, nice_scale
from analytics_pipeline.reads.dashboard_model import MAX_SERIES, DashboardData
from analytics_pipeline.reads.dashboard_render import SCRIPT, SCRIPT_HASH, RenderOptions, render_dashboard

HOSTILE = ['<script>document.title="pwned"</script>', '"><img src=x onerror=alert(1)>',
           "</title></svg><script>alert(2)</script>", "a&b 'quoted' <i>"]


def _hour_keys(now: datetime, hours: int = 48) -> list[str]:
    last = now.replace(minute=0, second=0, microsecond=0)
    return [(last - timedelta(hours=n)).strftime("%Y-%m-%dT%H:00:00Z") for n in range(hours - 1, -1, -1)]


def _day_keys(now: datetime, days: int = 30) -> list[str]:
    return [(now.date() - timedelta(days=n)).isoformat() for n in range(days - 1, -1, -1)]


def test_hourly_chart_has_one_point_per_series_per_hour_with_exact_counts(data, parse):
    doc = parse(render_dashboard(data))
    chart = doc.one("svg", data_chart="chart-hourly")
    dots = chart.find_all("circle", class_="dot")
    assert len(dots) == 2 * 48
    counts = {(d.attrs["data-series"], d.attrs["data-bucket"]): int(d.attrs["data-count"]) for d in dots}
    assert sorted({bucket for _, bucket in counts}) == _hour_keys(data.now)
    expected = {("page_view", "2026-11-27T14:00:00Z"): 17, ("page_view", "2026-11-27T13:00:00Z"): 5,
                ("page_view", "2026-11-26T08:00:00Z"): 40, ("signup", "2026-11-27T14:00:00Z"): 3,
                ("signup", "2026-11-25T15:00:00Z"): 2}
    assert {k: v for k, v in counts.items() if v} == expected
    # One stacked area and one outline per series, bottom-up in the order of the 30-day ranking.
    assert [p.attrs["data-series"] for p in chart.find_all("path", class_="area")] == ["page_view", "signup"]
    assert [p.attrs["data-series"] for p in chart.find_all("path", class_="line")] == ["page_view", "signup"]
    # Hover column of the current hour: tooltip with each series and the total.
    band = chart.one("rect", class_="band", data_bucket="2026-11-27T14:00:00Z")
    assert band.attrs["data-total"] == "20"
    assert band.text() == "Fri 27 Nov 2026, 14:00\u201315:00 UTC (so far)\npage_view: 17\nsignup: 3\nTotal: 20"
    # y axis: 0..40 in steps of 10 (largest stacked hour is 40); x axis: UTC dates at midnight, times every 6 h.
    assert chart.attrs["data-ymax"] == "40"
    assert [t.text() for t in chart.find_all("text", class_="ytick")] == ["0", "10", "20", "30", "40"]
    majors = {t.attrs["data-bucket"]: t.text() for t in chart.find_all("text") if {"xtick", "major"} <= t.classes()}
    assert majors == {"2026-11-26T00:00:00Z": "Thu 26 Nov", "2026-11-27T00:00:00Z": "Fri 27 Nov"}
    minors = [t.text() for t in chart.find_all("text", class_="xtick") if "major" not in t.classes()]
    assert minors == ["18:00", "06:00", "12:00", "18:00", "06:00", "12:00"]
    assert chart.one("title", id="chart-hourly-t").text() == "Events per hour · last 48 hours (UTC)"


def test_stacked_points_sit_at_the_cumulative_height(data, parse):
    chart = parse(render_dashboard(data)).one("svg", data_chart="chart-hourly")
    bottom = chart.one("circle", data_series="page_view", data_bucket="2026-11-27T14:00:00Z")
    top = chart.one("circle", data_series="signup", data_bucket="2026-11-27T14:00:00Z")
    zero_line = float(chart.one("line", class_="zero").attrs["y1"])
    top_line = float(chart.find_all("line", class_="line")[-1].attrs["y1"])  # the 40 gridline
    per_event = (zero_line - top_line) / 40
    assert float(bottom.attrs["cy"]) == pytest.approx(zero_line - 17 * per_event, abs=0.11)
    assert float(top.attrs["cy"]) == pytest.approx(zero_line - 20 * per_event, abs=0.11)


def test_daily_chart_has_exactly_the_nonzero_bars(data, parse):
    chart = parse(render_dashboard(data)).one("svg", data_chart="chart-daily")
    bars = {(b.attrs["data-series"], b.attrs["data-bucket"]): int(b.attrs["data-count"])
            for b in chart.find_all("rect", class_="bar")}
    assert bars == {("page_view", "2026-11-27"): 22, ("page_view", "2026-11-26"): 45,
                    ("page_view", "2026-10-29"): 7, ("signup", "2026-11-27"): 3, ("signup", "2026-11-26"): 2}
    bands = chart.find_all("rect", class_="band")
    assert [b.attrs["data-bucket"] for b in bands] == _day_keys(data.now)
    assert chart.attrs["data-ymax"] == "60"  # largest day 47 -> steps of 20
    # Today's column is marked as still filling up.
    today = [g for g in chart.find_all("g") if "slot" in g.classes() and "current" in g.classes()]
    assert len(today) == 1 and today[0].one("rect", class_="band").attrs["data-bucket"] == "2026-11-27"
    assert chart.one("rect", class_="bar", data_series="page_view", data_bucket="2026-11-26").text() == \
        "page_view · Thu 26 Nov 2026: 45"


def test_unique_users_chart_and_totals(data, parse):
    doc = parse(render_dashboard(data))
    chart = doc.one("svg", data_chart="chart-uniques")
    dots = chart.find_all("circle", class_="dot")
    assert [d.attrs["data-bucket"] for d in dots] == _day_keys(data.now)
    assert {d.attrs["data-bucket"]: int(d.attrs["data-count"]) for d in dots if d.attrs["data-count"] != "0"} == \
        {"2026-11-27": 4, "2026-11-26": 9, "2026-10-29": 1}
    stats = {s.attrs["data-stat"]: s for s in doc.find_all("div", class_="stat")}
    assert {k: s.attrs.get("data-value") for k, s in stats.items()} == {
        "events_24h": "25", "events_30d": "79", "users_today": "4", "event_types": "2"}
    assert stats["events_24h"].one("div", class_="value").text() == "25"
    assert "▼ 40%" in stats["events_24h"].text()  # 25 vs 42 in the 24 h before
    assert "yesterday 9" in stats["users_today"].text()
    assert "page_view" in stats["event_types"].text()


def test_legend_top_events_and_data_tables_carry_the_numbers(data, parse):
    doc = parse(render_dashboard(data))
    hourly_legend = doc.one("section", id="hourly").find_all("li", data_legend=True)
    assert [(li.attrs["data-legend"], li.one("span", class_="num").text()) for li in hourly_legend] == \
        [("page_view", "62"), ("signup", "5")]
    top = doc.one("section", id="top-events")
    row = top.one("tr", data_event_type="page_view")
    assert row.one("td", data_window="24h").text() == "22"
    assert row.one("td", data_window="30d").text().startswith("74")
    table = doc.one("table", id="table-hourly")
    assert [th.text() for th in table.one("thead").find_all("th")] == ["Hour (UTC)", "page_view", "signup", "Total"]
    row = table.one("tr", data_bucket="2026-11-27T14:00:00Z")
    assert [td.text() for td in row.find_all("td")] == ["17", "3", "20"]
    assert len(table.one("tbody").find_all("tr")) == 48
    daily = doc.one("table", id="table-daily").one("tr", data_bucket="2026-11-26")
    assert [td.text() for td in daily.find_all("td")] == ["45", "2", "47"]
    uniques = doc.one("table", id="table-uniques")
    assert len(uniques.one("tbody").find_all("tr")) == 30
    assert uniques.one("tr", data_bucket="2026-11-26").one("td").text() == "9"


def test_buckets_outside_the_window_are_dropped_duplicates_summed_naive_times_utc(parse):
    now = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
    hourly = {"a": [(datetime(2026, 3, 1, 0, 0), 2), (datetime(2026, 3, 1, 0, 0, tzinfo=UTC), 3),
                    (now - timedelta(hours=48), 100), (now + timedelta(hours=1), 100)]}
    daily = {"a": [(now.date(), 5), (now.date() - timedelta(days=30), 100)]}
    doc = parse(render_dashboard(DashboardData("default/x", now, hourly, daily, [])))
    dots = doc.one("svg", data_chart="chart-hourly").find_all("circle", class_="dot")
    assert {d.attrs["data-bucket"]: d.attrs["data-count"] for d in dots if d.attrs["data-count"] != "0"} == \
        {"2026-03-01T00:00:00Z": "5"}
    bars = doc.one("svg", data_chart="chart-daily").find_all("rect", class_="bar")
    assert [(b.attrs["data-bucket"], b.attrs["data-count"]) for b in bars] == [("2026-03-01", "5")]
    # Across a month end: the daily axis runs 31 Jan .. 1 Mar and 2026 is not a leap year.
    bands = doc.one("svg", data_chart="chart-daily").find_all("rect", class_="band")
    assert bands[0].attrs["data-bucket"] == "2026-01-31" and bands[-1].attrs["data-bucket"] == "2026-03-01"


def test_empty_state_says_how_to_send_a_first_event(parse):
    page = render_dashboard(DashboardData("default/web", datetime(2026, 11, 27, 9, tzinfo=UTC), {}, {}, []),
                            RenderOptions(ingest_url="http://localhost:8787/v1/events"))
    doc = parse(page)
    assert doc.one("div", id="app").attrs["data-empty"] == "true"
    empty = doc.one("section", id="empty-state")
    assert "No events yet" in empty.text()
    command = " ".join(empty.one("code", id="first-event-cmd").text().replace("\\\n", " ").split())
    assert command == ("curl -X POST http://localhost:8787/v1/events -H 'Content-Type: application/json' "
                       """-d '{"event":"page_view","user_id":"u1"}'""")
    assert doc.find_all("svg", data_chart=True) == []
    assert doc.find_all("div", class_="stat") == []


def test_types_seen_only_with_zero_counts_still_count_as_empty(parse):
    data = DashboardData("default/web", datetime(2026, 11, 27, 9, tzinfo=UTC), {"a": []}, {"a": []}, [])
    assert parse(render_dashboard(data)).one("div", id="app").attrs["data-empty"] == "true"


def test_old_data_only_shows_charts_with_an_in_chart_no_data_note(parse):
    now = datetime(2026, 11, 27, 9, tzinfo=UTC)
    data = DashboardData("default/web", now, {}, {"a": [(now.date() - timedelta(days=5), 3)]},
                         [(now.date() - timedelta(days=5), 1)])
    doc = parse(render_dashboard(data))
    assert doc.one("div", id="app").attrs["data-empty"] == "false"
    hourly = doc.one("svg", data_chart="chart-hourly")
    assert hourly.one("text", class_="nodata").text() == "No events in the last 48 hours"
    assert doc.one("svg", data_chart="chart-daily").find_all("text", class_="nodata") == []


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_event_names_stay_inert_text(name, parse):
    now = datetime(2026, 11, 27, 9, tzinfo=UTC)
    hour = now.replace(minute=0)
    data = DashboardData("default/web", now, {name: [(hour, 3)]}, {name: [(now.date(), 3)]}, [(now.date(), 1)])
    page = render_dashboard(data)
    doc = parse(page)
    scripts = doc.find_all("script")
    assert len(scripts) == 1 and scripts[0].text() == SCRIPT
    assert doc.find_all("img") == []
    assert [(n.tag, a) for n in doc.iter() for a in n.attrs if a.startswith("on")] == []
    assert doc.one("head").one("title").text() == "default/web · analytics"
    # The name survives as text and as attribute values, exactly.
    assert [li.attrs["data-legend"] for li in doc.find_all("li", data_legend=True) if li.attrs["data-legend"]
            != "unique_users"] == [name, name]
    assert doc.one("section", id="hourly").one("span", class_="name").text() == name
    dot = doc.one("svg", data_chart="chart-hourly").one("circle", data_bucket=hour.strftime("%Y-%m-%dT%H:00:00Z"))
    assert dot.attrs["data-series"] == name and dot.attrs["data-count"] == "3"
    assert doc.one("table", id="table-daily").one("thead").find_all("th")[1].text() == name
    assert "<script>alert" not in page and "<img" not in page


def test_many_event_types_are_merged_into_other_in_charts_but_not_in_tables(parse):
    now = datetime(2026, 11, 27, 9, tzinfo=UTC)
    names = [f"ev{i:02d}" for i in range(12)]
    daily = {n: [(now.date(), 100 - i)] for i, n in enumerate(names)}
    doc = parse(render_dashboard(DashboardData("default/web", now, {}, daily, [])))
    chart = doc.one("svg", data_chart="chart-daily")
    bars = chart.find_all("rect", class_="bar")
    shown = [b.attrs["data-series"] for b in bars if "data-series" in b.attrs]
    assert shown == names[: MAX_SERIES - 1]
    other = [b for b in bars if "data-series-other" in b.attrs]
    assert len(other) == 1
    assert other[0].attrs["data-series-other"] == ", ".join(names[MAX_SERIES - 1:])
    assert other[0].attrs["data-count"] == str(sum(100 - i for i in range(MAX_SERIES - 1, 12)))
    header = [th.text() for th in doc.one("table", id="table-daily").one("thead").find_all("th")]
    assert header == ["Day (UTC)", *sorted(names), "Total"]


def test_switched_off_granularities_say_so(parse):
    now = datetime(2026, 11, 27, 9, tzinfo=UTC)
    doc = parse(render_dashboard(DashboardData("default/web", now, None, {"a": [(now.date(), 1)]}, None)))
    assert doc.one("section", id="hourly").attrs["data-off"] == "hourly"
    assert doc.one("section", id="uniques").attrs["data-off"] == "user_daily"
    assert doc.find_all("svg", data_chart="chart-hourly") == []
    assert "data-value" not in doc.one("div", data_stat="events_24h").attrs


def test_refresh_options(data, parse):
    doc = parse(render_dashboard(data, RenderOptions(refresh_seconds=30)))
    assert doc.one("meta", http_equiv="refresh").attrs["content"] == "30"
    assert doc.one("body").attrs["data-refresh"] == "30"
    assert doc.one("a", data_action="pause").attrs["href"] == "?refresh=0"
    doc = parse(render_dashboard(data, RenderOptions(refresh_seconds=0, theme="dark")))
    assert doc.find_all("meta", http_equiv="refresh") == []
    assert doc.one("body").attrs["data-refresh"] == "0"
    assert doc.one("html").attrs["data-theme"] == "dark"
    assert doc.one("a", data_action="resume").attrs["href"] == "?theme=dark"


def test_csp_hash_matches_the_inline_script(data, parse):
    script = parse(render_dashboard(data)).one("script").text()
    assert SCRIPT_HASH == "sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()


@pytest.mark.parametrize(("maximum", "expected"), [(0, (1, 4)), (1, (1, 1)), (3, (1, 3)), (17, (5, 20)),
                                                  (40, (10, 40)), (47, (20, 60)), (999, (250, 1000)),
                                                  (123_456, (50_000, 150_000))])
def test_nice_scale(maximum, expected):
    assert nice_scale(maximum) == expected


@pytest.mark.parametrize(("value", "text"), [(0, "0"), (950, "950"), (1000, "1k"), (1500, "1.5k"),
                                             (12_000, "12k"), (3_400_000, "3.4M")])
def test_fmt_compact(value, text):
    assert fmt_compact(value) == text

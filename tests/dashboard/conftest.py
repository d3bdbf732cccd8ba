"""Fixtures of the dashboard tests: known data, a tiny HTML/SVG DOM reader, a served app, Chromium."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from support import ensure_schema

from analytics_pipeline.core.keys import PIPELINES_SET
from analytics_pipeline.flusher.store import PIPELINE_TABLES
from analytics_pipeline.reads.dashboard import DashboardProvider, setup_dashboard
from analytics_pipeline.reads.dashboard_model import DashboardData

NOW = datetime(2026, 11, 27, 14, 23, 5, tzinfo=UTC)

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    """One parsed element: tag, attributes, children and its own text pieces."""

    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    parts: list[str | Node] = field(default_factory=list)

    def text(self) -> str:
        """All text inside, in document order (what a user would read)."""
        return "".join(p if isinstance(p, str) else p.text() for p in self.parts)

    def iter(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str | None = None, **attrs: str | bool) -> list[Node]:
        """Descendants (and self) matching ``tag`` and attributes (True = present; '_' in names is '-')."""
        wanted = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        out = []
        for node in self.iter():
            if tag is not None and node.tag != tag:
                continue
            if all(_matches(node, name, value) for name, value in wanted.items()):
                out.append(node)
        return out

    def one(self, tag: str | None = None, **attrs: str | bool) -> Node:
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag} {attrs}>, found {len(found)}"
        return found[0]

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


def _matches(node: Node, name: str, value: str | bool) -> bool:
    if value is True:
        return name in node.attrs
    if name == "class":  # like a CSS class selector: every given class is present
        return set(str(value).split()) <= node.classes()
    return node.attrs.get(name) == value


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        parent = self.stack[-1]
        parent.children.append(node)
        parent.parts.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        self.stack[-1].parts.append(node)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].texts.append(data)
        self.stack[-1].parts.append(data)


def parse_html(markup: str) -> Node:
    """Parse a page (ours, or Chromium's --dump-dom output) into a small tree."""
    builder = _TreeBuilder()
    builder.feed(markup)
    builder.close()
    return builder.root


@pytest.fixture
def parse() -> Callable[[str], Node]:
    return parse_html


def known_data(pipeline: str = "default/web-shop", now: datetime = NOW) -> DashboardData:
    """A small, hand-checkable data set (see the assertions in test_render.py)."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    today = now.date()
    hourly = {
        "page_view": [(hour, 17), (hour - timedelta(hours=1), 5), (hour - timedelta(hours=30), 40)],
        "signup": [(hour, 3), (hour - timedelta(hours=47), 2)],
    }
    daily: dict[str, list[tuple[date, int]]] = {
        "page_view": [(today, 22), (today - timedelta(days=1), 45), (today - timedelta(days=29), 7)],
        "signup": [(today, 3), (today - timedelta(days=1), 2)],
    }
    uniques = [(today, 4), (today - timedelta(days=1), 9), (today - timedelta(days=29), 1)]
    return DashboardData(pipeline, now, hourly, daily, uniques)


@pytest.fixture
def data() -> DashboardData:
    return known_data()


def fixed_provider(data: DashboardData) -> DashboardProvider:
    """A provider that always returns ``data``."""
    async def provide(app: web.Application) -> DashboardData:
        return data
    return provide


@pytest.fixture
def provider_of() -> Callable[[DashboardData], DashboardProvider]:
    return fixed_provider


@pytest.fixture
def known() -> Callable[..., DashboardData]:
    return known_data


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[[DashboardProvider], Awaitable[TestClient]]]:
    """``await make_client(provider)``: an aiohttp test client of an app with only the dashboard."""
    clients: list[TestClient] = []

    async def make(provider: DashboardProvider) -> TestClient:
        app = web.Application()
        setup_dashboard(app, provider)
        client: TestClient = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()




@pytest.fixture(scope="session")
def schema(database_url: str) -> str:
    """The schema applied once per session when something of it is missing."""
    return ensure_schema(database_url)


@pytest.fixture
async def pg(schema: str, pipeline: str, redis_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A PostgreSQL connection (UTC); this test's rows and its ``ap:pipelines`` entry go afterwards."""
    conn = await asyncpg.connect(schema, server_settings={"timezone": "UTC"})
    try:
        yield conn
    finally:
        for table in PIPELINE_TABLES:
            await conn.execute(f"DELETE FROM {table} WHERE pipeline = $1", pipeline)
        await conn.close()
        client = aioredis.Redis.from_url(redis_url)
        await client.srem(PIPELINES_SET, pipeline)
        await client.aclose()


def png_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (and proof that the file is a PNG)."""
    with open(path, "rb") as file:
        head = file.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture
def png() -> Callable[[str | os.PathLike[str]], tuple[int, int]]:
    return png_size


def find_chromium() -> str | None:
    """The Chromium binary: $CHROMIUM, else the usual Debian/Ubuntu/Google names on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit and shutil.which(explicit):
        return shutil.which(explicit)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


# The flags this machine needs as root, plus a fixed window and no scrollbars for stable screenshots.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio")


@dataclass
class Chromium:
    """Headless Chromium driven from the command line: ``--dump-dom`` and ``--screenshot``."""

    binary: str
    workdir: Path
    runs: int = 0

    limit_seconds: float = 120.0

    async def _run(self, *args: str) -> str:
        self.runs += 1
        profile = self.workdir / f"chromium-profile-{self.runs}"
        process = await asyncio.create_subprocess_exec(
            self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(process.communicate(), self.limit_seconds)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode == 0, f"chromium failed ({process.returncode}): {err.decode()[-2000:]}"
        return out.decode()

    async def dump_dom(self, url: str, *, size: str = "1400,1800", virtual_time_ms: int | None = None) -> str:
        """The DOM after load (and after ``virtual_time_ms`` of page time: timers and fetches run)."""
        extra = [f"--virtual-time-budget={virtual_time_ms}"] if virtual_time_ms else []
        return await self._run(f"--window-size={size}", *extra, "--dump-dom", url)

    async def screenshot(self, url: str, path: Path, *, size: str = "1400,1800") -> Path:
        await self._run(f"--window-size={size}", f"--screenshot={path}", url)
        return path  # the test checks the file (png_size)


@pytest.fixture
def chromium(tmp_path: Path) -> Chromium:
    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium not found (install Debian's `chromium` or set CHROMIUM=/path/to/chrome)")
    return Chromium(binary, tmp_path)

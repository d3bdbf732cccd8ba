"""The sidecar's one PostgreSQL pool, shared by the query endpoints and the dashboard.

Ingest never depends on PostgreSQL, so the pool is opened lazily on the first read, re-opened if
the database URL changes (live config reload), and closed with the app. asyncpg itself is imported
then too (~2 MB of resident memory an ingest-only sidecar does not need).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from aiohttp import web

from analytics_pipeline.core.config import Config

if TYPE_CHECKING:
    import asyncpg

POOL_SIZE = 4


class LazyPool:
    """An asyncpg pool opened on first use."""

    def __init__(self, max_size: int = POOL_SIZE) -> None:
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._url: str | None = None
        self._lock = asyncio.Lock()

    async def pool(self, config: Config) -> asyncpg.Pool:
        from analytics_pipeline.core.postgres import create_pool

        async with self._lock:
            if self._pool is None or self._url != config.database_url:
                await self.close()
                self._pool = await create_pool(config, "analytics-pipeline-sidecar", max_size=self.max_size)
                self._url = config.database_url
            return self._pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 5)


DATABASE = web.AppKey("database", LazyPool)


def install_database(app: web.Application) -> LazyPool:
    """Give ``app`` the shared lazy pool (once; closed on app cleanup) and return it."""
    if DATABASE in app:
        return app[DATABASE]
    holder = LazyPool()
    app[DATABASE] = holder

    async def close(app: web.Application) -> None:
        await holder.close()

    app.on_cleanup.append(close)
    return holder

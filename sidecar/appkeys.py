"""Typed keys of the sidecar's aiohttp application, shared by its route modules."""

from __future__ import annotations

import redis.asyncio as aioredis
from aiohttp import web

from analytics_pipeline.core.config import Config

# The config in force (replaced in place by live reload, so read it per request).
CONFIG = web.AppKey("config", Config)
# The shared Redis client (a connection pool).
REDIS = web.AppKey("redis", aioredis.Redis)

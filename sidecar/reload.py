"""Live config reload: the operator updates the mounted ConfigMap; limits and TTL change without a restart.

The file is polled (content hash, so Kubernetes' symlink swap is seen) every ``interval`` seconds.
A file that fails validation is logged and ignored: the config in force stays.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import warnings
from pathlib import Path

from aiohttp import web

from analytics_pipeline.core.config import Config, ConfigError, load_config

from .appkeys import CONFIG, STATE

log = logging.getLogger(__name__)

# Changing these needs a restart (new connections, new socket, new key space).
RESTART_KEYS = ("pipeline", "redis_url", "server.host", "server.port", "server.redis_timeout_seconds",
                "server.keepalive_timeout_seconds", "server.header_timeout_seconds",
                "server.bad_request_logs_per_minute", "server.health_host", "server.health_port", "redis.cluster")


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _get(config: Config, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def apply_config(app: web.Application, config: Config) -> list[str]:
    """Put ``config`` in force on a running app; returns the changed keys that need a restart."""
    old = app[CONFIG]
    ignored = [key for key in RESTART_KEYS if _get(old, key) != _get(config, key)]
    if ignored:
        config = config.replace(pipeline=old.pipeline, redis_url=old.redis_url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # aiohttp warns on changing a started app
        app[CONFIG] = config
    app[STATE].apply(config)
    return ignored


class ConfigWatcher:
    """Polls one config file and applies every valid change to the app."""

    def __init__(self, app: web.Application, path: str | os.PathLike[str], interval: float = 2.0) -> None:
        self.app = app
        self.path = Path(path)
        self.interval = interval
        self._digest = _digest(self.path)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()

    def check(self) -> bool:
        """Reload if the file changed; True when a new config was put in force."""
        digest = _digest(self.path)
        if digest is None or digest == self._digest:
            return False
        self._digest = digest
        metrics = self.app[STATE].metrics
        try:
            config = load_config(self.path)
        except ConfigError as error:
            metrics.config_reloads.labels("invalid").inc()
            log.error("config file changed but is invalid; keeping the config in force: %s", error)
            return False
        ignored = apply_config(self.app, config)
        metrics.config_reloads.labels("applied").inc()
        if ignored:
            log.warning("config reloaded; changes to %s need a restart and are not applied", ", ".join(ignored))
        log.info("config reloaded", extra={"ttl_seconds": config.counters.ttl_seconds,
                                           "granularities": list(config.counters.granularities)})
        return True

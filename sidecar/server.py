"""Run the sidecar app until SIGTERM/SIGINT, then shut down gracefully (no acknowledged event lost)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.net import is_loopback

from .app import create_app
from .appkeys import STATE
from .connections import make_runner
from .probe_listener import start_probe_listener

log = logging.getLogger("analytics_pipeline.sidecar")


async def serve(config: Config, *, config_path: str | os.PathLike[str] | None = None,
                stop: asyncio.Event | None = None) -> int:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives; returns the exit code (0; 1 if it cannot listen)."""
    server = config.server
    if not is_loopback(server.host):
        log.warning("listening on non-loopback address %s: anyone who can reach it can write events; "
                    "a sidecar normally binds 127.0.0.1", server.host, extra={"host": server.host})
    app = create_app(config, config_path=config_path)
    runner = make_runner(app, server, access_log=None, handle_signals=False,
                         shutdown_timeout=server.shutdown_timeout_seconds)
    await runner.setup()
    site = web.TCPSite(runner, server.host, server.port, backlog=1024)
    try:
        await site.start()
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", server.host, server.port, error.strerror or error,
                  extra={"event": "listen_failed"})
        await runner.cleanup()
        return 1
    try:
        probes = await start_probe_listener(app, config)
    except OSError as error:
        log.error("cannot listen on %s:%s (probe listener): %s", server.health_host, server.health_port,
                  error.strerror or error, extra={"event": "listen_failed"})
        await runner.cleanup()
        return 1
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    addresses = [f"http://{sock.getsockname()[0]}:{sock.getsockname()[1]}"
                 for sock in (site._server.sockets if site._server else [])]  # type: ignore[union-attr]
    log.info("sidecar listening on %s for pipeline %s (granularities %s, TTL %d s)",
             ", ".join(addresses), config.pipeline, ",".join(config.counters.granularities),
             config.counters.ttl_seconds,
             extra={"event": "started", "addresses": addresses, "pipeline": config.pipeline,
                    "granularities": list(config.counters.granularities),
                    "ttl_seconds": config.counters.ttl_seconds, "pid": os.getpid()})
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        log.info("stopping: no new connections; finishing requests in flight", extra={"event": "draining"})
        app[STATE].draining = True
        if probes is not None:
            await probes.cleanup()
        await runner.cleanup()
        log.info("sidecar stopped", extra={"event": "stopped"})
    return 0

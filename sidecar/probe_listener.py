"""The probe listener: a second address (``server.health_host:health_port``, the pod IP in Kubernetes) that
serves ONLY ``/healthz``, ``/readyz`` and ``/metrics``.

Ingest, queries and the dashboard stay on the main listener (loopback): the app shares the pod's network
namespace and reaches them there, while nothing else in the cluster can write events or read counts. The
kubelet's probes and Prometheus need the pod IP, so they get this listener and nothing more. Its routes are the
main app's own handlers, with the main app's state (one readiness check, one metrics registry).
"""

from __future__ import annotations

import logging

from aiohttp import web

from analytics_pipeline.core.config import Config

from .connections import make_runner

log = logging.getLogger("analytics_pipeline.sidecar")

PROBE_PATHS = ("/healthz", "/readyz", "/metrics")


def create_probe_app(main: web.Application) -> web.Application:
    """An app routing only :data:`PROBE_PATHS` to ``main``'s handlers, sharing ``main``'s state.

    Call it after ``main`` has started (its start-up hooks may add state): the handlers read ``request.app``.
    """
    probe = web.Application()
    for key in main:  # the same objects (sidecar state, registry, readiness connection), not copies
        probe[key] = main[key]
    routes = {route.resource.canonical: route.handler for route in main.router.routes()
              if route.method == "GET" and route.resource is not None}
    for path in PROBE_PATHS:
        if path in routes:
            probe.router.add_get(path, routes[path], allow_head=False)
    return probe


async def start_probe_listener(main: web.Application, config: Config) -> web.AppRunner | None:
    """Serve the probe routes on ``health_host:health_port`` (None when not configured); OSError if it cannot."""
    server = config.server
    if server.health_port is None:
        return None
    # The same connection timeouts and quiet bad-request logs as the main listener: this one faces the pod network.
    runner = make_runner(create_probe_app(main), server, access_log=None, handle_signals=False,
                         shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, server.health_host, server.health_port).start()
    except OSError:
        await runner.cleanup()
        raise
    addresses = [f"http://{sock.getsockname()[0]}:{sock.getsockname()[1]}" for site in runner.sites
                 for sock in (site._server.sockets if site._server else [])]  # type: ignore[union-attr]
    log.info("probe listener on %s: %s only", ", ".join(addresses), ", ".join(PROBE_PATHS),
             extra={"event": "probe_listener", "addresses": addresses})
    return runner

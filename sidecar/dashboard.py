"""The dashboard page (GET /) served by the sidecar — delivered by the dashboard issue."""

from __future__ import annotations

from aiohttp import web


def setup_dashboard(app: web.Application) -> None:
    """Register the dashboard routes on ``app`` (none yet)."""

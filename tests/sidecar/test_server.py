"""serve(): startup line, non-loopback warning, graceful stop; CLI overrides; foreign routes never answer 500."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import pytest
from aiohttp import web
from sidecar_helpers import SidecarFactory, first_event_accepted

from analytics_pipeline.core.services import free_port
from analytics_pipeline.sidecar import app as app_module
from analytics_pipeline.sidecar.cli import add_arguments, effective_config
from analytics_pipeline.sidecar.server import is_loopback, serve


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                ("[::1]", True), ("0.0.0.0", False), ("10.0.0.5", False),
                                                ("example.com", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


async def test_serve_warns_on_non_loopback_and_stops_cleanly(sidecar_config, caplog: pytest.LogCaptureFixture,
                                                             redis_client) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    config = sidecar_config(server={"host": "0.0.0.0", "port": port})
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="analytics_pipeline")
    server = asyncio.create_task(serve(config, stop=stop))
    assert await first_event_accepted(port, 100, 0.02)
    stop.set()
    assert await asyncio.wait_for(server, 10) == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "non-loopback" in r.getMessage()]
    assert warnings and warnings[0].host == "0.0.0.0"  # type: ignore[attr-defined]
    started = [r for r in caplog.records if getattr(r, "event", None) == "started"]
    assert started and f"pipeline {config.pipeline}" in started[0].getMessage()
    assert "TTL 604800 s" in started[0].getMessage()
    assert any(getattr(r, "event", None) == "stopped" for r in caplog.records)


def test_cli_host_and_port_override_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  port: 9000\n  group_commit_window_ms: 5\n")
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_arguments(parser)
    monkeypatch.delenv("ANALYTICS_CONFIG", raising=False)
    config = effective_config(parser.parse_args(["--config", str(path)]))
    assert (config.server.host, config.server.port) == ("127.0.0.1", 9000)
    config = effective_config(parser.parse_args(["--config", str(path), "--host", "::1", "--port", "9100"]))
    assert (config.server.host, config.server.port, config.server.group_commit_window_ms) == ("::1", 9100, 5.0)


async def test_foreign_route_errors_become_503(monkeypatch: pytest.MonkeyPatch, start_sidecar: SidecarFactory,
                                               sidecar_config) -> None:  # type: ignore[no-untyped-def]
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("bug in a route module")

    def setup_broken(app: web.Application) -> None:
        app.router.add_get("/broken", broken)

    monkeypatch.setattr(app_module, "setup_dashboard", setup_broken)
    sidecar = await start_sidecar(sidecar_config())
    answer = await sidecar.get("/broken")
    assert answer.status == 503 and answer.headers["Retry-After"] == "1"
    assert answer.body["error"] == "internal_error"
    assert sidecar.metrics.requests_refused.labels("internal_error")._value.get() == 1


async def test_port_in_use_is_a_clear_error(sidecar_config, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        assert await serve(sidecar_config(server={"port": port})) == 1
    finally:
        blocker.close()
    assert any(f"cannot listen on 127.0.0.1:{port}" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("choice", "on_uvloop"), [("auto", True), ("asyncio", False)])
async def test_event_loop_choice(choice: str, on_uvloop: bool, config, redis_client) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("uvloop")
    port = free_port()
    env = {**os.environ, "REDIS_URL": config.redis_url, "ANALYTICS_PIPELINE": config.pipeline}
    env.pop("ANALYTICS_CONFIG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "analytics_pipeline", "sidecar", "--port", str(port), "--no-reload",
        "--event-loop", choice, env=env, stderr=asyncio.subprocess.PIPE)
    try:
        if not await first_event_accepted(port, 300, 0.05):
            if process.returncode is None:
                process.terminate()
            raise AssertionError(f"the sidecar did not start: {(await process.stderr.read())[-1000:]!r}")
        with open(f"/proc/{process.pid}/maps", encoding="utf-8") as maps:  # noqa: ASYNC230 - procfs, instant
            assert ("uvloop" in maps.read()) is on_uvloop
    finally:
        if process.returncode is None:
            process.terminate()
    assert await asyncio.wait_for(process.wait(), 20) == 0

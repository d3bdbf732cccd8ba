"""What the demo runs besides itself: the real sidecar command as a child process, and cleanup.

The sidecar is ``python -m analytics_pipeline sidecar`` (the same command a pod runs), so it gets a
core of its own while the demo's load generator uses the other one. Its log goes to a file whose
tail is shown if it fails to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys
from analytics_pipeline.core.services import free_port
from analytics_pipeline.flusher.store import PIPELINE_TABLES

DEFAULT_PORT = 8787


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what happened and what to do about it."""


def port_is_free(port: int) -> bool:
    """True if 127.0.0.1:``port`` can be bound right now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is no obstacle
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose_port(requested: int | None) -> int:
    """``requested`` if free (else DemoError), otherwise 8787 when free, otherwise any free port."""
    if requested:
        if not port_is_free(requested):
            raise DemoError(f"port {requested} on 127.0.0.1 is in use: choose another with --port, "
                            "or leave --port out to get a free one")
        return requested
    return DEFAULT_PORT if port_is_free(DEFAULT_PORT) else free_port()


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM if the demo dies, so no sidecar is left behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class SidecarProcess:
    """``analytics-pipeline sidecar`` for the demo's pipeline on 127.0.0.1:``port``."""

    def __init__(self, port: int, env: dict[str, str], log_path: Path, config_path: str | None = None) -> None:
        self.port = port
        self.env = env
        self.log_path = log_path
        self.config_path = config_path
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, session: aiohttp.ClientSession, wait_s: float = 60.0) -> None:
        """Start it and wait until ``/readyz`` answers 200; DemoError with its log tail otherwise."""
        command = [sys.executable, "-m", "analytics_pipeline", "sidecar", "--host", "127.0.0.1",
                   "--port", str(self.port), "--no-reload"]
        if self.config_path:
            command[4:4] = ["--config", self.config_path]
        log = self.log_path.open("ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *command, env=self.env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # Ctrl-C reaches the demo only; the demo stops the sidecar once
                # Not the caller's folder: run from a checkout, its top-level 'operator/' would shadow the stdlib.
                cwd=self.log_path.parent,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        finally:
            log.close()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise DemoError(f"the sidecar exited with code {self.process.returncode} while starting:\n"
                                f"{self.log_tail()}\n(full log: {self.log_path})")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.get(f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise DemoError(f"the sidecar did not become ready within {wait_s:.0f}s:\n{self.log_tail()}\n"
                        f"(full log: {self.log_path})")

    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self, wait_s: float = 30.0) -> int | None:
        """SIGTERM (the sidecar finishes in-flight requests and writes what it acknowledged), then wait."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), wait_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            if error.errno == errno.ENOENT:
                return "(no log written)"
            raise
        return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def sidecar_env(redis_url: str, database_url: str, pipeline: str) -> dict[str, str]:
    """The sidecar child's environment: ours plus the services and the demo pipeline."""
    env = dict(os.environ)
    env.update(REDIS_URL=redis_url, DATABASE_URL=database_url, ANALYTICS_PIPELINE=pipeline, PYTHONUNBUFFERED="1")
    return env


async def remove_pipeline_data(client: aioredis.Redis, conn: asyncpg.Connection, pipeline: str) -> tuple[int, int]:
    """Delete every Redis key and PostgreSQL row of ``pipeline`` (and its ``ap:pipelines`` entry).

    Only for the demo's own pipeline, once its sidecar has stopped; returns (keys, rows) removed.
    """
    keys = PipelineKeys(pipeline)
    removed_keys = 0
    batch: list[bytes | str] = []
    async for key in client.scan_iter(match=keys.scan_pattern, count=2000):
        batch.append(key)
        if len(batch) >= 1000:
            removed_keys += await client.unlink(*batch)
            batch = []
    if batch:
        removed_keys += await client.unlink(*batch)
    await client.srem(PIPELINES_SET, pipeline)
    removed_rows = 0
    async with conn.transaction():
        for table in PIPELINE_TABLES:
            status = await conn.execute(f"DELETE FROM {table} WHERE pipeline = $1", pipeline)
            removed_rows += int(status.split()[-1])
    return removed_keys, removed_rows

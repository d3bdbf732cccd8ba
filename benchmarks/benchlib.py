"""Shared helpers of the benchmark scripts: machine description, /proc sampling, medians, tables.

Benchmarks print figures; they never assert wall-clock time and are never part of the test suite.
Each script prints the machine it ran on and the exact command that reproduces it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from analytics_pipeline.core.services import PostgresServer, RedisServer

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------ machine
def first_line(command: Sequence[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable ({error})"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unavailable"


def _cpu_model() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> str:
    """The 1/5/15-minute load averages (the machine is shared: a busy one skews every figure)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine_lines(redis_version: str | None = None, postgres_version: str | None = None) -> list[str]:
    """Cores, CPU, kernel, Python, Redis and PostgreSQL versions, load average, date."""
    from analytics_pipeline.core.services import find_postgres_bin, find_redis_server

    if redis_version is None:
        redis_version = first_line([find_redis_server(), "--version"])
    if postgres_version is None:
        try:
            postgres_version = first_line([str(find_postgres_bin() / "postgres"), "--version"])
        except Exception as error:  # no binaries: the figure is then from --database-url
            postgres_version = f"unavailable ({error})"
    return [
        f"date        {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
        f"machine     {os.cpu_count()} cores ({_cpu_model()}), {platform.system()} {platform.release()}",
        f"python      {platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        f"redis       {redis_version}",
        f"postgresql  {postgres_version}",
        f"load avg    {load_average()} (1/5/15 min, at start)",
    ]


def rerun_command() -> str:
    """The command that reproduces this run, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = str(script)
    python = Path(sys.executable)
    try:
        python_text = str(python.relative_to(REPO))
    except ValueError:
        python_text = str(python)
    return " ".join(shlex.quote(part) for part in [python_text, script_text, *sys.argv[1:]])


def print_header(title: str, redis_version: str | None = None, postgres_version: str | None = None) -> None:
    """Title, machine and the rerun command, as every benchmark prints them first."""
    print(f"== {title}")
    for line in machine_lines(redis_version, postgres_version):
        print(f"   {line}")
    print(f"   rerun       cd {REPO} && {rerun_command()}")
    print(flush=True)


# --------------------------------------------------------------------------------------------- /proc
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def uses_uvloop(pid: int) -> bool:
    """True if the process has uvloop's extension mapped (it imported uvloop; the sidecar then runs on it)."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
        return any("uvloop" in line for line in maps)


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak resident set) of a process, in MiB (kB / 1024; the names say mb for brevity)."""
    found: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0]) / 1024
    return found


# ------------------------------------------------------------------------------------------ figures
@dataclass(frozen=True)
class Stat:
    """Median and spread (min..max) of repeated measurements."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent."""
        return 100.0 * (self.high - self.low) / self.median if self.median else 0.0

    def show(self, fmt: str = "{:,.0f}") -> str:
        if len(self.values) == 1:
            return fmt.format(self.median)
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}..{fmt.format(self.high)})"


def stat(values: Sequence[float]) -> Stat:
    return Stat(tuple(values))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with right-aligned figures (first column left-aligned)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(cells[0]).ljust(widths[0])]
        parts += [str(cell).rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-pct * len(ordered) // 100))))
    return ordered[rank - 1]


def check(ok: bool, what: str) -> str:
    return f"{'OK  ' if ok else 'FAIL'} {what}"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def which_or_none(name: str) -> str | None:
    return shutil.which(name)


# ------------------------------------------------------------------------------------------ services
@contextlib.contextmanager
def services(database_url: str | None, prefix: str,
             postgres_settings: dict[str, str] | None = None) -> Iterator[tuple[RedisServer, str, str]]:
    """A throwaway Redis, and PostgreSQL: ``database_url`` if given, else a throwaway one (both in a
    temp folder named ``prefix``…; ``postgres_settings`` override its test settings, e.g. fsync off);
    yields (redis server, database url, where PostgreSQL comes from)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield from _services(database_url, Path(folder), postgres_settings)


def _services(database_url: str | None, scratch: Path,
              postgres_settings: dict[str, str] | None = None) -> Iterator[tuple[RedisServer, str, str]]:
    redis_server = RedisServer(scratch / "redis").start()
    postgres = None
    try:
        if database_url is None:
            postgres = PostgresServer(scratch / "postgres", settings=postgres_settings).start()
            database_url = postgres.url
            origin = ("throwaway PostgresServer (" + (", ".join(f"{k}={v}" for k, v in postgres_settings.items())
                      if postgres_settings else "fsync=off, synchronous_commit=off") + ")")
        else:
            origin = "from --database-url"
        yield redis_server, database_url, origin
    finally:
        redis_server.stop()
        if postgres is not None:
            postgres.destroy()


async def print_services_header(title: str, client: Any, conn: Any, origin: str) -> None:
    """:func:`print_header` with the versions the benchmark's Redis client and PostgreSQL connection report."""
    redis_version = (await client.info("server"))["redis_version"]
    pg_version = await conn.fetchval("SHOW server_version")
    print_header(title, redis_version=f"{redis_version} (throwaway)", postgres_version=f"{pg_version} ({origin})")


def wait_started(process: subprocess.Popen[bytes], port: int, what: str, log_path: Path, timeout: float = 30) -> None:
    """Wait until the server ``process`` answers /healthz on ``port``; RuntimeError with its log's tail if it
    exits or does not answer within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not healthy(f"http://127.0.0.1:{port}/healthz"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start: {log_path.read_text()[-1500:]}")
        time.sleep(0.05)


@contextlib.contextmanager
def served(command: Sequence[str], *, env: dict[str, str], port: int, what: str, log_path: Path,
           cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A server process (its output to ``log_path``) that answers /healthz on ``port``; SIGTERM at the end."""
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(list(command), env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   cwd=cwd or REPO)
        try:
            wait_started(process, port, what, log_path)
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def healthy(url: str) -> bool:
    """True when ``url`` (a sidecar's /healthz) answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False

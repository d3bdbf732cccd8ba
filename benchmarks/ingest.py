"""Ingest benchmark: the real sidecar vs a naive sidecar vs a do-nothing aiohttp server, driven by wrk.

    .venv/bin/python benchmarks/ingest.py            # full run: 3 repetitions x 8 runs of 8 s (~4 min)
    .venv/bin/python benchmarks/ingest.py --quick    # smoke run: 1 repetition, 2 s runs (~40 s)

A throwaway Redis (core.services.RedisServer) is started, so figures do not depend on the machine's
Redis config. Then, per repetition, each server in turn is started as its own process, warmed up for
1 s and loaded by Debian's ``wrk`` (a separate process; installed with apt-get if missing) with
``benchmarks/wrk_events.lua``: distinct (event type, user) pairs over 100k users and 20 event types,
single events and batches of 100, at concurrency 32:

- ``sidecar``         the project: the real ``analytics-pipeline sidecar`` process, which runs on uvloop
                      when it is installed (``--event-loop auto``; uvloop is a dependency)
- ``sidecar-asyncio`` the same process with ``--event-loop asyncio``: the standard library's loop; the
                      difference is what uvloop earns (and costs in memory)
- ``naive``           benchmarks/baseline/naive_sidecar.py: per event a MULTI/EXEC pipeline of
                      INCR+EXPIRE x3 and SADD, awaited per request (aiohttp + redis-py)
- ``ceiling``         benchmarks/baseline/ceiling.py: a POST handler that does nothing (uvloop), and
  ``ceiling-asyncio`` the same on asyncio's loop

Servers run as deployed: the project's modules compiled to bytecode first (pip does it in the
image), and the sidecar reads a config file (``baseline/sidecar.yaml``: the defaults) like every pod.

Printed per run and as medians (min..max) over the repetitions: requests/s, events/s, p50/p99
latency, server CPU (utime+stime from /proc over the measured run, in cores), Redis and wrk CPU,
idle and peak RSS (VmRSS before load, VmHWM after). After every run the server is stopped
(gracefully) and Redis is checked: it must hold at least every event acknowledged (2xx) and at most
every event sent; the difference can only be requests in flight when wrk stopped (sent, answer not
read). Ratios are computed within each repetition, then their median is taken.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import benchlib
import redis

from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.services import RedisServer, free_port

LUA = benchlib.BENCH / "wrk_events.lua"
BASELINE = benchlib.BENCH / "baseline"
SIDECAR_CONFIG = BASELINE / "sidecar.yaml"
USERS = 100_000
MIB_PER_MB = 1.048576  # 1 MiB = 1.048576 MB
EVENT_TYPES = 20


@dataclass(frozen=True)
class Target:
    """One server under test and how to start it."""

    name: str
    kind: str  # "sidecar", "naive", "ceiling"
    loop: str  # "uvloop" or "asyncio"

    def command(self, port: int, redis_url: str, pipeline: str) -> tuple[list[str], dict[str, str]]:
        # Bytecode is used as in the image (pip compiles modules at install): see compile_sources().
        env = {k: v for k, v in os.environ.items()
               if k not in ("ANALYTICS_CONFIG", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
        if self.kind == "sidecar":
            console = Path(sys.executable).parent / "analytics-pipeline"
            base = [str(console)] if console.exists() else [sys.executable, "-m", "analytics_pipeline.main"]
            env.update(REDIS_URL=redis_url, ANALYTICS_PIPELINE=pipeline)
            # A config file, as every pod has (the operator's ConfigMap); REDIS_URL/ANALYTICS_PIPELINE win.
            return [*base, "sidecar", "--config", str(SIDECAR_CONFIG), "--port", str(port), "--no-reload",
                    "--event-loop", "auto" if self.loop == "uvloop" else "asyncio", "--log-level", "warning"], env
        if self.kind == "naive":
            return [sys.executable, str(BASELINE / "naive_sidecar.py"), "--port", str(port), "--redis-url",
                    redis_url, "--pipeline", pipeline], env
        return [sys.executable, str(BASELINE / "ceiling.py"), "--port", str(port), "--loop", self.loop], env


@dataclass(frozen=True)
class Load:
    """One wrk load: events per request and concurrency."""

    name: str
    per_request: int
    connections: int


@dataclass
class Run:
    """The figures of one (target, load, repetition)."""

    target: str
    load: str
    rep: int
    rps: float
    eps: float
    p50_ms: float
    p99_ms: float
    server_cores: float
    redis_cores: float
    wrk_cores: float
    idle_rss_mb: float
    peak_rss_mb: float
    cpu_us_per_request: float
    connections: int
    acked_events: int
    sent_events: int
    stored_events: int
    errors: dict[str, int] = field(default_factory=dict)
    consistent: bool = True
    uvloop: bool = False

    @property
    def verified(self) -> bool:
        return self.acked_events <= self.stored_events <= self.sent_events and self.consistent


# ------------------------------------------------------------------------------------------- wrk
def find_wrk() -> str:
    """Path of wrk; installs Debian's package with apt-get when it is missing (and says so)."""
    found = shutil.which("wrk")
    if found:
        print(f"wrk: using {found}")
        return found
    print("wrk: not found; installing Debian's package (apt-get install -y wrk)", flush=True)
    apt = shutil.which("apt-get")
    if apt is None:
        sys.exit("wrk is missing and apt-get is not available: install wrk (https://github.com/wg/wrk)")
    install = subprocess.run([apt, "install", "-y", "wrk"], capture_output=True, text=True)
    if install.returncode != 0:
        subprocess.run([apt, "update"], capture_output=True)
        install = subprocess.run([apt, "install", "-y", "wrk"], capture_output=True, text=True)
    found = shutil.which("wrk")
    if found is None:
        sys.exit(f"could not install wrk: {install.stderr.strip()[-400:]}")
    print(f"wrk: installed {found}")
    return found


PIN: dict[str, list[str]] = {"server": [], "client": []}  # taskset prefixes when --pin


def run_wrk(wrk: str, url: str, load: Load, seconds: float, threads: int) -> tuple[dict[str, float], float]:
    """Run wrk once; its BENCH_JSON summary and the CPU seconds wrk used."""
    command = [*PIN["client"], wrk, f"-t{threads}", f"-c{load.connections}", f"-d{seconds:g}s", "--timeout", "10s",
               "-s", str(LUA), url, "--", str(load.per_request), str(USERS), str(EVENT_TYPES), "/v1/events"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line.removeprefix("BENCH_JSON ")), cpu
    raise RuntimeError(f"wrk printed no summary (exit {done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")


# ---------------------------------------------------------------------------------------- servers
def compile_sources() -> None:
    """Compile the project's modules to bytecode, as ``pip install`` does in the image.

    With PYTHONDONTWRITEBYTECODE set (as in some dev shells) an editable install would compile
    every project module from source at each start: ~1 MB more resident memory (the compiler's
    leftovers) and a slower start than a deployed sidecar has.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    folders = [str(benchlib.REPO / name) for name in ("cli", "core", "sidecar")] + [str(BASELINE)]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *folders], env=env, check=True, capture_output=True)


@contextlib.contextmanager
def server_process(target: Target, redis_url: str, pipeline: str, log_dir: Path) -> Iterator[tuple[int, int]]:
    """Start the target on a free port; yields (pid, port); stops it with SIGTERM and waits."""
    port = free_port()
    command, env = target.command(port, redis_url, pipeline)
    log_path = log_dir / f"{target.name}-{port}.log"
    with benchlib.served([*PIN["server"], *command], env=env, port=port, what=target.name,
                         log_path=log_path) as process:
        yield process.pid, port


def stored_events(client: redis.Redis, target: Target, pipeline: str) -> tuple[int, bool]:
    """Events Redis holds for the run (sum of the daily counts), and whether granularities agree."""
    if target.kind == "sidecar":
        keys = PipelineKeys(pipeline)
        sums = {}
        for kind in ("d", "h", "u"):
            pattern = keys.scan_pattern[:-1] + f"{kind}:*"
            sums[kind] = sum(sum(int(v) for v in client.hvals(key)) for key in client.scan_iter(pattern, count=1000))
        return sums["d"], sums["d"] == sums["h"] == sums["u"]
    if target.kind == "naive":
        escaped = pipeline.replace("{", "\\{")
        total = {}
        for kind in ("d", "h"):
            found = list(client.scan_iter(f"naive:\\{{{escaped}\\}}:{kind}:*", count=1000))
            total[kind] = sum(int(v) for chunk in range(0, len(found), 1000)
                              for v in client.mget(found[chunk:chunk + 1000]))
        return total["d"], total["d"] == total["h"]
    return -1, True  # the ceiling stores nothing


def measure(wrk: str, target: Target, load: Load, rep: int, redis_server: RedisServer, client: redis.Redis,
            seconds: float, warmup: float, threads: int, log_dir: Path) -> Run:
    """Start the target, warm it up, load it, stop it, check Redis; the run's figures."""
    pipeline = f"bench/{target.name}-{load.name}-{rep}"
    assert redis_server.process is not None
    redis_pid = redis_server.process.pid
    with server_process(target, redis_server.url, pipeline, log_dir) as (pid, port):
        url = f"http://127.0.0.1:{port}"
        time.sleep(0.3)
        idle = benchlib.memory_mb(pid)["VmRSS"]
        on_uvloop = benchlib.uses_uvloop(pid)
        warm, _ = run_wrk(wrk, url, load, warmup, threads) if warmup > 0 else ({"requests": 0, "sent": 0,
                                                                               "status_errors": 0}, 0.0)
        time.sleep(0.2)
        cpu0, redis0, t0 = benchlib.cpu_seconds(pid), benchlib.cpu_seconds(redis_pid), time.monotonic()
        summary, wrk_cpu = run_wrk(wrk, url, load, seconds, threads)
        wall = time.monotonic() - t0
        cpu1, redis1 = benchlib.cpu_seconds(pid), benchlib.cpu_seconds(redis_pid)
        peak = benchlib.memory_mb(pid)["VmHWM"]
    duration = summary["duration_us"] / 1e6
    acked_requests = summary["requests"] - summary["status_errors"]
    acked = (acked_requests + warm["requests"] - warm["status_errors"]) * load.per_request
    sent = (summary["sent"] + warm["sent"]) * load.per_request
    stored, consistent = stored_events(client, target, pipeline)
    client.flushall()  # our throwaway Redis: every run starts empty
    errors = {name: int(summary[key]) for name, key in (("non2xx", "status_errors"), ("connect", "connect_errors"),
                                                         ("read", "read_errors"), ("write", "write_errors"),
                                                         ("timeout", "timeouts")) if summary[key]}
    run = Run(target.name, load.name, rep, acked_requests / duration, acked_requests * load.per_request / duration,
              summary["p50_us"] / 1000, summary["p99_us"] / 1000, (cpu1 - cpu0) / wall, (redis1 - redis0) / wall,
              wrk_cpu / wall, idle, peak, 1e6 * (cpu1 - cpu0) / max(summary["requests"], 1), load.connections,
              acked, sent, stored, errors, consistent)
    run.uvloop = on_uvloop
    if target.kind == "ceiling":
        run.stored_events = run.acked_events  # nothing to check
    return run


# ------------------------------------------------------------------------------------------ report
def show_run(run: Run) -> str:
    check = "ceiling: nothing stored" if run.stored_events == run.acked_events and run.target.startswith("ceiling") \
        else (f"Redis {run.stored_events:,} events: acked {run.acked_events:,} <= stored <= sent {run.sent_events:,}"
              f"{'' if run.consistent else ', granularities DISAGREE'}")
    errors = f" errors {run.errors}" if run.errors else ""
    return (f"  rep {run.rep} {run.target:<16} {run.load:<6} {run.rps:>9,.0f} req/s {run.eps:>10,.0f} ev/s  "
            f"p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  cpu {run.server_cores:4.2f} "
            f"({run.cpu_us_per_request:5.1f} us/req)  redis {run.redis_cores:4.2f}  wrk {run.wrk_cores:4.2f}  "
            f"rss {run.idle_rss_mb:4.0f}/{run.peak_rss_mb:4.0f} MiB  "
            f"[{'OK' if run.verified else 'FAIL'}: {check}]{errors}")


def summarize(runs: list[Run], targets: list[Target], loads: list[Load]) -> list[tuple[str, bool | None, str]]:
    rows = []
    for target in targets:
        for load in loads:
            mine = [r for r in runs if r.target == target.name and r.load == load.name]
            if not mine:
                continue
            s = benchlib.stat
            rows.append([f"{target.name} / {load.name}", s([r.rps for r in mine]).show(),
                         s([r.eps for r in mine]).show(),
                         s([r.p50_ms for r in mine]).show("{:.2f}"), s([r.p99_ms for r in mine]).show("{:.2f}"),
                         s([r.server_cores for r in mine]).show("{:.2f}"),
                         s([r.cpu_us_per_request for r in mine]).show("{:.1f}"),
                         s([r.redis_cores for r in mine]).show("{:.2f}"),
                         s([r.idle_rss_mb for r in mine]).show("{:.0f}"),
                         s([r.peak_rss_mb for r in mine]).show("{:.0f}"),
                         "yes" if all(r.verified for r in mine) else "NO"])
    loops = {r.target: "uvloop" if r.uvloop else "asyncio" for r in runs}
    print("Event loop seen in each server process (/proc/<pid>/maps): "
          + ", ".join(f"{name} {loop}" for name, loop in loops.items()))
    print("Medians over repetitions, (min..max):")
    print(benchlib.table(["server / load", "req/s", "events/s", "p50 ms", "p99 ms", "server cores", "CPU us/req",
                          "redis cores", "idle MiB", "peak MiB", "Redis ok"], rows))
    print()

    def per_rep(a: tuple[str, str], b: tuple[str, str], field_a: str = "rps",
                field_b: str = "rps") -> benchlib.Stat | None:
        ratios = []
        for rep in sorted({r.rep for r in runs}):
            x = next((r for r in runs if (r.target, r.load, r.rep) == (*a, rep)), None)
            y = next((r for r in runs if (r.target, r.load, r.rep) == (*b, rep)), None)
            if x and y and getattr(y, field_b):
                ratios.append(getattr(x, field_a) / getattr(y, field_b))
        return benchlib.stat(ratios) if ratios else None

    verdicts: list[tuple[str, bool | None, str]] = []

    def ratio_line(label: str, value: benchlib.Stat | None, target: float | None, unit: str = "x") -> None:
        if value is None:
            return
        text = f"{value.show('{:.2f}')}{unit}"
        ok = None if target is None else value.median >= target
        verdicts.append((label, ok, text + (f"  (target >= {target:g}{unit})" if target is not None else "")))

    # Targets are checked for both ways the sidecar runs: on uvloop (what the dev venv has installed)
    # and on asyncio's loop (where uvloop is not installed); each against the ceiling on the same loop.
    for name, ceiling in (("sidecar", "ceiling"), ("sidecar-asyncio", "ceiling-asyncio")):
        mine = [r for r in runs if r.target == name]
        if not mine:
            continue
        ratio_line(f"single: {name} / naive req/s", per_rep((name, "single"), ("naive", "single")), 2.5)
        ratio_line(f"single: {name} / {ceiling} req/s", per_rep((name, "single"), (ceiling, "single")), 0.8)
        p99 = benchlib.stat([r.p99_ms for r in mine if r.load == "single"] or [0])
        verdicts.append((f"single: {name} p99 at concurrency {mine[0].connections}", p99.median <= 15,
                         f"{p99.show('{:.2f}')} ms  (target <= 15 ms)"))
        ratio_line(f"batch: {name} events/s / naive single events/s",
                   per_rep((name, "batch"), ("naive", "single"), "eps", "eps"), 20)
        peak = benchlib.stat([r.peak_rss_mb for r in mine])
        # Targets are in MB (10^6 bytes); /proc gives KiB: compare in MiB against the MB limit converted.
        verdicts.append((f"{name} peak RSS under load", peak.median <= 80 / MIB_PER_MB,
                         f"{peak.show('{:.0f}')} MiB  (target <= 80 MB = 76.3 MiB)"))
        idle = benchlib.stat([r.idle_rss_mb for r in mine])
        verdicts.append((f"{name} idle RSS", idle.median <= 50 / MIB_PER_MB,
                         f"{idle.show('{:.0f}')} MiB  (target <= 50 MB = 47.7 MiB)"))
    ratio_line("single: sidecar / sidecar-asyncio req/s (what uvloop earns)",
               per_rep(("sidecar", "single"), ("sidecar-asyncio", "single")), None)
    ratio_line("batch: sidecar / sidecar-asyncio events/s (what uvloop earns)",
               per_rep(("sidecar", "batch"), ("sidecar-asyncio", "batch"), "eps", "eps"), None)
    ratio_line("single: ceiling / ceiling-asyncio req/s (what uvloop earns aiohttp)",
               per_rep(("ceiling", "single"), ("ceiling-asyncio", "single")), None)
    ratio_line("batch: sidecar / naive events/s (both batched)",
               per_rep(("sidecar", "batch"), ("naive", "batch"), "eps", "eps"), None)
    verdicts.append(("Redis holds exactly what was acked (all runs)", all(r.verified for r in runs),
                     f"{sum(r.verified for r in runs)}/{len(runs)} runs"))
    print("Ratios (within each repetition, median (min..max)) and targets:")
    width = max(len(label) for label, _, _ in verdicts)
    for label, ok, text in verdicts:
        mark = "    " if ok is None else ("MET " if ok else "MISS")
        print(f"  {mark} {label:<{width}}  {text}")
    return verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition of 2 s runs, no naive batch")
    parser.add_argument("--repeat", type=int, help="repetitions (default 3; --quick: 1)")
    parser.add_argument("--seconds", type=float, help="measured seconds per run (default 8; --quick: 2)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each run (default 1)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--batch", type=int, default=100, help="events per request of the batch load (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: leaves a core to the server)")
    parser.add_argument("--pin", action="store_true",
                        help="pin the server to CPU 0 and wrk + Redis to CPU 1 (taskset): steadier figures")
    parser.add_argument("--only", help="comma-separated targets to run (sidecar,sidecar-asyncio,naive,ceiling,"
                                       "ceiling-asyncio)")
    args = parser.parse_args()
    repeat = args.repeat or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 8.0)

    wrk = find_wrk()
    compile_sources()
    if args.pin:
        taskset = benchlib.which_or_none("taskset")
        if taskset is None or (os.cpu_count() or 1) < 2:
            sys.exit("--pin needs taskset and at least 2 CPUs")
        PIN["server"], PIN["client"] = [taskset, "-c", "0"], [taskset, "-c", "1"]
    wrk_version = benchlib.first_line([wrk, "--version"])
    targets = [Target("sidecar", "sidecar", "uvloop"), Target("sidecar-asyncio", "sidecar", "asyncio"),
               Target("naive", "naive", "asyncio"), Target("ceiling", "ceiling", "uvloop"),
               Target("ceiling-asyncio", "ceiling", "asyncio")]
    try:
        import uvloop  # noqa: F401
    except ImportError:
        print("uvloop is not installed: 'sidecar' runs on asyncio's loop like 'sidecar-asyncio'")
        targets = [t for t in targets if t.loop == "asyncio" or t.kind == "sidecar"]
    if args.only:
        wanted = set(args.only.split(","))
        targets = [t for t in targets if t.name in wanted]
    single = Load("single", 1, args.connections)
    batch = Load("batch", args.batch, args.connections)
    # Per repetition: every single-event run, then every batch run; each ratio's two runs are neighbours.
    order = ["ceiling", "sidecar", "naive", "sidecar-asyncio", "ceiling-asyncio"]
    ranked = sorted(targets, key=lambda t: order.index(t.name))
    plan = [(t, single) for t in ranked]
    plan += [(t, batch) for t in ranked if t.kind == "sidecar" or (t.kind == "naive" and not args.quick)]

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as scratch:
        redis_server = RedisServer(Path(scratch) / "redis").start()
        if args.pin and redis_server.process is not None:
            subprocess.run(["taskset", "-a", "-p", "-c", "1", str(redis_server.process.pid)], capture_output=True,
                           check=True)
        try:
            client = redis.Redis.from_url(redis_server.url, decode_responses=True)
            redis_version = client.info("server")["redis_version"]
            benchlib.print_header("ingest benchmark",
                                  redis_version=f"{redis_version} (throwaway, {redis_server.binary})")
            if args.pin:
                print("pinned: server on CPU 0, wrk and Redis on CPU 1")
            print(f"wrk {wrk_version.split(' Copyright')[0]}, {args.threads} thread(s), {args.connections} "
                  f"connections, {seconds:g} s per run after {args.warmup:g} s warm-up, {repeat} repetition(s); "
                  f"{USERS:,} users x {EVENT_TYPES} event types, batch = {args.batch} events/request\n", flush=True)
            runs: list[Run] = []
            log_dir = Path(scratch)
            for rep in range(1, repeat + 1):
                for target, load in plan:
                    run = measure(wrk, target, load, rep, redis_server, client, seconds, args.warmup, args.threads,
                                  log_dir)
                    runs.append(run)
                    print(show_run(run), flush=True)
            print(f"\nload avg at end: {benchlib.load_average()}\n")
            verdicts = summarize(runs, targets, [single, batch])
        finally:
            redis_server.stop()
    return 0 if all(ok is not False for label, ok, _ in verdicts if label.startswith("Redis")) else 1


if __name__ == "__main__":
    sys.exit(main())

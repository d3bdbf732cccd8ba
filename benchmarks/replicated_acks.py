"""What ``server.wait_replicas`` costs: the sidecar on a Redis master with one replica, WAIT 0 vs WAIT 1.

    PYTHONSAFEPATH= .venv/bin/python benchmarks/replicated_acks.py            # 3 repetitions x 4 runs of 8 s
    PYTHONSAFEPATH= .venv/bin/python benchmarks/replicated_acks.py --quick    # 1 repetition, 3 s runs

A throwaway Redis master and a replica of it (``--replicaof``, both core.services.RedisServer) are
started in the same run; the real ``analytics-pipeline sidecar`` process is started once per run with
``server.wait_replicas`` 0 or 1 (``benchmarks/baseline/sidecar.yaml`` otherwise) and loaded by ``wrk``
with ``benchmarks/wrk_events.lua`` (as benchmarks/ingest.py does): single events and batches of 100,
at concurrency 32. Printed per run and as medians over repetitions: events/s, p50/p99 request latency,
sidecar CPU per event; then the ratio WAIT 1 / WAIT 0 of each. Every run checks Redis afterwards
(acked <= stored <= sent) and that the replica holds what the master holds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import ingest
import redis
import yaml

from analytics_pipeline.core.services import RedisServer

LOADS = [ingest.Load("single", 1, 32), ingest.Load("batch", 100, 32)]


@dataclasses.dataclass(frozen=True)
class WaitTarget(ingest.Target):
    """The real sidecar with a config file of its own (``server.wait_replicas`` set)."""

    config_path: str = ""

    def command(self, port: int, redis_url: str, pipeline: str) -> tuple[list[str], dict[str, str]]:
        command, env = super().command(port, redis_url, pipeline)
        return [self.config_path if part == str(ingest.SIDECAR_CONFIG) else part for part in command], env


def write_config(folder: Path, wait: int) -> str:
    config = yaml.safe_load(ingest.SIDECAR_CONFIG.read_text())
    config.setdefault("server", {})["wait_replicas"] = wait
    path = folder / f"sidecar-wait{wait}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def wait_synced(replica: RedisServer) -> None:
    client = redis.Redis(port=replica.port, decode_responses=True)
    try:
        benchlib.wait_until(lambda: client.info("replication").get("master_link_status") == "up", 30,
                            "the replica to sync")
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition of 3 s runs")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    reps = args.reps or (1 if args.quick else 3)
    wrk = ingest.find_wrk()
    ingest.compile_sources()
    benchlib.print_header("replicated acks: server.wait_replicas 0 vs 1, master + 1 replica")
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-wait-")))
        master = RedisServer(scratch / "master").start()
        stack.callback(master.stop)
        replica = RedisServer(scratch / "replica", extra_args=("--replicaof", "127.0.0.1", str(master.port))).start()
        stack.callback(replica.stop)
        wait_synced(replica)
        client = redis.Redis(port=master.port)
        replica_client = redis.Redis(port=replica.port)
        stack.callback(client.close)
        stack.callback(replica_client.close)
        targets = {wait: WaitTarget(f"wait{wait}", "sidecar", "uvloop", write_config(scratch, wait)) for wait in (0, 1)}
        runs: list[ingest.Run] = []
        for rep in range(1, reps + 1):
            for load in LOADS:
                for wait, target in targets.items():
                    run = ingest.measure(wrk, target, load, rep, master, client, seconds, 1.0, 1, scratch)
                    # measure() flushed the master after reading it: the replica must follow it empty
                    benchlib.wait_until(lambda: replica_client.dbsize() == 0, 30, "the replica to follow")
                    runs.append(run)
                    cpu_event = run.cpu_us_per_request / load.per_request
                    print(f"  rep {rep} wait_replicas {wait} {load.name:<6} {run.eps:>10,.0f} ev/s "
                          f"{run.rps:>8,.0f} req/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  "
                          f"sidecar cpu {cpu_event:6.2f} us/event  [{'OK' if run.verified else 'FAIL'}]"
                          f"{' errors ' + str(run.errors) if run.errors else ''}", flush=True)
                    time.sleep(0.2)
    print("\nmedians (min..max) over repetitions; ratio = wait_replicas 1 / wait_replicas 0")
    rows = []
    ok = True
    for load in LOADS:
        by_wait = {wait: [r for r in runs if r.target == f"wait{wait}" and r.load == load.name] for wait in (0, 1)}
        ok = ok and all(r.verified for group in by_wait.values() for r in group)
        figures = {}
        for wait, group in by_wait.items():
            eps = benchlib.stat([r.eps for r in group])
            p50 = benchlib.stat([r.p50_ms for r in group])
            p99 = benchlib.stat([r.p99_ms for r in group])
            cpu = benchlib.stat([r.cpu_us_per_request / load.per_request for r in group])
            figures[wait] = (eps, p50, p99, cpu)
            rows.append([load.name, str(wait), eps.show("{:,.0f}"), p50.show("{:.2f}"), p99.show("{:.2f}"),
                         cpu.show("{:.2f}")])
        ratio = [figures[1][i].median / figures[0][i].median if figures[0][i].median else float("nan")
                 for i in range(4)]
        rows.append([load.name, "ratio", *(f"{value:.2f}x" for value in ratio)])
    print(benchlib.table(["load", "wait_replicas", "events/s", "p50 ms", "p99 ms", "sidecar CPU us/event"], rows))
    print(f"\nRedis checks (acked <= stored <= sent, every run): {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

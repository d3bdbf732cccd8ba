"""Build the project's Docker image on this machine: a Docker engine, a Debian base image, ``docker build``.

The engine is ``DOCKER_HOST`` when it answers, else a private ``dockerd`` in a temporary folder (no bridge,
no iptables: builds and containers use ``--network host``), stopped by PID and cleaned up afterwards.
The base is ``debootstrap --variant=minbase`` of Debian bookworm from the mirror apt uses, with the host's
extra CA certificates and pip settings copied in (networks that intercept TLS), cached under .cache/image/.
Used by ``make image`` (``python tests/imagebuild.py``) and by the slow image test.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "image"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
TAG = f"analytics-pipeline:{VERSION}"
BASE_TAG = "analytics-pipeline-base:bookworm"
SUITE = "bookworm"
INCLUDE = ("python3", "python3-venv", "ca-certificates")
BASE_LABEL = "org.analytics-pipeline.base-key"  # which cached tarball an imported base came from


class ImageError(RuntimeError):
    """A step of the build failed; the message names the step, its output and how to fix it."""


class Unavailable(ImageError):
    """This machine cannot build the image (not root, no Docker engine, no debootstrap)."""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ------------------------------------------------------------------------------------------ engine
def docker_cli() -> str:
    """The ``docker`` client (Debian's docker.io or any other on PATH)."""
    found = shutil.which("docker")
    if not found:
        raise Unavailable("no docker client: apt-get install docker.io")
    return found


@dataclass(frozen=True)
class Engine:
    """A Docker engine reachable at ``host`` (a DOCKER_HOST value)."""

    host: str
    private: bool

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``docker <args>`` against this engine; classic builder (BuildKit would fetch its own images)."""
        env = {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0", "DOCKER_CLI_HINTS": "false"}
        result = subprocess.run([docker_cli(), *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ImageError(f"docker {' '.join(args[:3])} ... failed with exit code {result.returncode}:\n"
                             f"{_tail(result.stderr or result.stdout)}")
        return result


def engine_answers(host: str) -> bool:
    """True if a Docker engine answers at ``host``."""
    try:
        return Engine(host, private=False).run("version", "--format", "{{.Server.Version}}",
                                               check=False, timeout=20).returncode == 0
    except (subprocess.TimeoutExpired, Unavailable):
        return False


def unavailable_reason() -> str | None:
    """Why this machine cannot build the image, or None (checked before anything is started)."""
    host = os.environ.get("DOCKER_HOST")
    if not shutil.which("docker"):
        return "no docker client (apt-get install docker.io)"
    if not (host and engine_answers(host)):
        if os.geteuid() != 0:
            return "no answering DOCKER_HOST and not root, so no private dockerd can run"
        if not shutil.which("dockerd"):
            return "no answering DOCKER_HOST and no dockerd (apt-get install docker.io)"
    if os.geteuid() != 0:
        return "debootstrap needs root to make the base image"
    if not shutil.which("debootstrap"):
        return "no debootstrap (apt-get install debootstrap)"
    return None


def _mounts_under(root: Path) -> list[str]:
    """Mount points below ``root``, deepest first (what a killed dockerd leaves mounted)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(root) or point.startswith(f"{root}/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


@contextlib.contextmanager
def private_dockerd() -> Iterator[Engine]:
    """A dockerd of our own in a temporary folder; stopped by PID, unmounted and removed on exit."""
    dockerd = shutil.which("dockerd")
    if os.geteuid() != 0 or not dockerd:
        raise Unavailable("a private dockerd needs root and Debian's docker.io (apt-get install docker.io)")
    root = Path(tempfile.mkdtemp(prefix="ap-dockerd-"))
    socket = root / "docker.sock"
    log = (root / "dockerd.log").open("wb")
    # Networking off: no bridge, no iptables or forwarding changes on a shared machine; --network host only.
    process = subprocess.Popen(
        [dockerd, "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
         "--pidfile", str(root / "docker.pid"), "-H", f"unix://{socket}", "--bridge=none",
         "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        engine = Engine(f"unix://{socket}", private=True)
        deadline = time.monotonic() + 120
        while not (socket.exists() and engine_answers(engine.host)):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ImageError(f"dockerd did not start (exit code {process.poll()}):\n"
                                 f"{_tail((root / 'dockerd.log').read_text(errors='replace'))}")
            time.sleep(0.5)
        yield engine
    finally:
        _stop(process)
        log.close()
        for point in _mounts_under(root):
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM dockerd by its PID (it stops its containers and containerd), SIGKILL its group if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # its own session: only dockerd and its children
            process.wait(10)
    with contextlib.suppress(ProcessLookupError):  # a containerd it started must not outlive it
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def docker_engine() -> Iterator[Engine]:
    """``DOCKER_HOST`` if it answers, else a private dockerd for the duration."""
    host = os.environ.get("DOCKER_HOST")
    if host and engine_answers(host):
        yield Engine(host, private=False)
        return
    with private_dockerd() as engine:
        yield engine


# ------------------------------------------------------------------------------------- base image
def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses for ``SUITE`` (sources.list, sources.list.d/*.list and *.sources)."""
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in files:
        for line in path.read_text().splitlines() if path.is_file() else ():
            parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return parts[1]
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^([\w-]+):\s*(.*)$", stanza, re.M))
            if ("deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split()
                    and fields.get("Enabled", "yes").lower() != "no"):
                return fields["URIs"].split()[0]
    raise Unavailable(f"apt has no Debian '{SUITE}' source in {apt_dir}/sources.list(.d) to debootstrap from")


def pip_settings(environ: dict[str, str] | None = None, conf: Path = Path("/etc/pip.conf")) -> str | None:
    """The host's /etc/pip.conf with its ``PIP_*`` environment merged in, as pip.conf text (None if neither).

    One file: pip refuses a config file that repeats a section, and env settings have no file of their own.
    """
    environ = dict(os.environ) if environ is None else environ
    config = configparser.RawConfigParser()
    config.optionxform = str  # type: ignore[assignment,method-assign]  # keep option names as written
    if conf.is_file():
        config.read(conf)
    overrides = {name[4:].lower().replace("_", "-"): value for name, value in environ.items()
                 if name.startswith("PIP_") and name != "PIP_CONFIG_FILE"}
    if not overrides and not config.sections():
        return None
    if overrides and not config.has_section("global"):
        config.add_section("global")
    for option, value in sorted(overrides.items()):
        config.set("global", option, value)
    text = io.StringIO()
    config.write(text)
    return text.getvalue()


def host_files() -> dict[str, bytes]:
    """What the base gets from the host: extra CA certificates, pip configuration and the files it names."""
    files: dict[str, bytes] = {}
    for folder in (Path("/usr/local/share/ca-certificates"), Path("/etc/xdg/pip")):
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    files[str(path)] = path.read_bytes()
    settings = pip_settings()
    if settings is not None:
        files["/etc/pip.conf"] = settings.encode()
        # files the settings name (a cert bundle, a constraints file), unless the base makes them itself
        for value in re.findall(r"=\s*(/\S+)", settings):
            path = Path(value)
            if path.is_file() and not value.startswith("/etc/ssl/") and path.stat().st_size < 10 << 20:
                files.setdefault(value, path.read_bytes())
    return files


def base_tarball(log: bool = True) -> Path:
    """The base rootfs as a tar under .cache/image/, made by debootstrap once per mirror and host files."""
    mirror = debian_mirror()
    extra = host_files()
    digest = hashlib.sha256(repr((SUITE, INCLUDE, mirror, sorted(extra.items()))).encode()).hexdigest()[:16]
    tarball = CACHE / f"{SUITE}-minbase-{digest}.tar"
    if tarball.exists():
        return tarball
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        raise Unavailable("making the base image needs root and debootstrap (apt-get install debootstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="base-", dir=CACHE))
    try:
        rootfs = work / "rootfs"
        if log:
            print(f"image: debootstrap {SUITE} from {mirror} (once; cached as {tarball.name})", file=sys.stderr)
        result = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                                 SUITE, str(rootfs), mirror], capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise ImageError(f"debootstrap failed ({result.returncode}):\n{_tail(result.stdout + result.stderr)}")
        for name, content in extra.items():
            target = rootfs / name.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        if any(name.startswith("/usr/local/share/ca-certificates/") for name in extra):
            result = subprocess.run(["chroot", str(rootfs), "update-ca-certificates"],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise ImageError(f"update-ca-certificates in the base failed:\n{_tail(result.stderr)}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):  # packages and indexes: build-time only
            for path in (rootfs / junk).glob("*"):
                if path.is_file():
                    path.unlink()
        partial = work / "base.tar"
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
        for stale in CACHE.glob(f"{SUITE}-minbase-*.tar"):
            stale.unlink()
        os.replace(partial, tarball)
        return tarball
    finally:
        shutil.rmtree(work, ignore_errors=True)


def base_image(engine: Engine) -> str:
    """The base imported into ``engine`` as ``BASE_TAG`` (skipped when it already holds this tarball)."""
    tarball = base_tarball()
    key = tarball.stem
    held = engine.run("image", "inspect", BASE_TAG, "--format", f'{{{{index .Config.Labels "{BASE_LABEL}"}}}}',
                      check=False)
    if held.returncode != 0 or held.stdout.strip() != key:
        engine.run("import", "--change", f"LABEL {BASE_LABEL}={key}", "--change", 'CMD ["/bin/bash"]',
                   str(tarball), BASE_TAG, timeout=900)
    return BASE_TAG


# ------------------------------------------------------------------------------------------ build
@dataclass(frozen=True)
class Built:
    """An image built into an engine, with what the build cost."""

    tag: str
    seconds: float
    size_bytes: int

    def describe(self) -> str:
        return f"{self.tag}: built in {self.seconds:.0f} s, {self.size_bytes / 1e6:.0f} MB"


def build(engine: Engine, base: str, tag: str = TAG) -> Built:
    """``docker build`` of the repository on ``base`` (host network: the engine has no bridge)."""
    started = time.monotonic()
    engine.run("build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}", "-t", tag, str(REPO),
               timeout=1800)
    seconds = time.monotonic() - started
    size = int(engine.run("image", "inspect", tag, "--format", "{{.Size}}").stdout.strip())
    return Built(tag, seconds, size)


def main(argv: list[str] | None = None) -> int:
    """``make image``: build, print time and size; a private engine's image is saved as a tar (it goes away)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default=TAG)
    parser.add_argument("--save", type=Path, metavar="TAR",
                        help=f"docker save the image here (default with a private dockerd: .cache/image/"
                             f"analytics-pipeline-{VERSION}.tar)")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"image: cannot build here: {reason}", file=sys.stderr)
        return 2
    try:
        with docker_engine() as engine:
            started = time.monotonic()
            base = base_image(engine)
            print(f"image: base {base} ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
            built = build(engine, base, args.tag)
            print(f"image: {built.describe()}")
            save = args.save or (CACHE / f"analytics-pipeline-{VERSION}.tar" if engine.private else None)
            if save is not None:
                engine.run("save", "-o", str(save), built.tag, timeout=900)
                print(f"image: saved to {save} (docker load -i {save})")
    except ImageError as error:
        print(f"image: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""requirements.lock: every runtime dependency of pyproject.toml pinned with hashes, for every Python the
package supports (the image's Debian 3.11.2 needs async-timeout, a 3.11.7 does not), and what `make` installs."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import tomllib
from dataclasses import dataclass

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from support import REPO

LOCK = REPO / "requirements.lock"
# Interpreters the lock must serve: the image's (Debian bookworm), this machine's, newer ones; Linux.
PYTHONS = ("3.11.2", "3.11.9", "3.12.8", "3.13.1")


@dataclass(frozen=True)
class Pin:
    requirement: Requirement
    hashes: tuple[str, ...]

    @property
    def version(self) -> Version:
        (spec,) = self.requirement.specifier
        return Version(spec.version)

    def applies(self, environment: dict[str, str]) -> bool:
        marker = self.requirement.marker
        return marker is None or marker.evaluate(environment)


def read_lock(text: str) -> dict[str, list[Pin]]:
    """Entries by canonical name (a name may appear more than once, under exclusive markers)."""
    text = re.sub(r"\\\n", " ", text)
    pins: dict[str, list[Pin]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        hashes = tuple(re.findall(r"--hash=(\S+)", line))
        requirement = Requirement(re.sub(r"\s*--hash=\S+", "", line))
        pins.setdefault(canonicalize_name(requirement.name), []).append(Pin(requirement, hashes))
    return pins


def environment(python: str) -> dict[str, str]:
    env: dict[str, str] = dict(default_environment())
    env.update(python_full_version=python, python_version=".".join(python.split(".")[:2]),
               sys_platform="linux", platform_system="Linux", os_name="posix", implementation_name="cpython",
               platform_python_implementation="CPython", extra="")
    return env


def runtime_dependencies() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(text) for text in project["dependencies"]]


def pin_for(pins: dict[str, list[Pin]], name: str, env: dict[str, str]) -> Pin | None:
    matching = [pin for pin in pins.get(canonicalize_name(name), []) if pin.applies(env)]
    assert len(matching) <= 1, f"{name}: more than one pin applies on Python {env['python_full_version']}"
    return matching[0] if matching else None


def missing_dependencies(pins: dict[str, list[Pin]]) -> list[str]:
    """What pip's --require-hashes would refuse: a dependency (direct or of a locked package) with no
    applicable pin, or a pin outside its specifier, on any interpreter of PYTHONS.

    Transitive requirements come from the installed distributions' metadata (the venv is installed
    from this lock); those of a package only other interpreters get (async-timeout) are not followed.
    """
    problems = []
    for python in PYTHONS:
        env = environment(python)
        todo = [(req, "pyproject.toml") for req in runtime_dependencies()]
        seen: set[str] = set()
        while todo:
            req, wanted_by = todo.pop()
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            pin = pin_for(pins, req.name, env)
            if pin is None:
                problems.append(f"Python {python}: {req} (wanted by {wanted_by}) is not in requirements.lock")
                continue
            if not req.specifier.contains(pin.version, prereleases=True):
                problems.append(f"Python {python}: {wanted_by} wants {req}, the lock pins {pin.version}")
            name = canonicalize_name(req.name)
            if name in seen:
                continue
            seen.add(name)
            try:
                requires = importlib.metadata.distribution(name).requires or []
            except importlib.metadata.PackageNotFoundError:
                if pin.applies(environment(platform.python_version())):
                    problems.append(f"{name} is locked and applies here but is not installed: run `make`")
                continue  # a package for other interpreters only: its own requirements are checked by the image
            todo += [(Requirement(text), name) for text in requires
                     if not (Requirement(text).marker and "extra" in str(Requirement(text).marker))]
    return problems


def test_every_entry_is_pinned_exactly_and_carries_hashes() -> None:
    pins = read_lock(LOCK.read_text(encoding="utf-8"))
    assert pins, "requirements.lock is empty"
    for name, entries in pins.items():
        for pin in entries:
            (spec,) = pin.requirement.specifier
            assert spec.operator == "==", f"{name} is not pinned with ==: {pin.requirement}"
            assert pin.hashes and all(h.startswith("sha256:") for h in pin.hashes), f"{name} has no sha256 hashes"
            assert not pin.requirement.extras, f"{name}: extras belong in pyproject.toml, not in the lock"


def test_the_lock_covers_every_runtime_dependency_on_every_python() -> None:
    """Direct and transitive, markers evaluated per interpreter: what `make lock` (uv --universal) produces."""
    assert missing_dependencies(read_lock(LOCK.read_text(encoding="utf-8"))) == []


def test_a_lock_made_for_one_interpreter_is_caught() -> None:
    """pip-compile on Python 3.11.7 leaves out async-timeout, which redis needs below 3.11.3 (the image)."""
    text = re.sub(r"(?ms)^async-timeout==.*?(?=^\S)", "", LOCK.read_text(encoding="utf-8"))
    assert "async-timeout==" not in text
    problems = missing_dependencies(read_lock(text))
    assert any(p.startswith("Python 3.11.2: async-timeout") for p in problems), problems
    assert not any(p.startswith("Python 3.12") for p in problems), problems


@pytest.mark.parametrize("requirement", runtime_dependencies(), ids=str)
def test_the_dev_install_has_the_locked_versions(requirement: Requirement) -> None:
    """`make` installs the lock first (hash-checked) and the test tools under it as constraints."""
    env = environment(platform.python_version())
    if requirement.marker is not None and not requirement.marker.evaluate(env):
        pytest.skip(f"{requirement} does not apply here")
    pin = pin_for(read_lock(LOCK.read_text(encoding="utf-8")), requirement.name, env)
    assert pin is not None
    assert Version(importlib.metadata.version(requirement.name)) == pin.version, \
        "the virtualenv differs from requirements.lock: run `make` again (or `make lock` after editing pyproject)"

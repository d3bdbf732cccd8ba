"""Fixtures of the operator tests; the harness itself is in operator_harness.py (importable from here)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent))

from operator_harness import Cluster, emulated_cluster


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    """An emulated Kubernetes API server (kmock) with the CRD's resource, and a client for it."""
    async with emulated_cluster(tmp_path, monkeypatch) as emulated:
        yield emulated

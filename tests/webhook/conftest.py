"""Fixtures of the webhook tests: the kmock cluster of the operator tests, test TLS material, AdmissionReviews.

The operator harness (kopf + kmock) lives in tests/operator/operator_harness.py and is imported from there.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "operator"))
sys.path.append(str(Path(__file__).resolve().parent))

from operator_harness import Cluster, emulated_cluster
from webhook_support import TestPKI


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    """An emulated Kubernetes API server (kmock) with the CRD's resource, and a client for it."""
    async with emulated_cluster(tmp_path, monkeypatch) as emulated:
        yield emulated


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    """A test CA and a serving certificate for 127.0.0.1/localhost in tmp_path/tls (tls.crt, tls.key)."""
    return TestPKI(tmp_path / "tls")

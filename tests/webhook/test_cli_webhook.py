"""`analytics-pipeline operator` with its webhook, as the chart's Deployment runs it: a process, HTTPS with
the mounted certificate, a plain-container sidecar (--sidecar-mode container), metrics on /metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from operator_harness import Cluster, condition, eventually, free_port
from webhook_support import TestPKI, admission_review, patched, send_review, wait_for_port

from analytics_pipeline.operator import crd

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

NS = "team-hook"
SPEC = {"redis": {"secretRef": {"name": "conn"}}, "postgres": {"secretRef": {"name": "conn"}}}
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
COMMAND = str(Path(sys.executable).parent / "analytics-pipeline")


@pytest.mark.skipif(SERVICE_ACCOUNT_TOKEN.exists(), reason="inside a pod the operator would log in with its token")
async def test_operator_command_serves_the_webhook_and_its_metric(cluster: Cluster, pki: TestPKI,
                                                                  tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        COMMAND, "operator", "--all-namespaces", "--liveness=", "--default-image=registry.example/ap:cli",
        f"--webhook-port={port}", "--webhook-address=127.0.0.1", f"--webhook-cert-dir={pki.directory}",
        "--sidecar-mode=container", f"--metrics-port={metrics}",
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: condition(cluster.pipeline(NS, "web"), "Ready").get("status") == "True", within=20)
        await wait_for_port(port, pki.client_context(), within=20)
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web-0", "namespace": NS, "labels": {crd.LABEL_INJECT: "web"}},
               "spec": {"containers": [{"name": "app", "image": "app:1"}]}}
        response = await send_review(f"https://127.0.0.1:{port}/{crd.WEBHOOK_PATH}", pki.client_context(),
                                     admission_review(pod, NS))
        result, _ = patched(pod, response)
        assert [c["name"] for c in result["spec"]["containers"]] == ["app", "analytics-sidecar"]
        assert "restartPolicy" not in result["spec"]["containers"][1] and "initContainers" not in result["spec"]
        assert result["spec"]["containers"][1]["image"] == "registry.example/ap:cli"
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{metrics}/metrics") as answer:
            text = await answer.text()
        assert 'analytics_pipeline_injections_total{result="injected"} 1.0' in text
        assert 'analytics_pipeline_injections_total{result="unknown_pipeline"} 0.0' in text
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, stderr.decode()[-3000:]
    assert "injected the sidecar of AnalyticsPipeline team-hook/web as a container" in stderr.decode()


async def test_missing_certificate_is_a_one_line_error(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        COMMAND, "operator", "--webhook-port=9443", f"--webhook-cert-dir={tmp_path}",
        env={**os.environ, "KUBECONFIG": str(tmp_path / "none")}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode != 0
    assert f"the webhook certificate {tmp_path / 'tls.crt'}" in stderr.decode()
    assert "Traceback" not in stderr.decode()

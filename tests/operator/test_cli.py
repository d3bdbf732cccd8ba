"""`analytics-pipeline operator` as a process, the way the Deployment runs it, against the emulated API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from operator_harness import Cluster, condition, eventually, free_port

from analytics_pipeline.operator import crd

# kmock 0.8 loads its bundled resource list with a deprecated importlib.resources call.
pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

NS = "team-cli"
SPEC = {"redis": {"secretRef": {"name": "conn"}}, "postgres": {"secretRef": {"name": "conn"}}}
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


@pytest.mark.skipif(SERVICE_ACCOUNT_TOKEN.exists(), reason="inside a pod the operator would log in with its token")
async def test_operator_command_reconciles_serves_liveness_and_stops_on_sigterm(cluster: Cluster,
                                                                               tmp_path: Path) -> None:
    port = free_port()
    liveness = f"http://127.0.0.1:{port}/healthz"
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "analytics-pipeline"), "operator", "--all-namespaces",
        f"--liveness={liveness}",
        "--default-image=registry.example/ap:cli", "--log-format=json",
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as session:
            async def alive() -> bool:
                try:
                    async with session.get(liveness) as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False
            for _ in range(300):
                if await alive() or process.returncode is not None:
                    break
                await asyncio.sleep(0.1)
            if not await alive():
                if process.returncode is None:
                    process.kill()
                _, stderr = await process.communicate()
                pytest.fail(f"the liveness endpoint never answered; the operator said: {stderr.decode()[-3000:]}")
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: condition(cluster.pipeline(NS, "web"), "Ready").get("status") == "True", within=20)
        cronjob = cluster.cronjob(NS, "web")
        image = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"]
        assert image == "registry.example/ap:cli"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, stderr.decode()[-3000:]
    records = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    messages = [record["msg"] for record in records if record.get("logger") == "analytics_pipeline.operator"]
    assert f"{NS}/web: created ConfigMap {crd.configmap_name('web')} (AnalyticsPipeline create)" in messages
    assert f"{NS}/web: created CronJob {crd.cronjob_name('web')} (AnalyticsPipeline create)" in messages

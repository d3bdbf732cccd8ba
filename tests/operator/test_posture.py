"""What a pipeline's author can and cannot do through the CR, on the real operator (kopf + kmock): images only
from the operator unless the admin allows them (Ready=False, ImageNotAllowed), posture warnings as Warning
Events and on the Ready condition, status.injectedPods at creation, the RBAC hint only on a 403."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
from operator_harness import TEST_IMAGE, Cluster, condition, eventually, running_operator

from analytics_pipeline.operator.kube import KubeApiError
from analytics_pipeline.operator.webhook import WebhookOptions, count_failure_message

sys.path.append(str(Path(__file__).resolve().parents[1] / "webhook"))

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

NS = "team-b"
SPEC: dict[str, Any] = {
    "redis": {"secretRef": {"name": "conn"}},
    "postgres": {"secretRef": {"name": "conn", "key": "writer"}, "readSecretRef": {"name": "conn", "key": "reader"}},
}


def ready(cluster: Cluster, name: str) -> dict[str, Any]:
    return condition(cluster.pipeline(NS, name), "Ready")


def reasons(cluster: Cluster, name: str) -> list[str]:
    return [event["reason"] for event in cluster.events(NS, name)]


async def test_an_image_the_admin_did_not_allow_is_refused(cluster: Cluster) -> None:
    async with running_operator(cluster, allowed_images=("registry.example/team/",)) as _:
        await cluster.create_pipeline(NS, "miner", {**SPEC, "flusher": {"image": "docker.io/evil/miner:1"}})
        await eventually(lambda: ready(cluster, "miner").get("status") == "False")
        await cluster.create_pipeline(NS, "ok", {**SPEC, "flusher": {"image": "registry.example/team/ap:2"},
                                                 "sidecar": {"image": TEST_IMAGE}})
        await eventually(lambda: ready(cluster, "ok").get("status") == "True")
        await eventually(lambda: "ImageNotAllowed" in reasons(cluster, "miner"))
    refused = ready(cluster, "miner")
    assert refused["reason"] == "ImageNotAllowed"
    assert "spec.flusher.image: 'docker.io/evil/miner:1' is not the operator's image" in refused["message"]
    assert "operator.allowedImages" in refused["message"]
    assert cluster.cronjob(NS, "miner") is None and cluster.configmap(NS, "miner") is None  # nothing ran it
    pod = cluster.cronjob(NS, "ok")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/team/ap:2"


async def test_posture_warnings_are_events_and_on_the_ready_condition(cluster: Cluster) -> None:
    async with running_operator(cluster):
        await cluster.create_pipeline(NS, "strict", SPEC)
        writer = copy.deepcopy(SPEC)
        del writer["postgres"]["readSecretRef"]
        await cluster.create_pipeline(NS, "writer", writer)
        await cluster.create_pipeline(NS, "open", {**SPEC, "sidecar": {"host": "0.0.0.0", "exposeIngest": True}})
        for name in ("strict", "writer", "open"):
            await eventually(lambda name=name: ready(cluster, name).get("status") == "True")
        await eventually(lambda: "WriterCredentialsInSidecar" in reasons(cluster, "writer")
                         and "IngestExposed" in reasons(cluster, "open"))
    assert "Warning" not in ready(cluster, "strict")["message"]
    assert not {"WriterCredentialsInSidecar", "IngestExposed", "HostIgnored"} & set(reasons(cluster, "strict"))
    assert "writer's" in ready(cluster, "writer")["message"] and "readSecretRef" in ready(cluster, "writer")["message"]
    assert "0.0.0.0:8787" in ready(cluster, "open")["message"]
    events = [event for event in cluster.events(NS, "open") if event["reason"] == "IngestExposed"]
    assert len(events) == 1 and events[0]["type"] == "Warning"  # once, not at every reconciliation


async def test_injected_pods_is_written_at_creation_not_at_the_first_resync(cluster: Cluster, tmp_path: Path) -> None:
    from webhook_support import TestPKI  # tests/webhook

    pki = TestPKI(tmp_path / "tls")
    options = WebhookOptions(port=0, address="127.0.0.1", cert_file=pki.cert_file, key_file=pki.key_file)
    async with running_operator(cluster, injection=options, resync_seconds=3600):
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: cluster.pipeline(NS, "web")["status"].get("injectedPods") == 0)


def test_the_rbac_hint_comes_only_with_a_403() -> None:
    forbidden = count_failure_message(KubeApiError(403, "Forbidden", "pods is forbidden"))
    assert "needs 'list' on pods" in forbidden
    for error in (KubeApiError(0, "ClientConnectorError", "connection refused"),
                  KubeApiError(500, "InternalError", "etcd"), KubeApiError(401, "Unauthorized", "token")):
        message = count_failure_message(error)
        assert "needs 'list'" not in message and "retrying at the next resync" in message

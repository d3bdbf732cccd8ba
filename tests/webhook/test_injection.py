"""The injection webhook end to end: the whole operator (kopf + our handlers, webhook server on) against
kmock, real AdmissionReview requests over HTTPS with a test CA, the returned JSONPatch applied to the pod."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import kubernetes_validate
import pytest
from operator_harness import Cluster, condition, eventually, free_port, running_operator
from prometheus_client import REGISTRY
from webhook_support import TestPKI, admission_review, patched, send_review, wait_for_port

from analytics_pipeline.operator import crd
from analytics_pipeline.operator.kube import pods_path
from analytics_pipeline.operator.webhook import WebhookOptions

# kmock 0.8 loads its bundled resource list with a deprecated importlib.resources call.
pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

NS = "shop"
SPEC: dict[str, Any] = {
    "redis": {"secretRef": {"name": "analytics-connections"}},
    "postgres": {"secretRef": {"name": "analytics-connections", "key": "pg"}},
    "sidecar": {"image": "registry.example/sidecar:7", "resources": {"requests": {"cpu": "20m"},
                                                                      "limits": {"memory": "100Mi"}}},
}
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())

# The sidecar exactly as a pod of pipeline "web" must get it (written out, not computed by the code under test).
SIDECAR: dict[str, Any] = {
    "name": "analytics-sidecar",
    "image": "registry.example/sidecar:7",
    "imagePullPolicy": "IfNotPresent",
    "command": ["analytics-pipeline"],
    "args": ["sidecar", "--config", "/etc/analytics-pipeline/config.yaml", "--log-format", "json"],
    "ports": [{"name": "analytics-ops", "containerPort": 8788, "protocol": "TCP"}],
    "env": [
        {"name": "REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "analytics-connections", "key": "redis-url"}}},
        {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "analytics-connections", "key": "pg"}}},
        # its pod's name (downward API): a sidecar of a sharded pipeline picks its shard by it
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
    ],
    "startupProbe": {"httpGet": {"path": "/healthz", "port": "analytics-ops"}, "periodSeconds": 1,
                     "failureThreshold": 30},
    "readinessProbe": {"httpGet": {"path": "/readyz", "port": "analytics-ops"}, "periodSeconds": 5},
    "livenessProbe": {"httpGet": {"path": "/healthz", "port": "analytics-ops"}, "periodSeconds": 10},
    "resources": {"requests": {"cpu": "20m"}, "limits": {"memory": "100Mi"}},
    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "readOnlyRootFilesystem": True,
                        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"}},
    "volumeMounts": [{"name": "analytics-config", "mountPath": "/etc/analytics-pipeline", "readOnly": True}],
}
NATIVE_SIDECAR = {**SIDECAR, "restartPolicy": "Always"}
CONFIG_VOLUME = {"name": "analytics-config", "configMap": {"name": "web-sidecar-config"}}
APP = {"name": "app", "image": "shop/web:1.2.3", "ports": [{"containerPort": 8080}],
       "env": [{"name": "ANALYTICS_URL", "value": "http://localhost:8787/v1/events"}]}


def pod(labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """A pod as a ReplicaSet creates it (generateName, no name yet)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-7d9f8-", "namespace": NS, "labels": {"app": "web", **(labels or {})}},
            "spec": {"containers": [copy.deepcopy(APP)], **copy.deepcopy(spec)}}


LABELLED = {crd.LABEL_INJECT: "web"}


def injections(result: str) -> float:
    return REGISTRY.get_sample_value("analytics_pipeline_injections_total", {"result": result}) or 0.0


def namespace_events(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    """Events whose involvedObject is the Namespace itself."""
    return [obj.raw for (resource, _, _), obj in cluster.k8s.objects.items()
            if resource == "v1/events" and not obj.deleted
            and (obj.raw.get("involvedObject") or {}).get("kind") == "Namespace"
            and obj.raw["involvedObject"].get("name") == namespace]


def ready(cluster: Cluster, name: str, status: str = "True") -> bool:
    return condition(cluster.pipeline(NS, name), "Ready").get("status") == status


@asynccontextmanager
async def webhook_operator(cluster: Cluster, pki: TestPKI, *, mode: str = "native",
                           resync_seconds: float = 60.0) -> AsyncIterator[str]:
    """The operator with its webhook on a free port; yields the webhook's URL (as the chart's Service path)."""
    port = free_port()
    options = WebhookOptions(port=port, address="127.0.0.1", cert_file=pki.cert_file, key_file=pki.key_file,
                             mode=mode, reload_seconds=0.1)
    async with running_operator(cluster, injection=options, resync_seconds=resync_seconds,
                                allowed_images=("registry.example/",)):
        await wait_for_port(port, pki.client_context())
        yield f"https://127.0.0.1:{port}/{crd.WEBHOOK_PATH}"


async def review(url: str, pki: TestPKI, body: dict[str, Any], **options: Any) -> tuple[dict[str, Any], Any]:
    """Send the pod for review; (the pod as the API server would store it, the JSONPatch operations)."""
    response = await send_review(url, pki.client_context(), admission_review(body, NS, **options))
    assert response["allowed"] is True, response  # whatever happens, the pod is admitted
    return patched(body, response)


async def test_labelled_pod_gets_a_native_sidecar_and_only_additions(cluster: Cluster, pki: TestPKI) -> None:
    async with webhook_operator(cluster, pki) as url:
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: ready(cluster, "web"))
        before = injections("injected")
        incoming = pod(LABELLED)
        result, operations = await review(url, pki, incoming)

    assert result == {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-7d9f8-", "namespace": NS, "labels": {"app": "web", **LABELLED}},
        "spec": {"containers": [APP], "initContainers": [NATIVE_SIDECAR], "volumes": [CONFIG_VOLUME]},
    }
    assert {op["op"] for op in operations} == {"add"}  # nothing of the pod is replaced or removed
    assert injections("injected") == before + 1
    for version in KUBERNETES_VERSIONS:  # what the API server would store is a valid Pod
        kubernetes_validate.validate({**result, "metadata": {**result["metadata"], "name": "web-7d9f8-x1"}},
                                     version, strict=True)


async def test_pod_with_init_containers_several_containers_and_a_colliding_volume(cluster: Cluster,
                                                                                 pki: TestPKI) -> None:
    migrate = {"name": "migrate", "image": "shop/web:1.2.3", "command": ["./migrate"]}
    worker = {"name": "worker", "image": "shop/worker:3"}
    theirs = {"name": "analytics-config", "emptyDir": {}}  # the app's own volume with our default name
    incoming = pod(LABELLED, initContainers=[migrate], volumes=[theirs])
    incoming["spec"]["containers"].append(worker)
    async with webhook_operator(cluster, pki) as url:
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: ready(cluster, "web"))
        result, operations = await review(url, pki, incoming)

    renamed = {**NATIVE_SIDECAR, "volumeMounts": [{**SIDECAR["volumeMounts"][0], "name": "analytics-config-2"}]}
    assert result["spec"] == {
        "containers": [APP, worker],
        "initContainers": [migrate, renamed],  # appended: the app's own init containers run first, untouched
        "volumes": [theirs, {**CONFIG_VOLUME, "name": "analytics-config-2"}],
    }
    assert result["metadata"] == incoming["metadata"]
    assert sorted((op["op"], op["path"]) for op in operations) == [("add", "/spec/initContainers/1"),
                                                                   ("add", "/spec/volumes/1")]


async def test_plain_container_mode_for_older_clusters(cluster: Cluster, pki: TestPKI) -> None:
    async with webhook_operator(cluster, pki, mode="container") as url:
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: ready(cluster, "web"))
        result, _ = await review(url, pki, pod(LABELLED))
    assert result["spec"] == {"containers": [APP, SIDECAR], "volumes": [CONFIG_VOLUME]}


async def test_unlabelled_and_already_injected_pods_are_left_alone(cluster: Cluster, pki: TestPKI) -> None:
    async with webhook_operator(cluster, pki) as url:
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: ready(cluster, "web"))
        plain = pod()
        assert await review(url, pki, plain) == (plain, [])

        injected, _ = await review(url, pki, pod(LABELLED))
        before = injections("already_injected")
        assert await review(url, pki, injected) == (injected, [])  # a re-invocation changes nothing
        assert injections("already_injected") == before + 1

        by_hand = pod(LABELLED)  # the snippet pasted as a plain container
        by_hand["spec"]["containers"].append(copy.deepcopy(SIDECAR))
        by_hand["spec"]["volumes"] = [CONFIG_VOLUME]
        assert await review(url, pki, by_hand) == (by_hand, [])


async def test_unknown_pipeline_admits_the_pod_unchanged_with_an_event_and_a_metric(cluster: Cluster,
                                                                                  pki: TestPKI) -> None:
    async with webhook_operator(cluster, pki) as url:
        before = injections("unknown_pipeline")
        incoming = pod({crd.LABEL_INJECT: "wbe"})  # a typo
        assert await review(url, pki, incoming) == (incoming, [])
        assert injections("unknown_pipeline") == before + 1
        (event,) = await eventually(lambda: namespace_events(cluster, NS))
        assert event["type"] == "Warning" and event["reason"] == "InjectionSkipped"
        assert event["metadata"]["namespace"] == NS
        assert "web-7d9f8-*" in event["message"] and "'wbe'" in event["message"]
        assert "names no AnalyticsPipeline in namespace shop" in event["message"]

        # a second pod a moment later: counted, but no second Event (one per pipeline and reason per minute)
        assert await review(url, pki, incoming) == (incoming, [])
        assert injections("unknown_pipeline") == before + 2
        assert len(namespace_events(cluster, NS)) == 1


async def test_not_ready_pipeline_admits_the_pod_unchanged_with_an_event_on_the_pipeline(cluster: Cluster,
                                                                                       pki: TestPKI) -> None:
    async with webhook_operator(cluster, pki) as url:
        await cluster.create_pipeline(NS, "web", {**SPEC, "flush": {"interval": "7m"}})  # InvalidSpec
        await eventually(lambda: ready(cluster, "web", status="False"))
        before = injections("pipeline_not_ready")
        incoming = pod(LABELLED)
        assert await review(url, pki, incoming, dry_run=True) == (incoming, [])
        assert await review(url, pki, incoming) == (incoming, [])
        assert injections("pipeline_not_ready") == before + 2

        def skipped() -> list[dict[str, Any]]:
            return [event for event in cluster.events(NS, "web") if event["reason"] == "InjectionSkipped"]

        (event,) = await eventually(skipped)  # one: the dry run posted none
        assert event["type"] == "Warning"
        assert event["involvedObject"]["uid"] == cluster.pipeline(NS, "web")["metadata"]["uid"]
        assert "is not Ready" in event["message"] and "InvalidSpec" in event["message"]

        # fixed: the very next pod is injected (a not-Ready index entry is read fresh from the API server)
        await cluster.patch_pipeline(NS, "web", {"spec": {"flush": {"interval": "5m"}}})
        await eventually(lambda: ready(cluster, "web"))
        result, _ = await review(url, pki, incoming)
        assert result["spec"]["initContainers"] == [NATIVE_SIDECAR]


async def test_status_counts_running_pods_that_carry_the_sidecar(cluster: Cluster, pki: TestPKI) -> None:
    async with webhook_operator(cluster, pki, resync_seconds=0.3) as url:
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: ready(cluster, "web"))
        injected, _ = await review(url, pki, pod(LABELLED))
        stored = [
            ("web-1", injected, "Running"), ("web-2", injected, "Running"),
            ("web-3", injected, "Pending"),  # not running yet
            ("web-4", pod(LABELLED), "Running"),  # labelled, but it was not injected
            ("other-1", {**injected, "metadata": {**injected["metadata"],
                                                  "labels": {crd.LABEL_INJECT: "other"}}}, "Running"),
        ]
        for name, body, phase in stored:
            await cluster.api.create(pods_path(NS), {**copy.deepcopy(body), "metadata": {
                **body["metadata"], "name": name}, "status": {"phase": phase}})
        await eventually(lambda: cluster.pipeline(NS, "web")["status"].get("injectedPods") == 2, within=10)
        await cluster.api.request("DELETE", f"{pods_path(NS)}/web-1")
        await eventually(lambda: cluster.pipeline(NS, "web")["status"].get("injectedPods") == 1, within=10)


async def test_index_miss_falls_back_to_one_get(cluster: Cluster) -> None:
    """Before the index is filled (the operator's first moments), the pipeline is read from the API server."""
    from analytics_pipeline.operator.webhook import find_pipeline

    await cluster.create_pipeline(NS, "web", SPEC)
    found = await find_pipeline({}, cluster.api, NS, "web")
    assert found is not None and found["spec"] == SPEC and found["metadata"]["name"] == "web"
    assert set(found) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert await find_pipeline({}, cluster.api, NS, "nope") is None


async def test_a_failing_lookup_admits_the_pod_unchanged(cluster: Cluster, pki: TestPKI,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The API server errs (or is slow) on an index miss: the pod is admitted as it is, never denied."""
    from analytics_pipeline.operator.kube import KubeApiError

    async def failing_get(path: str) -> None:
        raise KubeApiError(500, "InternalError", "etcd is having a bad day")

    port = free_port()
    options = WebhookOptions(port=port, address="127.0.0.1", cert_file=pki.cert_file, key_file=pki.key_file)
    async with running_operator(cluster, injection=options) as context:
        await wait_for_port(port, pki.client_context())
        monkeypatch.setattr(context.api, "get", failing_get)
        before = injections("error")
        incoming = pod(LABELLED)
        assert await review(f"https://127.0.0.1:{port}/{crd.WEBHOOK_PATH}", pki, incoming) == (incoming, [])
        assert injections("error") == before + 1
        (event,) = await eventually(lambda: namespace_events(cluster, NS))
        assert "etcd is having a bad day" in event["message"] and event["reason"] == "InjectionSkipped"

"""The operator running for real (kopf + our handlers) against kmock's emulated Kubernetes API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_harness import (
    CONFIGMAPS,
    CRONJOBS,
    TEST_IMAGE,
    Cluster,
    condition,
    eventually,
    free_port,
    running_operator,
)

from analytics_pipeline.core.config import load_config
from analytics_pipeline.operator import crd, selftest
from analytics_pipeline.operator.kube import configmaps_path, cronjobs_path

# kmock 0.8 loads its bundled resource list with a deprecated importlib.resources call.
pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

NS = "team-a"
HANDLED = f"{crd.ANNOTATION_PREFIX}/last-handled-configuration"
SPEC: dict[str, Any] = {
    "redis": {"secretRef": {"name": "analytics-connections"}},
    "postgres": {"secretRef": {"name": "analytics-connections", "key": "pg"}},
}


def ready(cluster: Cluster, name: str, generation: int = 1, status: str = "True") -> bool:
    obj = cluster.pipeline(NS, name)
    return (condition(obj, "Ready").get("status") == status
            and obj["status"].get("observedGeneration") == generation)


def config_of(cluster: Cluster, name: str, tmp_path: Path) -> Any:
    """The ConfigMap's config.yaml, loaded by the sidecar's own loader (with the env the pod would have)."""
    path = tmp_path / f"{name}-config.yaml"
    path.write_text(cluster.configmap(NS, name)["data"][crd.CONFIG_KEY], encoding="utf-8")
    return load_config(path, env={"REDIS_URL": "redis://redis:6379/0", "DATABASE_URL": "postgresql://pg/db"})


def owner_ref(cluster: Cluster, name: str) -> dict[str, Any]:
    pipeline = cluster.pipeline(NS, name)
    return {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "name": name,
            "uid": pipeline["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def reasons(cluster: Cluster, name: str) -> list[str]:
    return [event["reason"] for event in cluster.events(NS, name)]


async def test_create_renders_configmap_and_cronjob_with_owner_and_status(cluster: Cluster, tmp_path: Path) -> None:
    async with running_operator(cluster):
        await cluster.create_pipeline(NS, "web", {**SPEC, "counters": {"ttlSeconds": 86400}})
        await eventually(lambda: ready(cluster, "web"))

    cm, cj, pipeline = cluster.configmap(NS, "web"), cluster.cronjob(NS, "web"), cluster.pipeline(NS, "web")
    for child in (cm, cj):
        assert child["metadata"]["ownerReferences"] == [owner_ref(cluster, "web")]
        labels = child["metadata"]["labels"]
        assert labels[crd.LABEL_MANAGED_BY] == crd.MANAGED_BY and labels[crd.LABEL_INSTANCE] == "web"
        assert labels[crd.LABEL_NAME] == "analytics-pipeline"

    config = config_of(cluster, "web", tmp_path)
    assert config.pipeline == f"{NS}/web"
    assert config.counters.ttl_seconds == 86400
    assert config.redis_url == "redis://redis:6379/0"  # from the env (the Secret), never from the file
    text = cm["data"][crd.CONFIG_KEY]
    assert "redis_url" not in yaml.safe_load(text) and "_url" not in text

    spec = cj["spec"]
    assert spec["schedule"] == "*/5 * * * *" and spec["concurrencyPolicy"] == "Forbid" and spec["suspend"] is False
    assert spec["startingDeadlineSeconds"] == 120 and spec["failedJobsHistoryLimit"] == 3
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 2 and job["activeDeadlineSeconds"] == 1800
    pod = job["template"]["spec"]
    flusher = pod["containers"][0]
    assert flusher["image"] == TEST_IMAGE
    assert [*flusher["command"], *flusher["args"]][:4] == ["analytics-pipeline", "flush", "--config", crd.CONFIG_PATH]
    assert flusher["env"] == [
        {"name": "REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "analytics-connections", "key": "redis-url"}}},
        {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "analytics-connections", "key": "pg"}}},
    ]
    security = flusher["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "config", "configMap": {"name": "web-sidecar-config"}} in pod["volumes"]
    assert {"name": "config", "mountPath": crd.CONFIG_DIR, "readOnly": True} in flusher["volumeMounts"]
    assert pod["initContainers"][0]["args"][0] == "migrate"

    status = pipeline["status"]
    assert status["observedGeneration"] == 1 and status["schedule"] == "*/5 * * * *"
    assert status["configMapName"] == "web-sidecar-config" and status["cronJobName"] == "web-flusher"
    for kind in ("Ready", "ConfigMapReady", "CronJobReady"):
        item = condition(pipeline, kind)
        assert item["status"] == "True" and item["reason"] and item["message"] and item["lastTransitionTime"]
    assert {"Created"} <= set(reasons(cluster, "web"))


async def test_spec_update_patches_children_in_place(cluster: Cluster, tmp_path: Path) -> None:
    async with running_operator(cluster, allowed_images=("registry.example/",)):
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: ready(cluster, "web"))
        uids = (cluster.configmap(NS, "web")["metadata"]["uid"], cluster.cronjob(NS, "web")["metadata"]["uid"])
        first_transition = condition(cluster.pipeline(NS, "web"), "Ready")["lastTransitionTime"]

        await cluster.patch_pipeline(NS, "web", {"spec": {
            "counters": {"ttlSeconds": 2 * 86400, "granularities": ["daily"]},
            "flush": {"interval": "15m", "batchSize": 50},
            "ingest": {"dedupWindowSeconds": 0},
            "flusher": {"image": "registry.example/flusher:2", "backoffLimit": 5},
        }})
        await eventually(lambda: ready(cluster, "web", generation=2))

    config = config_of(cluster, "web", tmp_path)
    assert config.counters.ttl_seconds == 2 * 86400 and config.counters.granularities == ("daily",)
    assert config.flush.batch_size == 50 and config.ingest.dedup_window_seconds == 0
    cj = cluster.cronjob(NS, "web")
    assert cj["spec"]["schedule"] == "*/15 * * * *"
    assert cj["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 5
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/flusher:2"
    # patched in place: the same objects, not re-created
    assert (cluster.configmap(NS, "web")["metadata"]["uid"], cj["metadata"]["uid"]) == uids
    status = cluster.pipeline(NS, "web")["status"]
    assert status["schedule"] == "*/15 * * * *"
    assert condition(cluster.pipeline(NS, "web"), "Ready")["lastTransitionTime"] == first_transition
    assert "Updated" in reasons(cluster, "web")


async def test_deleted_and_hand_edited_children_are_repaired(cluster: Cluster) -> None:
    async with running_operator(cluster):
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: ready(cluster, "web"))
        wanted_cm, wanted_cj = cluster.configmap(NS, "web"), cluster.cronjob(NS, "web")

        await cluster.api.request("DELETE", cronjobs_path(NS, "web-flusher"))
        await eventually(lambda: cluster.cronjob(NS, "web") is not None)
        assert cluster.cronjob(NS, "web")["spec"] == wanted_cj["spec"]

        # kubectl edit: another schedule, suspended, an env var removed
        await cluster.api.patch(cronjobs_path(NS, "web-flusher"), {"spec": {
            "schedule": "0 0 1 1 *", "suspend": True,
            "jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "flusher", "image": "evil"}]}}}},
        }})
        await eventually(lambda: cluster.cronjob(NS, "web")["spec"] == wanted_cj["spec"])

        # the ConfigMap: a value changed, a key added, the owner reference stripped
        edited = {crd.CONFIG_KEY: "pipeline: someone/else\n", "extra": "x"}
        await cluster.api.patch(configmaps_path(NS, "web-sidecar-config"),
                                {"data": edited, "metadata": {"ownerReferences": None}})
        await eventually(lambda: cluster.configmap(NS, "web")["data"] == wanted_cm["data"])
        await eventually(lambda: cluster.configmap(NS, "web")["metadata"].get("ownerReferences")
                         == wanted_cm["metadata"]["ownerReferences"])

        await cluster.api.request("DELETE", configmaps_path(NS, "web-sidecar-config"))
        await eventually(lambda: cluster.configmap(NS, "web") is not None)
        assert cluster.configmap(NS, "web")["data"] == wanted_cm["data"]
        await eventually(lambda: ready(cluster, "web"))
    assert reasons(cluster, "web").count("Repaired") >= 3


async def test_resync_timer_repairs_without_child_events(cluster: Cluster) -> None:
    """With no watch on the children, the timer alone brings a deleted CronJob back within its interval."""
    async with running_operator(cluster, resync_seconds=0.5, watch_children=False):
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: ready(cluster, "web"))
        await cluster.api.request("DELETE", cronjobs_path(NS, "web-flusher"))
        assert cluster.cronjob(NS, "web") is None
        await eventually(lambda: cluster.cronjob(NS, "web") is not None, within=5)


async def test_invalid_interval_sets_invalid_spec_once_and_recovers(cluster: Cluster) -> None:
    async with running_operator(cluster, resync_seconds=0.3):
        await cluster.create_pipeline(NS, "web", {**SPEC, "flush": {"interval": "7m"}})
        await eventually(lambda: ready(cluster, "web", status="False"))
        item = condition(cluster.pipeline(NS, "web"), "Ready")
        assert item["reason"] == "InvalidSpec"
        assert "spec.flush.interval" in item["message"] and "60 is not divisible by 7" in item["message"]
        assert "5m" in item["message"] and "flush.schedule" in item["message"]  # says how to fix it
        assert condition(cluster.pipeline(NS, "web"), "CronJobReady")["status"] == "False"
        assert cluster.configmap(NS, "web") is None and cluster.cronjob(NS, "web") is None
        await eventually(lambda: "InvalidSpec" in reasons(cluster, "web"))
        events = cluster.events(NS, "web")
        assert any(e["type"] == "Warning" and "60 is not divisible by 7" in e["message"] for e in events)

        # No endless retry: kopf recorded the handler as done; several resync ticks later, still exactly
        # one warning and not a single write to the object.
        await eventually(lambda: HANDLED in cluster.pipeline(NS, "web")["metadata"].get("annotations", {}))
        version = cluster.pipeline(NS, "web")["metadata"]["resourceVersion"]
        await asyncio.sleep(1.2)
        assert reasons(cluster, "web").count("InvalidSpec") == 1
        assert cluster.pipeline(NS, "web")["metadata"]["resourceVersion"] == version

        await cluster.patch_pipeline(NS, "web", {"spec": {"flush": {"interval": "6m"}}})
        await eventually(lambda: ready(cluster, "web", generation=2))
        assert cluster.cronjob(NS, "web")["spec"]["schedule"] == "*/6 * * * *"


async def test_invalid_update_keeps_last_valid_children(cluster: Cluster) -> None:
    async with running_operator(cluster):
        await cluster.create_pipeline(NS, "web", {**SPEC, "flush": {"schedule": "*/10 * * * *"}})
        await eventually(lambda: ready(cluster, "web"))
        before = cluster.cronjob(NS, "web")["spec"]

        # both schedule and interval
        await cluster.patch_pipeline(NS, "web", {"spec": {"flush": {"interval": "5m"}}})
        await eventually(lambda: ready(cluster, "web", generation=2, status="False"))
        message = condition(cluster.pipeline(NS, "web"), "Ready")["message"]
        assert "not both" in message and "spec.flush" in message

        # a value the config model refuses although the CRD schema accepts it (cross-field rule)
        await cluster.patch_pipeline(NS, "web", {"spec": {"flush": {"interval": None},
                                                          "counters": {"ttlSeconds": 3600},
                                                          "ingest": {"maxPastSeconds": 7200}}})
        await eventually(lambda: ready(cluster, "web", generation=3, status="False"))
        message = condition(cluster.pipeline(NS, "web"), "Ready")["message"]
        assert "spec.ingest.maxPastSeconds" in message and "counters.ttlSeconds" in message
        assert cluster.cronjob(NS, "web")["spec"] == before  # the last valid settings stay in force
        assert cluster.pipeline(NS, "web")["status"]["schedule"] == "*/10 * * * *"


async def test_two_pipelines_in_one_namespace_stay_separate(cluster: Cluster, tmp_path: Path) -> None:
    async with running_operator(cluster):
        await cluster.create_pipeline(NS, "web", {**SPEC, "flush": {"interval": "1h"}})
        await cluster.create_pipeline(NS, "mobile", {**SPEC, "flush": {"schedule": "30 2 * * *"},
                                                     "counters": {"ttlSeconds": 7200}})
        await eventually(lambda: ready(cluster, "web") and ready(cluster, "mobile"))
        await cluster.api.request("DELETE", cronjobs_path(NS, "mobile-flusher"))
        await eventually(lambda: cluster.cronjob(NS, "mobile") is not None)

    web, mobile = config_of(cluster, "web", tmp_path), config_of(cluster, "mobile", tmp_path)
    assert (web.pipeline, mobile.pipeline) == (f"{NS}/web", f"{NS}/mobile")
    assert (web.counters.ttl_seconds, mobile.counters.ttl_seconds) == (604800, 7200)
    assert cluster.cronjob(NS, "web")["spec"]["schedule"] == "0 * * * *"
    assert cluster.cronjob(NS, "mobile")["spec"]["schedule"] == "30 2 * * *"
    for name in ("web", "mobile"):
        cj = cluster.cronjob(NS, name)
        assert cj["metadata"]["ownerReferences"][0]["name"] == name
        volumes = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
        assert volumes[0]["configMap"]["name"] == f"{name}-sidecar-config"
    assert "Repaired" in reasons(cluster, "mobile") and "Repaired" not in reasons(cluster, "web")


async def test_suspend_suspends_the_cronjob(cluster: Cluster) -> None:
    async with running_operator(cluster):
        await cluster.create_pipeline(NS, "web", {**SPEC, "suspend": True})
        await eventually(lambda: ready(cluster, "web"))
        assert cluster.cronjob(NS, "web")["spec"]["suspend"] is True
        assert condition(cluster.pipeline(NS, "web"), "Ready")["reason"] == "Suspended"
        await cluster.patch_pipeline(NS, "web", {"spec": {"suspend": False}})
        await eventually(lambda: ready(cluster, "web", generation=2))
        assert cluster.cronjob(NS, "web")["spec"]["suspend"] is False
        assert condition(cluster.pipeline(NS, "web"), "Ready")["reason"] == "Reconciled"


async def test_last_flush_comes_from_the_cronjob_status(cluster: Cluster) -> None:
    async with running_operator(cluster):
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: ready(cluster, "web"))
        # what the CronJob controller writes after a successful run
        await cluster.api.patch(cronjobs_path(NS, "web-flusher"), {"status": {
            "lastScheduleTime": "2026-11-27T10:00:00Z", "lastSuccessfulTime": "2026-11-27T10:00:07Z"}})
        await eventually(lambda: cluster.pipeline(NS, "web")["status"].get("lastFlush") == {
            "scheduleTime": "2026-11-27T10:00:00Z", "successfulTime": "2026-11-27T10:00:07Z", "result": "Succeeded"})
        # the next run was scheduled, is no longer active, and did not succeed
        await cluster.api.patch(cronjobs_path(NS, "web-flusher"),
                                {"status": {"lastScheduleTime": "2026-11-27T10:05:00Z"}})
        await eventually(lambda: cluster.pipeline(NS, "web")["status"]["lastFlush"]["result"] == "Failed")
        await eventually(lambda: "FlushFailed" in reasons(cluster, "web"))


async def test_foreign_object_with_the_childs_name_is_left_alone(cluster: Cluster) -> None:
    foreign = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "web-sidecar-config", "namespace": NS}, "data": {"mine": "yes"}}
    await cluster.api.create(configmaps_path(NS), foreign)
    async with running_operator(cluster, resync_seconds=0.5):  # a foreign object's events are not watched
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: condition(cluster.pipeline(NS, "web"), "ConfigMapReady").get("reason")
                         == "NameConflict")
        assert condition(cluster.pipeline(NS, "web"), "Ready")["status"] == "False"
        assert cluster.configmap(NS, "web")["data"] == {"mine": "yes"}
        await cluster.api.request("DELETE", configmaps_path(NS, "web-sidecar-config"))
        await eventually(lambda: ready(cluster, "web"), within=5)  # once it is gone, the resync creates ours


async def test_resume_reconciles_what_changed_while_the_operator_was_down(cluster: Cluster) -> None:
    async with running_operator(cluster):
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: ready(cluster, "web"))
    await cluster.api.request("DELETE", configmaps_path(NS, "web-sidecar-config"))
    await cluster.create_pipeline(NS, "late", SPEC)
    async with running_operator(cluster):
        await eventually(lambda: cluster.configmap(NS, "web") is not None and ready(cluster, "late"))
    assert cluster.get(CONFIGMAPS, NS, "late-sidecar-config") and cluster.get(CRONJOBS, NS, "late-flusher")


async def test_helm_selftest_passes_against_the_running_operator(cluster: Cluster, tmp_path: Path) -> None:
    """The `helm test` check (CRD served, list allowed, liveness 200) against the emulator and live operator."""
    port = free_port()
    token = tmp_path / "token"
    token.write_text("test-token", encoding="utf-8")
    argv = ["--api-server", str(cluster.server.url).rstrip("/"), "--token-file", str(token),
            "--namespace", NS, "--operator-url", f"http://127.0.0.1:{port}/healthz", "--wait", "5"]
    async with running_operator(cluster, liveness=f"http://127.0.0.1:{port}/healthz"):
        assert await asyncio.to_thread(selftest.main, argv) == 0
    # operator gone: the liveness check must fail (and say so)
    assert await asyncio.to_thread(selftest.main, [*argv[:-2], "--wait", "0"]) == 1

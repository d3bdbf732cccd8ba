"""The pure injection rules (operator/inject.py): what is added where, and which pods are left alone."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from analytics_pipeline.operator import crd, inject, render
from analytics_pipeline.operator.events import event_body
from analytics_pipeline.operator.webhook import Throttle, find_pipeline, snapshot

SPEC = {"redis": {"secretRef": {"name": "conn"}}, "postgres": {"secretRef": {"name": "conn"}}}
READY = {"conditions": [{"type": "Ready", "status": "True", "reason": "Reconciled", "message": "ok"}]}


def pipeline(spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": crd.API_VERSION, "kind": crd.KIND,
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-1", **meta},
            "spec": copy.deepcopy(spec or SPEC), "status": copy.deepcopy(READY if status is None else status)}


def pod(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "shop", "labels": {crd.LABEL_INJECT: "web"}},
            "spec": {"containers": [{"name": "app", "image": "a"}], **spec}}


def test_injected_container_is_the_published_snippet() -> None:
    """One function renders both: the ConfigMap's sidecar-container.yaml and what the webhook injects."""
    desired = render.desired_state("shop", "web", SPEC, default_image="img:1")
    snippet = yaml.safe_load(desired.configmap["data"][crd.SIDECAR_SNIPPET_KEY])
    for mode, field in (("native", "initContainers"), ("container", "containers")):
        decided = inject.plan(pod(), pipeline(), default_image="img:1", mode=mode)
        assert decided.result is inject.Result.INJECTED
        added = decided.changes[field][-1]
        if mode == "native":
            assert added.pop("restartPolicy") == "Always"
        assert added == snippet["containers"][0]
        assert decided.changes["volumes"] == snippet["volumes"]
    assert "analyticspipeline.io/inject" in desired.configmap["data"][crd.SIDECAR_SNIPPET_KEY]


def test_image_is_the_operators_unless_the_admin_allows_the_pipelines() -> None:
    default = inject.plan(pod(), pipeline(), default_image="op-default:1")
    assert default.changes["initContainers"][0]["image"] == "op-default:1"
    own = pipeline({**SPEC, "sidecar": {"image": "mine:2"}})
    refused = inject.plan(pod(), own, default_image="op-default:1")
    assert refused.result is inject.Result.INVALID_SPEC and not refused.changes
    assert "'mine:2' is not the operator's image" in refused.message
    allowed = inject.plan(pod(), own, default_image="op-default:1", allowed_images=("mine:",))
    assert allowed.changes["initContainers"][0]["image"] == "mine:2"


def test_volume_names_avoid_every_collision() -> None:
    spec = {"volumes": [{"name": "analytics-config", "emptyDir": {}}, {"name": "analytics-config-2", "emptyDir": {}}]}
    assert inject.free_volume_name(spec) == "analytics-config-3"
    decided = inject.plan(pod(**spec), pipeline(), default_image="i")
    assert decided.changes["volumes"][-1] == {"name": "analytics-config-3", "configMap": {"name": "web-sidecar-config"}}
    assert decided.changes["initContainers"][0]["volumeMounts"][0]["name"] == "analytics-config-3"


@pytest.mark.parametrize(("status", "why"), [
    ({}, "has not reconciled it yet"),
    ({"conditions": [{"type": "Ready", "status": "False", "reason": "NameConflict", "message": "m"}]}, "NameConflict"),
    ({"conditions": [{"type": "Ready", "status": "Unknown"}]}, "Unknown"),
])
def test_pipeline_must_be_ready(status: dict[str, Any], why: str) -> None:
    decided = inject.plan(pod(), pipeline(status=status), default_image="i")
    assert decided.result is inject.Result.PIPELINE_NOT_READY and not decided.changes
    assert why in decided.message


def test_a_pipeline_being_deleted_is_not_ready() -> None:
    decided = inject.plan(pod(), pipeline(deletionTimestamp="2026-01-01T00:00:00Z"), default_image="i")
    assert decided.result is inject.Result.PIPELINE_NOT_READY and "being deleted" in decided.message


def test_port_conflict_and_invalid_spec_are_skipped_with_the_fix() -> None:
    taken = pod(containers=[{"name": "app", "image": "a", "ports": [{"containerPort": 8787}]}])
    decided = inject.plan(taken, pipeline(), default_image="i")
    assert decided.result is inject.Result.PORT_CONFLICT and "spec.sidecar.port" in decided.message
    assert inject.plan(taken, pipeline({**SPEC, "sidecar": {"port": 9000}}), default_image="i").result \
        is inject.Result.INJECTED
    probes_taken = pod(containers=[{"name": "app", "image": "a", "ports": [{"containerPort": 8788}]}])
    decided = inject.plan(probes_taken, pipeline(), default_image="i")
    assert decided.result is inject.Result.PORT_CONFLICT and "spec.sidecar.healthPort" in decided.message
    bad = inject.plan(pod(), pipeline({**SPEC, "sidecar": {"imagePullPolicy": "Sometimes"}}), default_image="i")
    assert bad.result is inject.Result.INVALID_SPEC and "sidecar.imagePullPolicy" in bad.message


def test_already_injected_wins_over_everything_and_unknown_mode_is_refused() -> None:
    carrying = pod(initContainers=[{"name": crd.SIDECAR_CONTAINER_NAME, "image": "x"}])
    assert inject.plan(carrying, None, default_image="i").result is inject.Result.ALREADY_INJECTED
    assert inject.plan(pod(), None, default_image="i").result is inject.Result.UNKNOWN_PIPELINE
    with pytest.raises(ValueError, match="native, container"):
        inject.plan(pod(), pipeline(), default_image="i", mode="sidecar")


def test_running_with_sidecar_counts_only_running_carrying_labelled_pods() -> None:
    carrying = inject.apply(pod(), inject.plan(pod(), pipeline(), default_image="i"))
    pods = [{**carrying, "status": {"phase": "Running"}},
            {**carrying, "status": {"phase": "Succeeded"}},
            {**carrying, "metadata": {**carrying["metadata"], "deletionTimestamp": "x"},
             "status": {"phase": "Running"}},
            {**pod(), "status": {"phase": "Running"}},
            {**carrying, "metadata": {"labels": {crd.LABEL_INJECT: "other"}}, "status": {"phase": "Running"}}]
    assert inject.running_with_sidecar(pods, "web") == 1


async def test_find_pipeline_uses_the_index_first() -> None:
    class NoApi:
        async def get(self, path: str) -> None:
            raise AssertionError(f"the index had it, yet {path} was fetched")

    index = {("shop", "web"): [snapshot(pipeline())]}
    found = await find_pipeline(index, NoApi(), "shop", "web")  # type: ignore[arg-type]
    assert found is not None and found["metadata"]["uid"] == "u-1" and found["status"] == READY


def test_snapshot_event_body_and_throttle() -> None:
    kept = snapshot({**pipeline(), "metadata": {**pipeline()["metadata"], "managedFields": [{"x": 1}]}})
    assert set(kept["metadata"]) == {"name", "namespace", "uid"}
    body = event_body(kept, "InjectionSkipped", "m" * 5000)
    assert body["involvedObject"] == {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "name": "web",
                                      "namespace": "shop", "uid": "u-1"}
    assert body["metadata"] == {"generateName": "web.", "namespace": "shop"} and len(body["message"]) == 1000
    throttle = Throttle(60)
    assert throttle.allow(("shop", "x")) and not throttle.allow(("shop", "x"))
    assert throttle.allow(("shop", "y"))


def test_throttle_table_is_bounded() -> None:
    """A flood of distinct keys (say, reviews naming 10,000 made-up pipelines in as many namespaces) keeps at most
    max_keys windows; the newest keys are still throttled."""
    throttle = Throttle(3600, burst=2, max_keys=100)
    for number in range(10_000):
        assert throttle.allow(f"ns-{number}")
    assert len(throttle) == 100
    assert throttle.allow("ns-9999") and not throttle.allow("ns-9999")  # its burst of 2 is used up


async def test_find_pipeline_limits_api_lookups_per_namespace() -> None:
    class Api:
        calls = 0

        async def get(self, path: str) -> None:
            self.calls += 1

    api, lookups = Api(), Throttle(3600, burst=3)
    for number in range(50):
        assert await find_pipeline({}, api, "shop", f"made-up-{number}", lookups) is None  # type: ignore[arg-type]
    assert api.calls == 3
    assert await find_pipeline({}, api, "other", "x", lookups) is None  # type: ignore[arg-type]
    assert api.calls == 4


async def test_find_pipeline_reads_a_not_ready_entry_fresh() -> None:
    """The index trails the watch: an entry that is not Ready there is checked against the API server."""
    class Api:
        paths: list[str] = []

        async def get(self, path: str) -> dict[str, Any]:
            self.paths.append(path)
            return pipeline()

    api = Api()
    stale = snapshot(pipeline(status={}))
    found = await find_pipeline({("shop", "web"): [stale]}, api, "shop", "web")  # type: ignore[arg-type]
    assert found is not None and inject.pipeline_ready(found) == (True, "")
    assert api.paths == [f"/apis/{crd.GROUP}/{crd.VERSION}/namespaces/shop/{crd.PLURAL}/web"]

"""Pure rules of the operator: interval → cron, schedule checks, spec → Config errors, drift, last flush."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kopf
import kubernetes_validate
import pytest
import yaml
from operator_harness import validate_against_crd

from analytics_pipeline.core.config import load_config
from analytics_pipeline.operator import crd, render
from analytics_pipeline.operator.reconcile import flush_status

MINIMAL = {"redis": {"secretRef": {"name": "conn"}}, "postgres": {"secretRef": {"name": "conn"}}}


@pytest.mark.parametrize(("interval", "schedule"), [
    ("1m", "* * * * *"), ("5m", "*/5 * * * *"), ("6m", "*/6 * * * *"), ("30m", "*/30 * * * *"),
    ("60m", "0 * * * *"), ("120m", "0 */2 * * *"), ("1h", "0 * * * *"), ("8h", "0 */8 * * *"),
    ("12h", "0 */12 * * *"), ("24h", "0 0 * * *"), ("1440m", "0 0 * * *"), ("1d", "0 0 * * *"),
])
def test_intervals_that_map_exactly(interval: str, schedule: str) -> None:
    assert render.interval_to_schedule(interval) == schedule


@pytest.mark.parametrize(("interval", "why"), [
    ("7m", "60 is not divisible by 7"), ("45m", "60 is not divisible by 45"), ("90m", "not a whole number of hours"),
    ("5h", "24 is not divisible by 5"), ("36h", "not a whole number of days"), ("2d", "months are not divisible"),
    ("0m", "not an interval"), ("30s", "not an interval"), ("5", "not an interval"), ("", "not an interval"),
])
def test_intervals_that_do_not_map_say_why_and_what_to_use(interval: str, why: str) -> None:
    with pytest.raises(render.InvalidSpec) as caught:
        render.interval_to_schedule(interval)
    assert caught.value.field == "flush.interval"
    assert why in str(caught.value) and "10m" in str(caught.value) and "flush.schedule" in str(caught.value)


@pytest.mark.parametrize("schedule", ["*/5 * * * *", "0 0 * * MON-FRI", "30 2 1,15 * *", "0 9 ? jan-mar 1",
                                      "@hourly", "@daily", "0  */2 * * *", "0-30/10 * * * 7"])
def test_valid_schedules(schedule: str) -> None:
    assert render.validate_schedule(schedule) == " ".join(schedule.split())


@pytest.mark.parametrize(("schedule", "why"), [
    ("* * * *", "has 4 fields"), ("60 * * * *", "outside 0-59"), ("* 24 * * *", "outside 0-23"),
    ("* * 0 * *", "outside 1-31"), ("*/0 * * * *", "step"), ("30-10 * * * *", "backwards"),
    ("@every 5m", "flush.interval"), ("TZ=UTC 0 * * * *", "UTC"), ("0 0 * FOO *", "not a number"),
])
def test_invalid_schedules(schedule: str, why: str) -> None:
    with pytest.raises(render.InvalidSpec) as caught:
        render.validate_schedule(schedule)
    assert why in str(caught.value)


def test_schedule_and_interval_are_exclusive_and_default_is_five_minutes() -> None:
    assert render.effective_schedule({}) == "*/5 * * * *"
    assert render.effective_schedule({"flush": {"schedule": "0 3 * * *"}}) == "0 3 * * *"
    with pytest.raises(render.InvalidSpec, match="not both"):
        render.effective_schedule({"flush": {"schedule": "0 3 * * *", "interval": "5m"}})


@pytest.mark.parametrize(("patch", "field", "words"), [
    ({"counters": {"ttlSeconds": 60}}, "counters.ttlSeconds", "greater than or equal to 3600"),
    ({"counters": {"granularities": ["daily", "daily"]}}, "counters.granularities", "once"),
    ({"ingest": {"maxPastSeconds": 10 ** 7}}, "ingest.maxPastSeconds", "exceeds counters.ttlSeconds"),
    ({"flush": {"batchSize": "many"}}, "flush.batchSize", "integer"),
    ({"sidecar": {"port": 0}}, "sidecar.port", "between 1 and 65535"),
    ({"flusher": {"backoffLimit": 11}}, "flusher.backoffLimit", "between 0 and 10"),
    ({"flusher": {"resources": {"limits": {"memory": "lots"}}}}, "flusher.resources.limits.memory", "quantity"),
    ({"redis": {"secretRef": {"name": ""}}}, "redis.secretRef.name", "Secret"),
    ({"postgres": None}, "postgres.secretRef.name", "Secret"),
    ({"counters": "big"}, "counters", "object"),
])
def test_spec_errors_name_the_spec_field(patch: dict[str, Any], field: str, words: str) -> None:
    spec = {**copy.deepcopy(MINIMAL), **patch}
    with pytest.raises(render.InvalidSpec) as caught:
        render.desired_state("ns", "web", spec, default_image="img:1")
    assert caught.value.field == field and words in str(caught.value)


def test_name_too_long_for_a_cronjob_is_refused() -> None:
    with pytest.raises(render.InvalidSpec, match="52 characters"):
        render.desired_state("ns", "x" * 45, MINIMAL, default_image="img:1")


def test_configmap_is_loadable_by_the_sidecars_loader_and_has_no_secrets(tmp_path: Path) -> None:
    spec = {**copy.deepcopy(MINIMAL), "ingest": {"maxBatchEvents": 10, "maxPastSeconds": 7200},
            "sidecar": {"port": 9000}, "flush": {"retentionDays": 30, "deadLetterAfterFailures": 5}}
    desired = render.desired_state("shop", "checkout", spec, default_image="img:1")
    path = tmp_path / crd.CONFIG_KEY
    path.write_text(desired.configmap["data"][crd.CONFIG_KEY], encoding="utf-8")
    config = load_config(path, env={})
    assert config == desired.config
    assert config.pipeline == "shop/checkout" and config.ingest.max_batch_events == 10
    assert config.server.port == 9000 and config.server.host == "127.0.0.1" and config.flush.retention_days == 30
    assert (config.server.health_host, config.server.health_port) == ("0.0.0.0", 8788)
    assert config.flush.dead_letter_after_failures == 5
    assert "redis_url" not in yaml.safe_load(path.read_text()) and "database_url" not in path.read_text()


def test_batch_acceptance_and_counted_calls_come_from_the_spec(tmp_path: Path) -> None:
    default = render.desired_state("shop", "checkout", MINIMAL, default_image="img:1").config.ingest
    assert default.all_or_nothing is False and "identify" in default.uncounted_events
    spec = {**copy.deepcopy(MINIMAL), "ingest": {"allOrNothing": True, "uncountedEvents": []}}
    desired = render.desired_state("shop", "checkout", spec, default_image="img:1")
    path = tmp_path / crd.CONFIG_KEY
    path.write_text(desired.configmap["data"][crd.CONFIG_KEY], encoding="utf-8")
    ingest = load_config(path, env={}).ingest
    assert ingest.all_or_nothing is True and ingest.uncounted_events == ()
    with pytest.raises(render.InvalidSpec, match=r"ingest\.allOrNothing"):
        render.desired_state("shop", "checkout", {**MINIMAL, "ingest": {"allOrNothing": "yes"}}, default_image="i")


def test_sidecar_snippet_is_a_usable_container() -> None:
    desired = render.desired_state("shop", "checkout", MINIMAL, default_image="img:1")
    snippet = yaml.safe_load(desired.configmap["data"][crd.SIDECAR_SNIPPET_KEY])
    (container,) = snippet["containers"]
    # Only the probe listener is declared (ingest listens on loopback), and every probe goes there.
    assert container["ports"] == [{"name": "analytics-ops", "containerPort": 8788, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "analytics-ops"
    assert container["args"][:3] == ["sidecar", "--config", crd.CONFIG_PATH]
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "conn", "key": "redis-url"}
    assert snippet["volumes"] == [{"name": "analytics-config", "configMap": {"name": "checkout-sidecar-config"}}]
    assert container["volumeMounts"][0]["mountPath"] == crd.CONFIG_DIR


def test_migrations_init_container_can_be_turned_off() -> None:
    spec = {**copy.deepcopy(MINIMAL), "flusher": {"runMigrations": False}}
    pod = render.desired_state("ns", "web", spec, default_image="i")
    assert "initContainers" not in pod.cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_contains_ignores_server_defaults_but_not_changes() -> None:
    want = {"spec": {"a": 1, "list": [{"x": "1"}], "res": {"cpu": "0.5", "memory": "1Gi"}}}
    have = copy.deepcopy(want)
    have["spec"]["dnsPolicy"] = "ClusterFirst"  # server default
    have["spec"]["list"][0]["terminationMessagePath"] = "/dev/termination-log"
    have["spec"]["res"] = {"cpu": "500m", "memory": "1024Mi"}  # canonicalised quantities
    assert render.contains(have, want)
    assert not render.contains({**have, "spec": {**have["spec"], "a": 2}}, want)
    assert not render.contains({**have, "spec": {**have["spec"], "list": [{"x": "1"}, {"y": 2}]}}, want)
    assert not render.contains({"spec": {"a": True}}, {"spec": {"a": 1}})
    assert render.parse_quantity("1Ki") == 1024 and render.parse_quantity("2e3") == 2000


@pytest.mark.parametrize(("status", "expected"), [
    ({}, None),
    ({"lastScheduleTime": "2026-01-01T10:00:00Z", "lastSuccessfulTime": "2026-01-01T10:00:05Z"}, "Succeeded"),
    ({"lastScheduleTime": "2026-01-01T10:05:00Z", "lastSuccessfulTime": "2026-01-01T10:00:05Z"}, "Failed"),
    ({"lastScheduleTime": "2026-01-01T10:05:00Z", "active": [{"name": "job"}]}, "Running"),
    ({"lastScheduleTime": "2026-01-01T10:05:00Z"}, "Failed"),
])
def test_last_flush_result(status: dict[str, Any], expected: str | None) -> None:
    result = flush_status({"status": status})
    assert (result or {}).get("result") == expected


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.utils.latest_version()])
def test_children_are_valid_kubernetes_objects(version: str) -> None:
    """The ConfigMap and CronJob as the operator applies them (owner reference included), strictly validated."""
    spec = {**copy.deepcopy(MINIMAL), "flush": {"interval": "10m"}, "suspend": True}
    desired = render.desired_state("shop", "checkout", spec, default_image="registry.example/ap:1")
    owner = {"apiVersion": crd.API_VERSION, "kind": crd.KIND,
             "metadata": {"name": "checkout", "namespace": "shop", "uid": "0b2c-uid", "labels": {"team": "x"}}}
    for child in (desired.configmap, desired.cronjob):
        child = copy.deepcopy(child)
        kopf.adopt(child, owner=owner)
        assert child["metadata"]["ownerReferences"][0]["controller"] is True
        kubernetes_validate.validate(child, version, strict=True)
    snippet = yaml.safe_load(desired.configmap["data"][crd.SIDECAR_SNIPPET_KEY])
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app"},
           "spec": {"containers": [{"name": "app", "image": "app:1"}, *snippet["containers"]],
                    "volumes": snippet["volumes"]}}
    kubernetes_validate.validate(pod, version, strict=True)


def test_a_flush_leaving_dead_letters_fails_its_job_at_once() -> None:
    # exit 3 (flushed, but set-aside units wait): no backoff retries; the CronJob records a failed run,
    # which the operator reports as lastFlush.result Failed and a FlushFailed Warning Event
    from analytics_pipeline.flusher.cli import DEAD_LETTER_EXIT

    job = render.desired_state("ns", "web", MINIMAL, default_image="i").cronjob["spec"]["jobTemplate"]["spec"]
    assert job["podFailurePolicy"] == {"rules": [{"action": "FailJob", "onExitCodes": {
        "containerName": "flusher", "operator": "In", "values": [DEAD_LETTER_EXIT]}}]}
    assert job["template"]["spec"]["restartPolicy"] == "Never"  # what podFailurePolicy requires


def sidecar_of(desired: render.Desired) -> dict[str, Any]:
    return yaml.safe_load(desired.configmap["data"][crd.SIDECAR_SNIPPET_KEY])["containers"][0]


def test_ingest_stays_on_loopback_unless_the_spec_exposes_it() -> None:
    old_default = {**copy.deepcopy(MINIMAL), "sidecar": {"host": "0.0.0.0"}}  # stored by the previous CRD
    desired = render.desired_state("ns", "web", old_default, default_image="i")
    assert desired.config.server.host == "127.0.0.1"
    assert [reason for reason, _ in desired.warnings] == ["HostIgnored", "WriterCredentialsInSidecar"]
    assert "exposeIngest" in desired.warnings[0][1]
    exposed = {**copy.deepcopy(MINIMAL), "sidecar": {"host": "0.0.0.0", "exposeIngest": True}}
    desired = render.desired_state("ns", "web", exposed, default_image="i")
    assert desired.config.server.host == "0.0.0.0"
    assert desired.warnings[0][0] == "IngestExposed" and "NetworkPolicy" in desired.warnings[0][1]
    assert sidecar_of(desired)["ports"] == [{"name": "analytics", "containerPort": 8787, "protocol": "TCP"},
                                            {"name": "analytics-ops", "containerPort": 8788, "protocol": "TCP"}]
    same = {**copy.deepcopy(MINIMAL), "sidecar": {"healthPort": 8787}}
    with pytest.raises(render.InvalidSpec, match=r"must differ from sidecar\.port"):
        render.desired_state("ns", "web", same, default_image="i")


def test_the_sidecar_gets_the_read_only_credentials_and_the_flusher_the_writers() -> None:
    spec = {**copy.deepcopy(MINIMAL), "postgres": {"secretRef": {"name": "writer", "key": "w"},
                                                   "readSecretRef": {"name": "reader"}}}
    desired = render.desired_state("ns", "web", spec, default_image="i")
    assert desired.warnings == []
    sidecar_env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in sidecar_of(desired)["env"]
                   if "secretKeyRef" in item["valueFrom"]}
    assert sidecar_env == {"REDIS_URL": {"name": "conn", "key": "redis-url"},
                           "DATABASE_URL": {"name": "reader", "key": "database-read-url"}}
    pod = desired.cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    for container in [*pod["containers"], *pod["initContainers"]]:
        refs = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"]}
        assert refs == {"REDIS_URL": {"name": "conn", "key": "redis-url"},
                        "DATABASE_URL": {"name": "writer", "key": "w"}}  # never the reader's
        assert "reader" not in yaml.safe_dump(container)
    # Without readSecretRef the sidecar holds the writer's: said, not hidden.
    plain = render.desired_state("ns", "web", MINIMAL, default_image="i")
    assert sidecar_of(plain)["env"][1]["valueFrom"]["secretKeyRef"] == {"name": "conn", "key": "database-url"}
    assert plain.warnings[-1][0] == "WriterCredentialsInSidecar"


def test_only_named_secret_keys_reach_the_containers_by_reference() -> None:
    """secretKeyRefs only (resolved in the pod's = the pipeline's namespace): no envFrom, no Secret volume, no
    namespace anywhere in a reference, no connection string copied."""
    spec = {**copy.deepcopy(MINIMAL), "postgres": {"secretRef": {"name": "conn"}, "readSecretRef": {"name": "ro"}}}
    desired = render.desired_state("ns", "web", spec, default_image="i")
    pod = desired.cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    for container in [*pod["containers"], *pod["initContainers"], sidecar_of(desired)]:
        assert "envFrom" not in container
        for item in container["env"]:
            if item["name"] == "POD_NAME":  # the downward API's pod name, no secret
                assert item["valueFrom"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}
                continue
            assert set(item) == {"name", "valueFrom"} and set(item["valueFrom"]) == {"secretKeyRef"}
            assert set(item["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    assert all("secret" not in volume for volume in pod["volumes"])


@pytest.mark.parametrize(("image", "allowed", "ok"), [
    ("op:1", (), True),  # the operator's own image is always allowed
    ("evil/miner:1", (), False),
    ("registry.example.com/team/ap:2", ("registry.example.com/team/",), True),
    ("registry.example.com/teamx/ap:2", ("registry.example.com/team/",), False),
    ("registry.example.com.evil.io/team/ap:2", ("registry.example.com/",), False),
    ("registry.example.com/ap:2", ("registry.example.com/ap:",), True),
    ("registry.example.com/ap-other:2", ("registry.example.com/ap:",), False),
    ("registry.example.com/ap@sha256:abc", ("registry.example.com/ap@",), True),
    ("registry.example.com/ap:2", ("registry.example.com/ap:2",), True),
])
def test_images_come_from_the_operator_unless_the_admin_allows_them(image: str, allowed: tuple[str, ...],
                                                                    ok: bool) -> None:
    for section in ("sidecar", "flusher"):
        spec = {**copy.deepcopy(MINIMAL), section: {"image": image}}
        if ok:
            render.desired_state("ns", "web", spec, default_image="op:1", allowed_images=allowed)
            continue
        with pytest.raises(render.ImageNotAllowed) as caught:
            render.desired_state("ns", "web", spec, default_image="op:1", allowed_images=allowed)
        assert caught.value.reason == "ImageNotAllowed" and caught.value.field == f"{section}.image"
        assert "operator.allowedImages" in str(caught.value)


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.utils.latest_version()])
def test_unquoted_fractional_quantities_are_accepted_and_rendered(version: str) -> None:
    """`cpu: 0.25` (a YAML number), as a Pod takes it: accepted by the CRD, rendered into valid containers."""
    resources = {"requests": {"cpu": 0.25, "memory": "64Mi"}, "limits": {"cpu": 1, "memory": "128Mi"}}
    spec = {**copy.deepcopy(MINIMAL), "sidecar": {"resources": resources}, "flusher": {"resources": resources}}
    validate_against_crd({"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "web"},
                          "spec": spec})
    desired = render.desired_state("ns", "web", spec, default_image="i")
    assert sidecar_of(desired)["resources"]["requests"]["cpu"] == 0.25
    kubernetes_validate.validate(desired.cronjob, version, strict=True)
    for bad in ({"cpu": {"value": 1}}, {"cpu": [1]}, {"cpu": True}, {"memory": "lots"}):
        spec = {**copy.deepcopy(MINIMAL), "sidecar": {"resources": {"requests": bad}}}
        with pytest.raises(render.InvalidSpec, match=r"must be a quantity such as '100m', 0\.25"):
            render.desired_state("ns", "web", spec, default_image="i")


def test_the_sidecar_knows_its_pod_name_to_pick_its_shard() -> None:
    """POD_NAME from the downward API (metadata.name) in the sidecar snippet (the webhook injects the same
    container: tests/webhook/test_injection.py); the flusher's containers do not need it."""
    desired = render.desired_state("ns", "web", MINIMAL, default_image="i")
    env = {item["name"]: item for item in sidecar_of(desired)["env"]}
    assert env["POD_NAME"] == {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1",
                                                                             "fieldPath": "metadata.name"}}}
    pod = desired.cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert all(item["name"] != "POD_NAME" for c in [*pod["containers"], *pod["initContainers"]] for item in c["env"])

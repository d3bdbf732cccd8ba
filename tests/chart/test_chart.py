"""The Helm chart, checked with a real Helm 3.17: lint, render, validate every object offline."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from support import REPO

from analytics_pipeline.operator import crd

CHART = REPO / "charts" / "analytics-pipeline"
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
ALL_ON = ["--set", "examplePipeline.enabled=true", "--set", "serviceMonitor.enabled=true",
          "--set", "grafanaDashboard.enabled=true"]
CUSTOM_RESOURCES = {("analyticspipeline.io/v1alpha1", "AnalyticsPipeline"),
                    ("monitoring.coreos.com/v1", "ServiceMonitor")}


def helm_run(helm: Path, *args: str, chart: Path = CHART, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args, str(chart)], capture_output=True, text=True, timeout=120, check=check)


def render(helm: Path, *values: str, chart: Path = CHART) -> list[dict[str, Any]]:
    """`helm template` (with the CRD) as a list of objects."""
    result = subprocess.run([str(helm), "template", "demo", str(chart), "--namespace", "analytics", "--include-crds",
                             *values], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def crd_schema() -> dict[str, Any]:
    manifest = yaml.safe_load(crd.crd_path().read_text(encoding="utf-8"))
    return manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(obj["kind"] for obj in objects)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


@pytest.mark.parametrize("values", [[], ALL_ON, [*ALL_ON, "--set", "operator.watchNamespaces={team-a,team-b}"]],
                         ids=["defaults", "all-optional-parts", "namespaced"])
def test_lint_strict(helm: Path, values: list[str]) -> None:
    result = helm_run(helm, "lint", "--strict", *values, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def validate_object(obj: dict[str, Any], servicemonitor_check: Path | None = None) -> None:
    """Every object against its schema: Kubernetes' own (strict), the CRD's, or the Prometheus Operator's."""
    key = (obj["apiVersion"], obj["kind"])
    if key == ("analyticspipeline.io/v1alpha1", "AnalyticsPipeline"):
        jsonschema.validate(obj, crd_schema(), cls=jsonschema.Draft7Validator)
        return
    if key == ("monitoring.coreos.com/v1", "ServiceMonitor"):
        assert servicemonitor_check is not None
        result = subprocess.run(["node", str(servicemonitor_check), json.dumps(obj)], capture_output=True, text=True,
                                timeout=60, cwd=servicemonitor_check.parent)
        assert result.returncode == 0, f"ServiceMonitor invalid: {result.stdout}{result.stderr}"
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def test_default_render_is_valid_kubernetes(helm: Path) -> None:
    objects = render(helm)
    assert kinds(objects) == sorted(["CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                     "Service", "Deployment", "ServiceAccount", "Role", "RoleBinding", "Pod",
                                     "Secret", "MutatingWebhookConfiguration"])  # the injection webhook
    for obj in objects:
        validate_object(obj)


def test_every_optional_part_renders_valid_objects(helm: Path, servicemonitor_validator: Path) -> None:
    objects = render(helm, *ALL_ON, "--set", "operator.watchNamespaces={team-a,team-b}")
    assert {"AnalyticsPipeline", "ServiceMonitor", "ConfigMap"} <= set(kinds(objects))
    assert "ClusterRole" not in kinds(objects) and len(by_kind(objects, "Role")) == 3  # 2 namespaces + the test's
    for obj in objects:
        validate_object(obj, servicemonitor_validator)
    assert {(o["apiVersion"], o["kind"]) for o in objects} >= CUSTOM_RESOURCES


def test_servicemonitor_check_has_teeth(servicemonitor_validator: Path) -> None:
    bad = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"},
           "spec": {"selector": {}, "endpoints": [{"port": "analytics", "interval": "30 seconds"}]}}
    with pytest.raises(AssertionError, match="interval"):
        validate_object(bad, servicemonitor_validator)


def test_operator_deployment_is_single_recreate_probed_and_locked_down(helm: Path) -> None:
    (deployment,) = by_kind(render(helm), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "operator" and "--standalone" in container["args"]
    assert "--all-namespaces" in container["args"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["ANALYTICS_PIPELINE_IMAGE"] == container["image"] == "analytics-pipeline:0.1.0"


def test_rbac_is_least_privilege(helm: Path) -> None:
    (role,) = by_kind(render(helm), "ClusterRole")
    rules = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
             for group in rule["apiGroups"] for resource in rule["resources"]}
    assert rules == {
        ("analyticspipeline.io", "analyticspipelines"): {"get", "list", "watch", "patch"},
        ("analyticspipeline.io", "analyticspipelines/status"): {"get", "patch"},
        ("", "configmaps"): {"get", "list", "watch", "create", "patch"},
        ("batch", "cronjobs"): {"get", "list", "watch", "create", "patch"},
        ("", "events"): {"create"},
        ("", "pods"): {"list"},  # counting the pods that carry a pipeline's sidecar (status.injectedPods)
    }
    text = (CHART / "templates" / "rbac.yaml").read_text()
    assert text.count("\n# ") >= 5  # every rule says why it exists


def test_namespaced_install_has_no_cluster_wide_rights(helm: Path) -> None:
    objects = render(helm, "--set", "operator.watchNamespaces={team-a,team-b}")
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    roles = {obj["metadata"]["namespace"] for obj in by_kind(objects, "Role")}
    assert roles == {"team-a", "team-b", "analytics"}  # + the read-only role of the helm test
    (deployment,) = by_kind(objects, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_helm_test_pod_checks_crd_and_operator_via_its_service(helm: Path) -> None:
    objects = render(helm)
    (pod,) = by_kind(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "analytics_pipeline.operator.selftest"]
    (service,) = by_kind(objects, "Service")
    url = f"--operator-url=http://{service['metadata']['name']}.analytics.svc:8080/healthz"
    assert url in container["args"]
    test_role = next(role for role in by_kind(objects, "Role") if role["metadata"]["name"].endswith("-test"))
    assert test_role["rules"] == [{"apiGroups": ["analyticspipeline.io"], "resources": ["analyticspipelines"],
                                   "verbs": ["get", "list"]}]
    assert pod["spec"]["serviceAccountName"] == test_role["metadata"]["name"]


def test_example_pipeline_is_valid_against_the_crd_and_the_operator(helm: Path) -> None:
    (pipeline,) = by_kind(render(helm, "--set", "examplePipeline.enabled=true"), "AnalyticsPipeline")
    jsonschema.validate(pipeline, crd_schema(), cls=jsonschema.Draft7Validator)
    from analytics_pipeline.operator import render as operator_render
    desired = operator_render.desired_state("analytics", pipeline["metadata"]["name"], pipeline["spec"],
                                            default_image="img:1")
    assert desired.schedule == "*/5 * * * *" and desired.config.pipeline == "analytics/example"


def test_crd_in_the_chart_is_the_one_the_operator_tests_use(helm: Path) -> None:
    (definition,) = by_kind(render(helm), "CustomResourceDefinition")
    assert definition == yaml.safe_load(crd.crd_path().read_text(encoding="utf-8"))
    assert crd.crd_path().parent == CHART / "crds"


@pytest.mark.parametrize(("args", "complaint"), [
    (["--set", "operator.resyncSecond=5"], "resyncSecond"),  # misspelled key
    (["--set", "imagee.tag=x"], "imagee"),  # misspelled top-level key
    (["--set", "image.tag=5"], "tag"),  # wrong type: a number, not a string
    (["--set", "operator.logLevel=verbose"], "logLevel"),
    (["--set", "examplePipeline.interval=5s"], "interval"),
])
def test_values_schema_refuses_unknown_keys_and_wrong_types(helm: Path, args: list[str], complaint: str) -> None:
    for command in (["template", "demo"], ["lint", "--strict"]):
        result = helm_run(helm, *command, *args, check=False)
        assert result.returncode != 0, f"helm {command[0]} accepted {args}"
        assert complaint in result.stdout + result.stderr


def test_values_yaml_documents_every_key() -> None:
    """Every key down to the second level has a comment right above it (deeper keys are plain resources)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    checked = 0
    for index, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if indent > 2 or not line.strip() or line.lstrip().startswith(("#", "-")) or ":" not in line:
            continue
        assert lines[index - 1].lstrip().startswith("#"), f"values.yaml:{index + 1} '{line.strip()}' has no comment"
        checked += 1
    assert checked >= 30


def test_notes_tell_what_to_do_next(helm: Path, tmp_path: Path) -> None:
    """NOTES.txt rendered with the chart's values (Helm renders NOTES only on install; tpl does the same)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "files" / "notes.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "zz-notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n'
        '    {{- tpl (.Files.Get "files/notes.txt") . | nindent 4 }}\n')
    result = subprocess.run([str(helm), "template", "demo", str(chart), "--namespace", "analytics",
                             "--show-only", "templates/zz-notes.yaml", "--set", "grafanaDashboard.enabled=true"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["data"]["notes"]
    for needle in ("kubectl -n <app-namespace> get analyticspipelines", "create secret generic analytics-connections",
                   "sidecar-container", "8787", "helm test demo", "dashboard", "kind: AnalyticsPipeline"):
        assert needle in notes, needle

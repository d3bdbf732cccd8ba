"""The chart's security posture, rendered by a real Helm: the operator's NetworkPolicy (webhook in, API server
and DNS out, nothing else), the admin's image allow-list reaching the operator, the ServiceMonitor on the
sidecar's probe port (the port the operator declares and probes), and RBAC written down verb by verb."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml
from support import REPO

sys.path.append(str(Path(__file__).resolve().parent))
from test_chart import ALL_ON, by_kind, render, validate_object

from analytics_pipeline.operator import crd
from analytics_pipeline.operator import render as operator_render

POLICY_ON = ["--set", "networkPolicy.enabled=true"]


def policy(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = by_kind(objects, "NetworkPolicy")
    return found


def test_network_policy_is_off_by_default(helm: Path) -> None:
    assert not by_kind(render(helm), "NetworkPolicy")


def test_network_policy_opens_the_webhook_and_closes_everything_else(helm: Path) -> None:
    objects = render(helm, *POLICY_ON)
    found = policy(objects)
    validate_object(found)
    spec = found["spec"]
    (deployment,) = by_kind(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()  # it selects the operator's pod
    assert spec["policyTypes"] == ["Ingress", "Egress"]  # both directions closed unless listed
    webhook, helm_test = spec["ingress"]
    assert webhook == {"ports": [{"port": "webhook", "protocol": "TCP"}]}  # the API server, from wherever it is
    assert helm_test["ports"] == [{"port": "health", "protocol": "TCP"}]
    assert helm_test["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "test"
    container_ports = {port["name"] for port in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {"webhook", "health"} <= container_ports  # named ports the policy refers to exist
    api, dns = spec["egress"]
    assert api == {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]}
    assert dns["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                          "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]


def test_network_policy_narrows_to_the_api_servers_addresses_and_lets_monitoring_in(helm: Path,
                                                                                  tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"networkPolicy": {
        "enabled": True, "apiServerCIDRs": ["10.0.0.1/32", "fd00::1/128"],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}}))
    found = policy(render(helm, "-f", str(values)))
    validate_object(found)
    api = found["spec"]["egress"][0]
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}, {"ipBlock": {"cidr": "fd00::1/128"}}]
    monitoring = found["spec"]["ingress"][2]
    assert monitoring["ports"] == [{"port": "health", "protocol": "TCP"}, {"port": "metrics", "protocol": "TCP"}]
    # Without the webhook, its port is not opened either.
    found = policy(render(helm, *POLICY_ON, "--set", "webhook.enabled=false"))
    assert all(rule["ports"] != [{"port": "webhook", "protocol": "TCP"}] for rule in found["spec"]["ingress"])


def test_allowed_images_reach_the_operator(helm: Path) -> None:
    objects = render(helm, "--set", "operator.allowedImages={registry.example.com/team/,mirror.example/ap:}")
    (deployment,) = by_kind(objects, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [arg for arg in args if arg.startswith("--allowed-image")] == [
        "--allowed-image=registry.example.com/team/", "--allowed-image=mirror.example/ap:"]
    (deployment,) = by_kind(render(helm), "Deployment")
    assert not [arg for arg in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
                if arg.startswith("--allowed-image")]  # by default: the operator's image only


def test_servicemonitor_scrapes_the_port_the_operator_declares_and_probes(helm: Path) -> None:
    (monitor,) = by_kind(render(helm, *ALL_ON), "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == operator_render.HEALTH_PORT_NAME and endpoint["path"] == "/metrics"
    spec = {"redis": {"secretRef": {"name": "c"}}, "postgres": {"secretRef": {"name": "c"}}}
    container = operator_render.render_sidecar_container("web", spec, "img:1")
    assert [port["name"] for port in container["ports"]] == [endpoint["port"]]  # ingest is not declared
    assert container["readinessProbe"]["httpGet"]["port"] == endpoint["port"]
    assert crd.SIDECAR_PORT_NAME not in {port["name"] for port in container["ports"]}


def test_every_rbac_rule_is_written_down_verb_by_verb(helm: Path) -> None:
    """docs/kubernetes.md has a row per (resource, verb) the operator is granted, each saying why."""
    (role,) = by_kind(render(helm), "ClusterRole")
    docs = (REPO / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    section = docs[docs.index("### The operator's permissions"):]
    section = section[:section.index("\n## ")] if "\n## " in section else section
    rows = set()
    for line in section.splitlines():
        cells = [cell.strip(" `") for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"[a-z/]+", cells[0] or "-") and cells[2]:
            for verb in cells[1].replace("`", "").split(","):
                rows.add((cells[0], verb.strip()))
    granted = {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted <= rows, f"not documented: {sorted(granted - rows)}"

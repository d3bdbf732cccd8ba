"""The chart's sidecar injection webhook, rendered by a real Helm 3.17: the MutatingWebhookConfiguration both
ways (chart-generated CA, or cert-manager), kept certificates on upgrade (Helm's lookup against kmock),
the certificate accepted by a client trusting only the caBundle, and the native/plain sidecar switch."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from support import REPO

sys.path.append(str(REPO / "tests" / "operator"))
sys.path.append(str(REPO / "tests" / "webhook"))

from operator_harness import Cluster, emulated_cluster, free_port
from webhook_support import wait_for_port

from analytics_pipeline.operator.certs import ReloadingWebhookServer

# kmock 0.8 loads its bundled resource list with a deprecated importlib.resources call.
pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

CHART = REPO / "charts" / "analytics-pipeline"
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
SERVICE = "demo-analytics-pipeline-operator"
SECRET = "demo-analytics-pipeline-webhook-tls"
DNS_NAMES = [SERVICE, f"{SERVICE}.analytics", f"{SERVICE}.analytics.svc", f"{SERVICE}.analytics.svc.cluster.local"]
CERT_MANAGER = ["--set", "webhook.certManager.enabled=true"]


def render(helm: Path, *args: str, kubeconfig: Path | None = None) -> list[dict[str, Any]]:
    """`helm template` as a list of objects (with --dry-run=server against ``kubeconfig``, so lookup works)."""
    command = [str(helm), "template", "demo", str(CHART), "--namespace", "analytics", *args]
    if kubeconfig is not None:
        command += ["--dry-run=server", "--kubeconfig", str(kubeconfig)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [obj for obj in objects if obj["kind"] == kind]
    return found


def kinds(objects: list[dict[str, Any]]) -> set[str]:
    return {obj["kind"] for obj in objects}


def validate(objects: list[dict[str, Any]], certmanager_check: Path | None = None) -> None:
    """Kubernetes objects strictly against 1.29 and the newest schema; cert-manager ones against theirs."""
    for obj in objects:
        if obj["apiVersion"] == "cert-manager.io/v1":
            assert certmanager_check is not None
            result = subprocess.run(["node", str(certmanager_check), json.dumps(obj)], capture_output=True,
                                    text=True, timeout=60, cwd=certmanager_check.parent)
            assert result.returncode == 0, f"{obj['kind']} invalid: {result.stdout}{result.stderr}"
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def expected_hook(**client_config: Any) -> dict[str, Any]:
    return {
        "name": "sidecar-injector.analyticspipeline.io",
        "admissionReviewVersions": ["v1"],
        "clientConfig": {"service": {"name": SERVICE, "namespace": "analytics", "path": "/inject-sidecar",
                                     "port": 443}, **client_config},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                   "scope": "Namespaced"}],
        "objectSelector": {"matchExpressions": [{"key": "analyticspipeline.io/inject", "operator": "Exists"}]},
        "failurePolicy": "Ignore",
        "matchPolicy": "Equivalent",
        "sideEffects": "NoneOnDryRun",
        "reinvocationPolicy": "IfNeeded",
        "timeoutSeconds": 5,
    }


def test_self_signed_webhook_configuration_carries_the_generated_ca(helm: Path) -> None:
    objects = render(helm)
    validate(objects)
    secret, config = one(objects, "Secret"), one(objects, "MutatingWebhookConfiguration")
    assert secret["metadata"]["name"] == SECRET and secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert config["webhooks"] == [expected_hook(caBundle=secret["data"]["ca.crt"])]
    assert "annotations" not in config["metadata"]

    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    leaf = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    leaf.verify_directly_issued_by(ca)
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == DNS_NAMES
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 3650

    volumes = one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-tls", "secret": {"secretName": SECRET, "defaultMode": 0o440}} in volumes
    assert {"name": "webhook-tls", "mountPath": "/etc/analytics-pipeline/webhook-tls", "readOnly": True} \
        in container(objects)["volumeMounts"]


async def test_the_operator_serves_the_chart_certificate_to_a_client_trusting_only_the_ca_bundle(
        helm: Path, tmp_path: Path) -> None:
    """What the API server does: trust caBundle only, and check the Service's DNS name in the certificate."""
    objects = render(helm)
    data = one(objects, "Secret")["data"]
    for key in ("tls.crt", "tls.key"):
        (tmp_path / key).write_bytes(base64.b64decode(data[key]))
    bundle = base64.b64decode(one(objects, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"])
    client = ssl.create_default_context(cadata=bundle.decode())
    port = free_port()
    server = ReloadingWebhookServer(addr="127.0.0.1", port=port, certfile=tmp_path / "tls.crt",
                                    keyfile=tmp_path / "tls.key")

    async def handshake(hostname: str) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=hostname)
        writer.close()
        await writer.wait_closed()

    async def answer(request: Any, **_: Any) -> dict[str, Any]:
        return {}

    async with server:
        await anext(server(answer))
        listening = ssl.create_default_context(cadata=bundle.decode())
        listening.check_hostname = False  # only waits for the socket; the checks are the handshakes below
        await wait_for_port(port, listening)
        # The name the API server dials: the Service the chart registers in the MutatingWebhookConfiguration.
        service = one(objects, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["service"]
        await handshake(f"{service['name']}.{service['namespace']}.svc")
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake("some-other-service.analytics.svc")


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    """kmock's API server: Helm's `lookup` reads the Secret from it (helm template --dry-run=server)."""
    async with emulated_cluster(tmp_path, monkeypatch) as emulated:
        yield emulated


async def test_generated_certificate_is_kept_on_upgrade(helm: Path, cluster: Cluster) -> None:
    install = await asyncio.to_thread(render, helm, kubeconfig=cluster.kubeconfig)
    secret = one(install, "Secret")
    await cluster.api.create("/api/v1/namespaces/analytics/secrets", secret)  # what `helm install` stored
    upgrade = await asyncio.to_thread(render, helm, kubeconfig=cluster.kubeconfig)
    assert one(upgrade, "Secret")["data"] == secret["data"]
    assert one(upgrade, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"] \
        == secret["data"]["ca.crt"]
    # without the stored Secret every render generates a new CA: the test above is not passing by accident
    fresh = await asyncio.to_thread(render, helm)
    assert one(fresh, "Secret")["data"]["ca.crt"] != secret["data"]["ca.crt"]


def test_cert_manager_issues_and_injects_the_certificate(helm: Path, certmanager_validator: Path) -> None:
    objects = render(helm, *CERT_MANAGER)
    validate(objects, certmanager_validator)
    assert "Secret" not in kinds(objects)  # cert-manager writes it
    config = one(objects, "MutatingWebhookConfiguration")
    assert config["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": "analytics/demo-analytics-pipeline-webhook"}
    assert config["webhooks"] == [expected_hook()]  # no caBundle: the cainjector fills it in
    certificate, issuer = one(objects, "Certificate"), one(objects, "Issuer")
    assert certificate["metadata"]["name"] == "demo-analytics-pipeline-webhook"
    assert certificate["spec"]["secretName"] == SECRET and certificate["spec"]["dnsNames"] == DNS_NAMES
    assert certificate["spec"]["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "Issuer",
                                                "group": "cert-manager.io"}
    assert issuer["spec"] == {"selfSigned": {}}
    volumes = one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-tls", "secret": {"secretName": SECRET, "defaultMode": 0o440}} in volumes

    own = render(helm, *CERT_MANAGER, "--set", "webhook.certManager.issuerRef.name=corp-ca",
                 "--set", "webhook.certManager.issuerRef.kind=ClusterIssuer")
    validate(own, certmanager_validator)
    assert "Issuer" not in kinds(own)
    assert one(own, "Certificate")["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer",
                                                            "group": "cert-manager.io"}


def test_certmanager_check_has_teeth(certmanager_validator: Path) -> None:
    bad = {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "x"},
           "spec": {"secretName": "s", "issuerRef": {"name": "i"}, "privateKey": {"algorithm": "EC"}}}
    with pytest.raises(AssertionError, match="algorithm"):
        validate([bad], certmanager_validator)


@pytest.mark.parametrize(("args", "mode"), [
    ([], "native"),  # Helm's built-in Kubernetes version is newer than 1.29
    (["--kube-version", "1.29.0"], "native"),
    (["--kube-version", "1.28.0"], "container"),
    (["--kube-version", "1.28.0", "--set", "webhook.sidecarMode=native"], "native"),
    (["--set", "webhook.sidecarMode=container"], "container"),
])
def test_native_sidecar_or_plain_container(helm: Path, args: list[str], mode: str) -> None:
    modes = [arg for arg in container(render(helm, *args))["args"] if arg.startswith("--sidecar-mode=")]
    assert modes == [f"--sidecar-mode={mode}"]


def test_operator_serves_webhook_and_metrics_through_its_service(helm: Path) -> None:
    objects = render(helm)
    args = container(objects)["args"]
    assert {"--webhook-port=9443", "--webhook-cert-dir=/etc/analytics-pipeline/webhook-tls",
            "--metrics-port=9102"} <= set(args)
    assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in container(objects)["ports"]
    ports = one(objects, "Service")["spec"]["ports"]
    assert {"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"} in ports
    assert {"name": "metrics", "port": 9102, "targetPort": "metrics", "protocol": "TCP"} in ports
    quiet = render(helm, "--set", "webhook.countInjectedPods=false", "--set", "operator.metricsPort=0")
    assert "--no-count-injected-pods" in container(quiet)["args"]
    assert not any(arg.startswith("--metrics-port") for arg in container(quiet)["args"])
    rules = one(quiet, "ClusterRole")["rules"]
    assert not any("pods" in rule["resources"] for rule in rules)


def test_webhook_disabled_renders_none_of_it(helm: Path) -> None:
    objects = render(helm, "--set", "webhook.enabled=false")
    validate(objects)
    assert not kinds(objects) & {"MutatingWebhookConfiguration", "Secret", "Certificate", "Issuer"}
    assert not any(arg.startswith(("--webhook", "--sidecar")) for arg in container(objects)["args"])
    assert [port["name"] for port in one(objects, "Service")["spec"]["ports"]] == ["health", "metrics"]
    assert [volume["name"] for volume in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]] == ["tmp"]
    assert not any("pods" in rule["resources"] for rule in one(objects, "ClusterRole")["rules"])


def test_namespaced_install_sends_only_watched_namespaces_pods(helm: Path) -> None:
    objects = render(helm, "--set", "operator.watchNamespaces={team-a,team-b}")
    validate(objects)
    hook = one(objects, "MutatingWebhookConfiguration")["webhooks"][0]
    assert hook["namespaceSelector"] == {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}]}
    roles = [obj for obj in objects if obj["kind"] == "Role" and obj["metadata"]["name"].endswith("-operator")]
    assert [role["metadata"]["namespace"] for role in roles] == ["team-a", "team-b"]
    for role in roles:
        assert {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]} in role["rules"]


@pytest.mark.parametrize("values", [
    [], CERT_MANAGER, ["--set", "webhook.enabled=false"],
    [*CERT_MANAGER, "--set", "webhook.certManager.issuerRef.name=corp-ca", "--set", "webhook.failurePolicy=Fail"],
], ids=["self-signed", "cert-manager", "disabled", "cert-manager-own-issuer"])
def test_lint_strict_with_every_webhook_variant(helm: Path, values: list[str]) -> None:
    result = subprocess.run([str(helm), "lint", "--strict", str(CHART), *values], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("args", "complaint"), [
    (["--set", "webhook.sidecarMode=sidecar"], "sidecarMode"),
    (["--set", "webhook.failurePolicy=Maybe"], "failurePolicy"),
    (["--set", "webhook.timeoutSeconds=60"], "timeoutSeconds"),
    (["--set", "webhook.port=443"], "port"),  # the operator is not root
    (["--set", "webhook.certManager.issuerRef.kind=CA"], "kind"),
    (["--set", "webhook.certManger.enabled=true"], "certManger"),
])
def test_values_schema_refuses_bad_webhook_values(helm: Path, args: list[str], complaint: str) -> None:
    result = subprocess.run([str(helm), "template", "demo", str(CHART), *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0, f"helm accepted {args}"
    assert complaint in result.stderr


@pytest.mark.parametrize(("values", "injection"), [([], True), (["--set", "webhook.enabled=false"], False)])
def test_notes_give_the_one_label_way(helm: Path, tmp_path: Path, values: list[str], injection: bool) -> None:
    """NOTES.txt rendered with tpl (Helm renders NOTES only on install)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "files" / "notes.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "zz-notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n'
        '    {{- tpl (.Files.Get "files/notes.txt") . | nindent 4 }}\n')
    result = subprocess.run([str(helm), "template", "demo", str(chart), "--show-only", "templates/zz-notes.yaml",
                             *values], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["data"]["notes"]
    for needle in ('"analyticspipeline.io/inject":"web"', "-l analyticspipeline.io/inject=web",
                   "reason=InjectionSkipped", "native sidecar", "get ap web -o wide"):
        assert (needle in notes) is injection, needle
    assert "sidecar-container" in notes

"""The webhook trusts only ``request.*``: real AdmissionReview JSON over HTTPS to the running operator (kopf +
kmock). Namespace from request.namespace, Pods on CREATE only, malformed reviews answered 400 with an
AdmissionReview error (never 500), skip Events and API lookups throttled per namespace, TLS 1.2 at least."""

from __future__ import annotations

import copy
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from operator_harness import Cluster, eventually, free_port, running_operator
from test_injection import LABELLED, NS, SPEC, namespace_events, pod, ready
from webhook_support import TestPKI, admission_review, patched, send_review, wait_for_port

from analytics_pipeline.operator import crd
from analytics_pipeline.operator.reconcile import OperatorContext
from analytics_pipeline.operator.webhook import LOOKUPS_PER_INTERVAL, WebhookOptions

pytestmark = [pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")]


@asynccontextmanager
async def operator_with_webhook(cluster: Cluster, pki: TestPKI) -> AsyncIterator[tuple[str, OperatorContext]]:
    port = free_port()
    options = WebhookOptions(port=port, address="127.0.0.1", cert_file=pki.cert_file, key_file=pki.key_file)
    async with running_operator(cluster, injection=options, allowed_images=("registry.example/",)) as context:
        await wait_for_port(port, pki.client_context())
        yield f"https://127.0.0.1:{port}/{crd.WEBHOOK_PATH}", context


async def post_raw(url: str, pki: TestPKI, body: bytes) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(
            url, data=body, headers={"Content-Type": "application/json"}, ssl=pki.client_context()) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text


async def test_namespace_comes_from_the_request_not_from_the_object(cluster: Cluster, pki: TestPKI) -> None:
    """A review from namespace "attacker" naming a pod in "victim" must not get victim's sidecar (Secret names)."""
    async with operator_with_webhook(cluster, pki) as (url, _):
        await cluster.create_pipeline("victim", "web", SPEC)
        await eventually(lambda: condition_ready(cluster, "victim", "web"))
        forged = pod(LABELLED)
        forged["metadata"]["namespace"] = "victim"
        response = await send_review(url, pki.client_context(), admission_review(forged, "attacker"))
        assert response["allowed"] is True and "patch" not in response  # no pipeline "web" in attacker
        assert "analytics-connections" not in json.dumps(response)
        # The same pod reviewed in its real namespace is injected (so the refusal above is about the namespace).
        honest = await send_review(url, pki.client_context(), admission_review(forged, "victim"))
        result, _ = patched(forged, honest)
        assert result["spec"]["initContainers"][0]["name"] == crd.SIDECAR_CONTAINER_NAME
        # And a pod whose object names no namespace at all is placed in request.namespace.
        bare = pod(LABELLED)
        del bare["metadata"]["namespace"]
        result, _ = patched(bare, await send_review(url, pki.client_context(), admission_review(bare, "victim")))
        assert result["spec"]["initContainers"][0]["name"] == crd.SIDECAR_CONTAINER_NAME


def condition_ready(cluster: Cluster, namespace: str, name: str) -> bool:
    from operator_harness import condition
    return condition(cluster.pipeline(namespace, name), "Ready").get("status") == "True"


def configmap_review(namespace: str) -> dict[str, Any]:
    review = admission_review({"apiVersion": "v1", "kind": "ConfigMap",
                               "metadata": {"name": "c", "namespace": namespace, "labels": dict(LABELLED)},
                               "data": {"a": "b"}}, namespace)
    kind, resource = {"group": "", "version": "v1", "kind": "ConfigMap"}, {"group": "", "version": "v1",
                                                                            "resource": "configmaps"}
    review["request"].update(kind=kind, requestKind=kind, resource=resource, requestResource=resource)
    return review


async def test_only_pods_on_create_are_changed(cluster: Cluster, pki: TestPKI) -> None:
    async with operator_with_webhook(cluster, pki) as (url, _):
        await cluster.create_pipeline(NS, "web", SPEC)
        await eventually(lambda: ready(cluster, "web"))
        context = pki.client_context()
        # A ConfigMap (labelled, in a namespace with a Ready pipeline): allowed, untouched.
        response = await send_review(url, context, configmap_review(NS))
        assert response == {"uid": response["uid"], "allowed": True}
        # A review that says "pods" but carries a ConfigMap object.
        disguised = admission_review({"apiVersion": "v1", "kind": "ConfigMap",
                                      "metadata": {"name": "c", "labels": dict(LABELLED)}, "data": {}}, NS)
        assert "patch" not in await send_review(url, context, disguised)
        # A pod UPDATE (or DELETE, CONNECT): never changed.
        for operation in ("UPDATE", "DELETE"):
            review = admission_review(pod(LABELLED), NS, operation=operation)
            assert "patch" not in await send_review(url, context, review)
        # The control: a pod CREATE is injected.
        assert "patch" in await send_review(url, context, admission_review(pod(LABELLED), NS))


def malformed_bodies() -> list[tuple[str, bytes]]:
    good = admission_review(pod(LABELLED), NS)

    def variant(**request: Any) -> bytes:
        review = copy.deepcopy(good)
        review["request"].update(request)
        return json.dumps(review).encode()

    return [
        ("an array", b"[]"),
        ("an array of reviews", json.dumps([good]).encode()),
        ("no request", json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode()),
        ("request null", json.dumps({**good, "request": None}).encode()),
        ("request a string", json.dumps({**good, "request": "pod"}).encode()),
        ("not an AdmissionReview", json.dumps({**good, "kind": "Pod"}).encode()),
        ("uid a number", variant(uid=7)),
        ("object a string", variant(object="pod")),
        ("kind a string", variant(kind="Pod")),
        ("userInfo missing", json.dumps({**good, "request": {k: v for k, v in good["request"].items()
                                                             if k != "userInfo"}}).encode()),
        ("namespace a number", variant(namespace=3)),
        ("metadata a list", variant(object={**pod(LABELLED), "metadata": ["x"]})),
        ("not JSON", b"{\"request\": "),
        ("not UTF-8", b"\xff\xfe\x00"),
    ]


async def test_malformed_reviews_get_400_with_an_admission_review_error_never_500(cluster: Cluster,
                                                                                  pki: TestPKI) -> None:
    async with operator_with_webhook(cluster, pki) as (url, _):
        for what, body in malformed_bodies():
            status, answer = await post_raw(url, pki, body)
            assert status == 400, (what, status, answer)
            assert isinstance(answer, dict), (what, answer)
            assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview", what
            response = answer["response"]
            assert response["allowed"] is False and response["status"]["code"] == 400, what
            assert response["status"]["message"].startswith("malformed AdmissionReview: "), what
        # The uid is echoed when there is one to echo.
        review = admission_review(pod(LABELLED), NS)
        review["request"]["object"] = "pod"
        status, answer = await post_raw(url, pki, json.dumps(review).encode())
        assert answer["response"]["uid"] == review["request"]["uid"]
        assert "request.object has the wrong type: string" in answer["response"]["status"]["message"]
        # And the server still serves well-formed reviews afterwards.
        assert (await send_review(url, pki.client_context(), admission_review(pod(), NS)))["allowed"] is True


async def test_a_flood_of_made_up_pipelines_costs_one_event_and_bounded_lookups(
        cluster: Cluster, pki: TestPKI, monkeypatch: pytest.MonkeyPatch) -> None:
    async with operator_with_webhook(cluster, pki) as (url, context):
        lookups: list[str] = []
        real_get = context.api.get

        async def counting_get(path: str) -> Any:
            if f"/{crd.PLURAL}/" in path:
                lookups.append(path)
            return await real_get(path)

        monkeypatch.setattr(context.api, "get", counting_get)
        for number in range(100):
            incoming = pod({crd.LABEL_INJECT: f"made-up-{number}"})
            assert "patch" not in await send_review(url, pki.client_context(), admission_review(incoming, NS))
        await eventually(lambda: namespace_events(cluster, NS))
        assert len(namespace_events(cluster, NS)) == 1  # per (namespace, reason), not per made-up name
        assert len(lookups) == LOOKUPS_PER_INTERVAL  # the rest were answered from the index alone


@pytest.mark.parametrize(("version", "handshake"), [(ssl.TLSVersion.TLSv1_1, False),
                                                    (ssl.TLSVersion.TLSv1_2, True),
                                                    (ssl.TLSVersion.TLSv1_3, True)])
async def test_tls_below_1_2_is_refused(cluster: Cluster, pki: TestPKI, version: ssl.TLSVersion,
                                        handshake: bool) -> None:
    async with operator_with_webhook(cluster, pki) as (url, _):
        context = pki.client_context()
        context.minimum_version = context.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_2:
            context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer it, so the server is what refuses
        try:
            answer = await send_review(url, context, admission_review(pod(), NS))
        except aiohttp.ClientError:
            assert not handshake
        else:
            assert handshake and answer["allowed"] is True

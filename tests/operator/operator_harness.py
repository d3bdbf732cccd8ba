"""Harness: run the real operator (kopf + the project's handlers) against kmock's Kubernetes emulator.

kmock 0.8 stores objects as plain JSON and knows nothing of uid/resourceVersion/generation or the
status subresource; :class:`Emulator` adds just that much API-server behaviour (kopf.adopt needs a
uid; observedGeneration needs a generation; a spec change must bump it, a status write must not).
It has no garbage collector, no label selectors and no PUT, which the operator does not rely on.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import kmock
import kopf
import pytest
import yaml
from kmock._internal import dicts as kmock_dicts

from analytics_pipeline.operator import crd
from analytics_pipeline.operator.handlers import build_registry
from analytics_pipeline.operator.kube import KubeApi, pipeline_path
from analytics_pipeline.operator.reconcile import OperatorContext
from analytics_pipeline.operator.webhook import WebhookOptions

PIPELINES = f"{crd.GROUP}/{crd.VERSION}/{crd.PLURAL}"
CONFIGMAPS = "v1/configmaps"
CRONJOBS = "batch/v1/cronjobs"
EVENTS = "v1/events"
TEST_IMAGE = "registry.example/analytics-pipeline:test"


def load_crd() -> dict[str, Any]:
    """The CRD manifest from the chart (its one and only copy)."""
    return yaml.safe_load(crd.crd_path().read_text(encoding="utf-8"))


def crd_schema() -> dict[str, Any]:
    """The CRD's ``openAPIV3Schema`` for v1alpha1."""
    version = next(v for v in load_crd()["spec"]["versions"] if v["name"] == crd.VERSION)
    return version["schema"]["openAPIV3Schema"]


def validate_against_crd(obj: Mapping[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless ``obj`` is a valid AnalyticsPipeline per the CRD."""
    jsonschema.validate(dict(obj), crd_schema(), cls=jsonschema.Draft7Validator,
                        format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus uid, resourceVersion, generation, creationTimestamp and a status subresource."""

    _versions = itertools.count(1)

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and isinstance(request.data, dict):
            self._stamp(request)
        return await super()._handle(request)

    def _stamp(self, request: kmock.Request) -> None:
        data: dict[str, Any] = request.data
        meta = data.setdefault("metadata", {})
        version = str(next(self._versions))
        if request.action == kmock.action.CREATE:
            if not meta.get("name") and meta.get("generateName"):  # kopf's Events use generateName
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            meta["generation"] = 1
            meta["resourceVersion"] = version
            if request.resource == PIPELINES:
                data.pop("status", None)
        elif request.action == kmock.action.UPDATE and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            if key not in self.objects or self.objects[key].deleted:
                return
            current = copy.deepcopy(self.objects[key].raw)
            if request.resource == PIPELINES:  # the status subresource splits spec and status writes
                if request.subresource == "status":
                    for field in list(data):
                        if field not in ("status", "metadata"):
                            data.pop(field)
                else:
                    data.pop("status", None)
            after = kmock_dicts.patch_dict(copy.deepcopy(current), copy.deepcopy(data))
            generation = current.get("metadata", {}).get("generation", 1)
            meta["generation"] = generation + 1 if after.get("spec") != current.get("spec") else generation
            meta["resourceVersion"] = version


@dataclass
class Cluster:
    """The emulated API server and helpers to drive it the way kubectl would (over HTTP)."""

    k8s: Emulator
    server: kmock.Server
    api: KubeApi
    kubeconfig: Path

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored object (a deep copy), or None if it does not exist."""
        key = (kmock.resource(resource), namespace, name)  # ObjectsArray's `in` does not parse strings
        if key not in self.k8s.objects or self.k8s.objects[key].deleted:
            return None
        return copy.deepcopy(self.k8s.objects[key].raw)

    def configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(CONFIGMAPS, namespace, crd.configmap_name(name))

    def cronjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(CRONJOBS, namespace, crd.cronjob_name(name))

    def pipeline(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(PIPELINES, namespace, name)

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Kubernetes Events posted about the AnalyticsPipeline ``namespace/name``."""
        found = []
        for (resource, _, _), obj in self.k8s.objects.items():
            if resource == EVENTS and not obj.deleted:
                raw = obj.raw
                involved = raw.get("involvedObject") or {}
                if involved.get("kind") == crd.KIND and involved.get("name") == name \
                        and involved.get("namespace") == namespace:
                    found.append(raw)
        return found

    async def create_pipeline(self, namespace: str, name: str, spec: Mapping[str, Any], *,
                              validate: bool = True, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        """POST an AnalyticsPipeline (validated against the CRD schema first, as the API server would)."""
        body: dict[str, Any] = {"apiVersion": crd.API_VERSION, "kind": crd.KIND,
                                "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
                                "spec": copy.deepcopy(dict(spec))}
        if validate:
            validate_against_crd(body)
        return await self.api.create(pipeline_path(namespace), body)

    async def patch_pipeline(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self.api.patch(pipeline_path(namespace, name), patch)


def condition(obj: Mapping[str, Any] | None, kind: str) -> dict[str, Any]:
    """A status condition of an object ({} if absent)."""
    for item in ((obj or {}).get("status") or {}).get("conditions") or []:
        if item.get("type") == kind:
            return item
    return {}


async def eventually(check: Callable[[], Any], within: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy (and return that), or fail after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (KeyError, TypeError, AssertionError) as error:
            last_error = error
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s (last error: {last_error!r})")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A TCP port nobody listens on right now (for the operator's liveness endpoint)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}}],
    }), encoding="utf-8")
    return path


@asynccontextmanager
async def emulated_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    """An emulated API server on a local port, with the built-in resources and the CRD's resource."""
    async with Emulator() as k8s, kmock.Server(k8s) as server:
        k8s.resources.load_bundled()  # kopf waits for v1/namespaces etc. in discovery
        definition = load_crd()["spec"]
        k8s.resources[PIPELINES] = kmock.ResourceInfo(
            kind=definition["names"]["kind"], singular=definition["names"]["singular"],
            shortnames=set(definition["names"]["shortNames"]), namespaced=definition["scope"] == "Namespaced",
            verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"})
        kubeconfig = _kubeconfig(tmp_path / "kubeconfig", str(server.url).rstrip("/"))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        api = KubeApi(login=lambda: kopf.login_with_kubeconfig(settings=kopf.OperatorSettings()))
        try:
            yield Cluster(k8s=k8s, server=server, api=api, kubeconfig=kubeconfig)
        finally:
            await api.close()


@asynccontextmanager
async def running_operator(cluster: Cluster, *, resync_seconds: float = 60.0, watch_children: bool = True,
                           liveness: str | None = None, injection: WebhookOptions | None = None,
                           allowed_images: tuple[str, ...] = ()) -> AsyncIterator[OperatorContext]:
    """The project's operator (its own registry and handlers) running for real, as in a pod.

    It runs in its own thread and event loop, as it would in its own process: kopf treats every task
    of its loop that it did not start as "hung" at exit (the emulator's request tasks would be) and
    waits 5 s for them.
    """
    registry = build_registry(resync_seconds=resync_seconds, watch_children=watch_children, injection=injection)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo | None:  # the kubeconfig only, even inside a pod
        return kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())

    context = OperatorContext(
        api=KubeApi(login=lambda: kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())),
        default_image=TEST_IMAGE, allowed_images=allowed_images)
    settings = kopf.OperatorSettings()
    settings.watching.reconnect_backoff = 0.05
    settings.queueing.exit_timeout = 0.5
    settings.queueing.idle_timeout = 0.3  # per-object workers linger this long; kopf waits for them at exit
    stop, ready = threading.Event(), threading.Event()

    def operate() -> None:
        asyncio.run(kopf.operator(
            registry=registry, settings=settings, standalone=True, clusterwide=True, memo=kopf.Memo(ctx=context),
            stop_flag=stop, ready_flag=ready, liveness_endpoint=liveness))

    thread = asyncio.create_task(asyncio.to_thread(operate))
    try:
        await eventually(lambda: ready.is_set() or thread.done(), within=15)
        if thread.done():
            await thread  # it failed to start: show why
        yield context
    finally:
        stop.set()
        await asyncio.wait_for(thread, timeout=30)

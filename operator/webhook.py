"""The sidecar injection webhook, wired into kopf: an index of pipelines, the mutating handler, its
metric and Events, and the ``status.injectedPods`` count.

Which pipeline a pod gets is decided from a kopf **index** of AnalyticsPipelines (kept current by the watch
the operator already runs on them): answering an admission request then costs no call back into the API
server, which is waiting on us while it creates the pod, and needs no extra RBAC. Only when the index has no Ready
entry (the operator's first moments, before the initial listing fills the index, or a pipeline created or
made Ready milliseconds ago) is the pipeline read with one GET. A pipeline must be Ready: its ConfigMap exists, so the
injected volume can mount and the pod does not hang in ContainerCreating.

The handler never raises: anything unexpected is reported as ``result="error"`` and the pod is admitted
unchanged (kopf would otherwise *deny* the pod). Skips post at most one Warning Event per namespace and reason
per minute (about the pipeline, or the namespace when the pipeline does not exist), never on dry-run requests;
API lookups on index misses are limited per namespace too, so a flood of reviews naming made-up pipelines
costs neither a flood of Events nor of API calls. Both tables are bounded. The envelope itself (namespace from
``request.namespace``, Pods on CREATE only, malformed reviews answered 400) is checked in :mod:`.review`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import kopf
from prometheus_client import Counter

from . import crd, inject
from .certs import ReloadingWebhookServer
from .kube import KubeApi, KubeApiError, pipeline_path, pods_path

logger = logging.getLogger("analytics_pipeline.operator")

INDEX = "analytics_pipelines"  # the kopf index's name = the kwarg handlers receive it as
LOOKUP_TIMEOUT_SECONDS = 2.0  # an index miss reads the pipeline from the API server, at most this long
EVENT_REASON = "InjectionSkipped"
THROTTLE_TABLE_SIZE = 4096  # namespaces (x reasons) remembered by each throttle; the oldest are forgotten first
LOOKUPS_PER_INTERVAL = 20  # API lookups of index misses per namespace and throttle interval

INJECTIONS = Counter("analytics_pipeline_injections_total",
                     "Pods seen by the sidecar injection webhook, by what happened to them", ["result"])
for _result in inject.Result:  # every series exists from the start (at 0), so rate() and alerts work at once
    INJECTIONS.labels(result=_result.value)


@dataclass(frozen=True)
class WebhookOptions:
    """How the webhook is served and what it injects (from ``analytics-pipeline operator --webhook-*``)."""

    port: int
    cert_file: Path
    key_file: Path
    address: str = "0.0.0.0"
    mode: str = inject.NATIVE
    reload_seconds: float = 10.0
    event_interval: float = 60.0
    count_pods: bool = True

    @classmethod
    def from_cert_dir(cls, cert_dir: Path | str, port: int, **kwargs: Any) -> WebhookOptions:
        """Options for a ``kubernetes.io/tls`` Secret mounted at ``cert_dir`` (``tls.crt``, ``tls.key``)."""
        return cls(port=port, cert_file=Path(cert_dir) / "tls.crt", key_file=Path(cert_dir) / "tls.key", **kwargs)

    def server(self) -> ReloadingWebhookServer:
        """kopf's HTTPS admission server on these files (raises at start-up if they are unusable)."""
        return ReloadingWebhookServer(addr=self.address, port=self.port, certfile=self.cert_file,
                                      keyfile=self.key_file, reload_seconds=self.reload_seconds)


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the index keeps of a pipeline: enough to decide, render the sidecar and post an Event on it."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion", crd.API_VERSION),
        "kind": body.get("kind", crd.KIND),
        "metadata": {key: meta[key] for key in ("name", "namespace", "uid", "generation", "deletionTimestamp")
                     if key in meta},
        "spec": dict(body.get("spec") or {}),
        "status": {"conditions": list((body.get("status") or {}).get("conditions") or [])},
    }


class Throttle:
    """At most ``burst`` uses per key every ``interval`` seconds, in a table of at most ``max_keys`` keys.

    A key's window starts at its first use; when the table is full, expired windows are dropped, then the oldest
    one, so a flood of distinct keys costs bounded memory (the cost: a forgotten key may be used again early).
    """

    def __init__(self, interval: float, burst: int = 1, max_keys: int = THROTTLE_TABLE_SIZE) -> None:
        self.interval, self.burst, self.max_keys = interval, burst, max_keys
        self._windows: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def allow(self, key: Hashable) -> bool:
        """True if ``key`` may be used now (and count the use)."""
        now = time.monotonic()
        start, used = self._windows.get(key, (now, 0))
        if now - start >= self.interval:
            start, used = now, 0
        if used >= self.burst:
            return False
        self._windows[key] = (start, used + 1)
        self._windows.move_to_end(key)
        if len(self._windows) > self.max_keys:
            self._prune(now)
        return True

    def _prune(self, now: float) -> None:
        for old in [key for key, (start, _) in self._windows.items() if now - start >= self.interval]:
            del self._windows[old]
        while len(self._windows) > self.max_keys:
            self._windows.popitem(last=False)


async def find_pipeline(index: Mapping[Any, Any] | None, api: KubeApi, namespace: str,
                        name: str, lookups: Throttle | None = None) -> dict[str, Any] | None:
    """The pipeline from the index if it is Ready there, else from the API server (None if it does not exist).

    A miss or a not-Ready entry is read fresh: the index trails the watch by a moment, and a pod created right
    after its pipeline became Ready should not be skipped for that. ``lookups`` limits those reads per namespace;
    past it, the index's answer stands.
    """
    store = index.get((namespace, name)) if index is not None else None
    entries = [dict(value) for value in store or ()]
    for value in entries:
        if inject.pipeline_ready(value)[0]:
            return value
    if not name or len(name) > 253 or (lookups is not None and not lookups.allow(namespace)):
        return entries[0] if entries else None
    body = await api.get(pipeline_path(namespace, name))
    return snapshot(body) if body is not None else None


def register(registry: kopf.OperatorRegistry, options: WebhookOptions) -> None:
    """Add the pipeline index and the mutating handler to ``registry`` (kopf serves it at ``/inject-sidecar``)."""
    pipelines = (crd.GROUP, crd.VERSION, crd.PLURAL)
    throttle = Throttle(options.event_interval)
    lookups = Throttle(options.event_interval, burst=LOOKUPS_PER_INTERVAL)

    @kopf.index(*pipelines, id=INDEX, registry=registry)
    def analytics_pipelines(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): snapshot(body)}

    # Only pods carrying the label reach the webhook (the MutatingWebhookConfiguration's objectSelector);
    # the label filter here keeps a hand-made configuration without one from touching other pods.
    @kopf.on.mutate("", "v1", "pods", id=crd.WEBHOOK_PATH, operations=["CREATE"],
                    labels={crd.LABEL_INJECT: kopf.PRESENT}, registry=registry)
    async def inject_sidecar(body: kopf.Body, patch: kopf.Patch, dryrun: bool, memo: kopf.Memo,
                             **kwargs: Any) -> None:
        pod = dict(body)
        namespace = str((pod.get("metadata") or {}).get("namespace") or "")
        name = inject.pod_label(pod) or ""
        pipeline: dict[str, Any] | None = None
        try:
            if not inject.carries_sidecar(pod.get("spec") or {}):
                async with asyncio.timeout(LOOKUP_TIMEOUT_SECONDS):  # well within the webhook's timeoutSeconds
                    pipeline = await find_pipeline(kwargs.get(INDEX), memo.ctx.api, namespace, name, lookups)
            decided = inject.plan(pod, pipeline, default_image=memo.ctx.default_image, mode=options.mode,
                                  allowed_images=memo.ctx.allowed_images)
        except Exception as error:  # never deny a pod because of us: admit it unchanged and say why
            if not isinstance(error, KubeApiError | TimeoutError):
                logger.exception("sidecar injection failed")
            what = (f"API server: {error}" if isinstance(error, KubeApiError)
                    else f"no answer from the API server within {LOOKUP_TIMEOUT_SECONDS:g} s"
                    if isinstance(error, TimeoutError) else f"{type(error).__name__}: {error}")
            who = f"pod {namespace}/{inject.pod_display_name(pod)}"
            decided = inject.Plan(inject.Result.ERROR,
                                  f"{who} was not injected: looking up AnalyticsPipeline {name!r} failed ({what})")
        for field, value in decided.changes.items():
            patch.spec[field] = value  # kopf turns this into JSONPatch "add" operations (appends only)
        try:
            report(decided, namespace, name, pipeline, dryrun, memo)
        except Exception:  # reporting must not deny the pod either
            logger.exception("could not report the injection result %s", decided.result.value)

    def report(decided: inject.Plan, namespace: str, name: str, pipeline: Mapping[str, Any] | None,
               dryrun: bool, memo: kopf.Memo) -> None:
        INJECTIONS.labels(result=decided.result.value).inc()
        suffix = " (dry run)" if dryrun else ""
        if decided.result in (inject.Result.INJECTED, inject.Result.ALREADY_INJECTED):
            logger.info("%s%s", decided.message, suffix)
            return
        logger.warning("%s%s", decided.message, suffix)
        if dryrun or not throttle.allow((namespace, decided.result.value)):
            return  # a dry run has no side effects (sideEffects: NoneOnDryRun)
        regarding = pipeline if pipeline is not None and (pipeline.get("metadata") or {}).get("uid") else {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "namespace": namespace}}
        memo.ctx.events.post(regarding, EVENT_REASON, decided.message)


def pods_selector(name: str) -> str:
    """The label selector of the pods that asked for pipeline ``name``'s sidecar."""
    return quote(f"{crd.LABEL_INJECT}={name}", safe="")


async def update_injected_pods(api: KubeApi, namespace: str, name: str, status: Mapping[str, Any]) -> int:
    """Count the Running pods carrying pipeline ``name``'s sidecar and write ``status.injectedPods`` if it changed.

    One LIST of the namespace's pods, filtered by the label on the server (and again here), per resync tick.
    """
    listed = await api.get(f"{pods_path(namespace)}?labelSelector={pods_selector(name)}")
    count = inject.running_with_sidecar(list((listed or {}).get("items") or []), name)
    if status.get("injectedPods") != count:
        await api.patch(pipeline_path(namespace, name, status=True), {"status": {"injectedPods": count}})
    return count


def count_failure_message(error: KubeApiError) -> str:
    """Why ``status.injectedPods`` could not be counted; the RBAC hint only when the API server said 403."""
    if error.status == 403:
        return (f"could not count the pods carrying its sidecar (status.injectedPods): {error}; the operator needs "
                "'list' on pods (chart value webhook.countInjectedPods), or run it with --no-count-injected-pods")
    return f"could not count the pods carrying its sidecar (status.injectedPods): {error}; retrying at the next resync"

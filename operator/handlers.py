"""kopf wiring: which events of which objects lead to a reconciliation, and the operator's settings.

* AnalyticsPipeline created, changed (spec, labels) or found at start-up → reconcile it.
* A resync timer on every AnalyticsPipeline → reconcile (repairs drift within ``resync_seconds`` even if
  an event was missed).
* A ConfigMap or CronJob labelled as ours is added, modified or deleted → reconcile its owner at once
  (repairs hand edits and deletions within about a second; carries the CronJob's last run into the status).
* With the webhook on (:mod:`.webhook`): a pod labelled ``analyticspipeline.io/inject`` is being created →
  add its pipeline's sidecar; the resync timer also counts the Running pods carrying it (``status.injectedPods``).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from typing import Any

import kopf

from . import crd, webhook
from .kube import KubeApiError
from .reconcile import OperatorContext, reconcile

logger = logging.getLogger("analytics_pipeline.operator")

RETRY_DELAY_SECONDS = 10.0


def configure(settings: kopf.OperatorSettings) -> None:
    """Our settings: bookkeeping under our own prefix, no cluster scanning (least-privilege RBAC)."""
    settings.persistence.finalizer = crd.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=crd.ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=crd.ANNOTATION_PREFIX, key="last-handled-configuration")
    # Resources are discovered once at start-up; no list/watch of CRDs or namespaces is needed.
    settings.scanning.disabled = True
    settings.posting.level = logging.INFO


def owner_name(body: Mapping[str, Any]) -> str | None:
    """The AnalyticsPipeline a child belongs to: its owner reference, else our pipeline label."""
    meta = body.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == crd.KIND and str(ref.get("apiVersion", "")).startswith(f"{crd.GROUP}/"):
            return str(ref.get("name"))
    label = (meta.get("labels") or {}).get(crd.LABEL_PIPELINE)
    return str(label) if label else None


def build_registry(*, resync_seconds: float = 60.0, watch_children: bool = True,
                   injection: webhook.WebhookOptions | None = None) -> kopf.OperatorRegistry:
    """A registry with the operator's handlers (a fresh one per operator run, so tests can run several);
    ``injection`` adds the sidecar injection webhook and the injected-pod count."""
    registry = kopf.OperatorRegistry()
    pipelines = (crd.GROUP, crd.VERSION, crd.PLURAL)
    ours = {crd.LABEL_MANAGED_BY: crd.MANAGED_BY}

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure(settings)
        if injection is not None:
            try:
                settings.admission.server = injection.server()
            except (OSError, ssl.SSLError) as error:
                raise kopf.PermanentError(f"the webhook's certificate {injection.cert_file} / key "
                                          f"{injection.key_file} cannot be used: {error}") from error
            # The Helm chart owns the MutatingWebhookConfiguration (objectSelector, CA bundle, failurePolicy):
            # kopf must not create or rewrite one (that would also need cluster-wide RBAC on webhook configs).
            settings.admission.managed = None
        logger.info("operator starting: default image %s, resync every %ss, child watching %s, %s",
                    memo.ctx.default_image, resync_seconds, "on" if watch_children else "off",
                    f"sidecar injection webhook on {injection.address}:{injection.port} ({injection.mode} sidecars)"
                    if injection is not None else "sidecar injection webhook off")

    # A registry of our own gets none of kopf's default login handlers: log in as kopf would by default.
    @kopf.on.login(registry=registry)
    def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        await memo.ctx.events.drain()
        await memo.ctx.api.close()
        logger.info("operator stopped")

    @kopf.on.resume(*pipelines, registry=registry)
    @kopf.on.create(*pipelines, registry=registry)
    @kopf.on.update(*pipelines, registry=registry)
    async def pipeline_changed(namespace: str, name: str, reason: str, memo: kopf.Memo, **_: Any) -> None:
        ctx: OperatorContext = memo.ctx
        outcome = await reconcile(ctx, namespace, name, why=f"AnalyticsPipeline {reason}")
        if outcome is not None and outcome.retry:
            raise kopf.TemporaryError(outcome.message, delay=RETRY_DELAY_SECONDS)
        if outcome is not None and reason != "update":  # created or resumed: INJECTED is filled now, not in a minute
            await count_injected_pods(ctx, namespace, name, {})

    @kopf.timer(*pipelines, interval=resync_seconds, initial_delay=resync_seconds, registry=registry)
    async def resync(namespace: str, name: str, status: kopf.Status, memo: kopf.Memo, **_: Any) -> None:
        try:
            await reconcile(memo.ctx, namespace, name, why="periodic resync")
        except KubeApiError as error:  # the next tick tries again
            if memo.ctx.api.closed:  # kopf may fire a timer while it shuts down
                return
            logger.warning("%s/%s: resync failed: %s", namespace, name, error)
        await count_injected_pods(memo.ctx, namespace, name, status)

    async def count_injected_pods(ctx: OperatorContext, namespace: str, name: str,
                                  status: Mapping[str, Any]) -> None:
        """``status.injectedPods`` (when the webhook counts pods); failures are logged, the next tick retries."""
        if injection is None or not injection.count_pods:
            return
        try:
            await webhook.update_injected_pods(ctx.api, namespace, name, status)
        except KubeApiError as error:
            if ctx.api.closed:
                return
            logger.warning("%s/%s: %s", namespace, name, webhook.count_failure_message(error))

    if injection is not None:
        webhook.register(registry, injection)

    if watch_children:
        @kopf.on.event("v1", "configmaps", labels=ours, registry=registry)
        @kopf.on.event("batch", "v1", "cronjobs", labels=ours, registry=registry)
        async def child_changed(type: str | None, body: kopf.Body, namespace: str, memo: kopf.Memo,
                                **_: Any) -> None:
            if type is None:  # the initial listing: the resume handlers cover those objects
                return
            owner = owner_name(body)
            if owner is None or namespace is None:
                return
            why = f"{body.get('kind', 'child')} {body.metadata.name} {type.lower()}"
            try:
                await reconcile(memo.ctx, namespace, owner, why=why)
            except KubeApiError as error:  # the resync timer tries again
                if memo.ctx.api.closed:
                    return
                logger.warning("%s/%s: reconcile after %s failed: %s", namespace, owner, why, error)

    return registry

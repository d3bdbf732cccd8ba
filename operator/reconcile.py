"""One reconciliation of one AnalyticsPipeline: compare what should exist with what does, fix the
difference, and report it in the object's status (conditions, observed generation, last flush).

Every entry point (kopf's create/update/resume handlers, the resync timer, events on the children)
ends up in :func:`reconcile`, serialised per object by a lock, always working from a fresh GET of the
object so a late run can never write an older generation's status over a newer one.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from . import crd, render
from .events import EventPoster
from .kube import KubeApi, KubeApiError, configmaps_path, cronjobs_path, pipeline_path

logger = logging.getLogger("analytics_pipeline.operator")

READY, CONFIGMAP_READY, CRONJOB_READY = "Ready", "ConfigMapReady", "CronJobReady"
CONDITION_TYPES = (READY, CONFIGMAP_READY, CRONJOB_READY)


@dataclass
class OperatorContext:
    """What every handler shares (kept in kopf's memo): the API client, the default image and the other images
    the admin allows (a pipeline's spec may name only those), per-object locks, and the poster of Events that
    kopf cannot post for us (the webhook's)."""

    api: KubeApi
    default_image: str
    allowed_images: tuple[str, ...] = ()
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    events: EventPoster = field(init=False)

    def __post_init__(self) -> None:
        self.events = EventPoster(self.api)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        """The lock that serialises reconciliations of one pipeline."""
        return self.locks.setdefault((namespace, name), asyncio.Lock())


@dataclass
class Outcome:
    """What one reconciliation did; ``retry`` asks the caller to try again later (API trouble)."""

    ready: bool
    reason: str
    message: str
    actions: list[str] = field(default_factory=list)
    retry: bool = False


@dataclass
class ChildResult:
    """The state of one child after applying it: ``action`` is unchanged/created/updated/conflict."""

    kind: str
    name: str
    action: str
    actual: dict[str, Any] | None
    message: str = ""


def now() -> str:
    """RFC 3339 UTC timestamp with second precision, as Kubernetes writes them."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def flush_status(cronjob: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``lastFlush`` from a CronJob's status: schedule/success times and a derived result."""
    status = (cronjob or {}).get("status") or {}
    scheduled, succeeded = status.get("lastScheduleTime"), status.get("lastSuccessfulTime")
    if not scheduled and not succeeded:
        return None
    scheduled_at, succeeded_at = _parse_time(scheduled), _parse_time(succeeded)
    if status.get("active"):
        result = "Running"
    elif succeeded_at and (scheduled_at is None or succeeded_at >= scheduled_at):
        result = "Succeeded"
    elif scheduled_at:
        result = "Failed"
    else:
        result = "Unknown"
    flush: dict[str, Any] = {"result": result}
    if scheduled:
        flush["scheduleTime"] = scheduled
    if succeeded:
        flush["successfulTime"] = succeeded
    return flush


def condition(kind: str, ok: bool | None, reason: str, message: str, generation: int | None,
              previous: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A status condition; ``lastTransitionTime`` moves only when the status value changes."""
    status = "Unknown" if ok is None else "True" if ok else "False"
    old = next((item for item in previous if isinstance(item, Mapping) and item.get("type") == kind), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    result: dict[str, Any] = {"type": kind, "status": status, "reason": reason, "message": message,
                              "lastTransitionTime": since or now()}
    if generation is not None:
        result["observedGeneration"] = generation
    return result


def _owned_by(actual: Mapping[str, Any], owner_uid: str) -> bool:
    refs = (actual.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner_uid for ref in refs if isinstance(ref, Mapping))


def _adoptable(actual: Mapping[str, Any], name: str) -> bool:
    """A child we made whose owner reference was lost (removed by hand, or orphaned): ours to take back."""
    meta = actual.get("metadata") or {}
    refs = meta.get("ownerReferences") or []
    labels = meta.get("labels") or {}
    return (not any(isinstance(ref, Mapping) and ref.get("controller") for ref in refs)
            and labels.get(crd.LABEL_MANAGED_BY) == crd.MANAGED_BY and labels.get(crd.LABEL_PIPELINE) == name)


def _wanted(desired: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a child the operator owns: labels, owner references, and data or spec."""
    meta = desired["metadata"]
    want: dict[str, Any] = {"metadata": {"labels": meta["labels"], "ownerReferences": meta["ownerReferences"]}}
    for key in ("data", "spec"):
        if key in desired:
            want[key] = desired[key]
    return want


async def apply_child(api: KubeApi, owner: Mapping[str, Any], desired: dict[str, Any]) -> ChildResult:
    """Create the child, or patch it back to ``desired`` if it differs; never touch another owner's object."""
    meta = owner["metadata"]
    namespace, owner_name, owner_uid = meta["namespace"], meta["name"], meta.get("uid", "")
    desired = copy.deepcopy(desired)
    kopf.adopt(desired, owner=owner)  # ownerReferences (controller), namespace, the owner's labels
    kind, name = desired["kind"], desired["metadata"]["name"]
    paths = configmaps_path if kind == "ConfigMap" else cronjobs_path
    actual = await api.get(paths(namespace, name))
    if actual is None:
        try:
            created = await api.create(paths(namespace), desired)
        except KubeApiError as error:
            if error.status != 409:
                raise
            return ChildResult(kind, name, "conflict", None, f"{kind} {name} appeared while being created; retrying")
        return ChildResult(kind, name, "created", created)
    if not _owned_by(actual, owner_uid) and not _adoptable(actual, owner_name):
        return ChildResult(kind, name, "conflict", actual,
                           f"{kind} {name} exists and is not owned by AnalyticsPipeline {owner_name}: "
                           f"delete or rename it so the operator can create its own")
    want = _wanted(desired)
    extra_data = set(actual.get("data") or {}) - set(desired.get("data") or {})
    if render.contains(actual, want) and not extra_data:
        return ChildResult(kind, name, "unchanged", actual)
    patch = copy.deepcopy(want)
    for key in extra_data:  # a merge patch removes a key only when told to (null)
        patch["data"][key] = None
    patched = await api.patch(paths(namespace, name), patch)
    if patched is None:  # deleted between our GET and PATCH: the next event or resync re-creates it
        return ChildResult(kind, name, "conflict", None, f"{kind} {name} vanished while being patched; retrying")
    return ChildResult(kind, name, "updated", patched)


def _child_condition(kind: str, result: ChildResult, ok_reason: str, ok_message: str, generation: int | None,
                     previous: list[Mapping[str, Any]]) -> dict[str, Any]:
    if result.action == "conflict":
        return condition(kind, False, "NameConflict" if result.actual else "Pending", result.message, generation,
                         previous)
    return condition(kind, True, ok_reason, ok_message, generation, previous)


def _describe(result: ChildResult, drift: bool, existed: bool) -> tuple[str, str] | None:
    """(event reason, message) for a child that was changed, or None."""
    if result.action == "created":
        if existed:
            return "Repaired", f"re-created {result.kind} {result.name}: it had been deleted"
        return "Created", f"created {result.kind} {result.name}"
    if result.action == "updated":
        if drift:
            return "Repaired", (f"restored {result.kind} {result.name}: it differed from the spec "
                                "(edited by hand, or the operator's defaults changed)")
        return "Updated", f"updated {result.kind} {result.name} to the new spec"
    return None


async def _write_status(api: KubeApi, body: Mapping[str, Any], status: dict[str, Any]) -> None:
    current = body.get("status") or {}
    if render.contains(current, status):
        return
    meta = body["metadata"]
    await api.patch(pipeline_path(meta["namespace"], meta["name"], status=True), {"status": status})


def _invalid_status(error: render.InvalidSpec, generation: int | None, previous: list[Mapping[str, Any]],
                    old_status: Mapping[str, Any]) -> dict[str, Any]:
    message = (f"{error}. Fix the spec (kubectl edit analyticspipeline); the ConfigMap and CronJob keep their "
               "last valid settings until then.")
    stale = "not updated: the spec is invalid (see the Ready condition)"
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": [condition(READY, False, error.reason, message, generation, previous),
                       condition(CONFIGMAP_READY, False, error.reason, stale, generation, previous),
                       condition(CRONJOB_READY, False, error.reason, stale, generation, previous)],
    }
    for key in ("schedule", "configMapName", "cronJobName", "lastFlush"):
        if key in old_status:
            status[key] = old_status[key]
    return status


async def reconcile(ctx: OperatorContext, namespace: str, name: str, why: str) -> Outcome | None:
    """Bring pipeline ``namespace/name``'s children and status in line with its spec; None if it is gone."""
    async with ctx.lock(namespace, name):
        body = await ctx.api.get(pipeline_path(namespace, name))
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            logger.info("%s/%s: not reconciled (%s): the AnalyticsPipeline is gone or being deleted",
                        namespace, name, why)
            return None
        return await _reconcile_body(ctx, body, why)


async def _reconcile_body(ctx: OperatorContext, body: dict[str, Any], why: str) -> Outcome:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    generation = meta.get("generation")
    old_status = body.get("status") or {}
    previous = [item for item in old_status.get("conditions") or [] if isinstance(item, Mapping)]
    old_ready = next((item for item in previous if item.get("type") == READY), {})
    spec = body.get("spec") or {}

    try:
        desired = render.desired_state(namespace, name, spec, default_image=ctx.default_image,
                                       allowed_images=ctx.allowed_images)
    except render.InvalidSpec as error:
        status = _invalid_status(error, generation, previous, old_status)
        ready = status["conditions"][0]
        if old_ready.get("reason") != error.reason or old_ready.get("message") != ready["message"]:
            kopf.warn(body, reason=error.reason, message=ready["message"])
            logger.warning("%s/%s: invalid spec (%s): %s", namespace, name, why, error)
        await _write_status(ctx.api, body, status)
        return Outcome(False, error.reason, ready["message"])

    # Drift = the spec did not change since the last good reconciliation, yet a child differs.
    settled = old_status.get("observedGeneration") == generation and old_ready.get("status") == "True"
    try:
        cm = await apply_child(ctx.api, body, desired.configmap)
        cj = await apply_child(ctx.api, body, desired.cronjob)
    except KubeApiError as error:
        message = f"could not apply the children: {error}; retrying"
        logger.warning("%s/%s: %s (%s)", namespace, name, message, why)
        failed = {"observedGeneration": old_status.get("observedGeneration"),
                  "conditions": [condition(READY, False, "ApplyFailed", message, generation, previous)]
                  + [item for item in previous if item.get("type") != READY]}
        try:
            await _write_status(ctx.api, body, failed)
        except KubeApiError:
            pass
        return Outcome(False, "ApplyFailed", message, retry=True)

    actions = []
    for result, recorded in ((cm, "configMapName"), (cj, "cronJobName")):
        described = _describe(result, settled, existed=settled and old_status.get(recorded) == result.name)
        if described:
            reason, message = described
            actions.append(message)
            kopf.event(body, type="Normal", reason=reason, message=message)
            logger.info("%s/%s: %s (%s)", namespace, name, message, why)

    flush = flush_status(cj.actual)
    schedule_text = f"runs '{desired.schedule}' (UTC)"
    cj_reason, cj_message = (("Suspended", f"CronJob {cj.name} is suspended (spec.suspend: true)")
                             if desired.suspend else ("Scheduled", f"CronJob {cj.name} {schedule_text}"))
    conditions = [
        _child_condition(CONFIGMAP_READY, cm, "Applied", f"ConfigMap {cm.name} holds the sidecar config",
                         generation, previous),
        _child_condition(CRONJOB_READY, cj, cj_reason, cj_message, generation, previous),
    ]
    ok = all(item["status"] == "True" for item in conditions)
    if ok:
        reason = "Suspended" if desired.suspend else "Reconciled"
        message = (f"ConfigMap {cm.name} and CronJob {cj.name} match the spec; flushing is suspended"
                   if desired.suspend else f"ConfigMap {cm.name} and CronJob {cj.name} match the spec; "
                                           f"the flusher {schedule_text}")
    else:
        reason = next(item["reason"] for item in conditions if item["status"] != "True")
        message = "; ".join(item["message"] for item in conditions if item["status"] != "True")
    if desired.warnings:  # Ready, but weaker than the default posture: say so where `kubectl get ap -o wide` looks
        message = f"{message}. Warning: {'; '.join(text for _, text in desired.warnings)}"
        if old_ready.get("message") != message:
            for event_reason, text in desired.warnings:
                kopf.warn(body, reason=event_reason, message=text)
            logger.warning("%s/%s: %s", namespace, name, "; ".join(text for _, text in desired.warnings))
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "schedule": desired.schedule,
        "configMapName": cm.name,
        "cronJobName": cj.name,
        "conditions": [condition(READY, ok, reason, message, generation, previous), *conditions],
    }
    if flush:
        status["lastFlush"] = flush
        old_result = (old_status.get("lastFlush") or {}).get("result")
        if flush["result"] == "Failed" and old_result != "Failed":
            kopf.warn(body, reason="FlushFailed",
                      message=f"the flusher run scheduled at {flush.get('scheduleTime')} did not succeed; "
                              f"see: kubectl logs -n {namespace} -l {crd.LABEL_PIPELINE}={name} --tail=50 "
                              "(exit code 3: it flushed, but units it set aside wait: "
                              "'analytics-pipeline deadletter list', then 'retry' or 'discard')")
    if not ok:
        logger.warning("%s/%s: not ready (%s): %s", namespace, name, why, message)
    elif not actions:
        # Routine checks (timer, our own writes echoing back) stay quiet; a spec event is always reported.
        level = logging.INFO if why.startswith("AnalyticsPipeline") else logging.DEBUG
        logger.log(level, "%s/%s: ConfigMap %s and CronJob %s already match generation %s (%s)",
                   namespace, name, cm.name, cj.name, generation, why)
    await _write_status(ctx.api, body, status)
    # A name conflict is not retried here: the child's own events and the resync timer re-run us once it is gone.
    return Outcome(ok, reason, message, actions)

"""Sidecar injection as pure functions: from an incoming pod and its AnalyticsPipeline to what to add.

No I/O and no kopf here (the webhook wiring is in :mod:`.webhook`), so every rule is unit-testable:
which pods are left alone and why, where the sidecar goes (a native sidecar = an init container with
``restartPolicy: Always``, or a plain container), and how a volume-name collision is avoided. The
container itself comes from :func:`.render.render_sidecar_container`, the same function that writes the
``sidecar-container.yaml`` snippet into the pipeline's ConfigMap.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from . import crd, render

NATIVE, CONTAINER = "native", "container"
MODES = (NATIVE, CONTAINER)


class Result(StrEnum):
    """What the webhook did with one pod: the ``result`` label of ``analytics_pipeline_injections_total``."""

    INJECTED = "injected"
    ALREADY_INJECTED = "already_injected"
    UNKNOWN_PIPELINE = "unknown_pipeline"
    PIPELINE_NOT_READY = "pipeline_not_ready"
    INVALID_SPEC = "invalid_spec"
    PORT_CONFLICT = "port_conflict"
    ERROR = "error"


@dataclass(frozen=True)
class Plan:
    """The decision for one pod: ``changes`` maps a pod-spec list field to its new value (the old items
    unchanged, then the added ones); it is empty unless ``result`` is INJECTED."""

    result: Result
    message: str
    changes: dict[str, list[Any]] = field(default_factory=dict)


def pod_label(pod: Mapping[str, Any]) -> str | None:
    """The pipeline name a pod asks for with the ``analyticspipeline.io/inject`` label (None without it)."""
    value = ((pod.get("metadata") or {}).get("labels") or {}).get(crd.LABEL_INJECT)
    return str(value) if value is not None else None


def pod_display_name(pod: Mapping[str, Any]) -> str:
    """``name``, or ``generateName*`` for pods whose name the API server has not generated yet."""
    meta = pod.get("metadata") or {}
    return str(meta.get("name") or f"{meta.get('generateName') or '(unnamed)'}*")


def carries_sidecar(pod_spec: Mapping[str, Any]) -> bool:
    """The pod already has a container (plain or init) named ``analytics-sidecar``: injected before, or by hand."""
    return any(isinstance(item, Mapping) and item.get("name") == crd.SIDECAR_CONTAINER_NAME
               for key in ("containers", "initContainers") for item in pod_spec.get(key) or [])


def pipeline_ready(pipeline: Mapping[str, Any]) -> tuple[bool, str]:
    """Is the pipeline's ``Ready`` condition True (its ConfigMap exists and matches the spec)? And why not."""
    if (pipeline.get("metadata") or {}).get("deletionTimestamp"):
        return False, "it is being deleted"
    for item in (pipeline.get("status") or {}).get("conditions") or []:
        if isinstance(item, Mapping) and item.get("type") == "Ready":
            if item.get("status") == "True":
                return True, ""
            return False, f"its Ready condition is {item.get('status')} ({item.get('reason')}: {item.get('message')})"
    return False, "the operator has not reconciled it yet (no Ready condition)"


def free_volume_name(pod_spec: Mapping[str, Any], wanted: str = crd.SIDECAR_VOLUME_NAME) -> str:
    """``wanted``, or ``wanted-2``, ``wanted-3``… if the pod already has a volume of that name."""
    taken = {item.get("name") for item in pod_spec.get("volumes") or [] if isinstance(item, Mapping)}
    candidate, number = wanted, 1
    while candidate in taken:
        number += 1
        candidate = f"{wanted}-{number}"
    return candidate


def port_owner(pod_spec: Mapping[str, Any], port: int) -> str | None:
    """The name of a container that already declares ``containerPort: port`` (the pod shares one network)."""
    for key in ("containers", "initContainers"):
        for item in pod_spec.get(key) or []:
            for declared in (item.get("ports") or []) if isinstance(item, Mapping) else []:
                if isinstance(declared, Mapping) and declared.get("containerPort") == port:
                    return str(item.get("name"))
    return None


def plan(pod: Mapping[str, Any], pipeline: Mapping[str, Any] | None, *, default_image: str,
         mode: str = NATIVE, allowed_images: Sequence[str] = ()) -> Plan:
    """Decide what to do with ``pod`` (labelled for ``pipeline``, None if no such pipeline exists).

    Injection only ever appends: the sidecar to ``initContainers`` (native) or ``containers``, and the
    ConfigMap volume to ``volumes``. Pods already carrying the sidecar, pods of unknown or not-Ready
    pipelines, and pods already using the sidecar's port are left exactly as they are.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    spec = pod.get("spec") or {}
    namespace = (pod.get("metadata") or {}).get("namespace") or ""
    name = pod_label(pod) or ""
    who = f"pod {namespace}/{pod_display_name(pod)}"
    if carries_sidecar(spec):
        return Plan(Result.ALREADY_INJECTED, f"{who} already has a container named {crd.SIDECAR_CONTAINER_NAME}; "
                                             "left unchanged")
    if pipeline is None:
        return Plan(Result.UNKNOWN_PIPELINE,
                    f"{who} was not injected: its label {crd.LABEL_INJECT}={name!r} names no AnalyticsPipeline in "
                    f"namespace {namespace} (create it, or fix the label, then re-create the pod)")
    ready, why = pipeline_ready(pipeline)
    if not ready:
        return Plan(Result.PIPELINE_NOT_READY,
                    f"{who} was not injected: AnalyticsPipeline {namespace}/{name} is not Ready: {why}. "
                    "Re-create the pod once `kubectl get ap` shows it Ready")
    volume = free_volume_name(spec)
    try:
        pipeline_spec = pipeline.get("spec") or {}
        container = render.render_sidecar_container(name, pipeline_spec, default_image,
                                                    allowed_images=allowed_images, volume_name=volume)
        ports = render.sidecar_ports(pipeline_spec)
    except render.InvalidSpec as error:
        return Plan(Result.INVALID_SPEC, f"{who} was not injected: AnalyticsPipeline {namespace}/{name}: {error}")
    for port, field_name in zip(ports, ("port", "healthPort"), strict=True):
        owner = port_owner(spec, port)  # the ingest port counts even on loopback: one network namespace
        if owner is not None:
            return Plan(Result.PORT_CONFLICT,
                        f"{who} was not injected: its container {owner} already uses port {port}, the sidecar's "
                        f"{field_name}; set spec.sidecar.{field_name} of AnalyticsPipeline {namespace}/{name} to a "
                        "free port")
    if mode == NATIVE:
        target, container = "initContainers", {**container, "restartPolicy": "Always"}
    else:
        target = "containers"
    changes = {
        target: [*copy.deepcopy(list(spec.get(target) or [])), container],
        "volumes": [*copy.deepcopy(list(spec.get("volumes") or [])), render.sidecar_volume(name, volume)],
    }
    where = "a native sidecar (init container, restartPolicy: Always)" if mode == NATIVE else "a container"
    return Plan(Result.INJECTED, f"{who}: injected the sidecar of AnalyticsPipeline {namespace}/{name} as {where}",
                changes)


def apply(pod: Mapping[str, Any], decided: Plan) -> dict[str, Any]:
    """The pod after the plan (a copy): what the API server stores once it applies the webhook's patch."""
    result = copy.deepcopy(dict(pod))
    result.setdefault("spec", {}).update(copy.deepcopy(decided.changes))
    return result


def running_with_sidecar(pods: list[Mapping[str, Any]], name: str) -> int:
    """How many of ``pods`` are Running, not terminating, labelled for pipeline ``name`` and carry the sidecar."""
    count = 0
    for pod in pods:
        meta = pod.get("metadata") or {}
        if (pod_label(pod) == name and not meta.get("deletionTimestamp")
                and (pod.get("status") or {}).get("phase") == "Running" and carries_sidecar(pod.get("spec") or {})):
            count += 1
    return count

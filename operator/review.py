"""The admission webhook's envelope check, before kopf sees a review: trust only ``request.*``.

* The pod's namespace is ``request.namespace`` (what the API server authorised), never the object's own
  ``metadata.namespace``, which the caller wrote: a review from namespace ``a`` naming a pod in ``b`` must not
  get ``b``'s sidecar (its Secret names, its image).
* Only Pods (core/v1) on CREATE are ever changed; any other well-formed review is allowed unchanged.
* A malformed review (not an object, no ``request``, ``request: null``, fields of the wrong type) is answered
  HTTP 400 with an AdmissionReview whose ``response.status`` says what is wrong: never a 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import kopf
from aiohttp import web

logger = logging.getLogger("analytics_pipeline.operator")

API_VERSION = "admission.k8s.io/v1"
POD = {"group": "", "version": "v1", "kind": "Pod"}
_TYPES: dict[str, tuple[type, ...]] = {  # request fields the operator (or kopf) reads, and their JSON types
    "uid": (str,), "operation": (str,), "namespace": (str,), "name": (str,), "kind": (dict,), "resource": (dict,),
    "userInfo": (dict,), "object": (dict, type(None)), "oldObject": (dict, type(None)), "dryRun": (bool, type(None)),
    "subResource": (str, type(None)),
}
_REQUIRED = ("uid", "operation", "kind", "userInfo")


class MalformedReview(ValueError):
    """The body is not an AdmissionReview the webhook can answer; the message says which field and why."""


def check(review: Any) -> dict[str, Any]:
    """The review's ``request`` if the envelope is well formed, else MalformedReview naming the problem."""
    if not isinstance(review, Mapping):
        raise MalformedReview(f"the body must be an AdmissionReview object, got a JSON {_json_type(review)}")
    if review.get("kind") != "AdmissionReview" or review.get("apiVersion") != API_VERSION:
        raise MalformedReview(f"expected kind AdmissionReview, apiVersion {API_VERSION}; got kind "
                              f"{review.get('kind')!r}, apiVersion {review.get('apiVersion')!r}")
    request = review.get("request")
    if not isinstance(request, Mapping):
        raise MalformedReview(f"request must be an object, got {_json_type(request)}")
    for key in _REQUIRED:
        if key not in request:
            raise MalformedReview(f"request.{key} is missing")
    for key, types in _TYPES.items():
        if key in request and not isinstance(request[key], types):
            raise MalformedReview(f"request.{key} has the wrong type: {_json_type(request[key])}")
    if not request["uid"]:
        raise MalformedReview("request.uid is empty")
    return dict(request)


def is_pod_creation(request: Mapping[str, Any]) -> bool:
    """A core/v1 Pod being created, with the object a Pod too (the only thing the webhook changes)."""
    kind, obj = request.get("kind") or {}, request.get("object")
    return (request.get("operation") == "CREATE" and {key: kind.get(key) for key in POD} == POD
            and not request.get("subResource") and isinstance(obj, Mapping)
            and obj.get("kind", "Pod") == "Pod" and obj.get("apiVersion", "v1") == "v1")


def answer(uid: str, *, allowed: bool = True, code: int | None = None, message: str = "") -> dict[str, Any]:
    """An AdmissionReview response (with an error status when ``code`` is given)."""
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if code is not None:
        response["status"] = {"code": code, "message": message, "reason": "BadRequest" if code == 400 else ""}
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def bad_request(uid: str, message: str) -> web.HTTPBadRequest:
    """HTTP 400 carrying an AdmissionReview error (kopf passes aiohttp's HTTP errors through unchanged)."""
    body = answer(uid, allowed=False, code=400, message=f"malformed AdmissionReview: {message}")
    return web.HTTPBadRequest(text=json.dumps(body), content_type="application/json")


def strict(fn: kopf.WebhookFn) -> kopf.WebhookFn:
    """Wrap kopf's admission function: check the envelope, pass Pod creations on (namespace from the request),
    allow anything else unchanged."""

    async def wrapped(review: Any, **kwargs: Any) -> Any:
        try:
            request = check(review)
        except MalformedReview as error:
            request = review.get("request") if isinstance(review, Mapping) else None
            uid = request.get("uid") if isinstance(request, Mapping) else None
            logger.warning("refused a malformed admission review: %s", error)
            raise bad_request(uid if isinstance(uid, str) else "", str(error)) from None
        if not is_pod_creation(request):
            return answer(request["uid"])
        namespace = request.get("namespace")
        if not isinstance(namespace, str) or not namespace:
            raise bad_request(request["uid"], "request.namespace is missing for a namespaced Pod")
        pod = dict(request["object"])
        meta = pod.get("metadata")
        if meta is not None and not isinstance(meta, Mapping):
            raise bad_request(request["uid"], "request.object.metadata must be an object")
        pod["metadata"] = {**(meta or {}), "namespace": namespace}  # what the API server authorised, only
        return await fn({**review, "request": {**request, "object": pod}}, **kwargs)

    return wrapped  # type: ignore[return-value]


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)

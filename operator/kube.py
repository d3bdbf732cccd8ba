"""A tiny async Kubernetes REST client for the few calls the operator makes on its children.

kopf has no public client for arbitrary objects, so this one rides on kopf's own credential discovery
(``kopf.login_with_service_account`` in a pod, ``kopf.login_with_kubeconfig`` elsewhere) and aiohttp,
which kopf already depends on: GET, POST (create), merge-PATCH, nothing else. A 401 re-reads the
credentials once (service-account tokens are rotated by the kubelet).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

from . import crd

logger = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


class KubeApiError(Exception):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0 when the server was unreachable)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def default_login(settings: kopf.OperatorSettings | None = None) -> kopf.ConnectionInfo:
    """Credentials the way kopf finds its own: the pod's service account, else the kubeconfig."""
    settings = settings or kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise KubeApiError(0, "NoCredentials", "no service account token and no kubeconfig (set KUBECONFIG)")
    return info


class KubeApi:
    """GET/POST/PATCH against the API server; paths come from the helpers below."""

    def __init__(self, login: Callable[[], kopf.ConnectionInfo] = default_login, timeout: float = 30.0) -> None:
        self._login = login
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._lock = asyncio.Lock()
        self.closed = False

    async def _connect(self, fresh: bool = False) -> aiohttp.ClientSession:
        async with self._lock:
            if self.closed:
                raise KubeApiError(0, "Closed", "the operator is shutting down")
            if self._session is not None and not fresh:
                return self._session
            if self._session is not None:
                await self._session.close()
            info = self._login()
            ssl_context = info.as_ssl_context() if info.server.startswith("https") else None
            self._server = info.server.rstrip("/")
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else False),
                headers={**info.as_http_headers(), "User-Agent": "analytics-pipeline-operator"},
                timeout=self._timeout)
            return self._session

    async def close(self) -> None:
        """Close the HTTP session (call before the event loop stops); later calls raise KubeApiError."""
        async with self._lock:
            self.closed = True
            if self._session is not None:
                await self._session.close()
                self._session = None

    async def request(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                      content_type: str = "application/json") -> dict[str, Any] | None:
        """One API call; the decoded object, or None for 404. Other errors raise KubeApiError."""
        for attempt in (1, 2):
            session = await self._connect(fresh=attempt == 2)
            try:
                async with session.request(method, f"{self._server}{path}", json=body,
                                           headers={"Content-Type": content_type}) as response:
                    if response.status == 401 and attempt == 1:
                        logger.info("API server answered 401; re-reading credentials and retrying once")
                        continue
                    if response.status == 404:
                        return None
                    payload = await response.json(content_type=None) if response.content_length != 0 else {}
                    if response.status >= 400:
                        payload = payload if isinstance(payload, dict) else {}
                        raise KubeApiError(response.status, str(payload.get("reason") or response.reason),
                                           str(payload.get("message") or payload))
                    return payload if isinstance(payload, dict) else {}
            except (aiohttp.ClientError, TimeoutError) as error:
                raise KubeApiError(0, type(error).__name__, str(error) or "API server unreachable") from error
        raise KubeApiError(401, "Unauthorized", "credentials refused twice")

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object at ``path``, or None if it does not exist."""
        return await self.request("GET", path)

    async def create(self, collection: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``body`` into ``collection``; raises KubeApiError(409) if it exists already."""
        result = await self.request("POST", collection, body)
        if result is None:
            raise KubeApiError(404, "NotFound", f"{collection} does not exist (is the namespace gone?)")
        return result

    async def patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any] | None:
        """JSON merge patch (RFC 7386: maps merge, lists are replaced, null deletes); None if it is gone."""
        return await self.request("PATCH", path, patch, content_type=MERGE_PATCH)


def _q(part: str) -> str:
    return quote(part, safe="")


def configmaps_path(namespace: str, name: str | None = None) -> str:
    """``/api/v1/namespaces/<ns>/configmaps[/<name>]``."""
    base = f"/api/v1/namespaces/{_q(namespace)}/configmaps"
    return f"{base}/{_q(name)}" if name else base


def cronjobs_path(namespace: str, name: str | None = None) -> str:
    """``/apis/batch/v1/namespaces/<ns>/cronjobs[/<name>]``."""
    base = f"/apis/batch/v1/namespaces/{_q(namespace)}/cronjobs"
    return f"{base}/{_q(name)}" if name else base


def pipeline_path(namespace: str, name: str | None = None, status: bool = False) -> str:
    """The AnalyticsPipeline (or its ``/status`` subresource)."""
    base = f"/apis/{crd.GROUP}/{crd.VERSION}/namespaces/{_q(namespace)}/{crd.PLURAL}"
    if name is None:
        return base
    return f"{base}/{_q(name)}/status" if status else f"{base}/{_q(name)}"


def pods_path(namespace: str) -> str:
    """``/api/v1/namespaces/<ns>/pods`` (listed to count the pods carrying a pipeline's sidecar)."""
    return f"/api/v1/namespaces/{_q(namespace)}/pods"


def events_path(namespace: str) -> str:
    """``/api/v1/namespaces/<ns>/events`` (core v1 Events, as kopf posts them)."""
    return f"/api/v1/namespaces/{_q(namespace)}/events"

"""Kubernetes Events posted by the operator outside kopf's handlers (the admission webhook's requests
cannot reach kopf's event queue): in the background, so an admission answer never waits for them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from . import crd
from .kube import KubeApi, KubeApiError, events_path

logger = logging.getLogger("analytics_pipeline.operator")


def event_body(regarding: Mapping[str, Any], reason: str, message: str, event_type: str = "Warning") -> dict[str, Any]:
    """A core v1 Event about ``regarding`` (in its namespace), shaped like the ones kopf posts."""
    meta = regarding.get("metadata") or {}
    ref = {key: value for key, value in (("apiVersion", regarding.get("apiVersion")), ("kind", regarding.get("kind")),
                                         ("name", meta.get("name")), ("namespace", meta.get("namespace")),
                                         ("uid", meta.get("uid"))) if value}
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    prefix = f"{meta.get('name') or 'analytics-pipeline'}."
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": prefix, "namespace": meta.get("namespace")},
        "involvedObject": ref, "type": event_type, "reason": reason, "message": message[:1000],
        "source": {"component": crd.MANAGED_BY}, "reportingComponent": crd.MANAGED_BY,
        "reportingInstance": crd.MANAGED_BY, "action": "Admit",
        "firstTimestamp": now[:19] + "Z", "lastTimestamp": now[:19] + "Z", "eventTime": now, "count": 1,
    }


class EventPoster:
    """Posts Events in the background; failures are logged, never raised."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self._tasks: set[asyncio.Task[None]] = set()

    def post(self, regarding: Mapping[str, Any], reason: str, message: str) -> None:
        """Queue a Warning Event about ``regarding``; failures are logged, never raised."""
        task = asyncio.create_task(self._post(event_body(regarding, reason, message)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, body: dict[str, Any]) -> None:
        try:
            await self.api.create(events_path(body["metadata"]["namespace"]), body)
        except KubeApiError as error:
            if not self.api.closed:
                logger.warning("could not post Event %s: %s", body["reason"], error)

    async def drain(self) -> None:
        """Wait for the Events still being posted (at shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

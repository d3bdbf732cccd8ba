"""The PyPI SDKs driven through their public API: one function per SDK, run in a worker thread (the SDKs
block; the test's event loop keeps serving the sidecar they talk to)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdk_support import Call, parse_at


@dataclass
class PyRun:
    """What an SDK run reported: its error callbacks and the calls it refused to queue."""

    errors: list[str] = field(default_factory=list)
    not_queued: int = 0


def _errors(run: PyRun) -> Callable[[Exception, Any], None]:
    def on_error(error: Exception, batch: Any) -> None:
        run.errors.append(f"{type(error).__name__}: {error} ({len(batch) if batch else 0} events)")

    return on_error


def run_segment_like(module: str, host: str, calls: list[Call], options: dict[str, Any], pace_s: float) -> PyRun:
    """segment-analytics-python or rudder-sdk-python (the same API, forked): each call, then shutdown()."""
    if module == "segment":
        from segment.analytics import Client
    else:
        from rudderstack.analytics import Client
    run = PyRun()
    client = Client(write_key="test-write-key", host=host, on_error=_errors(run), **options)
    for call in calls:
        at = parse_at(call)
        if call.kind == "track":
            queued, _ = client.track(user_id=call.user, event=call.event, properties={"plan": "pro"}, timestamp=at)
        elif call.kind == "page":
            queued, _ = client.page(user_id=call.user, name=call.name, timestamp=at)
        elif call.kind == "screen":
            queued, _ = client.screen(user_id=call.user, name=call.name, timestamp=at)
        elif call.kind == "identify":
            queued, _ = client.identify(user_id=call.user, traits={"plan": "pro"}, timestamp=at)
        elif call.kind == "group":
            queued, _ = client.group(user_id=call.user, group_id=call.target, timestamp=at)
        else:
            queued, _ = client.alias(previous_id=call.target, user_id=call.user, timestamp=at)
        run.not_queued += not queued
        if pace_s:
            time.sleep(pace_s)
    client.shutdown()  # flush the queue, then join the consumer threads
    return run


def run_posthog(host: str, calls: list[Call], options: dict[str, Any], pace_s: float) -> PyRun:
    """posthog (Python): page is ``$pageview``, screen ``$screen``, identify is ``set`` (``$set``)."""
    from posthog import Posthog

    run = PyRun()
    client = Posthog("phc_test_key", host=host, on_error=_errors(run), **options)
    for call in calls:
        at = parse_at(call)
        if call.kind == "track":
            queued = client.capture(call.event, distinct_id=call.user, properties={"plan": "pro"}, timestamp=at)
        elif call.kind == "page":
            queued = client.capture("$pageview", distinct_id=call.user, timestamp=at,
                                    properties={"$current_url": f"https://example.com/{call.name}"})
        elif call.kind == "screen":
            queued = client.capture("$screen", distinct_id=call.user, properties={"$screen_name": call.name},
                                    timestamp=at)
        elif call.kind == "identify":
            queued = client.set(distinct_id=call.user, properties={"plan": "pro"}, timestamp=at)
        elif call.kind == "group":
            queued = client.group_identify("company", call.target or "", {"name": call.target},
                                           timestamp=at, distinct_id=call.user)
        else:
            queued = client.alias(previous_id=call.target or "", distinct_id=call.user, timestamp=at)
        run.not_queued += queued is None
        if pace_s:
            time.sleep(pace_s)
    client.shutdown()  # flush, then join the consumer
    return run


def run_python_sdk(sdk: str, host: str, calls: list[Call], options: dict[str, Any] | None = None,
                   pace_s: float = 0) -> PyRun:
    """Dispatch on the SDK name used in the test ids."""
    options = dict(options or {})
    if sdk in ("segment-python", "rudder-python"):
        return run_segment_like(sdk.split("-")[0].replace("rudder", "rudderstack"), host, calls, options, pace_s)
    if sdk == "posthog-python-v1":
        options["capture_mode"] = "v1"
    return run_posthog(host, calls, options, pace_s)

"""The mutable state of one sidecar app: what handlers need, in one object reached through one app key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.events import EventValidator

from .committer import GroupCommitter
from .metrics import SidecarMetrics


@dataclass(eq=False)
class SidecarState:
    """Validator and committer in force, metrics, and the counters the gauges read."""

    config: Config
    validator: EventValidator
    committer: GroupCommitter
    metrics: SidecarMetrics
    in_flight: int = 0
    draining: bool = False
    redis_full: bool = False  # Redis above redis.memory_high_water_ratio (sidecar/redis_watch.py): ingest 503s
    started: float = field(default_factory=time.time)

    def apply(self, config: Config) -> None:
        """Switch to a reloaded config: later requests see the new limits, later commits the new TTL."""
        self.config = config
        self.validator = EventValidator(config)
        self.committer.update(config)

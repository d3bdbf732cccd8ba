"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analytics_pipeline.core.config import Config, parse_config

REPO = Path(__file__).resolve().parents[1]


def make_config(pipeline: str, redis_url: str, database_url: str, **sections: Any) -> Config:
    """A validated Config for tests; ``sections`` (e.g. ``ingest={...}``) are merged over the defaults."""
    return parse_config({"pipeline": pipeline, "redis_url": redis_url, "database_url": database_url, **sections})

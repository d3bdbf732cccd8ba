"""Which shards a pipeline has right now: the configured ones plus every tag a writer ever registered.

A pipeline's shard set is ``shard_tags(pipeline, N)`` (N = ``counters.shards``) united with the tags in
``ap:pipelines`` whose pipeline is this one. The second part keeps old shards in the set after N
changed (they are drained by the flusher and read by queries until empty; an empty shard costs a
reader one small read) and picks up shards of a larger N that sidecars already write to. Writers
SADD their tag before their first count (sidecar/committer.py), so a reader that lists the set after
a write was acknowledged always sees that write's shard.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .keys import PIPELINES_SET, PipelineKeys, pipeline_of_tag, shard_tags


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def valid_tag(tag: str) -> bool:
    """True if ``tag`` names a shard of a well-formed pipeline (``ns/name`` or ``ns/name#<salt>``)."""
    try:
        PipelineKeys.of_tag(tag)
    except ValueError:
        return False
    return True


def group_tags(tags: Iterable[bytes | str]) -> dict[str, list[str]]:
    """Shard tags (as ``ap:pipelines`` holds them) grouped by pipeline, both sorted; bad names dropped."""
    grouped: dict[str, set[str]] = {}
    for raw in tags:
        tag = _text(raw)
        if valid_tag(tag):
            grouped.setdefault(pipeline_of_tag(tag), set()).add(tag)
    return {pipeline: sorted(grouped[pipeline]) for pipeline in sorted(grouped)}


def shard_set(pipeline: str, configured: int, registered: Iterable[bytes | str]) -> list[PipelineKeys]:
    """The shards of ``pipeline``: its ``configured`` shards first (in shard order), then any other
    registered tag of it (old shards after N shrank, or shards of a newer, larger N)."""
    tags = shard_tags(pipeline, max(configured, 1))
    extra = group_tags(registered).get(pipeline, [])
    return [PipelineKeys(pipeline, tag) for tag in [*tags, *(t for t in extra if t not in tags)]]


async def registered_tags(client: Any) -> set[str]:
    """Every shard tag writers registered (``SMEMBERS ap:pipelines``) on a redis-py client."""
    return {_text(tag) for tag in await client.smembers(PIPELINES_SET)}


async def pipeline_shards(client: Any, pipeline: str, configured: int) -> list[PipelineKeys]:
    """:func:`shard_set` with the tags read from Redis now."""
    return shard_set(pipeline, configured, await registered_tags(client))

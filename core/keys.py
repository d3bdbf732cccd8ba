"""The Redis key layout, defined once and imported by every component.

Every key of a pipeline shard starts with ``ap:{<tag>}:`` so that all of them hash to one Redis
Cluster slot and a single Lua script may touch them together. Shard 0's tag is the pipeline name
itself (``ns/name``: a one-shard pipeline keeps the original layout); shard k > 0 of N has the tag
``ns/name#<salt>``, with the salt chosen so that its slot lies about k/N of the slot ring away from
shard 0's (:func:`shard_tags`): N shards land on N different masters of an evenly split cluster.
Keys below are written for shard 0; every other shard has the same keys under its own tag.

Live buckets are hashes, one per pipeline x granularity x time bucket:

    ap:{ns/name}:d:YYYYMMDD      field = event_type                 (daily)
    ap:{ns/name}:h:YYYYMMDDHH    field = event_type                 (hourly, UTC)
    ap:{ns/name}:u:YYYYMMDD      field = event_type + US + user_id  (per user, daily)

Bookkeeping keys:

    ap:{ns/name}:dirty           ZSET  bucket key -> ms when first written since its last claim
    ap:{ns/name}:dd:<S>:<slice>:<hex>  HASH  message_id dedup shard: field = 12 bytes of the id's digest
                                 (see sidecar/commit.lua; one EXPIREAT per shard, ~16 B per id)
    ap:{ns/name}:msg:<id>        STRING pre-1.x message_id dedup marker: still honoured (read only)
    ap:{ns/name}:gc:<token>      STRING group-commit fence (makes an ambiguous write decidable)
    ap:{ns/name}:inflight        ZSET  flush unit id -> ms when claimed
    ap:{ns/name}:unit:<unit>     SET   staging keys claimed by that unit
    ap:{ns/name}:unitfails       HASH  unit id -> failed applies so far (set aside at flush.dead_letter_after_failures)
    ap:{ns/name}:s:<unit>:<kind>:<bucket>   HASH  a claimed (staged) bucket
    ap:{ns/name}:claimseq        STRING counter bumped by every claim (queries use it as a seqlock)
    ap:{ns/name}:claimhold       ZSET  reader token -> expiry ms; while not empty the flusher does not claim
    ap:{ns/name}:lock            STRING flusher run lock (SET NX PX with a token)
    ap:pipelines                 SET   every shard tag that has written (lets ``flush --all`` find them,
                                       and the flusher and queries find a pipeline's old shards after N
                                       changed); no hash tag, so only ever touched by a command of its own
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal

from .config import PIPELINE_RE, Granularity

BucketKind = Literal["d", "h", "u"]

KIND_OF_GRANULARITY: dict[Granularity, BucketKind] = {"daily": "d", "hourly": "h", "user_daily": "u"}
GRANULARITY_OF_KIND: dict[BucketKind, Granularity] = {v: k for k, v in KIND_OF_GRANULARITY.items()}

# Separates event type and user id in a per-user field. Event names may not contain control
# characters (the event model refuses them), so splitting at the first US is unambiguous.
USER_FIELD_SEPARATOR = "\x1f"

PIPELINES_SET = "ap:pipelines"

SHARD_SEPARATOR = "#"  # between pipeline name and shard salt in a tag; never part of a pipeline name
CLUSTER_SLOTS = 16384
_SHARD_SLOT_TOLERANCE = 16  # how far from its target slot a shard's tag may hash


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: str | bytes) -> int:
    """The Redis Cluster slot of a key: CRC16 of its hash tag (``{...}``) if it has one, else of the key."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc16(data) % CLUSTER_SLOTS


def shard_tags(pipeline: str, shards: int) -> list[str]:
    """The hash tags of shards 0..N-1 of a pipeline: ``[pipeline, pipeline#<salt>, ...]``.

    Shard k's salt is the smallest number whose tag hashes within a few slots of
    ``slot(shard 0) + k * 16384 / N``: spread evenly over the slot ring, so over the masters of a
    cluster whose slots are split evenly, and the same on every sidecar, flusher and reader.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, not {shards}")
    return list(_shard_tags(pipeline, shards))


@functools.lru_cache(maxsize=1024)
def _shard_tags(pipeline: str, shards: int) -> tuple[str, ...]:
    """:func:`shard_tags`, computed once per (pipeline, N): the salt search is ~1 ms of Python per three
    shards, and every query attempt and flush run asks for the shard set."""
    base = crc16(pipeline.encode()) % CLUSTER_SLOTS
    tags = [pipeline]
    for k in range(1, shards):
        target = (base + round(k * CLUSTER_SLOTS / shards)) % CLUSTER_SLOTS
        salt = 0
        while True:
            tag = f"{pipeline}{SHARD_SEPARATOR}{salt}"
            distance = abs(crc16(tag.encode()) % CLUSTER_SLOTS - target)
            if min(distance, CLUSTER_SLOTS - distance) <= _SHARD_SLOT_TOLERANCE and tag not in tags:
                tags.append(tag)
                break
            salt += 1
    return tuple(tags)


def sidecar_shard_tag(pipeline: str, shards: int, pod_name: str) -> str:
    """The shard a sidecar writes to: a stable hash of its pod name picks one of ``shard_tags``."""
    if shards <= 1:
        return pipeline
    return shard_tags(pipeline, shards)[crc16(pod_name.encode()) % shards]


def pipeline_of_tag(tag: str) -> str:
    """The pipeline a shard tag belongs to (``ns/name#123`` -> ``ns/name``)."""
    return tag.partition(SHARD_SEPARATOR)[0]

_DAY_FORMAT = "%Y%m%d"
_HOUR_FORMAT = "%Y%m%d%H"


def message_digest(message_id: str) -> bytes:
    """The 16-byte digest the dedup shards store instead of the id (4 bytes pick the shard, 12 are the field)."""
    return hashlib.blake2b(message_id.encode(), digest_size=16).digest()


def user_field(event_type: str, user_id: str) -> str:
    """The hash field of a per-user bucket."""
    return f"{event_type}{USER_FIELD_SEPARATOR}{user_id}"


def split_user_field(field: str) -> tuple[str, str]:
    """Inverse of :func:`user_field`: ``(event_type, user_id)``."""
    event_type, _, user_id = field.partition(USER_FIELD_SEPARATOR)
    return event_type, user_id


def day_bucket(moment: datetime | date) -> str:
    """``YYYYMMDD`` of a UTC moment or a date."""
    return moment.strftime(_DAY_FORMAT)


def hour_bucket(moment: datetime) -> str:
    """``YYYYMMDDHH`` of a UTC moment."""
    return moment.astimezone(UTC).strftime(_HOUR_FORMAT) if moment.tzinfo else moment.strftime(_HOUR_FORMAT)


def parse_bucket(kind: BucketKind, bucket: str) -> datetime:
    """The UTC start of a bucket (a day for ``d``/``u``, an hour for ``h``)."""
    fmt = _HOUR_FORMAT if kind == "h" else _DAY_FORMAT
    return datetime.strptime(bucket, fmt).replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class BucketRef:
    """A live bucket key taken apart: which kind and which time bucket."""

    kind: BucketKind
    bucket: str

    @property
    def start(self) -> datetime:
        return parse_bucket(self.kind, self.bucket)

    @property
    def suffix(self) -> str:
        return f"{self.kind}:{self.bucket}"


class PipelineKeys:
    """All Redis key names of one pipeline shard (shard 0, the whole pipeline when it has one shard)."""

    __slots__ = ("base", "pipeline", "tag")

    def __init__(self, pipeline: str, tag: str | None = None) -> None:
        if not PIPELINE_RE.match(pipeline):
            raise ValueError(f"not a pipeline name: {pipeline!r} (want '<namespace>/<name>')")
        tag = tag or pipeline
        if pipeline_of_tag(tag) != pipeline or (tag != pipeline and not tag.rpartition(SHARD_SEPARATOR)[2].isdigit()):
            raise ValueError(f"{tag!r} is not a shard tag of pipeline {pipeline}")
        self.pipeline = pipeline
        self.tag = tag
        self.base = f"ap:{{{tag}}}:"

    @classmethod
    def of_tag(cls, tag: str) -> PipelineKeys:
        """The keys of the shard a tag (as ``ap:pipelines`` holds it) names."""
        return cls(pipeline_of_tag(tag), tag)

    @property
    def slot(self) -> int:
        """The Redis Cluster slot every key of this shard hashes to."""
        return key_slot(self.base)

    # live buckets -------------------------------------------------------------------------------
    def bucket(self, kind: BucketKind, bucket: str) -> str:
        return f"{self.base}{kind}:{bucket}"

    def daily(self, moment: datetime | date) -> str:
        return self.bucket("d", day_bucket(moment))

    def hourly(self, moment: datetime) -> str:
        return self.bucket("h", hour_bucket(moment))

    def user_daily(self, moment: datetime | date) -> str:
        return self.bucket("u", day_bucket(moment))

    def parse_bucket_key(self, key: str) -> BucketRef:
        """Take a live bucket key of this pipeline apart; ValueError for any other key."""
        if not key.startswith(self.base):
            raise ValueError(f"{key!r} is not a key of pipeline {self.pipeline}")
        kind, _, bucket = key[len(self.base) :].partition(":")
        if kind not in GRANULARITY_OF_KIND or not bucket.isdigit():
            raise ValueError(f"{key!r} is not a bucket key")
        return BucketRef(kind, bucket)  # type: ignore[arg-type]

    # bookkeeping --------------------------------------------------------------------------------
    @property
    def dirty(self) -> str:
        return f"{self.base}dirty"

    def message(self, message_id: str) -> str:
        """The pre-1.x one-key-per-id dedup marker (only read now, until the old ones expire)."""
        return f"{self.base}msg:{message_id}"

    @property
    def dedup_prefix(self) -> str:
        """Prefix of the message_id dedup shard hashes (``<prefix><slice s>:<slice>:<hex>``)."""
        return f"{self.base}dd:"

    def group_commit(self, token: str) -> str:
        return f"{self.base}gc:{token}"

    @property
    def inflight(self) -> str:
        return f"{self.base}inflight"

    def unit(self, unit_id: str) -> str:
        return f"{self.base}unit:{unit_id}"

    @property
    def unit_failures(self) -> str:
        """Failed applies per in-flight unit (the flusher sets a unit aside after too many)."""
        return f"{self.base}unitfails"

    def staging_prefix(self, unit_id: str) -> str:
        return f"{self.base}s:{unit_id}:"

    def staging(self, unit_id: str, live_key: str) -> str:
        """The name a live bucket key gets while unit ``unit_id`` flushes it."""
        return self.staging_prefix(unit_id) + live_key[len(self.base) :]

    def unstage(self, unit_id: str, staging_key: str) -> BucketRef:
        """Which bucket a staging key holds."""
        prefix = self.staging_prefix(unit_id)
        if not staging_key.startswith(prefix):
            raise ValueError(f"{staging_key!r} is not a staging key of unit {unit_id}")
        return self.parse_bucket_key(self.base + staging_key[len(prefix) :])

    @property
    def claim_seq(self) -> str:
        return f"{self.base}claimseq"

    @property
    def claim_hold(self) -> str:
        """Readers that keep losing the claim_seq race park claims here for a moment (see reads/queries.py)."""
        return f"{self.base}claimhold"

    @property
    def lock(self) -> str:
        return f"{self.base}lock"

    @property
    def scan_pattern(self) -> str:
        """A SCAN MATCH pattern for every key of this pipeline (tests and admin tools only)."""
        escaped = self.base.replace("{", "\\{").replace("}", "\\}")
        return f"{escaped}*"

    @property
    def dedup_scan_pattern(self) -> str:
        """A SCAN MATCH pattern for this pipeline's dedup shards (tests, benchmarks, admin tools)."""
        return self.scan_pattern[:-1] + "dd:*"


def tag_from_key(key: str) -> str | None:
    """The shard tag of a key (``ns/name`` or ``ns/name#salt``); None for keys that are not ours."""
    if not key.startswith("ap:{"):
        return None
    end = key.find("}:", 4)
    return key[4:end] if end > 0 else None


def pipeline_from_key(key: str) -> str | None:
    """The pipeline a key belongs to, from its hash tag; None for keys that are not ours."""
    tag = tag_from_key(key)
    return pipeline_of_tag(tag) if tag is not None else None


def days_between(start: date, end: date) -> list[date]:
    """Every date from start to end inclusive."""
    return [start + timedelta(days=n) for n in range((end - start).days + 1)]


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    """Every UTC hour start from the hour of start to the hour of end inclusive."""
    first = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    last = end.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    count = int((last - first).total_seconds() // 3600) + 1
    return [first + timedelta(hours=n) for n in range(max(count, 0))]

"""The Redis key layout: one hash tag per pipeline, reversible bucket and staging names."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from analytics_pipeline.core.keys import (
    PipelineKeys,
    days_between,
    hours_between,
    pipeline_from_key,
    split_user_field,
    user_field,
)


def test_every_key_shares_the_pipeline_hash_tag() -> None:
    keys = PipelineKeys("shop/web")
    moment = datetime(2026, 11, 27, 23, 59, tzinfo=UTC)
    names = [keys.daily(moment), keys.hourly(moment), keys.user_daily(moment), keys.dirty, keys.inflight,
             keys.message("m1"), keys.group_commit("t"), keys.unit("r.1"), keys.claim_seq, keys.lock,
             keys.staging("r.1", keys.daily(moment))]
    assert all(name.startswith("ap:{shop/web}:") for name in names)
    assert len(set(names)) == len(names)
    assert {pipeline_from_key(name) for name in names} == {"shop/web"}


def test_buckets_are_utc_and_reversible() -> None:
    keys = PipelineKeys("shop/web")
    local = datetime(2026, 11, 28, 1, 30, tzinfo=timezone(timedelta(hours=5, minutes=30)))  # 20:00Z on the 27th
    assert keys.hourly(local) == "ap:{shop/web}:h:2026112720"
    assert keys.daily(date(2026, 11, 27)) == "ap:{shop/web}:d:20261127"
    ref = keys.parse_bucket_key(keys.hourly(local))
    assert (ref.kind, ref.bucket, ref.start) == ("h", "2026112720", datetime(2026, 11, 27, 20, tzinfo=UTC))
    staged = keys.staging("run7.3", keys.user_daily(date(2026, 1, 2)))
    assert keys.unstage("run7.3", staged).suffix == "u:20260102"


@pytest.mark.parametrize("bad", ["ap:{other/x}:d:20260101", "ap:{shop/web}:dirty", "ap:{shop/web}:x:1"])
def test_foreign_or_bookkeeping_keys_are_not_buckets(bad: str) -> None:
    with pytest.raises(ValueError):
        PipelineKeys("shop/web").parse_bucket_key(bad)


def test_user_field_splits_at_the_first_separator_only() -> None:
    assert split_user_field(user_field("signup", "a\x1fb")) == ("signup", "a\x1fb")


def test_pipeline_names_are_validated() -> None:
    with pytest.raises(ValueError):
        PipelineKeys("no-namespace")
    assert pipeline_from_key("unrelated") is None


def test_ranges_are_inclusive() -> None:
    assert len(days_between(date(2026, 2, 27), date(2026, 3, 1))) == 3
    hours = hours_between(datetime(2026, 1, 1, 22, 15, tzinfo=UTC), datetime(2026, 1, 2, 1, 0, tzinfo=UTC))
    assert [h.hour for h in hours] == [22, 23, 0, 1]


def test_key_slot_matches_redis_py() -> None:
    """Our CRC16 slot (the sidecar routes with it without importing redis-py) is Redis Cluster's."""
    import redis.crc

    from analytics_pipeline.core.keys import key_slot

    for key in ["a", "ap:{x/y}:d:1", "ap:{}:z", "{", "{a}{b}", "ap:{ns/n#3}:dirty", "héllo", "ap:pipelines"]:
        assert key_slot(key) == redis.crc.key_slot(key.encode()), key


def test_shard_tags_keep_shard_zero_and_spread_the_rest_over_the_ring() -> None:
    from analytics_pipeline.core.keys import CLUSTER_SLOTS, PipelineKeys, shard_tags, tag_from_key

    assert shard_tags("default/web", 1) == ["default/web"]
    assert PipelineKeys("default/web").base == "ap:{default/web}:"  # one shard: today's layout
    for shards in (2, 3, 5):
        tags = shard_tags("default/web", shards)
        assert tags[0] == "default/web" and len(set(tags)) == shards
        slots = [PipelineKeys.of_tag(tag).slot for tag in tags]
        for k, slot in enumerate(slots):
            target = (slots[0] + round(k * CLUSTER_SLOTS / shards)) % CLUSTER_SLOTS
            assert min(abs(slot - target), CLUSTER_SLOTS - abs(slot - target)) <= 16
        # on three equal slot ranges (what redis-cli --cluster create makes), three shards hit all three
        if shards == 3:
            assert len({slot * 3 // CLUSTER_SLOTS for slot in slots}) >= 2
    keys = PipelineKeys.of_tag(shard_tags("default/web", 3)[1])
    assert keys.pipeline == "default/web" and tag_from_key(keys.dirty) == keys.tag
    with pytest.raises(ValueError):
        PipelineKeys("default/web", "other/web#1")

"""Body encodings: Content-Encoding, PostHog's ?compression= and form bodies, zip bombs, unsupported codings.

Synthetic inputs here; recorded payloads of the real SDKs are replayed by the sdk-harness tests.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest
import redis.asyncio as aioredis
from sidecar_helpers import Sidecar, SidecarFactory, kind_totals, pipeline_keys

from analytics_pipeline.core.keys import PipelineKeys

BATCH = [{"event": "$pageview", "distinct_id": "u1", "properties": {"$current_url": "/é"}},
         {"event": "clicked", "distinct_id": "u2"}]
JSON = orjson.dumps(BATCH)
FORM = "application/x-www-form-urlencoded"
VECTORS = json.loads((Path(__file__).parent / "data" / "lz64_vectors.json").read_text(encoding="utf-8"))


def lz64_of(text: str) -> str:
    """A payload compressed by the JavaScript lz-string (see data/lz64_vectors.js)."""
    return next(vector["lz64"] for vector in VECTORS if vector["text"] == text)


LZ_PAYLOAD = VECTORS[7]["text"]  # a posthog-js style list of one $pageview


async def counted(redis_client: aioredis.Redis, keys: PipelineKeys) -> dict[str, str]:
    """Daily counts over every day (the recorded lz64 payload is timestamped 2026-11-27)."""
    return {event: str(total) for event, total in (await kind_totals(redis_client, keys, "d")).items()}


@pytest.mark.parametrize(("raw", "headers"), [
    (gzip.compress(JSON), {"Content-Encoding": "gzip"}),
    (gzip.compress(JSON), {"Content-Encoding": "x-gzip"}),
    (zlib.compress(JSON), {"Content-Encoding": "deflate"}),  # zlib-wrapped, RFC 1950
    (zlib.compress(JSON)[2:-4], {"Content-Encoding": "deflate"}),  # raw deflate, as some clients send it
    (gzip.compress(gzip.compress(JSON)), {"Content-Encoding": "gzip, gzip"}),
    (gzip.compress(JSON[:40]) + gzip.compress(JSON[40:]), {"Content-Encoding": "gzip"}),  # two members
    (JSON, {"Content-Encoding": "identity"}),
], ids=["gzip", "x-gzip", "deflate-zlib", "deflate-raw", "gzip-twice", "gzip-members", "identity"])
async def test_content_encodings(sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys, raw: bytes,
                                 headers: dict[str, str]) -> None:
    answer = await sidecar.post("/e/", raw=raw, headers=headers)
    assert answer.status == 200, answer.body
    assert answer.body["accepted"] == 2
    assert await counted(redis_client, keys) == {"$pageview": "1", "clicked": "1"}


async def test_gzip_js_query_parameter(sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    answer = await sidecar.post("/e/?compression=gzip-js&ver=1.200.0&_=1700000000000", raw=gzip.compress(JSON),
                                content_type="text/plain")
    assert answer.status == 200, answer.body
    assert await counted(redis_client, keys) == {"$pageview": "1", "clicked": "1"}
    # Declared by both the header and the query: undone once.
    again = await sidecar.post("/e/?compression=gzip-js", raw=gzip.compress(JSON),
                               headers={"Content-Encoding": "gzip"})
    assert again.status == 200, again.body


async def test_lz64_query_parameter(sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    answer = await sidecar.post("/e/?compression=lz64", raw=lz64_of(LZ_PAYLOAD).encode(), content_type="text/plain")
    assert answer.status == 200, answer.body
    assert answer.body == {"accepted": 1, "duplicates": 0, "status": 1}
    assert await counted(redis_client, keys) == {"$pageview": "1"}


async def test_form_bodies_of_older_posthog_clients(sidecar: Sidecar, redis_client: aioredis.Redis,
                                                    keys: PipelineKeys) -> None:
    as_base64 = "data=" + quote(base64.b64encode(JSON).decode())
    lz_in_form = "compression=lz64&data=" + quote(lz64_of(LZ_PAYLOAD))
    lz_in_query_form_plus = "data=" + lz64_of(LZ_PAYLOAD)  # '+' unescaped: read as ' ' by the form, restored
    plain_json = "data=" + quote(JSON.decode())
    for path, body in (("/capture/", as_base64), ("/e/", lz_in_form), ("/e/?compression=lz64", lz_in_query_form_plus),
                       ("/track/", plain_json)):
        answer = await sidecar.post(path, raw=body.encode(), content_type=FORM)
        assert answer.status == 200, (path, answer.body)
    # the two lz64 bodies hold the same event (same uuid): counted once
    assert await counted(redis_client, keys) == {"$pageview": "3", "clicked": "2"}


async def test_form_bodies_are_for_posthog_routes_only_and_need_data(sidecar: Sidecar) -> None:
    ours = await sidecar.post("/v1/events", raw=b'{"event": "a"}', content_type=FORM)  # curl -d without -H
    assert (ours.status, ours.body["error"]) == (415, "unsupported_media_type")
    missing = await sidecar.post("/e/", raw=b"foo=bar", content_type=FORM)
    assert missing.status == 400 and missing.body["errors"][0]["field"] == "data"


@pytest.mark.parametrize(("path", "raw", "headers", "content_type", "field"), [
    ("/e/", b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}, "application/json", "Content-Encoding"),
    ("/e/", gzip.compress(JSON)[:-12], {"Content-Encoding": "gzip"}, "application/json", "Content-Encoding"),
    ("/e/", gzip.compress(JSON) + b"junk", {"Content-Encoding": "gzip"}, "application/json", "Content-Encoding"),
    ("/e/?compression=gzip-js", JSON, {}, "text/plain", "compression"),
    ("/e/?compression=lz64", b"!!not lz64!!", {}, "text/plain", "compression"),
    ("/e/?compression=lz64", lz64_of(LZ_PAYLOAD)[:-8].encode(), {}, "text/plain", "compression"),
    ("/capture/", b"data=%%%not-base64", {}, FORM, "data"),
], ids=["gzip-garbage", "gzip-truncated", "gzip-trailing", "gzip-js-plain", "lz64-garbage", "lz64-truncated",
        "form-not-base64"])
async def test_corrupt_encodings_are_400_json(sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys,
                                              path: str, raw: bytes, headers: dict[str, str], content_type: str,
                                              field: str) -> None:
    answer = await sidecar.post(path, raw=raw, headers=headers, content_type=content_type)
    assert answer.status == 400, answer.body
    assert answer.body["errors"][0]["field"] == field
    assert await pipeline_keys(redis_client, keys) == []


@pytest.mark.parametrize("coding", ["foo", "br", "zstd", "gzip, foo", "compress"])
async def test_unsupported_content_encoding_is_415_json(sidecar: Sidecar, redis_client: aioredis.Redis,
                                                        keys: PipelineKeys, coding: str) -> None:
    # Before: "foo" was silently read as plain JSON (and counted); br/zstd got aiohttp's plain-text 400.
    answer = await sidecar.post("/v1/batch", {"batch": [{"event": "a"}]}, headers={"Content-Encoding": coding})
    assert answer.status == 415, answer.body
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.body["error"] == answer.body["code"] == "unsupported_encoding"
    assert answer.body["errors"][0]["field"] == "Content-Encoding"
    assert await pipeline_keys(redis_client, keys) == []


async def test_unknown_compression_parameter_is_415(sidecar: Sidecar) -> None:
    answer = await sidecar.post("/e/?compression=snappy", raw=JSON)
    assert (answer.status, answer.body["errors"][0]["field"]) == (415, "compression")


@pytest.mark.parametrize(("path", "encode", "headers"), [
    ("/v1/batch", gzip.compress, {"Content-Encoding": "gzip"}),
    ("/v1/batch", zlib.compress, {"Content-Encoding": "deflate"}),
    ("/e/?compression=gzip-js", gzip.compress, {}),
], ids=["gzip", "deflate", "gzip-js"])
async def test_zip_bomb_is_413_and_nothing_counted(
        start_sidecar: SidecarFactory, sidecar_config, redis_client: aioredis.Redis, keys: PipelineKeys,
        path: str, encode, headers: dict[str, str]) -> None:
    sidecar = await start_sidecar(sidecar_config(ingest={"max_request_bytes": 64 * 1024}))
    inner = b'{"batch": [' + b'{"event": "a"},' * 10 + b'{"event": "a", "p": "' + b"0" * 50_000_000 + b'"}]}'
    bomb = encode(inner)  # ~50 MB of JSON in ~50 KB
    assert len(bomb) < 64 * 1024
    answer = await sidecar.post(path, raw=bomb, headers=headers, content_type="application/json")
    assert answer.status == 413, answer.body
    assert answer.body["error"] == "payload_too_large" and "decompressed" in answer.body["message"]
    assert await pipeline_keys(redis_client, keys) == []


async def test_lz64_bomb_is_413(start_sidecar: SidecarFactory, sidecar_config, redis_client: aioredis.Redis,
                                keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(sidecar_config(ingest={"max_request_bytes": 4096}))
    answer = await sidecar.post("/e/?compression=lz64", raw=lz64_of("x" * 5000 + "y" * 3000).encode())
    assert answer.status == 413, answer.body
    assert await pipeline_keys(redis_client, keys) == []


async def test_a_decompressed_body_within_the_limit_is_still_limited_per_event(
        start_sidecar: SidecarFactory, sidecar_config, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(sidecar_config(ingest={"max_request_bytes": 64 * 1024}))
    body = orjson.dumps({"batch": [{"event": "a"}] * 3000})  # 48 KB: within the limit, over max_batch_events
    answer = await sidecar.post("/v1/batch", raw=gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert (answer.status, answer.body["error"]) == (413, "payload_too_large")


# Issue 11 case 6: properties nested 255-1024 deep in a body over max_event_bytes crashed the size
# check (orjson.dumps recursion) and got 503, which SDKs retry forever.
@pytest.mark.parametrize("depth", [255, 600, 1020])  # 1020 + the array and the event: 1022 < 1024
async def test_deep_nesting_in_a_large_body_is_4xx_not_503(sidecar: Sidecar, redis_client: aioredis.Redis,
                                                           keys: PipelineKeys, depth: int) -> None:
    deep = b'{"event": "deep", "properties": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
    padding = b'{"event": "pad", "properties": {"blob": "' + b"x" * 33_000 + b'"}}'
    answer = await sidecar.post("/v1/events", raw=b"[" + deep + b"," + padding + b"]")
    assert 400 <= answer.status < 500, answer.body
    assert answer.body["errors"][0] == {"index": 0, "field": "properties",
                                        "reason": "nested more than 254 levels deep; flatten it"}
    assert await pipeline_keys(redis_client, keys) == []  # the padding event is over 32 KiB: rejected too
    single = await sidecar.post("/v1/events", raw=deep[:-1] + b', "x": "' + b"y" * 33_000 + b'"}')
    assert single.status == 400 and single.body["errors"][0]["field"] == "properties"

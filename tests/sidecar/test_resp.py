"""The committer's own Redis connection: URLs read exactly as redis-py reads them, errors typed by outcome."""

from __future__ import annotations

import pytest
import redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.asyncio.connection import parse_url as redis_py_parse_url

from analytics_pipeline.core.services import RedisServer
from analytics_pipeline.sidecar.resp import (
    NoScriptError,
    RedisAddress,
    RedisReplyError,
    RedisTimeout,
    RedisUnavailable,
    RespConnection,
    parse_url,
)

URLS = [
    "redis://127.0.0.1:6379/0",
    "redis://localhost",
    "redis://redis.ns.svc:6380/3",
    "redis://:s3cret@redis:6379/2",
    "redis://user:p%40ss%2Fword@redis/5",
    "redis://user@redis",
    "redis://redis/7?db=4",
    "redis://redis?db=9",
    "redis://redis/not-a-db",
    "redis://redis/",
    "redis://[::1]:6379/1",
    "rediss://secure.example:6390/1",
    "rediss://default:tok@secure.example",
    "unix:///run/redis.sock",
    "unix:///run/redis.sock?db=3",
    "unix://:pw@/run/redis%20x.sock?db=2",
    "redis://redis:6379/1?socket_timeout=2&health_check_interval=5",
]


def _redis_py(url: str) -> RedisAddress:
    """What redis-py's client would connect to, in our terms."""
    options = redis_py_parse_url(url)
    cls = options.get("connection_class")
    if cls is UnixDomainSocketConnection:
        return RedisAddress(path=options.get("path"), username=options.get("username"),
                            password=options.get("password"), db=int(options.get("db", 0) or 0))
    return RedisAddress(host=options.get("host", "localhost"), port=int(options.get("port", 6379)),
                        tls=cls is SSLConnection, username=options.get("username"),
                        password=options.get("password"), db=int(options.get("db", 0) or 0))


@pytest.mark.parametrize("url", URLS)
def test_urls_mean_what_they_mean_to_redis_py(url: str) -> None:
    # Writes (this parser) and queries (redis-py) must reach the same server and database.
    assert parse_url(url) == _redis_py(url)


@pytest.mark.parametrize("url", ["http://redis:6379", "redis://redis?db=x", "redis://redis:port"])
def test_bad_urls_are_refused_like_redis_py(url: str) -> None:
    with pytest.raises(ValueError):
        redis_py_parse_url(url)
    with pytest.raises(ValueError):
        parse_url(url)


async def test_password_and_db_from_the_url_are_used(private_redis: RedisServer) -> None:
    redis.Redis.from_url(private_redis.url).config_set("requirepass", "s3cret")
    base = f"redis://:s3cret@127.0.0.1:{private_redis.port}"
    good = RespConnection(f"{base}/4", 2.0)
    await good.connect()
    assert await good.execute("SET", "k", "v") == b"OK"
    assert b" db=4 " in await good.execute("CLIENT", "INFO")
    good.abort()
    assert redis.Redis.from_url(f"{base}/4").get("k") == b"v"  # redis-py reads the same database
    assert redis.Redis.from_url(f"{base}/0").get("k") is None
    bad = RespConnection(f"redis://:wrong@127.0.0.1:{private_redis.port}/0", 2.0)
    with pytest.raises(RedisReplyError):
        await bad.connect()
    assert not bad.connected


async def test_error_types_say_whether_the_command_may_have_run(private_redis: RedisServer) -> None:
    connection = RespConnection(private_redis.url, 0.3)
    await connection.connect()
    with pytest.raises(NoScriptError):
        await connection.execute("EVALSHA", "0" * 40, 0)
    with pytest.raises(RedisReplyError):
        await connection.execute("HINCRBY", "h", "f", "not-a-number")
    private_redis.pause()
    try:
        with pytest.raises(RedisTimeout):  # sent, no answer: ambiguous (an OSError, like a lost connection)
            await connection.execute("PING")
        assert not connection.connected
    finally:
        private_redis.resume()
    await connection.connect()
    assert await connection.execute("PING") == b"PONG"
    connection.abort()
    refused = RespConnection("redis://127.0.0.1:1/0", 0.5)
    with pytest.raises(RedisUnavailable):
        await refused.connect()
    assert issubclass(RedisTimeout, OSError) and issubclass(RedisUnavailable, OSError)
    assert not issubclass(RedisReplyError, OSError)

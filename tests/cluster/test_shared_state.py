"""Rate-limit buckets and Idempotency-Key records in Redis: the in-process semantics,
shared by every gateway (two limiter or store objects stand for two gateways)."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from swarmgate.accounts.keys import KeySettings
from swarmgate.accounts.limits import RateLimiter
from swarmgate.cluster.idempotency import RedisIdempotencyStore
from swarmgate.cluster.keys import ClusterKeys
from swarmgate.cluster.limits import RedisRateLimiter
from swarmgate.errors import Conflict, IdempotencyMismatch, RateLimited
from swarmgate.store.idempotency import StoredResponse


async def test_request_limit_is_shared_between_gateways(
    redis_client: Redis, redis_prefix: str
) -> None:
    keys = ClusterKeys(redis_prefix)
    one, two = RedisRateLimiter(redis_client, keys), RedisRateLimiter(redis_client, keys)
    settings = KeySettings(rpm_limit=6)
    for limiter in (one, two, one, two, one, two):
        await limiter.admit("key_1", settings, 10)
    with pytest.raises(RateLimited) as caught:
        await two.admit("key_1", settings, 10)
    # One request back every 10 s at 6 per minute.
    assert caught.value.retry_after is not None and 1 <= caught.value.retry_after <= 10
    assert caught.value.code == "RATE_LIMIT_EXCEEDED"
    await one.admit("key_2", settings, 10)  # other keys are not touched


async def test_token_limit_takes_the_bound_and_gives_back_the_rest(
    redis_client: Redis, redis_prefix: str
) -> None:
    limiter = RedisRateLimiter(redis_client, ClusterKeys(redis_prefix))
    settings = KeySettings(tpm_limit=1_000)
    first = await limiter.admit("key_t", settings, 600)
    assert first.tokens_taken == 600
    with pytest.raises(RateLimited):
        await limiter.admit("key_t", settings, 600)  # 400 left
    limiter.finish(first, 100)  # 500 unused come back, in the background
    await limiter.drain()
    second = await limiter.admit("key_t", settings, 600)
    assert second.tokens_taken == 600
    # A request bigger than the minute's allowance takes the whole bucket when it is full.
    big = await limiter.admit("key_big", settings, 5_000)
    assert big.tokens_taken == 1_000


async def test_same_answers_as_the_in_process_limiter(
    redis_client: Redis, redis_prefix: str
) -> None:
    shared = RedisRateLimiter(redis_client, ClusterKeys(redis_prefix))
    local = RateLimiter()
    settings = KeySettings(rpm_limit=5, tpm_limit=2_000)
    outcomes: dict[str, list[str]] = {"shared": [], "local": []}
    for name, limiter in (("shared", shared), ("local", local)):
        for tokens in (800, 900, 700, 50, 10, 10, 10):
            try:
                taken = await limiter.admit("key_same", settings, tokens)
                outcomes[name].append(f"ok {taken.tokens_taken}")
            except RateLimited as exc:
                outcomes[name].append(f"429 {exc.retry_after}")
    assert outcomes["shared"] == outcomes["local"]
    assert outcomes["local"][2] == "429 12"  # 300 tokens left, 400 more come in 12 s
    assert outcomes["local"][6].startswith("429")  # the sixth admitted request: rpm 5


async def test_racing_admissions_never_pass_the_limit(
    redis_client: Redis, redis_prefix: str
) -> None:
    keys = ClusterKeys(redis_prefix)
    limiters = [RedisRateLimiter(redis_client, keys) for _ in range(4)]
    settings = KeySettings(rpm_limit=25)

    async def one(i: int) -> bool:
        try:
            await limiters[i % 4].admit("key_race", settings, 1)
            return True
        except RateLimited:
            return False

    admitted = await asyncio.gather(*(one(i) for i in range(100)))
    assert sum(admitted) == 25


async def test_rate_buckets_expire(redis_client: Redis, redis_prefix: str) -> None:
    keys = ClusterKeys(redis_prefix)
    await RedisRateLimiter(redis_client, keys).admit("key_ttl", KeySettings(rpm_limit=3), 1)
    ttl = await redis_client.ttl(keys.rate("key_ttl", "req"))
    assert 0 < ttl <= 120


def _store(client: Redis, prefix: str, takeover_s: float = 300.0) -> RedisIdempotencyStore:
    return RedisIdempotencyStore(
        client, ClusterKeys(prefix), ttl_s=86_400, takeover_after_s=takeover_s
    )


async def test_idempotency_claim_conflict_replay_and_mismatch(
    redis_client: Redis, redis_prefix: str
) -> None:
    one, two = _store(redis_client, redis_prefix), _store(redis_client, redis_prefix)
    assert await one.begin("acct_1", "key-1", "hash-a") is None  # claimed: run it
    with pytest.raises(Conflict) as running:
        await two.begin("acct_1", "key-1", "hash-a")  # the first is still running
    assert running.value.status_code == 409
    with pytest.raises(IdempotencyMismatch) as mismatch:
        await two.begin("acct_1", "key-1", "hash-b")
    assert mismatch.value.status_code == 422
    stored = StoredResponse(
        status=200, headers=[(b"content-type", b"application/json")], body=b'{"ok": true}'
    )
    await one.finish("acct_1", "key-1", stored)
    assert await two.begin("acct_1", "key-1", "hash-a") == stored  # the replay
    # Scoped per account: another account's key of the same name is its own.
    assert await two.begin("acct_2", "key-1", "hash-b") is None
    ttl = await redis_client.ttl(ClusterKeys(redis_prefix).idempotency("acct_1", "key-1"))
    assert 86_000 < ttl <= 86_400


async def test_idempotency_failed_request_frees_the_key_and_stale_claims_are_taken_over(
    redis_client: Redis, redis_prefix: str
) -> None:
    store = _store(redis_client, redis_prefix, takeover_s=0.2)
    assert await store.begin("acct_1", "retry", "h") is None
    await store.finish("acct_1", "retry", None)  # failed: nothing stored
    assert await store.begin("acct_1", "retry", "h") is None  # runs again
    with pytest.raises(Conflict):
        await store.begin("acct_1", "retry", "h")
    await asyncio.sleep(0.3)  # its gateway died while running it
    assert await store.begin("acct_1", "retry", "h") is None
    assert await store.purge_expired() == 0  # Redis expires records by itself


async def test_concurrent_duplicates_run_once(redis_client: Redis, redis_prefix: str) -> None:
    stores = [_store(redis_client, redis_prefix) for _ in range(5)]

    async def attempt(i: int) -> str:
        try:
            claimed = await stores[i % 5].begin("acct_1", "dup", "h")
        except Conflict:
            return "409"
        return "run" if claimed is None else "replay"

    outcomes = await asyncio.gather(*(attempt(i) for i in range(20)))
    assert outcomes.count("run") == 1
    assert outcomes.count("409") == 19

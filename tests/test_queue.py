"""The arq transport against a real Redis: batched deliveries, each still answered on its own."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from arq.connections import ArqRedis, create_pool

from app import queue
from app.dev import free_port
from app.queue import Delivery, Enqueuer
from tests.conftest import REDIS_DB


@pytest.fixture
async def arq_redis() -> AsyncIterator[ArqRedis]:
    settings = queue.redis_settings(f"redis://127.0.0.1:6379/{REDIS_DB}")
    redis = await create_pool(settings, default_queue_name=f"test-queue-{uuid.uuid4().hex}")
    await redis.script_load(queue._ENQUEUE_LUA)  # so that each batch is one EVALSHA
    yield redis
    await redis.delete(redis.default_queue_name)
    await redis.aclose()


def count_calls(redis: ArqRedis, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = redis.execute_command

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[0]))
        return await real(*args, **kwargs)

    monkeypatch.setattr(redis, "execute_command", counted)
    return calls


def deliveries(count: int) -> list[Delivery]:
    later = datetime.now(UTC) + timedelta(hours=1)
    return [
        Delivery(uuid.uuid4(), f"q-{uuid.uuid4().hex}", later if i % 2 else None)
        for i in range(count)
    ]


async def test_deliveries_that_arrive_together_leave_in_one_round_trip(
    arq_redis: ArqRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_calls(arq_redis, monkeypatch)
    enqueuer = Enqueuer(arq_redis)
    batch = deliveries(50)
    assert await asyncio.gather(*(enqueuer.enqueue(d) for d in batch)) == [True] * 50
    assert len(calls) == 1
    queued = dict(await arq_redis.zrange(arq_redis.default_queue_name, 0, -1, withscores=True))
    assert set(queued) == {d.queue_id.encode() for d in batch}
    for d in batch:
        assert await arq_redis.exists(f"arq:job:{d.queue_id}")
        if d.run_at is not None:  # deferred: scored at its run_at, as arq's _defer_until
            assert queued[d.queue_id.encode()] == pytest.approx(d.run_at.timestamp() * 1000, abs=1)
    job = await arq_redis.get(f"arq:job:{batch[0].queue_id}")
    assert job is not None and b"run_job" in job


async def test_a_burst_leaves_in_batches_of_at_most_the_limit(
    arq_redis: ArqRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_calls(arq_redis, monkeypatch)
    enqueuer = Enqueuer(arq_redis)
    burst = deliveries(2 * queue.BATCH_LIMIT + 7)
    assert all(await asyncio.gather(*(enqueuer.enqueue(d) for d in burst)))
    assert len(calls) == 3
    assert await arq_redis.zcard(arq_redis.default_queue_name) == len(burst)


async def test_a_delivery_publishes_its_announcement(arq_redis: ArqRedis) -> None:
    channel = f"test-announce-{uuid.uuid4().hex}"
    pubsub = arq_redis.pubsub()
    await pubsub.subscribe(channel)
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    delivery = Delivery(uuid.uuid4(), f"q-{uuid.uuid4().hex}", None, (channel, "hello"))
    assert await Enqueuer(arq_redis).enqueue(delivery)
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
    assert message is not None and message["data"] == b"hello"
    await pubsub.aclose()


async def test_an_unreachable_redis_answers_false_to_every_caller() -> None:
    dead = ArqRedis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    enqueuer = Enqueuer(dead)
    results = await asyncio.gather(*(enqueuer.enqueue(d) for d in deliveries(5)))
    assert results == [False] * 5
    await dead.aclose()

"""The arq transport. A message carries the job id alone; PostgreSQL holds everything else."""

import asyncio
import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from arq.connections import ArqRedis, RedisSettings
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms, to_unix_ms
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = structlog.get_logger(__name__)

RUN_JOB = "run_job"
ENQUEUE_TIMEOUT = 2.0


def redis_settings(url: str) -> RedisSettings:
    settings = RedisSettings.from_dsn(url)
    settings.conn_retries = 10
    settings.retry_on_timeout = True
    settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, ConnectionError]
    # Ride out a Redis restart of ~30 s: arq's poll loop dies on an unretried ConnectionError.
    settings.retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=30)
    return settings


def new_queue_id(job_id: uuid.UUID) -> str:
    """A fresh arq id per delivery, so stale arq keys of an earlier delivery never block one."""
    return f"{job_id}:{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Delivery:
    """One arq message for a job: its arq id (already recorded on the job row), when it may run,
    and the event (channel, payload) announcing it, published in the same round trip."""

    job_id: uuid.UUID
    queue_id: str
    run_at: datetime | None = None
    announce: tuple[str, str] | None = None


class Enqueuer:
    """Sends deliveries to arq in batches: those that arrive while a round trip is in flight
    leave together in the next one (one script call for all, like a group commit), so under
    load the cost per job falls instead of the waits growing. Each caller still returns only
    once its own delivery is written (True), or Redis failed (False: the job is safe in
    PostgreSQL and the reconciler queues it later)."""

    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis
        self._waiting: list[tuple[Delivery, asyncio.Future[bool]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def enqueue(self, delivery: Delivery) -> bool:
        sent: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((delivery, sent))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        return await sent

    async def _send(self) -> None:
        while self._waiting:
            batch = self._waiting[:BATCH_LIMIT]
            del self._waiting[:BATCH_LIMIT]
            try:
                sent = await enqueue_many(self.redis, [delivery for delivery, _ in batch])
            except BaseException as e:  # a bug, or shutdown: no caller may wait forever
                batch += self._waiting
                self._waiting.clear()
                for _, future in batch:
                    if future.done():
                        continue
                    if isinstance(e, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(e)
                raise
            for _, future in batch:
                if not future.done():  # a caller that gave up has a cancelled future
                    future.set_result(sent)


async def enqueue_many(redis: ArqRedis, deliveries: list[Delivery]) -> bool:
    """Queue the deliveries in one round trip. False when Redis is unreachable: the jobs are
    safe in PostgreSQL and the reconciler will queue them later."""
    try:
        async with asyncio.timeout(ENQUEUE_TIMEOUT):
            await _enqueue(redis, deliveries)
    except (RedisError, OSError, TimeoutError) as e:
        ids = [str(d.job_id) for d in deliveries]
        log.warning("enqueue_failed", job_ids=ids, error=str(e))
        return False
    return True


# What `ArqRedis.enqueue_job` writes for each delivery (the message, then its place in the
# queue), after the job's announcement when there is one, as ONE command for the whole batch: a
# pipeline (MULTI .. EXEC) costs the API several times the CPU. arq's WATCH and EXISTS guard
# against a reused arq id; every queue id here is fresh.
_ENQUEUE_LUA = """
for i = 2, #KEYS do
    local a = (i - 2) * 6
    if ARGV[a + 4] ~= '' then redis.call('PUBLISH', ARGV[a + 4], ARGV[a + 5]) end
    redis.call('PSETEX', KEYS[i], ARGV[a + 1], ARGV[a + 2])
    redis.call('ZADD', KEYS[1], ARGV[a + 3], ARGV[a + 6])
end
"""
_ENQUEUE_SHA = hashlib.sha1(_ENQUEUE_LUA.encode()).hexdigest()
BATCH_LIMIT = 200  # deliveries per script call


async def _enqueue(redis: ArqRedis, deliveries: list[Delivery]) -> None:
    now = timestamp_ms()
    keys: list[str] = [redis.default_queue_name]
    args: list[Any] = []
    for d in deliveries:
        score = max(to_unix_ms(d.run_at), now) if d.run_at is not None else now
        job = serialize_job(
            RUN_JOB, (str(d.job_id),), {}, None, now, serializer=redis.job_serializer
        )
        channel, payload = d.announce or ("", "")
        keys.append(job_key_prefix + d.queue_id)
        args += [score - now + redis.expires_extra_ms, job, score, channel, payload, d.queue_id]
    command = (len(keys), *keys, *args)
    try:
        await redis.execute_command("EVALSHA", _ENQUEUE_SHA, *command)  # type: ignore[no-untyped-call]
    except NoScriptError:  # a Redis that has not seen the script yet (or was restarted)
        await redis.execute_command("EVAL", _ENQUEUE_LUA, *command)  # type: ignore[no-untyped-call]


async def is_queued(redis: ArqRedis, queue_id: str) -> bool:
    """Whether arq still holds the message (queued, deferred or running)."""
    exists = await redis.exists(f"arq:job:{queue_id}", f"arq:in-progress:{queue_id}")
    return bool(exists)

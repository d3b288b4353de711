"""The arq transport. A message carries the job id alone; PostgreSQL holds everything else."""

import asyncio
import hashlib
import uuid
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


async def enqueue(
    redis: ArqRedis,
    job_id: uuid.UUID,
    queue_id: str,
    run_at: datetime | None = None,
    announce: tuple[str, str] | None = None,
) -> bool:
    """Queue the job under `queue_id` (already recorded on the job row), after publishing the
    `announce` event (channel, payload) in the same round trip. False when Redis is
    unreachable: the job is safe in PostgreSQL and the reconciler will queue it later."""
    try:
        async with asyncio.timeout(ENQUEUE_TIMEOUT):
            await _enqueue(redis, queue_id, job_id, run_at, announce)
    except (RedisError, OSError, TimeoutError) as e:
        log.warning("enqueue_failed", job_id=str(job_id), error=str(e))
        return False
    return True


# What `ArqRedis.enqueue_job` writes (the message, then its place in the queue), after the job's
# announcement when there is one, as ONE command: a pipeline of five (MULTI .. EXEC) costs the
# API several times the CPU. arq's WATCH and EXISTS guard against a reused arq id; every queue id
# here is fresh.
_ENQUEUE_LUA = """
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
redis.call('PSETEX', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[6])
"""
_ENQUEUE_SHA = hashlib.sha1(_ENQUEUE_LUA.encode()).hexdigest()


async def _enqueue(
    redis: ArqRedis,
    queue_id: str,
    job_id: uuid.UUID,
    run_at: datetime | None,
    announce: tuple[str, str] | None = None,
) -> None:
    now = timestamp_ms()
    score = max(to_unix_ms(run_at), now) if run_at is not None else now
    job = serialize_job(RUN_JOB, (str(job_id),), {}, None, now, serializer=redis.job_serializer)
    channel, payload = announce or ("", "")
    keys_and_args: tuple[Any, ...] = (
        job_key_prefix + queue_id,
        redis.default_queue_name,
        score - now + redis.expires_extra_ms,
        job,
        score,
        channel,
        payload,
        queue_id,
    )
    try:
        await redis.execute_command("EVALSHA", _ENQUEUE_SHA, 2, *keys_and_args)  # type: ignore[no-untyped-call]
    except NoScriptError:  # a Redis that has not seen the script yet (or was restarted)
        await redis.execute_command("EVAL", _ENQUEUE_LUA, 2, *keys_and_args)  # type: ignore[no-untyped-call]


async def is_queued(redis: ArqRedis, queue_id: str) -> bool:
    """Whether arq still holds the message (queued, deferred or running)."""
    exists = await redis.exists(f"arq:job:{queue_id}", f"arq:in-progress:{queue_id}")
    return bool(exists)

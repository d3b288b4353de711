"""The arq transport. A message carries the job id alone; PostgreSQL holds everything else."""

import asyncio
import uuid
from datetime import datetime

import structlog
from arq.connections import ArqRedis, RedisSettings
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
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
    redis: ArqRedis, job_id: uuid.UUID, queue_id: str, run_at: datetime | None = None
) -> bool:
    """Queue the job under `queue_id` (already recorded on the job row). False when Redis is
    unreachable: the job is safe in PostgreSQL and the reconciler will queue it later."""
    try:
        await asyncio.wait_for(
            redis.enqueue_job(RUN_JOB, str(job_id), _job_id=queue_id, _defer_until=run_at),
            ENQUEUE_TIMEOUT,
        )
    except (RedisError, OSError, TimeoutError) as e:
        log.warning("enqueue_failed", job_id=str(job_id), error=str(e))
        return False
    return True


async def is_queued(redis: ArqRedis, queue_id: str) -> bool:
    """Whether arq still holds the message (queued, deferred or running)."""
    exists = await redis.exists(f"arq:job:{queue_id}", f"arq:in-progress:{queue_id}")
    return bool(exists)

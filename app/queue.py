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


async def enqueue(redis: ArqRedis, job_id: uuid.UUID, run_at: datetime | None = None) -> str | None:
    """Queue the job under a fresh arq id; returns it, or None when Redis is unreachable (the
    reconciler will queue the job later: it is safe in PostgreSQL)."""
    queue_id = f"{job_id}:{uuid.uuid4().hex[:12]}"
    try:
        await asyncio.wait_for(
            redis.enqueue_job(RUN_JOB, str(job_id), _job_id=queue_id, _defer_until=run_at),
            ENQUEUE_TIMEOUT,
        )
    except (RedisError, OSError, TimeoutError) as e:
        log.warning("enqueue_failed", job_id=str(job_id), error=str(e))
        return None
    return queue_id


async def is_queued(redis: ArqRedis, queue_id: str) -> bool:
    """Whether arq still holds the message (queued, deferred or running)."""
    exists = await redis.exists(f"arq:job:{queue_id}", f"arq:in-progress:{queue_id}")
    return bool(exists)

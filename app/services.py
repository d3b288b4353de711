"""The shared resources of a process, opened once (API lifespan, worker startup) and passed in."""

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import asyncpg
from arq import create_pool as create_arq_pool
from arq.connections import ArqRedis

from app import db, resources
from app.auth import KeyLookup
from app.backpressure import QueueDepth
from app.config import Settings
from app.queue import Enqueuer, redis_settings
from app.storage import Storage


@dataclass
class Services:
    settings: Settings
    pool: asyncpg.Pool
    redis: ArqRedis
    storage: Storage
    resources: resources.Registry
    queue_depth: QueueDepth
    keys: KeyLookup
    enqueuer: Enqueuer


@asynccontextmanager
async def open_services(
    settings: Settings, pool_size: int | None = None
) -> AsyncIterator[Services]:
    async with AsyncExitStack() as stack:
        pool = await db.create_pool(settings.database_url, pool_size or settings.db_pool_max_size)
        stack.push_async_callback(pool.close)
        async with pool.acquire() as con:
            registry = await resources.load(settings.resources_file, con)
        redis = await create_arq_pool(redis_settings(settings.redis_url))
        stack.push_async_callback(redis.aclose)
        storage = await Storage.open(settings, stack)
        yield Services(
            settings,
            pool,
            redis,
            storage,
            registry,
            QueueDepth(settings.max_queued_jobs),
            KeyLookup(pool, settings.auth_cache_seconds),
            Enqueuer(redis),
        )

"""The ASGI app: `uvicorn app.main:app`."""

import gc
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import structlog
from fastapi import FastAPI
from redis.asyncio import Redis

from app import __version__, logs
from app.api import exports, health, imports, jobs, problems, resources, ws
from app.config import Settings, get_settings
from app.errors import ConfigError
from app.events import Hub
from app.middleware import BodyLimit, RequestContext
from app.services import open_services

DESCRIPTION = """
Ferry moves bulk data between PostgreSQL and S3 as background jobs.

1. **Authorize** with an API key (`ferry keys create --tenant NAME`; `make run` prints one).
2. `GET /resources` lists what you can export and import.
3. `POST /exports` (or `POST /imports`) answers `202` with a job at once.
4. Follow it: `GET /jobs/{id}`, or the websocket `/ws/jobs/{id}` (`?token=<key>`).
5. `GET /exports/{id}/download` redirects to the file.

Errors are `application/problem+json` with a machine-readable `code`.
"""

log = structlog.get_logger(__name__)

TAGS = [
    {"name": "exports", "description": "PostgreSQL to S3: CSV or JSON Lines, optionally gzip."},
    {"name": "imports", "description": "CSV from S3 into PostgreSQL, validated and atomic."},
    {"name": "jobs", "description": "Job status, listing and cancellation."},
    {"name": "resources", "description": "The tables and views you may move."},
    {"name": "operations", "description": "Health, readiness, metrics."},
]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logs.configure(settings.log_level, settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            try:
                services = await stack.enter_async_context(open_services(settings))
            except ConfigError as e:
                log.error("startup_refused", reason=str(e))
                raise
            hub = Hub(lambda: _pubsub_redis(settings))
            await hub.start()
            stack.push_async_callback(hub.stop)
            app.state.services = services
            app.state.hub = hub
            # What startup built (routes, models, the OpenAPI schema, clients) lives as long as
            # the process: keep it out of every later collection, which then has far less to walk.
            gc.freeze()
            yield

    app = FastAPI(
        title="Ferry",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        # Ferry's metrics are Prometheus and its logs structlog. FastAPI's native OpenTelemetry
        # looks up the global providers on every request (~3% of a submission's CPU) to find
        # none configured.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    problems.install(app)
    for module in (exports, imports, jobs, resources, health, ws):
        app.include_router(module.router)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestContext)
    return app


def _pubsub_redis(settings: Settings) -> Redis:
    # Named per process, so that an operator (or a test) can find this process's subscription.
    redis: Redis = Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=2,
        client_name=f"ferry-events-{os.getpid()}",
    )
    return redis


app = create_app()

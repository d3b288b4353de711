"""Liveness, readiness (each dependency checked) and Prometheus metrics."""

import asyncio
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from app import jobstore, metrics
from app.api.deps import ServicesDep

router = APIRouter(tags=["operations"])


class Readiness(BaseModel):
    postgres: str = Field(description="`ok`, or `error: <kind>`")
    redis: str
    s3: str


CHECK_TIMEOUT = 2.0


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _check(probe: Any) -> str:
    try:
        await asyncio.wait_for(probe, CHECK_TIMEOUT)
    except Exception as e:
        return f"error: {type(e).__name__}"
    return "ok"


@router.get(
    "/readyz",
    summary="Readiness: PostgreSQL, Redis and S3 each checked",
    response_model=Readiness,
    responses={
        503: {"model": Readiness, "description": "A dependency is down; the body names it."}
    },
)
async def readyz(services: ServicesDep) -> JSONResponse:
    postgres, redis, s3 = await asyncio.gather(
        _check(services.pool.fetchval("SELECT 1")),
        _check(services.redis.ping()),
        _check(services.storage.ping()),
    )
    body = {"postgres": postgres, "redis": redis, "s3": s3}
    ready = all(v == "ok" for v in body.values())
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(services: ServicesDep) -> Response:
    try:
        counts = await jobstore.counts(services.pool)
    except Exception:
        counts = None
    if counts is not None:
        metrics.JOBS.clear()
        for (kind, status), n in counts.items():
            metrics.JOBS.labels(kind, status).set(n)
        metrics.QUEUE_DEPTH.set(sum(n for (_, status), n in counts.items() if status == "queued"))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

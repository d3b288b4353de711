"""Job submission and lifecycle, shared by every router: back pressure, idempotency, enqueue."""

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from app import events, jobstore, metrics, presenter, queue
from app.errors import Conflict, TooManyRequests, Unavailable
from app.services import Services

RETRY_AFTER_QUEUE_FULL = 30
RETRY_AFTER_TENANT = 10


@dataclass(frozen=True)
class Submitted:
    job: jobstore.Job
    status_code: int
    replayed: bool = False


def request_hash(kind: str, params: dict[str, Any]) -> str:
    canonical = json.dumps([kind, params], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def check_capacity(con: jobstore.Connection, services: Services, tenant: str) -> None:
    settings = services.settings
    load = await jobstore.load(
        con, tenant, settings.max_queued_jobs, settings.max_active_jobs_per_tenant
    )
    if load.queued >= services.settings.max_queued_jobs:
        raise Unavailable(
            "The queue is full; retry later.",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_QUEUE_FULL)},
        )
    if load.tenant_active >= services.settings.max_active_jobs_per_tenant:
        raise TooManyRequests(
            f"This tenant already has {load.tenant_active} queued or running jobs.",
            code="too_many_active_jobs",
            headers={"Retry-After": str(RETRY_AFTER_TENANT)},
        )


async def replay(
    services: Services, tenant: str, key: str | None, fingerprint: str
) -> Submitted | None:
    """The original answer to a request with this Idempotency-Key, if there was one."""
    if key is None:
        return None
    job = await jobstore.find_idempotent(services.pool, tenant, key)
    if job is None:
        return None
    if job["request_hash"] != fingerprint:
        raise Conflict(
            "This Idempotency-Key was used with a different request.",
            code="idempotency_key_reused",
        )
    return Submitted(job, job["response_status"], replayed=True)


async def submit(
    services: Services,
    *,
    tenant: str,
    kind: str,
    resource: str,
    params: dict[str, Any],
    run_at: datetime | None = None,
    idempotency_key: str | None = None,
    awaiting_upload: bool = False,
    upload_key: str | None = None,
    job_id: uuid.UUID | None = None,
) -> Submitted:
    """Commit the job row, then queue it. A refused request leaves no row behind."""
    fingerprint = request_hash(kind, params)
    previous = await replay(services, tenant, idempotency_key, fingerprint)
    if previous is not None:
        return previous
    status_code = 201 if awaiting_upload else 202
    try:
        async with services.pool.acquire() as con, con.transaction():
            # One submission per tenant at a time, so the tenant's limit is exact.
            await jobstore.lock_tenant(con, tenant)
            await check_capacity(con, services, tenant)
            job = await jobstore.create(
                con,
                tenant=tenant,
                kind=kind,
                status="awaiting_upload" if awaiting_upload else "queued",
                resource=resource,
                params=params,
                run_at=run_at,
                upload_key=upload_key,
                idempotency_key=idempotency_key,
                request_hash=fingerprint if idempotency_key else None,
                response_status=status_code,
                job_id=job_id,
            )
    except asyncpg.UniqueViolationError:
        # Another request with the same Idempotency-Key won the race: answer as it did.
        previous = await replay(services, tenant, idempotency_key, fingerprint)
        if previous is None:
            raise
        return previous
    metrics.JOBS_SUBMITTED.labels(kind).inc()
    # Tenant streams (/ws/jobs) learn of the new job; a job's own stream starts from its snapshot.
    await events.publish_job(services.redis, job, presenter.job_out(job))
    if not awaiting_upload:
        await dispatch(services, job)
    return Submitted(job, status_code)


async def dispatch(services: Services, job: jobstore.Job) -> None:
    """Send the queued job's delivery (its arq id is already on the row)."""
    await queue.enqueue(services.redis, job["id"], job["queue_id"], job["run_at"])


async def start_upload(services: Services, tenant: str, job_id: uuid.UUID) -> jobstore.Job:
    job = await jobstore.start_upload(services.pool, job_id, tenant)
    await events.publish_job(services.redis, job, presenter.job_out(job))
    await dispatch(services, job)
    return job


async def cancel(services: Services, tenant: str, job_id: uuid.UUID) -> jobstore.Job:
    """Cancel at once when not running; a running job's worker stops within a heartbeat."""
    job = await jobstore.request_cancel(services.pool, job_id, tenant)
    if job["status"] == "cancelled":
        metrics.JOBS_FINISHED.labels(job["kind"], "cancelled").inc()
        await events.publish_job(services.redis, job, await presenter.present(job, services))
    return job

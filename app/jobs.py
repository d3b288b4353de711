"""Job submission and lifecycle, shared by every router: back pressure, idempotency, enqueue."""

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from app import events, jobstore, metrics, presenter, queue
from app.backpressure import refuse_if_full
from app.errors import Conflict
from app.services import Services


@dataclass(frozen=True)
class Submitted:
    job: jobstore.Job
    status_code: int
    replayed: bool = False


def request_hash(kind: str, params: dict[str, Any]) -> str:
    canonical = json.dumps([kind, params], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def check_capacity(services: Services, tenant: str) -> None:
    """An early refusal (before an upload), with no lock held: `submit` checks again."""
    settings = services.settings
    load = await jobstore.load(
        services.pool, tenant, settings.max_queued_jobs, settings.max_active_jobs_per_tenant
    )
    services.queue_depth.counted(load.queued)
    refuse_if_full(load, settings.max_queued_jobs, settings.max_active_jobs_per_tenant)


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
    # The fingerprint only serves an Idempotency-Key (a canonical JSON dump and a SHA-256).
    fingerprint = request_hash(kind, params) if idempotency_key else ""
    previous = await replay(services, tenant, idempotency_key, fingerprint)
    if previous is not None:
        return previous
    status_code = 201 if awaiting_upload else 202
    settings = services.settings
    try:
        load, job = await jobstore.create_within_limits(
            services.pool,
            services.queue_depth.limit_to_count(),
            settings.max_active_jobs_per_tenant,
            tenant=tenant,
            kind=kind,
            status="awaiting_upload" if awaiting_upload else "queued",
            resource=resource,
            params=params,
            run_at=run_at,
            upload_key=upload_key,
            idempotency_key=idempotency_key,
            request_hash=fingerprint or None,
            response_status=status_code,
            job_id=job_id,
        )
    except asyncpg.UniqueViolationError:
        # Another request with the same Idempotency-Key won the race: answer as it did.
        previous = await replay(services, tenant, idempotency_key, fingerprint)
        if previous is None:
            raise
        return previous
    services.queue_depth.counted(load.queued)
    if job is None:
        refuse_if_full(load, settings.max_queued_jobs, settings.max_active_jobs_per_tenant)
        raise AssertionError("admission refused a job within the limits")
    if not awaiting_upload:
        services.queue_depth.added()
    metrics.JOBS_SUBMITTED.labels(kind).inc()
    if awaiting_upload:
        await events.publish_job(services.redis, job, presenter.job_out(job))
    else:
        await dispatch(services, job)
    return Submitted(job, status_code)


async def dispatch(services: Services, job: jobstore.Job) -> None:
    """Announce the queued job and send its delivery (its arq id is already on the row), in one
    round trip. Tenant streams (/ws/jobs) learn of the new job from the announcement; a job's
    own stream starts from its snapshot."""
    announce = events.job_message(job, presenter.job_out(job))
    delivery = queue.Delivery(job["id"], job["queue_id"], job["run_at"], announce)
    await services.enqueuer.enqueue(delivery)


async def start_upload(services: Services, tenant: str, job_id: uuid.UUID) -> jobstore.Job:
    job = await jobstore.start_upload(services.pool, job_id, tenant)
    services.queue_depth.added()
    await dispatch(services, job)
    return job


async def cancel(services: Services, tenant: str, job_id: uuid.UUID) -> jobstore.Job:
    """Cancel at once when not running; a running job's worker stops within a heartbeat."""
    job = await jobstore.request_cancel(services.pool, job_id, tenant)
    if job["status"] == "cancelled":
        metrics.JOBS_FINISHED.labels(job["kind"], "cancelled").inc()
        await events.publish_job(services.redis, job, await presenter.present(job, services))
    return job

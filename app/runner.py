"""The life of one job attempt in a worker: claim the lease, heartbeat, run, finish.

The arq message is only a wake-up call carrying the job id. The attempt runs only when this
worker wins the lease; everything it writes is conditional on that lease.
"""

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from app import events, jobstore, metrics, presenter, queue
from app.errors import JobFailure, LeaseLost
from app.services import Services

log = structlog.get_logger(__name__)

Handler = Callable[["JobRun"], Coroutine[Any, Any, jobstore.Job]]


@dataclass
class JobRun:
    """One attempt of a job, holding its lease."""

    services: Services
    job: jobstore.Job
    stop_reason: str | None = None  # "cancel" or "lease_lost", set by the heartbeat
    finishing: bool = False  # writing its end state: too late to cancel
    progress: dict[str, Any] = field(
        default_factory=lambda: {"rows": 0, "bytes": 0, "total_rows": None, "percent": None}
    )
    _reported_at: float = 0.0

    @property
    def id(self) -> uuid.UUID:
        job_id: uuid.UUID = self.job["id"]
        return job_id

    @property
    def lease(self) -> uuid.UUID:
        lease: uuid.UUID = self.job["lease"]
        return lease

    @property
    def tenant(self) -> str:
        tenant: str = self.job["tenant_id"]
        return tenant

    async def report(
        self, rows: int, nbytes: int, total_rows: int | None = None, force: bool = False
    ) -> None:
        """Record progress, at most once per `progress_interval_seconds` unless forced."""
        if total_rows is not None:
            self.progress["total_rows"] = total_rows
        total = self.progress["total_rows"]
        rows = max(rows, self.progress["rows"])  # never decreases within an attempt
        self.progress.update(rows=rows, bytes=nbytes, percent=_percent(rows, total))
        now = time.monotonic()
        if not force and now - self._reported_at < progress_interval(self.services):
            return
        self._reported_at = now
        seq = await jobstore.progress(self.services.pool, self.id, self.lease, self.progress)
        frame = events.progress_frame(self.id, dict(self.progress))
        await events.publish(self.services.redis, self.tenant, self.id, seq, [frame])

    def final_progress(self, rows: int, nbytes: int) -> dict[str, Any]:
        rows = max(rows, self.progress["rows"])
        return {"rows": rows, "bytes": nbytes, "total_rows": rows, "percent": 100.0}

    async def finish(self, con: jobstore.Connection, status: str, **fields: Any) -> jobstore.Job:
        """End this attempt (on `con`, so an import can commit rows and status together).
        Its objects (result, upload, error report) are kept `FERRY_RESULT_TTL_SECONDS`."""
        ttl = timedelta(seconds=self.services.settings.result_ttl_seconds)
        fields.setdefault("expires_at", datetime.now(UTC) + ttl)
        self.finishing = True  # a cancel now could interrupt a commit that succeeds anyway
        return await jobstore.finish(con, self.id, self.lease, status, **fields)


# SPEC §4: progress frames at most 4 per second per job, at least every 2 s while rows flow.
PROGRESS_MIN_INTERVAL = 0.25
PROGRESS_MAX_INTERVAL = 2.0


def progress_interval(services: Services) -> float:
    interval = services.settings.progress_interval_seconds
    return min(max(interval, PROGRESS_MIN_INTERVAL), PROGRESS_MAX_INTERVAL)


def _percent(rows: int, total: int | None) -> float | None:
    if not total:
        return None
    return round(min(99.0, 100.0 * rows / total), 1)


def is_transient(exc: BaseException) -> bool:
    """Failures worth another attempt: lost connections, timeouts, S3 5xx, serialization."""
    if isinstance(exc, asyncpg.PostgresError):
        return exc.sqlstate is not None and exc.sqlstate[:2] in ("08", "40", "53", "57", "58")
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return int(status) >= 500 or exc.response.get("Error", {}).get("Code") in (
            "SlowDown",
            "RequestTimeout",
        )
    return isinstance(
        exc,
        (
            asyncpg.InterfaceError,
            BotoCoreError,
            RedisError,
            OSError,
            TimeoutError,
            asyncio.TimeoutError,
        ),
    ) or type(exc).__module__.startswith("aiohttp")


def backoff(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff with full jitter (AWS architecture blog)."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


async def run_job(services: Services, job_id: uuid.UUID, handlers: dict[str, Handler]) -> None:
    settings = services.settings
    job = await jobstore.claim(services.pool, job_id, settings.heartbeat_timeout_seconds)
    if job is None:
        log.info("job_not_claimable", job_id=str(job_id))
        return
    structlog.contextvars.bind_contextvars(job_id=str(job_id), tenant=job["tenant_id"])
    log.info("job_started", kind=job["kind"], attempt=job["attempts"])
    await events.publish_job(services.redis, job, presenter.job_out(job))
    run = JobRun(services, job)
    started = time.monotonic()
    work = asyncio.create_task(handlers[job["kind"]](run))
    beat = asyncio.create_task(_heartbeat(run, work))
    final: jobstore.Job | None = None
    try:
        final = await _outcome(run, work)
    finally:
        beat.cancel()
        metrics.JOB_SECONDS.labels(job["kind"]).observe(time.monotonic() - started)
        if final is not None:
            metrics.JOBS_FINISHED.labels(job["kind"], final["status"]).inc()
            moved = final["progress"] or {}
            metrics.ROWS_MOVED.labels(job["kind"]).inc(moved.get("rows") or 0)
            metrics.BYTES_MOVED.labels(job["kind"]).inc(moved.get("bytes") or 0)
            await _announce(services, final)
        structlog.contextvars.unbind_contextvars("job_id", "tenant")


async def _outcome(run: JobRun, work: asyncio.Task[jobstore.Job]) -> jobstore.Job | None:
    """Wait for the attempt and turn how it ended into the job's next state.

    A cancelled COPY often surfaces as an asyncpg error rather than CancelledError, so why the
    attempt stopped is read from `run.stop_reason` and from this task's own cancellation.
    """
    pool = run.services.pool
    try:
        return await work
    except BaseException as e:
        if isinstance(e, LeaseLost) or run.stop_reason == "lease_lost":
            log.warning("job_lease_lost")
            return None
        if run.stop_reason == "cancel":
            log.info("job_cancelled")
            return await _quietly(run.finish(pool, "cancelled", progress=run.progress))
        if isinstance(e, asyncio.CancelledError) or _shutting_down():
            # The worker is stopping: hand the job back so another worker continues now.
            log.info("job_handed_back")
            await asyncio.shield(_hand_back(run, delay=0.0))
            raise asyncio.CancelledError from e
        if not isinstance(e, Exception):
            raise
        return await _failed(run, e)


def _shutting_down() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _failed(run: JobRun, e: Exception) -> jobstore.Job | None:
    """A permanent failure ends the job; a transient one is retried with backoff."""
    pool = run.services.pool
    if isinstance(e, JobFailure):
        log.info("job_failed", code=e.code, message=e.message)
        error = {"code": e.code, "message": e.message}
        return await _quietly(run.finish(pool, "failed", error=error, result=e.result))
    if not is_transient(e):
        log.exception("job_crashed")
        error = {"code": "internal_error", "message": f"{type(e).__name__}: {e}"}
        return await _quietly(run.finish(pool, "failed", error=error))
    attempts = run.job["attempts"]
    if attempts >= run.services.settings.job_max_attempts:
        log.warning("job_out_of_attempts", error=str(e))
        message = f"Gave up after {attempts} attempts; last error: {type(e).__name__}: {e}"
        error = {"code": "attempts_exhausted", "message": message}
        return await _quietly(run.finish(pool, "failed", error=error))
    log.warning("job_retrying", error=f"{type(e).__name__}: {e}", attempt=attempts)
    await _hand_back(run, delay=backoff(attempts))
    return None


async def _quietly(finishing: Awaitable[jobstore.Job]) -> jobstore.Job | None:
    try:
        return await finishing
    except LeaseLost:
        log.warning("job_lease_lost")
        return None


async def _hand_back(run: JobRun, delay: float) -> None:
    services = run.services
    run_at = datetime.now(UTC) + timedelta(seconds=delay) if delay else None
    try:
        job = await jobstore.requeue(services.pool, run.id, run.lease, run_at)
    except Exception:
        log.warning("job_hand_back_failed", exc_info=True)  # the reconciler will re-run it
        return
    if job is None:
        return
    if job["status"] == "cancelled":  # cancel was asked while it ran: it ends here
        metrics.JOBS_FINISHED.labels(job["kind"], "cancelled").inc()
        await _announce(services, job)
        return
    announce = events.job_message(job, presenter.job_out(job))
    await services.enqueuer.enqueue(queue.Delivery(run.id, job["queue_id"], run_at, announce))


async def _heartbeat(run: JobRun, work: asyncio.Task[Any]) -> None:
    interval = run.services.settings.heartbeat_interval_seconds
    while not work.done():
        await asyncio.sleep(interval)
        try:
            cancel = await jobstore.heartbeat(run.services.pool, run.id, run.lease)
        except LeaseLost:
            if run.finishing:
                # Its finish took the lease (or, if the lease was lost, raises LeaseLost
                # itself): cancelling now could interrupt a commit that succeeded anyway.
                return
            run.stop_reason = "lease_lost"
            work.cancel()
            return
        except Exception as e:
            log.warning("heartbeat_failed", error=str(e))
            continue
        if cancel and not run.finishing:
            run.stop_reason = "cancel"
            work.cancel()
            return


async def _announce(services: Services, job: jobstore.Job) -> None:
    await events.publish_job(services.redis, job, await presenter.present(job, services))

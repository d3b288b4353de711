"""The reconciler: PostgreSQL is the truth, Redis is a transport that may forget.

Every `FERRY_RECONCILE_INTERVAL_SECONDS`, one worker at a time (an advisory lock) re-queues
queued jobs whose arq message is gone, re-runs running jobs whose heartbeat stopped (or fails them
when out of attempts), and aborts multipart uploads left behind by attempts that died.
"""

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import structlog

from app import events, jobstore, presenter, queue
from app.services import Services

log = structlog.get_logger(__name__)

LOCK = 0x46455253  # one reconciler at a time across all workers
ENQUEUE_GRACE_SECONDS = 10  # the API enqueues right after its commit


async def loop(services: Services) -> None:
    interval = services.settings.reconcile_interval_seconds
    while True:
        try:
            counts = await reconcile(services)
            if counts:
                log.info("reconciled", **counts)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("reconcile_failed", exc_info=True)
        await asyncio.sleep(interval)


async def reconcile(services: Services) -> dict[str, int]:
    counts: Counter[str] = Counter()
    # A transaction-scoped lock: it cannot outlive the pass on a pooled connection.
    async with services.pool.acquire() as con, con.transaction():
        if not await con.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK):
            return {}
        await _stale_running(services, counts)
        await _lost_messages(services, counts)
        await _abandoned_uploads(services, counts)
        await _expired_results(services, counts)
        await jobstore.expire_idempotency_keys(services.pool)
    return dict(counts)


async def _stale_running(services: Services, counts: Counter[str]) -> None:
    settings = services.settings
    rows = await services.pool.fetch(
        """SELECT id, lease, attempts, cancel_requested FROM ferry.jobs
           WHERE status = 'running' AND heartbeat_at < now() - make_interval(secs => $1)""",
        settings.heartbeat_timeout_seconds,
    )
    for row in rows:
        if row["cancel_requested"]:
            job = await jobstore.fail_unleased(
                services.pool, row["id"], row["lease"], None, "cancelled"
            )
            counts["cancelled"] += 1
        elif row["attempts"] >= settings.job_max_attempts:
            error = {
                "code": "attempts_exhausted",
                "message": f"The worker running attempt {row['attempts']} stopped responding.",
            }
            job = await jobstore.fail_unleased(services.pool, row["id"], row["lease"], error)
            counts["failed"] += 1
        else:
            await _enqueue(services, row["id"], None)
            counts["rerun"] += 1
            continue
        if job is not None:
            await events.publish_job(services.redis, job, await presenter.present(job, services))


async def _lost_messages(services: Services, counts: Counter[str]) -> None:
    rows = await services.pool.fetch(
        """SELECT id, queue_id, run_at FROM ferry.jobs
           WHERE status = 'queued' AND created_at < now() - make_interval(secs => $1)""",
        ENQUEUE_GRACE_SECONDS,
    )
    for row in rows:
        if row["queue_id"] is None or not await queue.is_queued(services.redis, row["queue_id"]):
            await _enqueue(services, row["id"], row["run_at"])
            counts["requeued"] += 1


async def _enqueue(services: Services, job_id: uuid.UUID, run_at: datetime | None) -> None:
    queue_id = await jobstore.new_delivery(services.pool, job_id)
    await services.enqueuer.enqueue(queue.Delivery(job_id, queue_id, run_at))


async def _expired_results(services: Services, counts: Counter[str]) -> None:
    """Delete the objects of jobs past `expires_at`: export results, uploads, error reports."""
    for job in await jobstore.expired(services.pool):
        keys = [job["result_key"], job["upload_key"], (job["result"] or {}).get("error_report_key")]
        for key in filter(None, keys):
            await services.storage.delete(key)
        await jobstore.mark_expired(services.pool, job["id"])
        counts["expired"] += 1


async def _abandoned_uploads(services: Services, counts: Counter[str]) -> None:
    """Abort the uploads of attempts that no longer hold their job's lease, or whose process is
    gone (its attempt lock is free) while the lease waits for the heartbeat to go stale."""
    storage = services.storage
    leases = {
        (str(r["id"]), str(r["lease"]))
        for r in await services.pool.fetch(
            "SELECT id, lease FROM ferry.jobs WHERE status = 'running' AND lease IS NOT NULL"
        )
    }
    recent = datetime.now(UTC) - timedelta(seconds=5)
    for prefix in ("exports/", "imports/"):
        response = await storage.client.list_multipart_uploads(Bucket=storage.bucket, Prefix=prefix)
        for upload in response.get("Uploads", []):
            attempt = _attempt_of(upload["Key"])
            if attempt is None or upload["Initiated"] > recent:
                continue
            if attempt not in leases or await jobstore.attempt_gone(services.pool, attempt[1]):
                await storage.client.abort_multipart_upload(
                    Bucket=storage.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                counts["uploads_aborted"] += 1


def _attempt_of(key: str) -> tuple[str, str] | None:
    """(job id, lease) of an object one attempt writes: an export, exports/{tenant}/{job}/
    {lease}.{ext}, or an import's error report, imports/{tenant}/{job}/{lease}/errors.csv (the
    uploaded files, imports/{tenant}/{job}/upload, are aborted by the API process that streams
    them)."""
    parts = key.split("/")
    if parts[0] == "exports" and len(parts) == 4:
        return parts[2], parts[3].split(".")[0]
    if parts[0] == "imports" and len(parts) == 5 and parts[4] == "errors.csv":
        return parts[2], parts[3]
    return None

"""The job store: every SQL statement about jobs. PostgreSQL owns job state.

A worker claims a job with one conditional UPDATE that sets a fresh lease (a fencing token); it
heartbeats, reports progress and finishes only `WHERE lease = $lease`. Zero rows updated means the
lease was lost: the caller raises `LeaseLost`, rolls back and stops.
"""

import base64
import binascii
import contextlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg

from app import queue
from app.errors import BadRequest, Conflict, JobNotFound, LeaseLost

Connection: TypeAlias = "asyncpg.Connection | asyncpg.Pool"
Job = dict[str, Any]

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")

COLUMNS = """id, tenant_id, kind, status, resource, params, progress, result, error, attempts,
    run_at, created_at, started_at, finished_at, seq, upload_key, result_key, expires_at,
    cancel_requested, lease, idempotency_key, request_hash, response_status, queue_id"""


def _job(row: asyncpg.Record | None) -> Job | None:
    return dict(row) if row is not None else None


_INSERT = """INSERT INTO ferry.jobs (id, tenant_id, kind, status, resource, params, run_at,
        upload_key, idempotency_key, request_hash, response_status, queue_id,
        idempotency_expires_at)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
        CASE WHEN $9::text IS NULL THEN NULL ELSE now() + interval '24 hours' END"""


def _values(
    *,
    tenant: str,
    kind: str,
    status: str,
    resource: str,
    params: dict[str, Any],
    run_at: datetime | None = None,
    upload_key: str | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    response_status: int | None = None,
    job_id: uuid.UUID | None = None,
) -> tuple[Any, ...]:
    job_id = job_id or uuid.uuid4()
    queue_id = queue.new_queue_id(job_id) if status == "queued" else None
    return (
        job_id,
        tenant,
        kind,
        status,
        resource,
        params,
        run_at,
        upload_key,
        idempotency_key,
        request_hash,
        response_status,
        queue_id,
    )


async def create(con: Connection, **fields: Any) -> Job:
    """Insert a job as is, with no admission check (see `create_within_limits`)."""
    row = await con.fetchrow(f"{_INSERT} RETURNING {COLUMNS}", *_values(**fields))
    assert row is not None
    return dict(row)


@dataclass(frozen=True)
class Load:
    queued: int | None  # None: not counted
    tenant_active: int


async def create_within_limits(
    con: Connection, max_queued: int | None, max_active: int, **fields: Any
) -> tuple[Load, Job | None]:
    """Insert the job if the queue (up to `max_queued`; None skips that count) and the tenant's
    active jobs (up to `max_active`) are below their limits, in one statement and round trip:
    `ferry.admission` serializes the tenant's submissions until it commits, so the tenant's
    limit is exact under concurrency. Returns the counts, and the job if it was admitted."""
    row = await con.fetchrow(
        f"""WITH load AS (SELECT * FROM ferry.admission($2, $13, $14)),
                job AS ({_INSERT} FROM load
                    WHERE coalesce(load.queued < $13, true) AND load.tenant_active < $14
                    RETURNING {COLUMNS})
            SELECT load.queued AS load_queued, load.tenant_active AS load_tenant_active, job.*
            FROM load LEFT JOIN job ON true""",
        *_values(**fields),
        max_queued,
        max_active,
    )
    assert row is not None
    job = dict(row)
    load = Load(queued=job.pop("load_queued"), tenant_active=job.pop("load_tenant_active"))
    return load, (job if job["id"] is not None else None)


async def find_idempotent(con: Connection, tenant: str, key: str) -> Job | None:
    return _job(
        await con.fetchrow(
            f"""SELECT {COLUMNS} FROM ferry.jobs
                WHERE tenant_id = $1 AND idempotency_key = $2
                  AND idempotency_expires_at > now()""",
            tenant,
            key,
        )
    )


async def expire_idempotency_keys(con: Connection) -> None:
    await con.execute(
        """UPDATE ferry.jobs SET idempotency_key = NULL, idempotency_expires_at = NULL
           WHERE idempotency_expires_at <= now()"""
    )


async def get(con: Connection, job_id: uuid.UUID, tenant: str | None = None) -> Job | None:
    """The job; with `tenant`, only if that tenant owns it (another tenant's job is absent)."""
    return _job(
        await con.fetchrow(
            f"""SELECT {COLUMNS} FROM ferry.jobs
                WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2)""",
            job_id,
            tenant,
        )
    )


async def get_owned(con: Connection, job_id: uuid.UUID, tenant: str) -> Job:
    job = await get(con, job_id, tenant)
    if job is None:
        raise JobNotFound(job_id)
    return job


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job["created_at"].isoformat(), str(job["id"])])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The position a cursor names. Anything else, however it was made, is 400 `invalid_cursor`:
    a cursor is only a position, the tenant always comes from the key."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        if not isinstance(created_at, str) or not isinstance(job_id, str):
            raise TypeError("a cursor holds two strings")
        at = datetime.fromisoformat(created_at)
        if at.tzinfo is None:
            raise ValueError("a cursor's time must have an offset")
        # Out of range once in UTC (year 1 at +05:00): OverflowError, not a query that fails.
        return at.astimezone(UTC), uuid.UUID(job_id)
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise BadRequest(
            "The cursor is not one this service issued.", code="invalid_cursor"
        ) from None


async def list_page(
    con: Connection,
    tenant: str,
    *,
    kind: str | None,
    status: str | None,
    resource: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Job], str | None]:
    """Newest first; a cursor resumes strictly after its page's last job. A cursor must name
    one of the tenant's jobs at its exact position (no secret needed to refuse a forged one)."""
    after = decode_cursor(cursor) if cursor else None
    if after is not None:
        created_at = await con.fetchval(
            "SELECT created_at FROM ferry.jobs WHERE id = $1 AND tenant_id = $2",
            after[1],
            tenant,
        )
        if created_at != after[0]:
            raise BadRequest("The cursor is not one this service issued.", code="invalid_cursor")
    rows = await con.fetch(
        f"""SELECT {COLUMNS} FROM ferry.jobs
            WHERE tenant_id = $1
              AND ($2::text IS NULL OR kind = $2)
              AND ($3::text IS NULL OR status = $3)
              AND ($4::text IS NULL OR resource = $4)
              AND ($5::timestamptz IS NULL OR (created_at, id) < ($5, $6::uuid))
            ORDER BY created_at DESC, id DESC
            LIMIT $7""",
        tenant,
        kind,
        status,
        resource,
        after[0] if after else None,
        after[1] if after else None,
        limit + 1,
    )
    jobs = [dict(r) for r in rows[:limit]]
    next_cursor = encode_cursor(jobs[-1]) if len(rows) > limit else None
    return jobs, next_cursor


async def tenant_jobs_since(
    con: Connection, tenant: str, since: datetime | None
) -> tuple[datetime, list[Job]]:
    """The database's clock, and the tenant's jobs that may still change or that finished at or
    after `since`: what a tenant's event stream re-reads after it may have missed events."""
    async with _acquire(con) as c:
        now: datetime = await c.fetchval("SELECT now()")
        rows = await c.fetch(
            f"""SELECT {COLUMNS} FROM ferry.jobs
                WHERE tenant_id = $1
                  AND (status NOT IN ('succeeded', 'failed', 'cancelled')
                       OR ($2::timestamptz IS NOT NULL AND finished_at >= $2))""",
            tenant,
            since,
        )
    return now, [dict(r) for r in rows]


def _acquire(con: Connection) -> Any:
    if isinstance(con, asyncpg.Pool):
        return con.acquire()
    return contextlib.nullcontext(con)


async def counts(con: Connection) -> dict[tuple[str, str], int]:
    """Jobs by (kind, status), for metrics."""
    rows = await con.fetch("SELECT kind, status, count(*) AS n FROM ferry.jobs GROUP BY 1, 2")
    return {(r["kind"], r["status"]): int(r["n"]) for r in rows}


async def load(con: Connection, tenant: str, max_queued: int | None, max_active: int) -> Load:
    """Queued jobs (all tenants; None skips that count) and the tenant's active jobs, each
    counted up to its limit only: a submission's cost stays bounded however long the queue."""
    row = await con.fetchrow(
        "SELECT queued, tenant_active FROM ferry.admission($1, $2, $3)",
        tenant,
        max_queued,
        max_active,
    )
    assert row is not None
    return Load(queued=row["queued"], tenant_active=row["tenant_active"])


async def new_delivery(con: Connection, job_id: uuid.UUID) -> str:
    """Record a fresh arq id for the job's next delivery; returns it."""
    queue_id = queue.new_queue_id(job_id)
    await con.execute("UPDATE ferry.jobs SET queue_id = $2 WHERE id = $1", job_id, queue_id)
    return queue_id


async def start_upload(con: Connection, job_id: uuid.UUID, tenant: str) -> Job:
    """awaiting_upload -> queued."""
    row = await con.fetchrow(
        f"""UPDATE ferry.jobs SET status = 'queued', seq = seq + 1, queue_id = $3
            WHERE id = $1 AND tenant_id = $2 AND status = 'awaiting_upload'
            RETURNING {COLUMNS}""",
        job_id,
        tenant,
        queue.new_queue_id(job_id),
    )
    if row is None:
        await get_owned(con, job_id, tenant)
        raise Conflict("The job is not awaiting an upload.", code="job_not_awaiting_upload")
    return dict(row)


async def claim(con: Connection, job_id: uuid.UUID, heartbeat_timeout: float) -> Job | None:
    """Take the job's lease when it is queued and due, or running with a dead heartbeat."""
    return _job(
        await con.fetchrow(
            f"""UPDATE ferry.jobs
                SET status = 'running', attempts = attempts + 1, lease = gen_random_uuid(),
                    heartbeat_at = now(), started_at = coalesce(started_at, now()),
                    progress = '{{"rows": 0, "bytes": 0, "total_rows": null, "percent": null}}',
                    seq = seq + 1
                WHERE id = $1 AND NOT cancel_requested
                  AND ((status = 'queued' AND (run_at IS NULL OR run_at <= now()))
                       OR (status = 'running'
                           AND heartbeat_at < now() - make_interval(secs => $2)))
                RETURNING {COLUMNS}""",
            job_id,
            heartbeat_timeout,
        )
    )


# A lock an attempt holds for as long as its transaction (and so its uploads) lasts. When its
# process dies, PostgreSQL closes the connection and drops the lock at once, long before the
# heartbeat goes stale: the reconciler aborts that attempt's uploads within its next pass.
_ATTEMPT_LOCK = "hashtextextended($1::text, 1179927129)"  # seed: a namespace of Ferry's own


async def hold_attempt_lock(con: asyncpg.Connection, lease: uuid.UUID) -> None:
    """Take the attempt's lock for the rest of `con`'s transaction."""
    await con.execute(f"SELECT pg_advisory_xact_lock({_ATTEMPT_LOCK})", str(lease))


async def attempt_gone(con: Connection, lease: uuid.UUID | str) -> bool:
    """Whether no live process holds the attempt's lock (taken and at once released if free)."""
    gone: bool = await con.fetchval(
        f"""SELECT CASE WHEN pg_try_advisory_lock({_ATTEMPT_LOCK})
                        THEN pg_advisory_unlock({_ATTEMPT_LOCK}) ELSE false END""",
        str(lease),
    )
    return gone


async def heartbeat(con: Connection, job_id: uuid.UUID, lease: uuid.UUID) -> bool:
    """Refresh the lease; returns whether cancellation was requested. Raises LeaseLost."""
    cancel = await con.fetchval(
        """UPDATE ferry.jobs SET heartbeat_at = now()
           WHERE id = $1 AND lease = $2 AND status = 'running'
           RETURNING cancel_requested""",
        job_id,
        lease,
    )
    if cancel is None:
        raise LeaseLost(str(job_id))
    return bool(cancel)


async def progress(
    con: Connection, job_id: uuid.UUID, lease: uuid.UUID, progress: dict[str, Any]
) -> int:
    """Record progress (also a heartbeat); returns the event's sequence number."""
    seq = await con.fetchval(
        """UPDATE ferry.jobs SET progress = $3, heartbeat_at = now(), seq = seq + 1
           WHERE id = $1 AND lease = $2 AND status = 'running'
           RETURNING seq""",
        job_id,
        lease,
        progress,
    )
    if seq is None:
        raise LeaseLost(str(job_id))
    return int(seq)


async def finish(
    con: Connection,
    job_id: uuid.UUID,
    lease: uuid.UUID,
    status: str,
    *,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
    result_key: str | None = None,
    expires_at: datetime | None = None,
) -> Job:
    """End the attempt that holds `lease` in a terminal status. Raises LeaseLost."""
    row = await con.fetchrow(
        f"""UPDATE ferry.jobs
            SET status = $3, result = $4, error = $5, progress = coalesce($6, progress),
                result_key = $7, expires_at = $8, finished_at = clock_timestamp(), lease = NULL,
                seq = seq + 1
            WHERE id = $1 AND lease = $2 AND status = 'running'
            RETURNING {COLUMNS}""",
        job_id,
        lease,
        status,
        result,
        error,
        progress,
        result_key,
        expires_at,
    )
    if row is None:
        raise LeaseLost(str(job_id))
    return dict(row)


async def requeue(
    con: Connection, job_id: uuid.UUID, lease: uuid.UUID, run_at: datetime | None
) -> Job | None:
    """Hand a running job back to the queue (retry after a transient error, or shutdown); a job
    whose cancel was asked meanwhile ends `cancelled` instead (no worker would claim it)."""
    return _job(
        await con.fetchrow(
            f"""UPDATE ferry.jobs
                SET status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END,
                    finished_at = CASE WHEN cancel_requested THEN clock_timestamp() END,
                    lease = NULL, heartbeat_at = NULL, run_at = $3, seq = seq + 1,
                    queue_id = $4
                WHERE id = $1 AND lease = $2 AND status = 'running'
                RETURNING {COLUMNS}""",
            job_id,
            lease,
            run_at,
            queue.new_queue_id(job_id),
        )
    )


async def request_cancel(con: Connection, job_id: uuid.UUID, tenant: str) -> Job:
    """Cancel a job that has not started at once; flag a running one for its worker."""
    row = await con.fetchrow(
        f"""UPDATE ferry.jobs
            SET cancel_requested = true,
                status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
                finished_at = CASE WHEN status = 'running' THEN NULL ELSE now() END,
                seq = seq + CASE WHEN status = 'running' THEN 0 ELSE 1 END
            WHERE id = $1 AND tenant_id = $2 AND status NOT IN ('succeeded', 'failed', 'cancelled')
            RETURNING {COLUMNS}""",
        job_id,
        tenant,
    )
    if row is None:
        await get_owned(con, job_id, tenant)
        raise Conflict("The job has already finished.", code="job_finished")
    return dict(row)


async def expired(con: Connection, limit: int = 500) -> list[Job]:
    """Finished jobs past `expires_at` whose objects still exist."""
    rows = await con.fetch(
        """SELECT id, result_key, upload_key, result FROM ferry.jobs
           WHERE expires_at <= now() AND NOT objects_deleted
             AND status IN ('succeeded', 'failed', 'cancelled')
           ORDER BY expires_at LIMIT $1""",
        limit,
    )
    return [dict(r) for r in rows]


async def mark_expired(con: Connection, job_id: uuid.UUID) -> None:
    await con.execute(
        """UPDATE ferry.jobs SET objects_deleted = true,
               result = CASE WHEN result IS NULL THEN NULL
                             ELSE result || '{"expired": true}'::jsonb END
           WHERE id = $1""",
        job_id,
    )


async def fail_unleased(
    con: Connection,
    job_id: uuid.UUID,
    lease: uuid.UUID,
    error: dict[str, Any] | None,
    status: str = "failed",
) -> Job | None:
    """End a job whose attempt (`lease`) died: out of attempts, or cancelled meanwhile. None
    when another attempt has claimed it since (a duplicate delivery): that one is alive."""
    return _job(
        await con.fetchrow(
            f"""UPDATE ferry.jobs
                SET status = $3, error = $2, finished_at = now(), lease = NULL, seq = seq + 1
                WHERE id = $1 AND lease = $4 AND status = 'running'
                RETURNING {COLUMNS}""",
            job_id,
            error,
            status,
            lease,
        )
    )

"""Breaking things for real: killed workers, lost Redis data, dropped connections, back pressure,
idempotency. Each test controls its own worker processes."""

import asyncio
import gzip
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import redis as redis_sync

from app import events, export, jobstore, runner
from app.dev import free_port
from app.services import open_services
from tests.conftest import Stack, Tenant, stop, wait_for_http, wait_for_job
from tests.test_exports import download, seed_users

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def no_session_worker(stack: Stack) -> Iterator[None]:
    """Stop the shared worker so each test decides which workers run; restore it after."""
    assert stack.workers is not None
    for worker in stack.workers:
        stop(worker)
    stack.workers.clear()
    try:
        yield
    finally:
        stack.workers.append(stack.start_worker())


@pytest.fixture
def workers(stack: Stack, no_session_worker: None) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for worker in started:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


async def poll(check: Any, deadline_s: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + deadline_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached after {deadline_s}s")
        await asyncio.sleep(0.1)


async def running_with_rows(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        job = (await client.get(f"/jobs/{job_id}")).json()
        assert job["status"] in ("queued", "running"), job
        return job if job["status"] == "running" and job["progress"]["rows"] > 0 else None

    result: dict[str, Any] = await poll(check, 120, "running with rows")
    return result


async def open_uploads(stack: Stack) -> list[str]:
    import aioboto3

    session = aioboto3.Session()
    async with session.client("s3", endpoint_url=stack.env["FERRY_S3_ENDPOINT_URL"]) as s3:
        response = await s3.list_multipart_uploads(Bucket=stack.settings.s3_bucket)
    return [u["Key"] for u in response.get("Uploads", [])]


@pytest.fixture
async def big_table(pool: asyncpg.Pool, tenant: Tenant) -> AsyncIterator[int]:
    rows = 2_000_000
    await seed_users(pool, tenant.name, rows)
    yield rows
    await pool.execute("DELETE FROM public.users WHERE tenant_id = $1", tenant.name)


async def test_sigkill_mid_export_is_finished_by_another_worker(
    stack: Stack,
    client: httpx.AsyncClient,
    workers: list[subprocess.Popen[bytes]],
    big_table: int,
) -> None:
    first = stack.start_worker()
    workers.append(first)
    job = (await client.post("/exports", json={"resource": "users", "compression": "gzip"})).json()
    await running_with_rows(client, job["id"])
    first.send_signal(signal.SIGKILL)
    first.wait()
    workers.append(stack.start_worker())
    done = await wait_for_job(client, job["id"], deadline_s=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] >= 2
    assert done["result"]["rows"] == big_table
    body = gzip.decompress(await download(client, done))
    assert body.count(b"\n") == big_table + 1
    await poll(lambda: _no_uploads_for(stack, job["id"]), 60, "dead attempt's upload aborted")


async def test_a_heartbeat_after_the_finish_committed_keeps_the_export(
    stack: Stack,
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    tenant: Tenant,
    no_session_worker: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The finish commits `succeeded` (lease gone), a heartbeat runs before the commit's answer
    arrives and finds no lease: the attempt must neither be cancelled nor delete its object,
    and its end must be announced."""
    await seed_users(pool, tenant.name, 100)
    job = (await client.post("/exports", json={"resource": "users"})).json()
    committed, beat_after_commit = asyncio.Event(), asyncio.Event()
    real_finish, real_heartbeat, real_publish = (
        jobstore.finish,
        jobstore.heartbeat,
        events.publish_job,
    )
    announced: list[str] = []

    async def finish_answered_late(*args: Any, **kwargs: Any) -> Any:
        row = await real_finish(*args, **kwargs)
        committed.set()
        async with asyncio.timeout(30):  # not wait_for: it can swallow a cancel (3.11)
            await beat_after_commit.wait()
        return row

    async def heartbeat(*args: Any) -> bool:
        try:
            return await real_heartbeat(*args)
        finally:
            if committed.is_set():
                beat_after_commit.set()

    async def publish_job(redis: Any, job: Any, public: dict[str, Any]) -> None:
        announced.append(public["status"])
        await real_publish(redis, job, public)

    monkeypatch.setattr(jobstore, "finish", finish_answered_late)
    monkeypatch.setattr(jobstore, "heartbeat", heartbeat)
    monkeypatch.setattr(events, "publish_job", publish_job)
    async with open_services(stack.settings) as services:
        await runner.run_job(services, uuid.UUID(job["id"]), {"export": export.run})

    assert beat_after_commit.is_set()
    done = (await client.get(f"/jobs/{job['id']}")).json()
    assert done["status"] == "succeeded", done
    assert (await download(client, done)).count(b"\n") == 101
    assert announced[-1] == "succeeded"


async def test_a_finish_that_committed_but_lost_its_answer_keeps_the_export(
    stack: Stack,
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    tenant: Tenant,
    no_session_worker: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection drops after the finish's commit: the job's row names the object, so the
    failed attempt's clean-up must not delete it."""
    await seed_users(pool, tenant.name, 100)
    job = (await client.post("/exports", json={"resource": "users"})).json()
    real_finish = jobstore.finish

    async def finish_then_drop(*args: Any, **kwargs: Any) -> Any:
        await real_finish(*args, **kwargs)
        raise asyncpg.InterfaceError("connection lost after the commit")

    monkeypatch.setattr(jobstore, "finish", finish_then_drop)
    async with open_services(stack.settings) as services:
        await runner.run_job(services, uuid.UUID(job["id"]), {"export": export.run})

    done = (await client.get(f"/jobs/{job['id']}")).json()
    assert done["status"] == "succeeded", done
    assert (await download(client, done)).count(b"\n") == 101


async def test_a_killed_attempts_upload_is_aborted_before_its_heartbeat_goes_stale(
    stack: Stack,
    client: httpx.AsyncClient,
    workers: list[subprocess.Popen[bytes]],
    big_table: int,
) -> None:
    """SPEC: a killed attempt's unfinished upload is aborted within 60 s, and the heartbeat
    timeout alone is 60 s by default: the reconciler sees that the attempt's process is gone."""
    first = stack.start_worker()
    workers.append(first)
    job = (await client.post("/exports", json={"resource": "users", "compression": "gzip"})).json()
    await running_with_rows(client, job["id"])
    await poll(lambda: _uploads_for(stack, job["id"]), 30, "the export's multipart upload")
    first.send_signal(signal.SIGKILL)
    first.wait()
    # Its reconciler would re-run the job (and so replace its lease) only after 10 minutes.
    workers.append(stack.start_worker(FERRY_HEARTBEAT_TIMEOUT_SECONDS="600"))
    await poll(lambda: _no_uploads_for(stack, job["id"]), 30, "killed attempt's upload aborted")
    still = (await client.get(f"/jobs/{job['id']}")).json()
    assert (still["status"], still["attempts"]) == ("running", 1), still
    await client.post(f"/jobs/{job['id']}/cancel")  # the session's worker ends it later


async def test_an_attempt_is_gone_once_its_transaction_or_connection_is(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    """The attempt lock that tells the reconciler whether an upload's writer still lives."""
    lease = uuid.uuid4()
    assert await jobstore.attempt_gone(pool, lease)
    con = await asyncpg.connect(stack.dsn)  # the attempt's own connection, as in a worker
    try:
        async with con.transaction():
            await jobstore.hold_attempt_lock(con, lease)
            assert not await jobstore.attempt_gone(pool, lease)
            assert not await jobstore.attempt_gone(pool, str(lease))  # twice: the probe let go
            assert await jobstore.attempt_gone(pool, uuid.uuid4())
        assert await jobstore.attempt_gone(pool, lease)
        await con.transaction().start()
        await jobstore.hold_attempt_lock(con, lease)
        assert not await jobstore.attempt_gone(pool, lease)
        con.terminate()  # its process dies mid-transaction: PostgreSQL drops the lock
        assert await poll(lambda: jobstore.attempt_gone(pool, lease), 10, "lock dropped")
    finally:
        con.terminate()


async def test_the_reconciler_never_ends_an_attempt_that_claimed_the_job_since(
    client: httpx.AsyncClient, pool: asyncpg.Pool, no_session_worker: None
) -> None:
    """Between the reconciler's read of a stale job and its write, a duplicate delivery may
    claim the job: the end it writes is fenced by the dead attempt's lease."""
    job_id = uuid.UUID((await client.post("/exports", json={"resource": "users"})).json()["id"])
    dead, live = uuid.uuid4(), uuid.uuid4()
    await pool.execute(
        "UPDATE ferry.jobs SET status = 'running', lease = $2, attempts = 5,"
        " heartbeat_at = now() - interval '1 hour' WHERE id = $1",
        job_id,
        dead,
    )
    await pool.execute(  # the duplicate delivery's claim
        "UPDATE ferry.jobs SET lease = $2, heartbeat_at = now(), attempts = 6 WHERE id = $1",
        job_id,
        live,
    )
    error = {"code": "attempts_exhausted", "message": "stopped responding"}
    assert await jobstore.fail_unleased(pool, job_id, dead, error) is None
    job = await jobstore.get(pool, job_id)
    assert job is not None and (job["status"], job["lease"]) == ("running", live)
    ended = await jobstore.fail_unleased(pool, job_id, live, None, "cancelled")
    assert ended is not None and ended["status"] == "cancelled"


async def _uploads_for(stack: Stack, job_id: str) -> bool:
    return not await _no_uploads_for(stack, job_id)


async def _no_uploads_for(stack: Stack, job_id: str) -> bool:
    return not [key for key in await open_uploads(stack) if job_id in key]


async def test_terminated_database_connections_are_retried(
    stack: Stack,
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    workers: list[subprocess.Popen[bytes]],
    big_table: int,
) -> None:
    workers.append(stack.start_worker())
    job = (await client.post("/exports", json={"resource": "users"})).json()
    await running_with_rows(client, job["id"])
    killed = await pool.fetchval(
        """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
           WHERE datname = current_database() AND pid <> pg_backend_pid()
             AND query ILIKE 'COPY%'"""
    )
    assert killed >= 1
    done = await wait_for_job(client, job["id"], deadline_s=180)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert done["result"]["rows"] == big_table
    await poll(lambda: _no_uploads_for(stack, job["id"]), 60, "failed attempt's upload aborted")


async def test_sigterm_hands_the_job_over(
    stack: Stack,
    client: httpx.AsyncClient,
    workers: list[subprocess.Popen[bytes]],
    big_table: int,
) -> None:
    first = stack.start_worker(FERRY_SHUTDOWN_GRACE_SECONDS="0")
    workers.append(first)
    job = (await client.post("/exports", json={"resource": "users", "compression": "gzip"})).json()
    await running_with_rows(client, job["id"])
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) is not None
    handed_back = (await client.get(f"/jobs/{job['id']}")).json()
    assert handed_back["status"] in ("queued", "succeeded")
    workers.append(stack.start_worker())
    done = await wait_for_job(client, job["id"], deadline_s=180)
    assert done["status"] == "succeeded" and done["result"]["rows"] == big_table


async def test_flushed_redis_loses_no_job(
    stack: Stack, client: httpx.AsyncClient, workers: list[subprocess.Popen[bytes]]
) -> None:
    ids = [
        (await client.post("/exports", json={"resource": "users"})).json()["id"] for _ in range(5)
    ]
    redis_sync.Redis.from_url(stack.env["FERRY_REDIS_URL"]).flushdb()
    workers.append(stack.start_worker())
    for job_id in ids:
        job = await wait_for_job(client, job_id, deadline_s=90)
        assert job["status"] == "succeeded" and job["attempts"] == 1


async def test_a_redis_that_forgot_the_enqueue_script_still_queues_jobs(
    client: httpx.AsyncClient, stack: Stack, workers: list[subprocess.Popen[bytes]]
) -> None:
    """Submissions run a cached Lua script (EVALSHA); a Redis restarted without it answers
    NOSCRIPT, and the submission sends the script itself."""
    workers.append(stack.start_worker())
    redis_sync.Redis.from_url(stack.env["FERRY_REDIS_URL"]).script_flush()
    response = await client.post("/exports", json={"resource": "users"})
    assert response.status_code == 202, response.text
    job = await wait_for_job(client, response.json()["id"], deadline_s=60)
    assert job["status"] == "succeeded" and job["attempts"] == 1


async def test_redis_outage_keeps_accepting_and_completes_everything(
    stack: Stack, tenant: Tenant, workers: list[subprocess.Popen[bytes]], tmp_path: Any
) -> None:
    port = free_port()
    server = [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(tmp_path),
    ]
    private = subprocess.Popen(server, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    api = None
    try:
        await poll(lambda: _redis_up(url), 10, "private redis")
        api, api_url = stack.start_api(FERRY_REDIS_URL=url)
        workers.append(stack.start_worker(FERRY_REDIS_URL=url))
        async with httpx.AsyncClient(base_url=api_url, headers=tenant.headers, timeout=30) as c:
            ids = [(await c.post("/exports", json={"resource": "users"})).json()["id"]]
            stop(private)
            outage_ends = time.monotonic() + 10
            ready = await c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["redis"] != "ok"
            while time.monotonic() < outage_ends:
                response = await c.post("/exports", json={"resource": "users"})
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])
                await asyncio.sleep(1)
            private = subprocess.Popen(server, stdout=subprocess.DEVNULL)
            for job_id in ids:
                job = await wait_for_job(c, job_id, deadline_s=120)
                assert job["status"] == "succeeded", job
        assert workers[-1].poll() is None, "the worker survived the outage"
    finally:
        stop(api)
        stop(private)


async def _redis_up(url: str) -> bool:
    try:
        return bool(redis_sync.Redis.from_url(url, socket_connect_timeout=0.2).ping())
    except redis_sync.RedisError:
        return False


async def test_many_concurrent_submissions_are_accepted_or_cleanly_refused(
    stack: Stack, pool: asyncpg.Pool, workers: list[subprocess.Popen[bytes]]
) -> None:
    from app import auth

    keys: dict[str, str] = {}
    async with pool.acquire() as con:
        for _ in range(10):
            name = f"load-{uuid.uuid4().hex[:8]}"
            keys[name] = await auth.create_key(con, name)
    tenants = list(keys)
    workers.append(stack.start_worker())
    body = {"resource": "users", "filter": [{"column": "age", "op": "eq", "value": 1}]}
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, limits=limits) as c:

        async def submit(i: int) -> tuple[str, httpx.Response]:
            tenant = tenants[i % len(tenants)]
            headers = {"Authorization": f"Bearer {keys[tenant]}"}
            return tenant, await c.post("/exports", json=body, headers=headers)

        results = await asyncio.gather(*(submit(i) for i in range(500)))
        assert {r.status_code for _, r in results} <= {202, 429, 503}
        for _, r in results:
            if r.status_code != 202:
                assert int(r.headers["retry-after"]) > 0
                assert r.json()["code"] in ("too_many_active_jobs", "queue_full")
        accepted = [(t, r.json()["id"]) for t, r in results if r.status_code == 202]
        assert accepted
        total = await pool.fetchval(
            "SELECT count(*) FROM ferry.jobs WHERE tenant_id = ANY($1)", tenants
        )
        assert total == len(accepted), "a refused request left a job behind"
        for tenant, job_id in accepted:
            c.headers["Authorization"] = f"Bearer {keys[tenant]}"
            job = await wait_for_job(c, job_id, deadline_s=120)
            assert job["status"] == "succeeded", job


async def test_back_pressure_answers_429_and_503_with_retry_after(
    stack: Stack, tenant: Tenant, pool: asyncpg.Pool, no_session_worker: None
) -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    body = {"resource": "users", "run_at": later}
    api, url = stack.start_api(FERRY_MAX_ACTIVE_JOBS_PER_TENANT="5")
    try:
        async with httpx.AsyncClient(base_url=url, headers=tenant.headers) as c:
            burst = await asyncio.gather(*(c.post("/exports", json=body) for _ in range(20)))
            codes = sorted(r.status_code for r in burst)
            assert codes == [202] * 5 + [429] * 15  # exact under concurrency
            refused = await c.post("/exports", json=body)
            assert refused.status_code == 429
            assert refused.json()["code"] == "too_many_active_jobs"
            assert int(refused.headers["retry-after"]) > 0
    finally:
        stop(api)
    queued = await pool.fetchval("SELECT count(*) FROM ferry.jobs WHERE status = 'queued'")
    api, url = stack.start_api(FERRY_MAX_QUEUED_JOBS=str(queued))
    try:
        async with httpx.AsyncClient(base_url=url, headers=tenant.headers) as c:
            before = len((await c.get("/jobs", params={"limit": 100})).json()["items"])
            refused = await c.post("/exports", json={"resource": "users"})
            assert refused.status_code == 503 and refused.json()["code"] == "queue_full"
            assert int(refused.headers["retry-after"]) > 0
            after = len((await c.get("/jobs", params={"limit": 100})).json()["items"])
            assert after == before
    finally:
        stop(api)
    await pool.execute(
        "UPDATE ferry.jobs SET status = 'cancelled' WHERE tenant_id = $1 AND status = 'queued'",
        tenant.name,
    )


async def test_idempotency_key_replays_and_refuses_a_different_body(
    client: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    body = {"resource": "users", "run_at": later}
    first = await client.post("/exports", json=body, headers=headers)
    again = await client.post("/exports", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.json()["id"] == first.json()["id"]
    other = await client.post("/exports", json={**body, "format": "jsonl"}, headers=headers)
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    await client.post(f"/jobs/{first.json()['id']}/cancel")


async def test_concurrent_requests_with_one_idempotency_key_make_one_job(
    client: httpx.AsyncClient, other_tenant: Tenant, stack: Stack
) -> None:
    key = f"k-{uuid.uuid4()}"
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    body = {"resource": "users", "run_at": later}
    responses = await asyncio.gather(
        *(client.post("/exports", json=body, headers={"Idempotency-Key": key}) for _ in range(8))
    )
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    # Keys are per tenant: the same key from another tenant is another job.
    async with httpx.AsyncClient(base_url=stack.api_url, headers=other_tenant.headers) as other:
        theirs = await other.post("/exports", json=body, headers={"Idempotency-Key": key})
        assert theirs.status_code == 202 and theirs.json()["id"] != responses[0].json()["id"]
        await other.post(f"/jobs/{theirs.json()['id']}/cancel")
    await client.post(f"/jobs/{responses[0].json()['id']}/cancel")


async def test_expired_results_are_deleted_and_download_is_410(
    stack: Stack,
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    workers.append(stack.start_worker())
    job = (await client.post("/exports", json={"resource": "users"})).json()
    job = await wait_for_job(client, job["id"])
    url = job["result"]["download_url"]
    assert httpx.get(url).status_code == 200
    await pool.execute(
        "UPDATE ferry.jobs SET expires_at = now() WHERE id = $1", uuid.UUID(job["id"])
    )

    async def deleted() -> bool:
        return httpx.get(url).status_code == 404

    await poll(deleted, 30, "object deleted")
    expired = (await client.get(f"/jobs/{job['id']}")).json()
    assert expired["result"]["expired"] is True and expired["result"]["download_url"] is None
    response = await client.get(f"/exports/{job['id']}/download")
    assert response.status_code == 410 and response.json()["code"] == "result_expired"


def test_api_answers_while_workers_are_stopped(stack: Stack, no_session_worker: None) -> None:
    wait_for_http(f"{stack.api_url}/healthz", stack.api)  # type: ignore[arg-type]

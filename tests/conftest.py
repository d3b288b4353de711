"""Session fixtures: a throwaway database, a dedicated Redis db, the S3 emulator over HTTP, and
the real API (uvicorn) and a real arq worker as processes."""

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis

from app import auth, cli, db
from app.config import Settings
from app.dev import (
    api_command,
    emulator_env,
    ensure_bucket,
    free_port,
    start_s3_emulator,
    stop,
    wait_for_http,
    wait_for_port,
    worker_command,
)

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
ADMIN_DSN = os.environ.get("FERRY_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_DB = int(os.environ.get("FERRY_TEST_REDIS_DB", "13"))
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Stack:
    env: dict[str, str]
    settings: Settings
    dsn: str
    logs: Path
    api_url: str = ""
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] | None = None

    def start_api(self, port: int | None = None, **env: str) -> tuple[subprocess.Popen[bytes], str]:
        port = port or free_port()
        log = open(self.logs / f"api-{port}.log", "ab")  # noqa: SIM115
        process = subprocess.Popen(
            api_command(port),
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        wait_for_http(f"http://127.0.0.1:{port}/healthz", process)
        return process, f"http://127.0.0.1:{port}"

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / "worker.log", "ab")  # noqa: SIM115
        return subprocess.Popen(
            worker_command(),
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


async def _prepare_database(dsn: str) -> None:
    await db.migrate(dsn)
    await cli.seed_demo(dsn, 0)
    con = await asyncpg.connect(dsn)
    try:
        await con.execute((TESTS / "schema.sql").read_text())
    finally:
        await con.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("logs")
    name = f"ferry_test_{uuid.uuid4().hex[:10]}"
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    s3_port = free_port()
    emulator = start_s3_emulator(s3_port, stdout=open(logs / "s3.log", "ab"))  # noqa: SIM115
    stack: Stack | None = None
    try:
        redis_url = f"redis://127.0.0.1:6379/{REDIS_DB}"
        redis.Redis.from_url(redis_url).flushdb()
        env = {
            **os.environ,
            **emulator_env(f"http://127.0.0.1:{s3_port}"),
            "FERRY_DATABASE_URL": dsn,
            "FERRY_REDIS_URL": redis_url,
            "FERRY_S3_BUCKET": "ferry-test",
            "FERRY_RESOURCES_FILE": str(TESTS / "resources.toml"),
            "FERRY_RECONCILE_INTERVAL_SECONDS": "1",
            "FERRY_HEARTBEAT_TIMEOUT_SECONDS": "6",
            "FERRY_HEARTBEAT_INTERVAL_SECONDS": "0.5",
            "FERRY_PROGRESS_INTERVAL_SECONDS": "0.25",
            "FERRY_SHUTDOWN_GRACE_SECONDS": "5",
            "FERRY_AUTH_CACHE_SECONDS": "1",
            "FERRY_LOG_JSON": "true",
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith(("FERRY_", "AWS_"))})
        settings = Settings()
        asyncio.run(_prepare_database(dsn))
        asyncio.run(ensure_bucket(settings))
        stack = Stack(env=env, settings=settings, dsn=dsn, logs=logs, workers=[])
        stack.api, stack.api_url = stack.start_api()
        stack.workers.append(stack.start_worker())
        yield stack
    finally:
        if stack is not None:
            stop(stack.api)
            for worker in stack.workers or []:
                stop(worker)
        stop(emulator)
        if os.environ.get("FERRY_TEST_SHOW_LOGS"):
            for log in sorted(logs.iterdir()):
                sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-5000:]}\n")
        asyncio.run(_drop_database(name))


async def _drop_database(name: str) -> None:
    con = await asyncpg.connect(ADMIN_DSN)
    try:
        await con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await con.close()


@pytest.fixture(scope="session")
async def pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(stack.dsn, 10)
    yield pool
    await pool.close()


@dataclass
class Tenant:
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
async def tenant(pool: asyncpg.Pool) -> Tenant:
    """A fresh tenant with its own key: tests never see each other's jobs or rows."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    async with pool.acquire() as con:
        return Tenant(name, await auth.create_key(con, name))


@pytest.fixture
async def other_tenant(pool: asyncpg.Pool) -> Tenant:
    name = f"o-{uuid.uuid4().hex[:10]}"
    async with pool.acquire() as con:
        return Tenant(name, await auth.create_key(con, name))


@pytest.fixture
async def client(stack: Stack, tenant: Tenant) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the real API, authenticated as `tenant`."""
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=tenant.headers, timeout=60
    ) as client:
        yield client


@pytest.fixture
async def anonymous(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60) as client:
        yield client


_next_id = [10_000_000]


def next_ids(count: int) -> int:
    """A block of user ids no other test uses (ids are global, tenants share the table)."""
    first = _next_id[0]
    _next_id[0] += count + 1000
    return first


async def wait_for_job(
    client: httpx.AsyncClient,
    job_id: str,
    deadline_s: float = 120,
    statuses: tuple[str, ...] = TERMINAL,
) -> dict[str, Any]:
    """Poll the job until it reaches one of `statuses`, with a deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        response = await client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {deadline_s}s: {job}")
        await asyncio.sleep(0.1)


__all__ = ["Stack", "Tenant", "next_ids", "wait_for_http", "wait_for_job", "wait_for_port"]

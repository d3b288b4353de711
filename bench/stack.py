"""The servers a bench run starts (S3 emulator, API, worker), its database and its tenants.

Same approach as tests/conftest.py: real processes on loopback, each stopped when the run ends.
"""

import asyncio
import os
import subprocess
import sys
import time
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis

from app import cli, db
from app.config import Settings
from app.dev import (
    api_command,
    emulator_env,
    ensure_bucket,
    free_port,
    start_s3_emulator,
    stop,
    wait_for_http,
    worker_command,
)
from bench.config import APP_ROOT, RESULTS, Config

BUCKET = "ferry-bench"
TENANT = "bench"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB: its resident set now and its peak."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of processes, in seconds (a process gone counts nothing)."""
    total = 0
    for pid in pids:
        try:
            fields = _stat(pid)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def postgres_cpu_seconds() -> float:
    """CPU time of the whole PostgreSQL server: every live process plus the backends that have
    exited (the postmaster's reaped children), so a client's short-lived backend counts too."""
    while True:
        reaped = _reaped_cpu_seconds()
        live = cpu_seconds(postgres_pids())
        # A backend reaped during the scan would count twice (or not at all): scan again.
        if _reaped_cpu_seconds() == reaped:
            return reaped + live


def _reaped_cpu_seconds() -> float:
    """User plus system CPU time of the postmaster's exited, reaped children."""
    for pid in postgres_pids():
        with suppress(OSError):
            fields = _stat(pid)
            if Path(f"/proc/{fields[1]}/comm").read_text().strip() != "postgres":  # postmaster
                return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def postgres_pids() -> list[int]:
    """Every PostgreSQL server process on this machine (the bench's server is on loopback)."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with suppress(OSError):
            if comm.read_text().strip() == "postgres":
                pids.append(int(comm.parent.name))
    return pids


@dataclass
class Stack:
    config: Config
    logs: Path = RESULTS / "logs"
    env: dict[str, str] = field(default_factory=dict)
    s3_endpoint: str = ""
    settings: Settings | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    emulator: subprocess.Popen[bytes] | None = None
    api: subprocess.Popen[bytes] | None = None
    api_url: str = ""
    worker: subprocess.Popen[bytes] | None = None
    keys: dict[str, str] = field(default_factory=dict)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for old in self.logs.glob("*.log"):
            old.unlink()
        port = free_port()
        self.s3_endpoint = f"http://127.0.0.1:{port}"
        log(f"S3 emulator (moto) on {self.s3_endpoint}")
        self.emulator = start_s3_emulator(port, stdout=self._log("s3"))
        self.processes.append(self.emulator)
        redis.Redis.from_url(self.config.redis_url).flushdb()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(APP_ROOT),
            **emulator_env(self.s3_endpoint),
            "FERRY_DATABASE_URL": self.config.dsn,
            "FERRY_REDIS_URL": self.config.redis_url,
            "FERRY_S3_BUCKET": BUCKET,
            "FERRY_RESOURCES_FILE": str(APP_ROOT / "resources.toml"),
            "FERRY_LOG_JSON": "true",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        os.environ.update({k: v for k, v in self.env.items() if k.startswith(("FERRY_", "AWS_"))})
        self.settings = Settings()
        asyncio.run(db.migrate(self.config.dsn))
        # The API refuses to start without the tables its resources name.
        asyncio.run(_create_demo_table(self.config.dsn))
        asyncio.run(ensure_bucket(self.settings))

    def close(self) -> None:
        for process in [self.worker, self.api, *reversed(self.processes)]:
            stop(process)
        self.worker = self.api = None
        with suppress(redis.RedisError):
            redis.Redis.from_url(self.config.redis_url).flushdb()

    def _log(self, name: str) -> Any:
        return open(self.logs / f"{name}.log", "ab")

    # -- processes --------------------------------------------------------------------------
    def start_api(self, **env: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        process = subprocess.Popen(
            api_command(port),
            env={**self.env, **env},
            stdout=self._log(f"api-{port}"),
            stderr=subprocess.STDOUT,
            cwd=APP_ROOT,
        )
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", process)
        return process, url

    def ensure_api(self) -> str:
        if self.api is None or self.api.poll() is not None:
            self.api, self.api_url = self.start_api()
        return self.api_url

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        self.stop_worker()
        self.worker = subprocess.Popen(
            worker_command(),
            env={**self.env, **env},
            stdout=self._log("worker"),
            stderr=subprocess.STDOUT,
            cwd=APP_ROOT,
        )
        return self.worker

    def ensure_worker(self) -> subprocess.Popen[bytes]:
        if self.worker is None or self.worker.poll() is not None:
            return self.start_worker()
        return self.worker

    def stop_worker(self) -> None:
        stop(self.worker)
        self.worker = None

    # -- data -------------------------------------------------------------------------------
    def settle(self) -> None:
        """Write out what set-up wrote (seeded rows, the AWS CLI's virtualenv, files) before
        anything is timed. Left to PostgreSQL's checkpointer and the kernel, that write-back
        lands on the first measured runs: each of Ferry's commits waits for its WAL fsync."""
        asyncio.run(_checkpoint(self.config.dsn))
        os.sync()

    def key(self, tenant: str) -> str:
        if tenant not in self.keys:
            self.keys[tenant] = asyncio.run(cli.create_key(self.config.dsn, tenant))
        return self.keys[tenant]

    def headers(self, tenant: str = TENANT) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(tenant)}"}

    def seed(self, tenant: str, rows: int, first_id: int) -> None:
        """Give `tenant` exactly ids first_id..first_id+rows-1 (kept between runs)."""
        asyncio.run(_seed(self.config.dsn, tenant, rows, first_id))

    async def s3(self, stack: AsyncExitStack) -> Any:
        from app.storage import Storage

        assert self.settings is not None
        return await Storage.open(self.settings, stack)


async def _checkpoint(dsn: str) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await con.execute("CHECKPOINT")
    finally:
        await con.close()


async def _create_demo_table(dsn: str) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(cli.DEMO_TABLE_SQL)
    finally:
        await con.close()


async def _seed(dsn: str, tenant: str, rows: int, first_id: int) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(cli.DEMO_TABLE_SQL)
        last = first_id + rows - 1
        have = await con.fetchrow(
            "SELECT count(*) AS n, min(id) AS lo, max(id) AS hi FROM public.users"
            " WHERE tenant_id = $1",
            tenant,
        )
        if have is not None and (have["n"], have["lo"], have["hi"]) == (rows, first_id, last):
            return
        log(f"seeding {rows:,} users for tenant {tenant!r} (ids {first_id:,}..{last:,})")
        async with con.transaction():
            await con.execute(
                "INSERT INTO ferry.tenants (id) VALUES ($1) ON CONFLICT DO NOTHING", tenant
            )
            deleted = 0
            for sql, args in (
                ("DELETE FROM public.users WHERE tenant_id = $1", (tenant,)),
                ("DELETE FROM public.users WHERE id BETWEEN $1 AND $2", (first_id, last)),
            ):
                deleted += int((await con.execute(sql, *args)).split()[-1])
            await con.execute(cli.SEED_ROWS, first_id, last, tenant)
        # Rows replaced (BENCH_BIG's 10M back to 1M) leave the table and its index bloated
        # with dead entries, and slow every export after them (1M rows: 0.96 s against 0.78 s):
        # rewrite them compactly.
        await con.execute(f"VACUUM ({'FULL, ' if deleted else ''}ANALYZE) public.users")
    finally:
        await con.close()

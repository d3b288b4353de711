"""API: job submissions/s and latency at 64 concurrent clients, beside GET /healthz.

Only the API path is measured: the worker is stopped and every export asks for a `run_at` far in
the future. The bench API process gets limits high enough that back pressure never answers; the
queued jobs are deleted after each run (PostgreSQL rows and arq messages), so they never count
against another run's queue.
"""

import asyncio
import time
from typing import Any

import aiohttp
import asyncpg
import redis

from bench.measure import Figure, alternate, median, percentile
from bench.stack import Stack, log, stop

API_TENANT_PREFIX = "bench-api-"
BODY = {"resource": "users", "run_at": "2100-01-01T00:00:00Z"}
LIMITS = {"FERRY_MAX_QUEUED_JOBS": "100000000", "FERRY_MAX_ACTIVE_JOBS_PER_TENANT": "100000000"}


async def _load(
    url: str, keys: list[str], method: str, path: str, seconds: float
) -> tuple[int, list[float], dict[int, int]]:
    """`len(keys)` clients, each with its own API key, looping for `seconds`."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=len(keys), force_close=False)
    async with aiohttp.ClientSession(base_url=url, connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def client(key: str) -> None:
            headers = {"Authorization": f"Bearer {key}"}
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                kwargs: dict[str, Any] = {"headers": headers}
                if method == "POST":
                    kwargs["json"] = BODY
                async with session.request(method, path, **kwargs) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client(k) for k in keys))
        elapsed = time.perf_counter() - started
    ok = sum(n for s, n in statuses.items() if s < 300)
    return round(ok / elapsed), latencies, statuses


async def _clean(dsn: str, redis_url: str) -> int:
    con = await asyncpg.connect(dsn)
    try:
        deleted = await con.execute(
            "DELETE FROM ferry.jobs WHERE tenant_id LIKE $1", API_TENANT_PREFIX + "%"
        )
        # Leave no dead index entries behind for the next run to step over.
        await con.execute("VACUUM ANALYZE ferry.jobs")
    finally:
        await con.close()
    # The worker is stopped and nothing else is queued: drop the deferred arq messages.
    redis.Redis.from_url(redis_url).flushdb()
    return int(deleted.split()[-1])


def bench_api(stack: Stack, figures: list[Any], commands: dict[str, str]) -> None:
    config = stack.config
    stack.stop_worker()
    keys = [stack.key(f"{API_TENANT_PREFIX}{i}") for i in range(config.api_clients)]
    process, url = stack.start_api(**LIMITS)
    samples: dict[str, list[list[float]]] = {"submit": [], "healthz": []}
    errors: dict[int, int] = {}
    try:
        asyncio.run(_load(url, keys, "GET", "/healthz", 1.0))
        asyncio.run(_load(url, keys, "POST", "/exports", 1.0))
        asyncio.run(_clean(config.dsn, config.redis_url))

        def submit() -> float:
            rate, latencies, statuses = asyncio.run(
                _load(url, keys, "POST", "/exports", config.api_seconds)
            )
            for status, n in statuses.items():
                if status != 202:
                    errors[status] = errors.get(status, 0) + n
            samples["submit"].append(latencies)
            asyncio.run(_clean(config.dsn, config.redis_url))
            return rate

        def healthz() -> float:
            rate, latencies, _ = asyncio.run(
                _load(url, keys, "GET", "/healthz", config.api_seconds)
            )
            samples["healthz"].append(latencies)
            return rate

        runs = alternate({"submit": submit, "healthz": healthz}, config.repeat, label="api")
        if config.profile:
            from bench.profile import recording

            with recording(process.pid, "api"):
                asyncio.run(_load(url, keys, "POST", "/exports", config.api_seconds))
            asyncio.run(_clean(config.dsn, config.redis_url))
    finally:
        stop(process)
    if errors:
        log(f"api: non-202 answers during the submission runs: {errors}")
    n = config.api_clients
    figures.append(
        Figure(
            f"API submissions/s, {n} concurrent clients",
            median(runs["submit"]),
            median(runs["healthz"]),
            "req/s",
            "GET /healthz, same process and clients",
            target=">= 1,000/s",
            note=f"{n} tenants, one key each; non-202: {errors or 'none'}",
            runs=runs,
        )
    )
    for p in (50, 99):
        ferry = median([percentile(s, p) * 1000 for s in samples["submit"]])
        ref = median([percentile(s, p) * 1000 for s in samples["healthz"]])
        figures.append(
            Figure(
                f"API submission p{p} latency, ms",
                ferry,
                ref,
                "ms",
                "GET /healthz",
                higher_is_better=False,
                target="<= 50 ms" if p == 99 else "",
            )
        )
    commands["api"] = (
        f"aiohttp, {n} clients x {config.api_seconds:g} s: POST /exports {BODY} vs GET /healthz;"
        f" API process env {LIMITS}, worker stopped"
    )

"""API: job submissions/s and latency at 64 concurrent clients, beside GET /healthz.

Only the API path is measured: the worker is stopped and every export asks for a `run_at` far in
the future. The bench API process gets limits high enough that back pressure never answers; the
queued jobs are deleted after each run (PostgreSQL rows and arq messages), so they never count
against another run's queue.
"""

import asyncio
import json
import os
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import redis
import uvloop

from app.dev import stop
from bench.measure import Figure, alternate, median, percentile
from bench.stack import Stack, cpu_seconds, log, postgres_pids

API_TENANT_PREFIX = "bench-api-"
BODY = {"resource": "users", "run_at": "2100-01-01T00:00:00Z"}
LIMITS = {"FERRY_MAX_QUEUED_JOBS": "100000000", "FERRY_MAX_ACTIVE_JOBS_PER_TENANT": "100000000"}


class _Connection:
    """One keep-alive HTTP/1.1 connection that sends a fixed request and reads the answer.

    The load generator shares the machine's two cores with the API and PostgreSQL: it sends
    pre-encoded bytes and reads the status line and Content-Length only, a small fraction of
    an HTTP client library's CPU per request, so the figures are the API's, not the client's."""

    def __init__(self, url: str, request: bytes) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.request = request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line[15:])
        await self.reader.readexactly(length)
        if b"connection: close" in head.lower():
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


def _request(method: str, path: str, key: str) -> bytes:
    body = json.dumps(BODY).encode() if method == "POST" else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _load(
    url: str,
    keys: list[str],
    method: str,
    path: str,
    seconds: float,
    rate: float | None = None,
) -> tuple[int, list[float], dict[int, int]]:
    """`len(keys)` clients, each with its own API key and connection, for `seconds`.

    With no `rate` (closed loop), each client sends its next request as soon as the last one is
    answered: the server's maximum throughput, where latency is only the queue of 64 requests.
    With a `rate` (open loop), the clients send `rate` requests/s between them on a fixed
    schedule, and latency counts from each request's scheduled time, so a server that falls
    behind is charged for the wait too (no coordinated omission).
    """
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    start = time.perf_counter()
    deadline = start + seconds

    async def client(i: int, key: str) -> None:
        connection = _Connection(url, _request(method, path, key))
        scheduled = start + (i / rate if rate else 0.0)
        try:
            while scheduled < deadline:
                if rate:
                    await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
                else:
                    scheduled = time.perf_counter()
                status = await connection.send()
                statuses[status] = statuses.get(status, 0) + 1
                latencies.append(time.perf_counter() - scheduled)
                if rate:
                    scheduled += len(keys) / rate
                else:
                    scheduled = time.perf_counter()
        finally:
            await connection.close()

    await asyncio.gather(*(client(i, k) for i, k in enumerate(keys)))
    elapsed = time.perf_counter() - start
    ok = sum(n for s, n in statuses.items() if s < 300)
    return round(ok / elapsed), latencies, statuses


async def _clean(dsn: str, redis_url: str) -> int:
    con = await asyncpg.connect(dsn)
    try:
        deleted = await con.execute(
            "DELETE FROM ferry.jobs WHERE tenant_id LIKE $1", API_TENANT_PREFIX + "%"
        )
        # Leave no dead index entries behind for the next run to step over, and no checkpoint
        # still writing out the figures before (an import writes GBs of WAL) during the next.
        await con.execute("VACUUM ANALYZE ferry.jobs")
        await con.execute("CHECKPOINT")
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
    latencies: dict[str, list[list[float]]] = {}
    errors: dict[int, int] = {}
    # CPU microseconds per submission, per run: where the two cores go.
    cpu: dict[str, list[float]] = {"API process": [], "PostgreSQL": [], "load generator": []}

    def side(name: str, method: str, path: str, rate: float | None) -> Callable[[], float]:
        def run() -> float:
            groups = {
                "API process": [process.pid],
                "PostgreSQL": postgres_pids(),
                "load generator": [os.getpid()],
            }
            before = {k: cpu_seconds(v) for k, v in groups.items()}
            achieved, samples, statuses = uvloop.run(
                _load(url, keys, method, path, config.api_seconds, rate)
            )
            if name == "submit":
                for k, v in groups.items():
                    cpu[k].append((cpu_seconds(v) - before[k]) * 1e6 / max(1, len(samples)))
            latencies.setdefault(name, []).append(samples)
            if method == "POST":
                for status, n in statuses.items():
                    if status != 202:
                        errors[status] = errors.get(status, 0) + n
                asyncio.run(_clean(config.dsn, config.redis_url))
            return achieved

        return run

    rate = config.api_rate
    try:
        uvloop.run(_load(url, keys, "GET", "/healthz", 1.0))
        uvloop.run(_load(url, keys, "POST", "/exports", 1.0))
        asyncio.run(_clean(config.dsn, config.redis_url))
        sides = {
            "submit": side("submit", "POST", "/exports", None),
            "healthz": side("healthz", "GET", "/healthz", None),
            "submit-paced": side("submit-paced", "POST", "/exports", rate),
            "healthz-paced": side("healthz-paced", "GET", "/healthz", rate),
        }
        runs = alternate(sides, config.repeat, label="api")
        if config.profile:
            from bench.profile import recording

            with recording(process.pid, "api"):
                uvloop.run(_load(url, keys, "POST", "/exports", config.api_seconds))
            asyncio.run(_clean(config.dsn, config.redis_url))
    finally:
        stop(process)
    if errors:
        log(f"api: non-202 answers during the submission runs: {errors}")

    def ms(name: str, p: float) -> float:
        return median([percentile(s, p) * 1000 for s in latencies[name]])

    n = config.api_clients
    figures.append(
        Figure(
            f"API submissions/s, {n} concurrent clients",
            median(runs["submit"]),
            median(runs["healthz"]),
            "req/s",
            "GET /healthz, same process and clients",
            target=">= 1,000/s",
            note=(
                f"closed loop, {n} tenants with one key and connection each; non-202:"
                f" {errors or 'none'}; latency at this saturation (the queue of {n} requests):"
                f" p50 {ms('submit', 50):.0f} ms, p99 {ms('submit', 99):.0f} ms; CPU per"
                " submission: " + ", ".join(f"{k} {median(v):.0f} us" for k, v in cpu.items())
            ),
            runs={k: v for k, v in runs.items() if k in ("submit", "healthz")},
        )
    )
    for p in (50, 99):
        figures.append(
            Figure(
                f"API submission p{p} latency at {rate:,.0f} submissions/s, ms",
                ms("submit-paced", p),
                ms("healthz-paced", p),
                "ms",
                f"GET /healthz at {rate:,.0f}/s",
                higher_is_better=False,
                target="<= 50 ms" if p == 99 else "",
                note=(
                    f"open loop: {n} clients send {rate:,.0f} requests/s between them on a fixed"
                    " schedule; latency counts from each request's scheduled time; achieved"
                    f" {median(runs['submit-paced']):,.0f}/s; p{p} of each run: "
                    + ", ".join(f"{percentile(s, p) * 1000:.1f}" for s in latencies["submit-paced"])
                    + " ms"
                ),
                runs={k: v for k, v in runs.items() if k.endswith("paced")} if p == 99 else {},
            )
        )
    commands["api"] = (
        f"raw HTTP/1.1 keep-alive clients (pre-encoded requests, uvloop), {n} clients"
        f" x {config.api_seconds:g} s: POST /exports {BODY} vs GET /healthz,"
        f" closed loop, then open loop at {rate:,.0f} requests/s;"
        f" API process env {LIMITS}, worker stopped"
    )

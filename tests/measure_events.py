"""Measurement, not a test (never collected by default): websocket event latency from a job's
completion (its `finished_at`, written by the worker) to each subscriber, with many subscribers
on one API process.

    FERRY_TEST_REDIS_DB=12 .venv/bin/pytest -q -s tests/measure_events.py

Env: FERRY_MEASURE_SOCKETS (default 200), FERRY_MEASURE_JOBS (default 10).
"""

import asyncio
import json
import os
import statistics
import time
from datetime import datetime

import httpx
from websockets.asyncio.client import connect

from tests.conftest import Stack, Tenant, wait_for_job
from tests.test_events import _wait_subscribed, submit, ws_url


async def test_measure_completion_latency(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    sockets = int(os.environ.get("FERRY_MEASURE_SOCKETS", "200"))
    jobs = int(os.environ.get("FERRY_MEASURE_JOBS", "10"))
    url = ws_url(stack.api_url, "/ws/jobs", tenant.key)
    received: dict[str, list[float]] = {}

    async def listen(ws: object) -> None:
        async for message in ws:  # type: ignore[attr-defined]
            frame = json.loads(message)
            if frame["type"] == "completed":
                received.setdefault(frame["job"]["id"], []).append(time.time())

    conns = [await connect(url) for _ in range(sockets)]
    tasks = [asyncio.create_task(listen(ws)) for ws in conns]
    try:
        await _wait_subscribed(stack, sockets)
        latencies: list[float] = []
        for _ in range(jobs):
            job = await submit(client)
            final = await wait_for_job(client, job["id"])
            finished = datetime.fromisoformat(final["finished_at"]).timestamp()
            deadline = time.monotonic() + 30
            while len(received.get(job["id"], [])) < sockets:
                assert time.monotonic() < deadline, "not every subscriber got its frame"
                await asyncio.sleep(0.01)
            latencies += [t - finished for t in received[job["id"]]]
        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
        print(
            f"\n{sockets} subscribers on one API process, {jobs} jobs: completion -> client "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)

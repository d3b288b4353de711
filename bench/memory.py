"""Worker peak RSS during one export, at 1M rows (and 10M with BENCH_BIG=1).

Each point is the median of BENCH_REPEAT fresh worker processes. Each worker is warmed up by a
one-row export (imports loaded, pools open), its resident set read then (the reference: the idle
worker), then it runs one export of N rows, during which VmRSS is sampled every 20 ms; its figure
is the process's VmHWM (its lifetime peak).
"""

import asyncio
import threading
import time
from typing import Any

import httpx

from bench.config import MILLION
from bench.export import _delete_prefix, run_export
from bench.measure import Figure, median
from bench.stack import TENANT, Stack, log, rss_kib

TINY = {"resource": "users", "filter": [{"column": "id", "op": "eq", "value": 1}]}


def _tenant_for(stack: Stack, rows: int) -> str:
    if rows == stack.config.rows:
        stack.seed(TENANT, rows, 1)  # kept between runs: a no-op when already seeded
        return TENANT
    tenant = f"bench-{rows}"
    # Ids far above the main tenant's, one block per size.
    stack.seed(tenant, rows, 1_000_000_000 + rows)
    return tenant


def peak_rss(stack: Stack, rows: int) -> tuple[float, float, float]:
    """(idle RSS, peak RSS, sampled max RSS) of a fresh worker exporting `rows` rows, in MiB."""
    tenant = _tenant_for(stack, rows)
    api = stack.ensure_api()
    worker = stack.start_worker()
    with httpx.Client(base_url=api, headers=stack.headers(tenant), timeout=60) as client:
        run_export(client, TINY)  # warm-up: imports loaded, pools and S3 client open
        time.sleep(0.5)
        idle, _ = rss_kib(worker.pid)
        sampled = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    sampled[0] = max(sampled[0], rss_kib(worker.pid)[0])
                except (OSError, KeyError):
                    return
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            job = run_export(client, {"resource": "users"})
        finally:
            done.set()
            sampler.join()
        assert job["result"]["rows"] == rows, job["result"]
        _, peak = rss_kib(worker.pid)
    asyncio.run(_delete_prefix(stack, f"exports/{tenant}/"))
    stack.stop_worker()
    return idle / 1024, peak / 1024, sampled[0] / 1024


def bench_memory(stack: Stack, figures: list[Any], commands: dict[str, str]) -> None:
    peaks: dict[int, float] = {}
    for rows in stack.config.memory_points:
        # The peak is the base plus the part buffers alive at one moment (bounded, but how many
        # coincide varies from run to run): the median of several fresh workers, not one.
        points = []
        for run in range(stack.config.repeat):
            log(f"worker peak RSS, export of {rows:,} rows, run {run + 1}/{stack.config.repeat}")
            points.append(peak_rss(stack, rows))
        peaks[rows] = median([peak for _, peak, _ in points])
        figures.append(
            Figure(
                f"worker peak RSS, export of {rows:,} rows, MiB",
                peaks[rows],
                median([idle for idle, _, _ in points]),
                "MiB",
                "the same worker idle, after a warm-up",
                higher_is_better=False,
                plain_ratio=True,
                target="<= 150 MiB" if rows >= MILLION else "",
                note="VmHWM, median of fresh workers; each run's peak: "
                + ", ".join(f"{peak:.1f}" for _, peak, _ in points)
                + " MiB",
            )
        )
    commands["memory"] = (
        "VmHWM from /proc/<worker pid>/status of a fresh `arq worker.WorkerSettings`"
    )
    small = min(peaks)
    for rows in sorted(peaks):
        if rows == small:
            continue
        figures.append(
            Figure(
                f"peak RSS {rows // 1000:,}k rows / {small // 1000:,}k rows",
                peaks[rows] / peaks[small],
                1.0,
                "x",
                "flat memory (1.0)",
                higher_is_better=False,
                plain_ratio=True,
                target="<= 1.1" if rows == 10 * MILLION else "",
            )
        )

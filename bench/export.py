"""Export: Ferry end to end against `psql \\copy | aws s3 cp -` and `psql \\copy > /dev/null`.

All three run the same SELECT (built by app.export.build_query for the same request and tenant)
against the same database; Ferry and the pipeline write to the same S3 endpoint and bucket.
"""

import asyncio
import os
import shlex
import time
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import httpx

from app import export as ferry_export
from app import resources
from app.schemas import ExportRequest
from bench import awscli
from bench.measure import Figure, alternate, median, timed_shell
from bench.stack import BUCKET, TENANT, Stack, cpu_seconds, log, postgres_cpu_seconds

REQUEST: dict[str, Any] = {"resource": "users"}  # every column, key order, CSV with a header


def _literal(value: Any) -> str:
    return "'" + str(value).replace("'", "''") + "'"


async def _query(stack: Stack, tenant: str) -> str:
    """The export's SELECT with its parameters inlined, for psql."""
    assert stack.settings is not None
    con = await asyncpg.connect(stack.config.dsn)
    try:
        registry = await resources.load(stack.settings.resources_file, con)
    finally:
        await con.close()
    request = ExportRequest.model_validate(REQUEST)
    query = ferry_export.build_query(registry.get("users", "export"), request, tenant)
    sql = query.sql
    # Replace $10 before $1: the longest placeholders first.
    for i in sorted(range(len(query.args)), reverse=True):
        sql = sql.replace(f"${i + 1}::", f"{_literal(query.args[i])}::")
    return " ".join(sql.split())  # one line: psql's \\copy ends at the end of its line


def psql_copy(dsn: str, sql: str) -> str:
    meta = f"\\copy ({sql}) to stdout with (format csv, header true)"
    return f"psql -X -q -v ON_ERROR_STOP=1 -d {shlex.quote(dsn)} -c {shlex.quote(meta)}"


def run_export(client: httpx.Client, body: dict[str, Any], poll: float = 0.02) -> dict[str, Any]:
    response = client.post("/exports", json=body)
    if response.status_code != 202:
        raise RuntimeError(f"POST /exports answered {response.status_code}: {response.text}")
    job_id = response.json()["id"]
    while True:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if job["status"] == "succeeded":
            return job
        if job["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"export {job_id} ended {job['status']}: {job.get('error')}")
        time.sleep(poll)


async def _delete_prefix(stack: Stack, prefix: str) -> int:
    """Delete what a run left in S3 (the emulator keeps objects in memory)."""
    async with AsyncExitStack() as es:
        storage = await stack.s3(es)
        deleted = 0
        paginator = storage.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix):
            for item in page.get("Contents", []):
                await storage.client.delete_object(Bucket=BUCKET, Key=item["Key"])
                deleted += 1
        return deleted


async def _object_size(stack: Stack, key: str) -> int | None:
    async with AsyncExitStack() as es:
        storage = await stack.s3(es)
        size: int | None = await storage.size(key)
        return size


def _cpu_now(stack: Stack) -> dict[str, float]:
    """Cumulative CPU seconds of each process group a run can use."""
    assert stack.emulator is not None and stack.worker is not None and stack.api is not None
    children = os.times()  # psql and the AWS CLI, once their shell has been waited for
    return {
        "PostgreSQL": postgres_cpu_seconds(),
        "S3 emulator": cpu_seconds([stack.emulator.pid]),
        "worker": cpu_seconds([stack.worker.pid]),
        "API": cpu_seconds([stack.api.pid]),
        "psql + aws": children.children_user + children.children_system,
    }


def _with_cpu(
    stack: Stack, run: Callable[[], float], spent: dict[str, list[float]]
) -> Callable[[], float]:
    """`run`, also recording the CPU seconds each process group spent during it."""

    def measured() -> float:
        before = _cpu_now(stack)
        elapsed = run()
        after = _cpu_now(stack)
        for group, seconds in after.items():
            spent.setdefault(group, []).append(seconds - before[group])
        return elapsed

    return measured


def _cpu_note(side: str, spent: dict[str, list[float]]) -> str:
    groups = [f"{g} {median(s):.2f}" for g, s in spent.items() if median(s) >= 0.005]
    return f"{side}: " + ", ".join(groups)


def bench_export(stack: Stack, figures: list[Any], commands: dict[str, str]) -> None:
    config = stack.config
    rows = config.rows
    stack.seed(TENANT, rows, 1)
    sql = asyncio.run(_query(stack, TENANT))
    aws = awscli.ensure()
    aws_env = awscli.env(stack.env)
    copy = psql_copy(config.dsn, sql)
    ref_key = f"reference/{uuid.uuid4().hex}.csv"
    to_s3 = f"{copy} | {aws} --endpoint-url {stack.s3_endpoint} s3 cp - s3://{BUCKET}/{ref_key}"
    to_null = f"{copy} > /dev/null"
    commands["export: psql | aws s3 cp"] = to_s3
    commands["export: psql > /dev/null"] = to_null

    api = stack.ensure_api()
    stack.ensure_worker()
    sizes: dict[str, int] = {}
    with httpx.Client(base_url=api, headers=stack.headers(TENANT), timeout=60) as client:
        stack.settle()
        log(f"export warm-up ({rows:,} rows)")
        warm = run_export(client, REQUEST)
        asyncio.run(_delete_prefix(stack, f"exports/{TENANT}/"))
        assert warm["result"]["rows"] == rows, warm["result"]

        def ferry() -> float:
            started = time.perf_counter()
            job = run_export(client, REQUEST)
            elapsed = time.perf_counter() - started
            sizes["ferry"] = job["result"]["bytes"]
            asyncio.run(_delete_prefix(stack, f"exports/{TENANT}/"))
            return elapsed

        def pipeline() -> float:
            elapsed = timed_shell(to_s3, env=aws_env)
            size = asyncio.run(_object_size(stack, ref_key))
            if size is None:
                raise RuntimeError("the reference pipeline left no object in S3")
            sizes["pipeline"] = size
            asyncio.run(_delete_prefix(stack, "reference/"))
            return elapsed

        def devnull() -> float:
            return timed_shell(to_null, env=aws_env)

        cpu: dict[str, dict[str, list[float]]] = {"ferry": {}, "psql|aws": {}, "psql>null": {}}
        runs = alternate(
            {
                "ferry": _with_cpu(stack, ferry, cpu["ferry"]),
                "psql|aws": _with_cpu(stack, pipeline, cpu["psql|aws"]),
                "psql>null": _with_cpu(stack, devnull, cpu["psql>null"]),
            },
            config.repeat,
            label="export",
        )
    # The reference pays the AWS CLI's start-up on each run (Ferry's worker is long-lived):
    # measure it, so a reader can tell how much of the ratio it is.
    startup = median(
        [
            timed_shell(
                f"{aws} --endpoint-url {stack.s3_endpoint} s3api head-bucket --bucket {BUCKET}",
                aws_env,
            )
            for _ in range(3)
        ]
    )
    note = ""
    if sizes.get("ferry") != sizes.get("pipeline"):
        note = (
            f"object sizes differ: Ferry {sizes.get('ferry')} B, pipeline {sizes.get('pipeline')} B"
        )
    else:
        note = f"same object: {sizes['ferry']:,} bytes"
    note += f"; the AWS CLI's start-up alone (`aws s3api head-bucket`) takes {startup:.2f} s"
    # Both sides share 2 cores with PostgreSQL and the emulator: where each side's CPU goes.
    note += "; CPU seconds per run (medians): " + "; ".join(
        _cpu_note(side, spent) for side, spent in cpu.items() if side != "psql>null"
    )
    ferry_rate = rows / median(runs["ferry"])
    figures.append(
        Figure(
            f"export {rows:,} rows to S3, rows/s",
            ferry_rate,
            rows / median(runs["psql|aws"]),
            "rows/s",
            "psql \\copy | aws s3 cp -",
            target=">= 1.2x",
            note=note,
            runs=runs,
        )
    )
    figures.append(
        Figure(
            f"export {rows:,} rows, rows/s vs COPY alone",
            ferry_rate,
            rows / median(runs["psql>null"]),
            "rows/s",
            "psql \\copy > /dev/null",
            note="the ceiling: PostgreSQL's COPY with no S3 at all; CPU seconds per run "
            f"(medians): {_cpu_note('psql>null', cpu['psql>null'])}",
            runs=runs,
        )
    )

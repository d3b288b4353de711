"""Import: Ferry (SPEC §3 `POST /imports`) against `aws s3 cp - | psql \\copy`, insert and upsert.

The same CSV file (BENCH_ROWS rows of `users`), the same database, the same S3 endpoint. Ferry
writes the caller's tenant id; the reference copies into `public.bench_ref_users`, a copy of
`public.users` (LIKE ... INCLUDING ALL: same columns, key, index, constraints, the same existing
rows) whose tenant_id defaults to the reference's tenant. Upsert is timed over existing rows, the
reference being `\\copy` into a temporary staging table plus the same INSERT ... ON CONFLICT.

Ferry is timed from `POST /imports/{id}/start` to `succeeded`: the file is PUT to its presigned
`upload_url` before, as the reference's file is already in S3 before its pipeline starts.
When the API has no `POST /imports` (404/405) the figures are skipped with a clear line
(with BENCH_IMPORT_REFERENCE=1 the reference side is still measured, alone).
"""

import asyncio
import os
import shlex
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx

from bench import awscli
from bench.config import RESULTS
from bench.measure import Figure, Skipped, alternate, median, timed_shell
from bench.stack import BUCKET, TENANT, Stack, log

IMPORT_TENANT = "bench-import"
REF_TENANT = "bench-ref"
REF_TABLE = "public.bench_ref_users"
COLUMNS = ["id", "first_name", "last_name", "age", "email", "created_at"]
FIRST_ID = 3_000_000_000
SOURCE_KEY = "import-source/users.csv"

_ROWS = """SELECT g AS id,
       (ARRAY['Ada','Grace','Alan','Edsger','Barbara','Donald','Frances',
              'Ken','Margaret','Niklaus'])[1 + g % 10] AS first_name,
       (ARRAY['Lovelace','Hopper','Turing','Dijkstra','Liskov','Knuth',
              'Allen','Thompson','Hamilton','Wirth'])[1 + (g / 10) % 10] AS last_name,
       CASE WHEN g % 17 = 0 THEN NULL ELSE 16 + g % 60 END AS age,
       {email} AS email,
       timestamptz '2024-01-01 00:00:00+00' + (g % 1000000) * interval '1 minute' AS created_at
FROM generate_series({first}::bigint, {last}::bigint) AS g"""


def _rows_sql(rows: int, email: str = "'user' || g || '@example.com'") -> str:
    """One line: psql's \\copy ends at the end of its line."""
    sql = _ROWS.format(email=email, first=FIRST_ID, last=FIRST_ID + rows - 1)
    return " ".join(sql.split())


def _psql(dsn: str, *commands: str) -> str:
    args = " ".join(f"-c {shlex.quote(c)}" for c in commands)
    return f"psql -X -q -v ON_ERROR_STOP=1 -d {shlex.quote(dsn)} {args}"


async def _prepare(dsn: str) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(
            f"CREATE TABLE IF NOT EXISTS {REF_TABLE} (LIKE public.users INCLUDING ALL);"
            f"ALTER TABLE {REF_TABLE} ALTER COLUMN tenant_id SET DEFAULT '{REF_TENANT}'"
        )
        # The same existing rows as public.users holds, so both sides write into the same shape.
        others = "tenant_id NOT IN ($1, $2)"
        have = await con.fetchval(
            f"SELECT count(*) FROM {REF_TABLE} WHERE {others}", IMPORT_TENANT, REF_TENANT
        )
        want = await con.fetchval(
            f"SELECT count(*) FROM public.users WHERE {others}", IMPORT_TENANT, REF_TENANT
        )
        if have != want:
            log(f"copying {want:,} existing users into {REF_TABLE}")
            await con.execute(f"TRUNCATE {REF_TABLE}")
            await con.execute(
                f"INSERT INTO {REF_TABLE} SELECT * FROM public.users WHERE {others}",
                IMPORT_TENANT,
                REF_TENANT,
            )
            await con.execute(f"VACUUM ANALYZE {REF_TABLE}")
    finally:
        await con.close()


async def _reset(dsn: str, existing: bool, rows: int) -> None:
    """Both sides' targets without (insert) or with (upsert) the file's ids, then vacuumed."""
    con = await asyncpg.connect(dsn)
    try:
        await con.execute("DELETE FROM public.users WHERE tenant_id = $1", IMPORT_TENANT)
        await con.execute(f"DELETE FROM {REF_TABLE} WHERE tenant_id = $1", REF_TENANT)
        if existing:
            old = _rows_sql(rows, email="'old' || g || '@example.com'")
            cols = ", ".join(COLUMNS)
            await con.execute(
                f"INSERT INTO public.users (tenant_id, {cols}) SELECT $1, * FROM ({old}) r",
                IMPORT_TENANT,
            )
            await con.execute(f"INSERT INTO {REF_TABLE} ({cols}) SELECT * FROM ({old}) r")
        await con.execute(f"VACUUM ANALYZE public.users, {REF_TABLE}")
    finally:
        await con.close()


def _wait(client: httpx.Client, job_id: str) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.02)


def _ferry_import(client: httpx.Client, path: str, mode: str) -> float:
    created = client.post("/imports", json={"resource": "users", "mode": mode})
    if created.status_code != 201:
        raise RuntimeError(f"POST /imports answered {created.status_code}: {created.text}")
    job = created.json()
    with open(path, "rb") as f:
        put = httpx.put(job["upload_url"], content=f, timeout=600)
    put.raise_for_status()
    started = time.perf_counter()
    start = client.post(f"/imports/{job['id']}/start")
    if start.status_code != 202:
        raise RuntimeError(f"POST /imports/{{id}}/start answered {start.status_code}: {start.text}")
    done = _wait(client, job["id"])
    elapsed = time.perf_counter() - started
    if done["status"] != "succeeded":
        raise RuntimeError(f"import {job['id']} ended {done['status']}: {done.get('error')}")
    return elapsed


def bench_import(stack: Stack, figures: list[Any], commands: dict[str, str]) -> None:
    config = stack.config
    rows = config.rows
    api = stack.ensure_api()
    stack.ensure_worker()
    client = httpx.Client(base_url=api, headers=stack.headers(IMPORT_TENANT), timeout=60)
    with client:
        probe = client.post("/imports", json={"resource": "users", "mode": "insert"})
        available = probe.status_code not in (404, 405)
        if not available:
            figures.append(
                Skipped("import", f"not available (POST /imports answered {probe.status_code})")
            )
            if not os.environ.get("BENCH_IMPORT_REFERENCE"):
                return
            log("import: measuring the reference side alone (BENCH_IMPORT_REFERENCE)")
        if probe.status_code == 201:
            client.post(f"/jobs/{probe.json()['id']}/cancel")

        stack.seed(TENANT, rows, 1)
        asyncio.run(_prepare(config.dsn))
        path = RESULTS / f"import-{rows}.csv.tmp"
        if not path.exists():
            log(f"writing the import file {path} ({rows:,} rows)")
            target = shlex.quote(str(path))
            copy = f"\\copy ({_rows_sql(rows)}) to {target} with (format csv, header true)"
            timed_shell(_psql(config.dsn, copy))
        aws = awscli.ensure()
        aws_env = awscli.env(stack.env)
        s3 = f"{aws} --endpoint-url {stack.s3_endpoint} s3"
        timed_shell(f"{s3} cp {shlex.quote(str(path))} s3://{BUCKET}/{SOURCE_KEY}", env=aws_env)

        cols = ",".join(COLUMNS)
        fetch = f"{s3} cp s3://{BUCKET}/{SOURCE_KEY} -"
        insert_ref = f"{fetch} | " + _psql(
            config.dsn, f"\\copy {REF_TABLE}({cols}) from stdin with (format csv, header true)"
        )
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS if c != "id")
        upsert_ref = f"{fetch} | " + _psql(
            config.dsn,
            f"CREATE TEMP TABLE stg (LIKE {REF_TABLE} INCLUDING DEFAULTS)",
            f"\\copy stg({cols}) from stdin with (format csv, header true)",
            f"INSERT INTO {REF_TABLE} ({cols}) SELECT {cols} FROM stg"
            f" ON CONFLICT (id) DO UPDATE SET {updates}",
        )
        stack.settle()
        commands["import insert: aws s3 cp - | psql"] = insert_ref
        commands["import upsert: aws s3 cp - | psql (staging + ON CONFLICT)"] = upsert_ref

        for mode, reference in (("insert", insert_ref), ("upsert", upsert_ref)):
            existing = mode == "upsert"

            def ferry(mode: str = mode, existing: bool = existing) -> float:
                asyncio.run(_reset(config.dsn, existing, rows))
                return _ferry_import(client, str(path), mode)

            def ref(reference: str = reference, existing: bool = existing) -> float:
                asyncio.run(_reset(config.dsn, existing, rows))
                return timed_shell(reference, env=aws_env)

            sides: dict[str, Callable[[], float]] = (
                {"ferry": ferry, "reference": ref} if available else {"reference": ref}
            )
            # One unmeasured run of each side first: the first run of each paid for cold
            # caches (worker code paths, PostgreSQL's plans and buffers), not for its method.
            log(f"{mode} warm-up: {', '.join(sides)}")
            for warm_up in sides.values():
                warm_up()
            runs = alternate(sides, config.repeat, label=mode)
            figures.append(
                Figure(
                    f"import {mode} {rows:,} rows, rows/s",
                    rows / median(runs["ferry"]) if available else None,
                    rows / median(runs["reference"]),
                    "rows/s",
                    "aws s3 cp - | psql \\copy" + (" + ON CONFLICT" if existing else ""),
                    note="Ferry timed from POST /imports/{id}/start to succeeded",
                    runs=runs,
                )
            )
        asyncio.run(_reset(config.dsn, False, rows))

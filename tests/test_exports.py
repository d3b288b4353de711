"""Exports end to end: real API, real worker, real PostgreSQL, the S3 emulator over HTTP."""

import csv
import gzip
import io
import json
import uuid
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from app import storage as s3
from app.export import RowCounter
from app.storage import Storage
from tests.conftest import Stack, Tenant, next_ids, wait_for_job

AWKWARD_ROWS: list[tuple[Any, ...]] = [
    # label, amount, ratio, active, born, seen_at, has ref, doc, code, big
    (
        "plain",
        "12.50",
        0.5,
        True,
        "2001-02-03",
        "2024-05-06T07:08:09+00:00",
        True,
        {"a": 1},
        "abc",
        1,
    ),
    ('comma, "quote"', "-3.00", -1.25, False, "1999-12-31", None, True, [1, "x"], "", 2**62),
    ("line\nfeed\r\nand cr\r", None, None, None, None, None, False, None, None, None),
    ("", "0.00", 0.0, True, "2020-02-29", "2020-02-29T23:59:59.5+02:00", True, {}, "=cmd", -5),
    (
        "ünïcødé ✓ 日本",
        "99.99",
        1e-9,
        False,
        "1970-01-01",
        None,
        True,
        "str",
        "+x",
        9007199254740993,
    ),
    (None, "1.00", 3.0, True, None, None, True, None, "@home", 0),
    ("=SUM(A1)", "2.00", 2.0, True, None, None, True, None, "-5", 7),
    ("\tTab", "3.00", None, None, None, None, True, None, "\rcr", 8),
]


async def seed_awkward(pool: asyncpg.Pool, tenant: str) -> list[int]:
    first = next_ids(len(AWKWARD_ROWS))
    ids = []
    for offset, (label, amount, ratio, active, born, seen, has_ref, doc, code, big) in enumerate(
        AWKWARD_ROWS
    ):
        row_id = first + offset
        ids.append(row_id)
        await pool.execute(
            """INSERT INTO public.awkward (id, tenant_id, label, amount, ratio, active, born,
                   seen_at, ref, doc, code, big)
               VALUES ($1, $2, $3, $4::numeric, $5, $6, $7::date, $8::timestamptz, $9, $10, $11,
                   $12)""",
            row_id,
            tenant,
            label,
            amount,
            ratio,
            active,
            datetime.fromisoformat(born).date() if born else None,
            datetime.fromisoformat(seen) if seen else None,
            uuid.uuid4() if has_ref else None,
            doc,
            code,
            big,
        )
    return ids


async def seed_users(pool: asyncpg.Pool, tenant: str, rows: int) -> int:
    first = next_ids(rows)
    await pool.execute(
        """INSERT INTO public.users (id, tenant_id, first_name, last_name, age, email, created_at)
           SELECT g, $2, 'First' || g, 'Last' || g,
                  CASE WHEN g % 11 = 0 THEN NULL ELSE g % 90 END,
                  CASE WHEN g % 7 = 0 THEN NULL ELSE 'u' || g || '@example.com' END,
                  timestamptz '2024-01-01' + g * interval '1 second'
           FROM generate_series($1::bigint, $1::bigint + $3 - 1) g""",
        first,
        tenant,
        rows,
    )
    return first


async def export(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/exports", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["location"].endswith(f"/jobs/{response.json()['id']}")
    job = await wait_for_job(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    return job


async def download(client: httpx.AsyncClient, job: dict[str, Any]) -> bytes:
    redirect = await client.get(f"/exports/{job['id']}/download")
    assert redirect.status_code == 307
    async with httpx.AsyncClient() as plain:  # presigned: no API key
        body = (await plain.get(redirect.headers["location"])).content
        direct = (await plain.get(job["result"]["download_url"])).content
    assert body == direct
    assert job["result"]["bytes"] == len(body)
    return body


async def copy_csv(pool: asyncpg.Pool, sql: str, *args: Any, **options: Any) -> bytes:
    out = io.BytesIO()

    async def sink(chunk: bytes) -> None:
        out.write(chunk)

    async with pool.acquire() as con:
        await con.copy_from_query(sql, *args, output=sink, format="csv", **options)
    return out.getvalue()


AWKWARD_COLUMNS = "id, label, amount, ratio, active, born, seen_at, ref, doc, code, big"


async def test_csv_round_trip_is_exact_for_awkward_data(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    ids = await seed_awkward(pool, tenant.name)
    job = await export(client, {"resource": "awkward"})
    body = await download(client, job)
    expected = await copy_csv(
        pool,
        f"SELECT {AWKWARD_COLUMNS} FROM public.awkward WHERE tenant_id = $1 ORDER BY id",
        tenant.name,
        header=True,
    )
    assert body == expected
    assert job["result"]["rows"] == len(ids) == job["progress"]["rows"]
    assert job["progress"]["percent"] == 100.0
    lines = body.decode().split("\n")
    assert lines[0] == "id,label,amount,ratio,active,born,seen_at,ref,doc,code,big"
    null_row = next(line for line in lines if line.startswith(f"{ids[5]},"))
    assert null_row.split(",")[1] == ""  # NULL: unquoted empty field
    empty_row = next(line for line in lines if line.startswith(f"{ids[3]},"))
    assert empty_row.split(",")[1] == '""'  # empty string: quoted
    records = list(csv.reader(io.StringIO(body.decode(), newline="")))
    assert records[3][1] == "line\nfeed\r\nand cr\r"
    assert records[2][1] == 'comma, "quote"'


async def test_never_exports_other_tenants_rows_or_the_tenant_column(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant, other_tenant: Tenant
) -> None:
    mine = await seed_users(pool, tenant.name, 5)
    await seed_users(pool, other_tenant.name, 7)
    body = await download(client, await export(client, {"resource": "users"}))
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [int(r["id"]) for r in rows] == list(range(mine, mine + 5))
    assert "tenant_id" not in rows[0]


FILTER_CASES = [
    ({"column": "age", "op": "eq", "value": 30}, "age = 30"),
    ({"column": "age", "op": "ne", "value": 30}, "age <> 30"),
    ({"column": "age", "op": "lt", "value": 20}, "age < 20"),
    ({"column": "age", "op": "lte", "value": 20}, "age <= 20"),
    ({"column": "age", "op": "gt", "value": 70}, "age > 70"),
    ({"column": "age", "op": "gte", "value": "70"}, "age >= 70"),
    ({"column": "age", "op": "in", "value": [1, 2, 3]}, "age IN (1, 2, 3)"),
    ({"column": "age", "op": "not_in", "value": [1, 2, 3]}, "age NOT IN (1, 2, 3)"),
    ({"column": "email", "op": "like", "value": "%5@example.com"}, "email LIKE '%5@example.com'"),
    ({"column": "first_name", "op": "ilike", "value": "FIRST%3"}, "first_name ILIKE 'FIRST%3'"),
    ({"column": "age", "op": "is_null", "value": True}, "age IS NULL"),
    ({"column": "email", "op": "is_null", "value": False}, "email IS NOT NULL"),
    (
        {"column": "created_at", "op": "gte", "value": "2024-01-01T00:02:00Z"},
        "created_at >= '2024-01-01T00:02:00Z'",
    ),
]


@pytest.mark.parametrize(("flt", "where"), FILTER_CASES, ids=[c[0]["op"] for c in FILTER_CASES])
async def test_every_filter_op(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant, flt: dict, where: str
) -> None:
    await seed_users(pool, tenant.name, 300)
    body = await download(
        client, await export(client, {"resource": "users", "columns": ["id"], "filter": [flt]})
    )
    got = [int(line) for line in body.decode().split()[1:]]
    expected = [
        r["id"]
        for r in await pool.fetch(
            f"SELECT id FROM public.users WHERE tenant_id = $1 AND {where} ORDER BY id", tenant.name
        )
    ]
    assert expected and got == expected


async def test_filters_combine_with_and_and_order_by(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    await seed_users(pool, tenant.name, 200)
    job = await export(
        client,
        {
            "resource": "users",
            "columns": ["id", "age"],
            "filter": [
                {"column": "age", "op": "gte", "value": 18},
                {"column": "age", "op": "lt", "value": 60},
            ],
            "order_by": ["-age", "id"],
        },
    )
    body = await download(client, job)
    expected = await copy_csv(
        pool,
        "SELECT id, age FROM public.users WHERE tenant_id = $1 AND age >= 18 AND age < 60"
        " ORDER BY age DESC, id",
        tenant.name,
        header=True,
    )
    assert body == expected


async def test_jsonl_types_are_exact(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    ids = await seed_awkward(pool, tenant.name)
    body = await download(client, await export(client, {"resource": "awkward", "format": "jsonl"}))
    lines = body.decode().splitlines()
    assert len(lines) == len(ids)
    rows = {r["id"]: r for r in map(json.loads, lines)}
    assert list(rows[ids[0]]) == AWKWARD_COLUMNS.split(", ")
    assert rows[ids[1]]["big"] == 2**62
    assert rows[ids[4]]["big"] == 9007199254740993  # past 2^53, exact
    assert rows[ids[0]]["active"] is True and rows[ids[2]]["active"] is None
    assert rows[ids[2]]["label"] == "line\nfeed\r\nand cr\r"
    assert rows[ids[0]]["doc"] == {"a": 1}
    assert rows[ids[3]]["label"] == "" and rows[ids[5]]["label"] is None
    seen = datetime.fromisoformat(rows[ids[0]]["seen_at"])
    assert seen == datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


async def test_gzip_delimiter_and_no_header(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    await seed_awkward(pool, tenant.name)
    job = await export(
        client,
        {"resource": "awkward", "compression": "gzip", "delimiter": ";", "header": False},
    )
    assert job["result"]["compression"] == "gzip" and job["result"]["format"] == "csv"
    body = gzip.decompress(await download(client, job))
    expected = await copy_csv(
        pool,
        f"SELECT {AWKWARD_COLUMNS} FROM public.awkward WHERE tenant_id = $1 ORDER BY id",
        tenant.name,
        header=False,
        delimiter=";",
    )
    assert body == expected


async def test_spreadsheet_safe_touches_text_cells_only(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    ids = await seed_awkward(pool, tenant.name)
    job = await export(
        client,
        {
            "resource": "awkward",
            "columns": ["id", "label", "code", "big"],
            "spreadsheet_safe": True,
        },
    )
    rows = {
        int(r["id"]): r
        for r in csv.DictReader(io.StringIO((await download(client, job)).decode(), newline=""))
    }
    assert rows[ids[6]]["label"] == "'=SUM(A1)"
    assert rows[ids[7]]["label"] == "'\tTab"
    assert rows[ids[3]]["code"] == "'=cmd" and rows[ids[4]]["code"] == "'+x"
    assert rows[ids[5]]["code"] == "'@home" and rows[ids[6]]["code"] == "'-5"
    assert rows[ids[3]]["big"] == "-5"  # an integer is never prefixed
    assert rows[ids[0]]["label"] == "plain"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"resource": "nope"}, "unknown_resource"),
        ({"resource": "users", "columns": ["id", "shoe"]}, "unknown_column"),
        ({"resource": "users", "columns": ["tenant_id"]}, "unknown_column"),
        ({"resource": "users", "order_by": ["tenant_id"]}, "unknown_column"),
        (
            {"resource": "users", "filter": [{"column": "x", "op": "eq", "value": 1}]},
            "unknown_column",
        ),
        (
            {"resource": "users", "filter": [{"column": "tenant_id", "op": "eq", "value": "a"}]},
            "unknown_column",
        ),
        (
            {"resource": "users", "filter": [{"column": "age", "op": "eq", "value": "old"}]},
            "invalid_value",
        ),
        (
            {"resource": "users", "filter": [{"column": "age", "op": "between", "value": 1}]},
            "validation_error",
        ),
        (
            {"resource": "users", "filter": [{"column": "age", "op": "in", "value": 1}]},
            "validation_error",
        ),
        (
            {"resource": "users", "filter": [{"column": "age", "op": "is_null", "value": 1}]},
            "validation_error",
        ),
        ({"resource": "users", "format": "xml"}, "validation_error"),
        ({"resource": "users", "compression": "zip"}, "validation_error"),
        ({"resource": "users", "delimiter": ";;"}, "validation_error"),
        ({"resource": "users", "filename": "../etc/passwd"}, "validation_error"),
        ({"resource": "users", "filename": "a%2Fb.csv"}, "validation_error"),
        ({"resource": "users", "surprise": 1}, "validation_error"),
        ({}, "validation_error"),
    ],
)
async def test_bad_requests_are_422_and_create_no_job(
    client: httpx.AsyncClient, body: dict, code: str
) -> None:
    before = (await client.get("/jobs", params={"limit": 100})).json()["items"]
    response = await client.post("/exports", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["code"] == code, problem
    if code == "validation_error":
        assert problem["errors"]
    assert (await client.get("/jobs", params={"limit": 100})).json()["items"] == before


async def test_another_tenants_job_is_404_everywhere(
    client: httpx.AsyncClient, stack: Stack, other_tenant: Tenant
) -> None:
    job = await export(client, {"resource": "users"})
    async with httpx.AsyncClient(base_url=stack.api_url, headers=other_tenant.headers) as other:
        for response in (
            await other.get(f"/jobs/{job['id']}"),
            await other.get(f"/exports/{job['id']}/download"),
            await other.post(f"/jobs/{job['id']}/cancel"),
        ):
            assert response.status_code == 404
            assert response.json()["code"] == "job_not_found"
        assert job["id"] not in [j["id"] for j in (await other.get("/jobs")).json()["items"]]


async def test_download_not_ready_then_expired(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    pending = (await client.post("/exports", json={"resource": "users", "run_at": later})).json()
    assert pending["status"] == "queued" and pending["run_at"] is not None
    response = await client.get(f"/exports/{pending['id']}/download")
    assert response.status_code == 409 and response.json()["code"] == "job_not_ready"
    await client.post(f"/jobs/{pending['id']}/cancel")

    job = await export(client, {"resource": "users"})
    expires = datetime.fromisoformat(job["result"]["expires_at"])
    finished = datetime.fromisoformat(job["finished_at"])
    assert abs((expires - finished).total_seconds() - 604800) < 1
    await pool.execute(
        "UPDATE ferry.jobs SET expires_at = now() - interval '1 second' WHERE id = $1",
        uuid.UUID(job["id"]),
    )
    response = await client.get(f"/exports/{job['id']}/download")
    assert response.status_code == 410 and response.json()["code"] == "result_expired"
    assert (await client.get(f"/jobs/{job['id']}")).json()["result"]["download_url"] is None


async def test_filename_names_the_download_not_the_object(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    job = await export(client, {"resource": "users", "filename": "adults é.csv"})
    url = job["result"]["download_url"]
    assert "response-content-disposition=attachment" in url
    object_path = httpx.URL(url).path
    assert "adults" not in object_path
    assert object_path.startswith(f"/ferry-test/exports/{tenant.name}/{job['id']}/")
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "X-Amz-Expires=3600" in url


def test_row_counter_counts_records_not_embedded_newlines() -> None:
    data = b'id,label\n1,"a\nb"\n2,plain\n3,"x ""q"" \r\n y"\n'
    for size in (1, 2, 3, 5, len(data)):
        counter = RowCounter(header=True)
        for start in range(0, len(data), size):
            counter.feed(data[start : start + size])
        assert counter.rows == 3, size


@pytest.mark.slow
async def test_a_million_rows_export_exactly(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    await seed_users(pool, tenant.name, 1_000_000)
    job = await export(client, {"resource": "users", "compression": "gzip"})
    body = gzip.decompress(await download(client, job))
    assert body.count(b"\n") == 1_000_001
    assert job["result"]["rows"] == 1_000_000 == job["progress"]["rows"]
    await pool.execute("DELETE FROM public.users WHERE tenant_id = $1", tenant.name)


async def test_parts_grow_every_thousand_and_bytes_in_flight_stay_within_budget(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 takes 10,000 parts: sizes double every PARTS_PER_SIZE parts (2 here, 1,000 in use),
    and larger parts mean fewer in flight, never none."""
    monkeypatch.setattr(s3, "PARTS_PER_SIZE", 2)
    mib = 1024 * 1024
    started: list[tuple[int, int, int]] = []  # (part number, its size, bytes already in flight)
    in_flight = 0
    async with AsyncExitStack() as exit_stack:
        storage = await Storage.open(stack.settings, exit_stack)
        upload_part = storage.client.upload_part

        async def counted(**kwargs: Any) -> Any:
            nonlocal in_flight
            size = len(kwargs["Body"].getbuffer())
            started.append((kwargs["PartNumber"], size, in_flight))
            in_flight += size
            try:
                return await upload_part(**kwargs)
            finally:
                in_flight -= size

        monkeypatch.setattr(storage.client, "upload_part", counted)
        key = f"test/{uuid.uuid4()}.bin"
        async with storage.writer(key, 5 * mib, 2, "application/octet-stream") as writer:
            for _ in range(51):
                await writer.write(b"x" * mib)
        assert await storage.size(key) == 51 * mib
        await storage.delete(key)
    assert sorted((n, size // mib) for n, size, _ in started) == [
        (1, 5),
        (2, 5),
        (3, 10),
        (4, 10),
        (5, 20),
        (6, 1),
    ]
    budget = 2 * 5 * mib
    assert all(before == 0 or before + size <= budget for _, size, before in started), started


@pytest.mark.parametrize("mib", [1, 6])  # one PUT, or a multipart upload (5 MiB parts)
async def test_a_write_whose_answer_is_lost_leaves_no_object(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, mib: int
) -> None:
    """The PUT or the completion takes effect, then its answer is lost: the writer fails, and
    the object it made (that no job will name) is deleted."""
    async with AsyncExitStack() as exit_stack:
        storage = await Storage.open(stack.settings, exit_stack)
        for name in ("put_object", "complete_multipart_upload"):

            async def lost(*, _real: Any = getattr(storage.client, name), **kwargs: Any) -> Any:
                await _real(**kwargs)
                raise ConnectionResetError("the answer was lost")

            monkeypatch.setattr(storage.client, name, lost)
        key = f"test/{uuid.uuid4()}.bin"
        with pytest.raises(ConnectionResetError):
            async with storage.writer(key, 5 * 1024 * 1024, 2, "text/csv") as writer:
                await writer.write(b"x" * mib * 1024 * 1024)
        assert await storage.size(key) is None
        assert key not in await storage.open_uploads("test/")

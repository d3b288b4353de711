"""Imports (issue 4): both upload forms, modes, validation, error report, atomicity, isolation."""

import csv
import gzip
import io
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from app import csvio, validate
from app.errors import JobFailure
from app.resources import Column
from tests.conftest import Tenant, next_ids, wait_for_job

PROBLEM = "application/problem+json"
USERS = "id,first_name,last_name,age,email"


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["code"] == code and body["status"] == status
    return body


async def upload(client: httpx.AsyncClient, data: bytes, **params: Any) -> httpx.Response:
    fields = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()}
    fields.setdefault("resource", "users")
    return await client.post(
        "/imports", data=fields, files={"file": ("../../etc/passwd.csv", data, "text/csv")}
    )


async def run_import(client: httpx.AsyncClient, data: bytes | str, **params: Any) -> dict[str, Any]:
    raw = data.encode() if isinstance(data, str) else data
    response = await upload(client, raw, **params)
    assert response.status_code == 202, response.text
    assert response.headers["location"].endswith(f"/jobs/{response.json()['id']}")
    return await wait_for_job(client, response.json()["id"])


async def users_of(pool: asyncpg.Pool, tenant: Tenant) -> list[tuple[Any, ...]]:
    rows = await pool.fetch(
        "SELECT id, first_name, last_name, age, email FROM users WHERE tenant_id = $1 ORDER BY id",
        tenant.name,
    )
    return [tuple(r) for r in rows]


async def table_dump(pool: asyncpg.Pool, table: str = "users") -> str:
    return str(await pool.fetch(f"SELECT t::text FROM {table} t ORDER BY t::text"))


async def seed(pool: asyncpg.Pool, tenant: Tenant, rows: list[tuple[Any, ...]]) -> None:
    await pool.executemany(
        "INSERT INTO users (id, tenant_id, first_name, last_name, age, email)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        [(r[0], tenant.name, *r[1:]) for r in rows],
    )


async def fetch(url: str) -> httpx.Response:
    """GET a presigned URL without the API key."""
    async with httpx.AsyncClient(timeout=60) as plain:
        return await plain.get(url)


def error_codes(job: dict[str, Any]) -> list[tuple[int, str | None, str]]:
    return [(e["line"], e["column"], e["code"]) for e in job["result"]["errors"]]


# --- Reading: pure functions -------------------------------------------------------------------


def test_split_tells_null_from_empty_string() -> None:
    assert csvio.split('1,,"",a', ",") == ["1", None, "", "a"]
    assert csvio.split('"x,y","say ""hi""",', ",") == ["x,y", 'say "hi"', None]
    assert csvio.split('a"b,c"d;e', ";") == ["ab,cd", "e"]
    assert csvio.split('"multi\nline",2', ",") == ["multi\nline", "2"]


def test_records_start_lines_with_embedded_newlines() -> None:
    splitter = csvio.Records(",")
    text = 'h1,h2\r\n1,"a\nb\nc"\r\n\r\n2,"x"\n3,"""quoted""\n"\n4,end'
    out = []
    for piece in (text[:7], text[7:20], text[20:]):  # cut mid-record
        out += list(splitter.feed(piece))
    out += list(splitter.close())
    assert [line for line, _ in out] == [1, 2, 6, 7, 9]
    assert csvio.split(out[1][1], ",") == ["1", "a\nb\nc"]


def test_unclosed_quote_is_malformed() -> None:
    splitter = csvio.Records(",")
    list(splitter.feed('a\n"open,1\n'))
    with pytest.raises(JobFailure) as e:
        list(splitter.close())
    assert e.value.code == "malformed_csv"


async def _chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_gzip_bomb_fails_in_constant_memory() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), 9)  # 64 MiB from ~64 KiB
    assert len(bomb) < 200_000
    largest = 0
    with pytest.raises(JobFailure) as e:
        async for chunk in csvio.plain_bytes(_chunks(bomb), limit=8 * 1024 * 1024):
            largest = max(largest, len(chunk))
    assert e.value.code == "upload_too_large"
    assert largest <= csvio.INFLATE_CHUNK


async def test_gzip_multi_member_and_bom_decoding() -> None:
    data = gzip.compress("\ufeffa,b\n".encode()) + gzip.compress("é,2\n".encode())
    text = "".join(
        [t async for t in csvio.decoded(csvio.plain_bytes(_chunks(data, 7), 1000), "utf-8")]
    )
    assert text == "a,b\né,2\n"


def _column(type_: str, base: str, is_text: bool = False) -> Column:
    return Column("c", type_, base, True, False, is_text)


@pytest.mark.parametrize(
    ("type_", "base", "good", "bad", "unsure"),
    [
        ("smallint", "int2", ["1", " -32768 ", "+7"], ["32768", "1.5", "x", ""], []),
        ("bigint", "int8", ["9223372036854775807"], ["9223372036854775808"], []),
        ("numeric(12,2)", "numeric", ["1.005", "-9999999999.99", "1e3"], ["1e10", "abc"], ["NaN"]),
        ("double precision", "float8", ["1.5", "-2e300"], ["1,5"], ["Infinity", "1e999"]),
        ("boolean", "bool", ["t", "TRUE", "yes", "0", " off "], ["maybe", "o", "2"], []),
        ("date", "date", ["2024-02-29"], ["2023-02-29"], ["Jan 5 2024"]),
        ("timestamp with time zone", "timestamptz", ["2024-01-01T10:00:00Z"], [], ["now"]),
        ("uuid", "uuid", [str(uuid.uuid4()), uuid.uuid4().hex], [], ["{x}"]),
        ("jsonb", "jsonb", ['{"a": [1, 2.5e400]}', "null"], ["{a:1}", "NaN"], ['"\\u0000"']),
    ],
)
def test_checkers(
    type_: str, base: str, good: list[str], bad: list[str], unsure: list[str]
) -> None:
    check = validate.checker(_column(type_, base))
    assert check is not None
    for text in good:
        assert check(text) is None, text
    for text in bad:
        assert isinstance(check(text), str), text
    for text in unsure:
        assert check(text) is validate.UNSURE, text


def test_varchar_checker_counts_characters_and_forgives_trailing_spaces() -> None:
    check = validate.checker(_column("character varying(3)", "varchar", True))
    assert check is not None
    assert check("äöü") is None and check("abc   ") is None
    assert check("abcd") == "value too long for type character varying(3)"
    assert validate.checker(_column("text", "text", True)) is None


# --- Modes -------------------------------------------------------------------------------------


async def test_insert_writes_rows_with_null_and_empty_string(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    a = next_ids(3)
    job = await run_import(client, f'{USERS}\n{a},Ada,Lovelace,36,\n{a + 1},Alan,"",,""\n')
    assert job["status"] == "succeeded", (job["error"], job["result"])
    result = job["result"]
    assert result == {
        "rows_total": 2,
        "rows_inserted": 2,
        "rows_updated": 0,
        "rows_failed": 0,
        "error_report_url": None,
        "errors": [],
    }
    assert await users_of(pool, tenant) == [
        (a, "Ada", "Lovelace", 36, None),
        (a + 1, "Alan", "", None, ""),
    ]
    assert job["progress"]["rows"] == 2 and job["progress"]["percent"] == 100.0
    assert_problem(await client.get(f"/imports/{job['id']}/errors"), 404, "error_report_not_found")


async def test_upsert_counts_inserted_and_updated(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    a = next_ids(3)
    await seed(pool, tenant, [(a, "Old", "Name", 1, "o@x"), (a + 1, "Keep", "Me", 2, "k@x")])
    job = await run_import(
        client, f"{USERS}\n{a},New,Name,10,n@x\n{a + 2},Fresh,Row,20,f@x\n", mode="upsert"
    )
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert (job["result"]["rows_inserted"], job["result"]["rows_updated"]) == (1, 1)
    assert await users_of(pool, tenant) == [
        (a, "New", "Name", 10, "n@x"),
        (a + 1, "Keep", "Me", 2, "k@x"),
        (a + 2, "Fresh", "Row", 20, "f@x"),
    ]


async def test_replace_swaps_the_tenants_rows_only(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant, other_tenant: Tenant
) -> None:
    a = next_ids(10)
    await seed(pool, tenant, [(a, "Gone", "A", 1, None), (a + 1, "Gone", "B", 2, None)])
    await seed(pool, other_tenant, [(a + 5, "Other", "C", 3, None)])
    before_other = await users_of(pool, other_tenant)
    job = await run_import(
        client, f"{USERS}\n{a + 1},Back,B,5,\n{a + 2},New,C,6,\n", mode="replace"
    )
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert (job["result"]["rows_inserted"], job["result"]["rows_updated"]) == (2, 0)
    assert await users_of(pool, tenant) == [
        (a + 1, "Back", "B", 5, None),
        (a + 2, "New", "C", 6, None),
    ]
    assert await users_of(pool, other_tenant) == before_other


@pytest.mark.parametrize("mode", ["insert", "upsert", "replace"])
async def test_a_tenant_cannot_touch_another_tenants_row(
    client: httpx.AsyncClient, pool: asyncpg.Pool, other_tenant: Tenant, mode: str
) -> None:
    a = next_ids(3)
    await seed(pool, other_tenant, [(a, "Theirs", "Row", 40, "t@x")])
    before = await users_of(pool, other_tenant)
    job = await run_import(
        client, f"{USERS}\n{a},Mine,Now,1,m@x\n{a + 1},Ok,Row,2,\n", mode=mode, on_error="skip"
    )
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert error_codes(job) == [(2, "id", "duplicate_key")]
    assert job["result"]["rows_inserted"] == 1 and job["result"]["rows_failed"] == 1
    assert await users_of(pool, other_tenant) == before


async def test_abort_on_any_bad_row_writes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    a = next_ids(5)
    await seed(pool, tenant, [(a, "Exists", "Already", 9, None)])
    before = await table_dump(pool)
    rows = [f"{a + 1},Good,Row,1,", f"{a},Dup,Key,2,", f"{a + 2},Bad,Age,old,", f"{a + 3},,X,3,"]
    job = await run_import(client, USERS + "\n" + "\n".join(rows) + "\n", mode="insert")
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_rows"
    result = job["result"]
    assert (result["rows_total"], result["rows_failed"]) == (4, 3)
    assert (result["rows_inserted"], result["rows_updated"]) == (0, 0)
    assert error_codes(job) == [
        (3, "id", "duplicate_key"),
        (4, "age", "invalid_value"),
        (5, "first_name", "missing_value"),
    ]
    assert await table_dump(pool) == before
    # The full report is a CSV behind a 307, also as error_report_url.
    redirect = await client.get(f"/imports/{job['id']}/errors")
    assert redirect.status_code == 307
    report = await fetch(redirect.headers["location"])
    assert report.status_code == 200
    lines = list(csv.reader(io.StringIO(report.text)))
    assert lines[0] == ["line", "column", "value", "code", "message"]
    assert [r[0] for r in lines[1:]] == ["3", "4", "5"]
    assert lines[2][2] == "old"
    assert (await fetch(result["error_report_url"])).text == report.text


async def test_skip_commits_exactly_the_valid_rows(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    a = next_ids(10)
    body = (
        f"{USERS}\n{a},One,A,1,\n{a + 1},Two,B,-1,\n{a + 2},Three,C\n"
        f"{a},Again,A,1,\n{a + 3},Four,D,4,x\n"
    )
    job = await run_import(client, body, on_error="skip")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    r = job["result"]
    assert (r["rows_total"], r["rows_inserted"], r["rows_failed"]) == (5, 2, 3)
    assert error_codes(job) == [
        (3, "age", "invalid_value"),  # CHECK (age >= 0), checked per row
        (4, None, "wrong_field_count"),
        (5, "id", "duplicate_key_in_file"),
    ]
    assert "line 2" in job["result"]["errors"][2]["message"]
    assert await users_of(pool, tenant) == [(a, "One", "A", 1, None), (a + 3, "Four", "D", 4, "x")]

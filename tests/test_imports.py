"""Imports (issue 4): both upload forms, modes, validation, error report, atomicity, isolation."""

import asyncio
import csv
import gzip
import hashlib
import io
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import asyncpg
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import csvio, importer, validate
from app.config import Settings
from app.errors import JobFailure, LeaseLost
from app.resources import Column, Resource
from app.runner import JobRun
from app.schemas import ImportParams
from app.services import open_services
from app.storage import Storage
from tests.conftest import Stack, Tenant, next_ids, stop, wait_for_job

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


async def test_decoding_with_a_codec_that_is_not_a_text_encoding_fails_cleanly() -> None:
    with pytest.raises(JobFailure) as e:
        [t async for t in csvio.decoded(_chunks(b"a,b\n"), "rot13")]
    assert e.value.code == "invalid_encoding"


def _column(type_: str, base: str, is_text: bool = False) -> Column:
    return Column("c", type_, base, True, False, is_text)


@pytest.mark.parametrize(
    ("type_", "base", "good", "bad", "unsure"),
    [
        ("smallint", "int2", ["1", " -32768 ", "+7"], ["32768", "1.5", "x", ""], []),
        ("bigint", "int8", ["9223372036854775807"], ["9223372036854775808"], []),
        ("numeric(12,2)", "numeric", ["1.005", "-9999999999.99", "1e3"], ["1e10", "abc"], ["NaN"]),
        ("double precision", "float8", ["1.5", "-2e300"], [], ["Infinity", "1e999", "1,5"]),
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


@pytest.mark.parametrize("base", ["float4", "float8"])
def test_float_texts_outside_the_simple_pattern_are_left_to_postgres(base: str) -> None:
    """PostgreSQL's float input (strtod) takes hex and any case of Infinity and NaN."""
    check = validate.checker(_column(base, base))
    assert check is not None
    for text in ("0x10", "0x1p3", " -INF ", "+Infinity", "nan", "1_000"):
        assert check(text) is validate.UNSURE, text


def test_json_nested_deeper_than_pythons_parser_is_left_to_postgres() -> None:
    check = validate.checker(_column("jsonb", "jsonb"))
    assert check is not None
    assert check("[" * 3000 + "]" * 3000) is validate.UNSURE
    assert check('{"a":' * 3000 + "1" + "}" * 3000) is validate.UNSURE


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


async def test_upsert_of_existing_rows_updates_them_by_key(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    a = next_ids(3)
    await seed(pool, tenant, [(a, "Old", "A", 1, "o@x"), (a + 1, "Old", "B", 2, None)])
    await seed(pool, tenant, [(a + 2, "Keep", "Me", 3, "k@x")])
    job = await run_import(client, f"{USERS}\n{a + 1},New,B,,b@x\n{a},New,A,10,\n", mode="upsert")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert (job["result"]["rows_inserted"], job["result"]["rows_updated"]) == (0, 2)
    assert await users_of(pool, tenant) == [
        (a, "New", "A", 10, None),
        (a + 1, "New", "B", None, "b@x"),
        (a + 2, "Keep", "Me", 3, "k@x"),
    ]


def existing_then(a: int, *rows: str) -> str:
    """A file whose first EXISTING_SAMPLE rows update existing keys a, a+1, ... then `rows`."""
    updates = [f"{a + i},Updated,{i},{i % 50}," for i in range(importer.EXISTING_SAMPLE)]
    return "\n".join([USERS, *updates, *rows]) + "\n"


async def seed_sample(pool: asyncpg.Pool, tenant: Tenant, a: int) -> None:
    await seed(
        pool, tenant, [(a + i, "Old", "Row", 1, None) for i in range(importer.EXISTING_SAMPLE)]
    )


async def test_upsert_that_starts_with_existing_keys_inserts_the_new_ones_after(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    n = importer.EXISTING_SAMPLE
    a = next_ids(n + 2)
    await seed_sample(pool, tenant, a)
    body = existing_then(a, f"{a + n},New,X,1,", f"{a + n + 1},New,Y,2,y@x")
    job = await run_import(client, body, mode="upsert")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert (job["result"]["rows_inserted"], job["result"]["rows_updated"]) == (2, n)
    rows = await users_of(pool, tenant)
    assert len(rows) == n + 2 and all(r[1] == "Updated" for r in rows[:n])
    assert rows[n:] == [(a + n, "New", "X", 1, None), (a + n + 1, "New", "Y", 2, "y@x")]


async def test_upsert_by_key_still_reports_repeated_and_foreign_keys(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant, other_tenant: Tenant
) -> None:
    n = importer.EXISTING_SAMPLE
    a = next_ids(n + 1)
    await seed_sample(pool, tenant, a)
    await seed(pool, other_tenant, [(a + n, "Theirs", "Row", 40, "t@x")])
    before_other = await users_of(pool, other_tenant)
    body = existing_then(a, f"{a + n},Mine,Now,1,", f"{a},Again,Twice,2,")
    job = await run_import(client, body, mode="upsert", on_error="skip")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert error_codes(job) == [
        (n + 2, "id", "duplicate_key"),
        (n + 3, "id", "duplicate_key_in_file"),
    ]
    result = job["result"]
    assert (result["rows_inserted"], result["rows_updated"], result["rows_failed"]) == (0, n, 2)
    assert (await users_of(pool, tenant))[0] == (a, "Updated", "0", 0, None)
    assert await users_of(pool, other_tenant) == before_other


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


async def test_too_many_errors_writes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    a = next_ids(5)
    body = f"{USERS}\n{a},Ok,A,1,\n{a + 1},Bad,B,x,\n{a + 2},Bad,C,y,\n"
    job = await run_import(client, body, on_error="skip", max_errors=1)
    assert job["status"] == "failed" and job["error"]["code"] == "too_many_errors"
    assert job["result"]["rows_failed"] == 2 and job["result"]["rows_inserted"] == 0
    assert job["result"]["error_report_url"]
    assert await users_of(pool, tenant) == []
    job = await run_import(client, body, on_error="skip", max_errors=2)
    assert job["status"] == "succeeded"
    assert await users_of(pool, tenant) == [(a, "Ok", "A", 1, None)]


@pytest.mark.parametrize("bad", [False, True])
async def test_dry_run_counts_and_writes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant, bad: bool
) -> None:
    a = next_ids(5)
    await seed(pool, tenant, [(a, "Old", "A", 1, None)])
    before = await table_dump(pool)
    body = f"{USERS}\n{a},New,A,2,\n{a + 1},Fresh,B,3,\n" + (f"{a + 2},Bad,C,x,\n" if bad else "")
    job = await run_import(client, body, mode="upsert", dry_run=True, on_error="skip")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    r = job["result"]
    assert (r["rows_total"], r["rows_inserted"], r["rows_updated"]) == (2 + bad, 1, 1)
    assert r["rows_failed"] == bad
    assert await table_dump(pool) == before


async def test_an_upsert_of_key_columns_only_counts_what_its_dry_run_counts(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    """Nothing to update but the key: an existing key is counted updated (as it stands), in the
    real run as in the dry run, and every row is counted once."""
    job = await run_import(client, "code\nx\ny\n", resource="items", mode="insert")
    assert job["status"] == "succeeded", job["error"]
    body = "code\nx\ny\nz\n"
    counts = []
    for dry_run in (True, False):
        job = await run_import(client, body, resource="items", mode="upsert", dry_run=dry_run)
        assert job["status"] == "succeeded", (job["error"], job["result"])
        r = job["result"]
        counts.append((r["rows_total"], r["rows_inserted"], r["rows_updated"], r["rows_failed"]))
    assert counts == [(3, 1, 2, 0)] * 2
    codes = await pool.fetch("SELECT code FROM scoped_items WHERE tenant_id = $1", tenant.name)
    assert sorted(r["code"] for r in codes) == ["x", "y", "z"]


@pytest.mark.parametrize("mode", ["insert", "upsert"])
async def test_a_key_too_large_for_its_index_fails_with_a_clear_code(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant, mode: str
) -> None:
    """A key past the btree entry limit (~2.7 kB): the job says which limit, writes nothing."""
    huge = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(100))  # 6.4 kB
    body = f"code,qty\nsmall,1\n{huge},2\n"
    job = await run_import(client, body, resource="items", mode=mode, on_error="skip")
    assert job["status"] == "failed", job["result"]
    assert job["error"]["code"] == "constraint_violation", job["error"]
    assert "index row size" in job["error"]["message"], job["error"]
    rows = await pool.fetchval(
        "SELECT count(*) FROM scoped_items WHERE tenant_id = $1", tenant.name
    )
    assert rows == 0


# --- File-level failures and row error codes ---------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"id,first_name,last_name,nickname\n1,a,b,c\n", "unknown_column"),
        (b"id,first_name,last_name,tenant_id\n1,a,b,mine\n", "unknown_column"),
        (b"id,first_name\n1,a\n", "missing_column"),
        (b"id,first_name,last_name,id\n1,a,b,1\n", "duplicate_column"),
        ("id,first_name,last_name\n1,\u00e9,b\n".encode("latin-1"), "invalid_encoding"),
        (b"id,first_name,last_name\n1,ok,b\n2,\xff\xfe,c\n", "invalid_encoding"),
        (b"", "empty_file"),
        (b"\n\n", "empty_file"),
        (gzip.compress(b""), "empty_file"),
        (b'id,first_name,last_name\n1,"never closed,b\n2,x,y\n', "malformed_csv"),
        (gzip.compress(b"id,first_name,last_name\n1,a,b\n")[:-12], "malformed_csv"),
    ],
)
async def test_file_level_failures_write_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant, data: bytes, code: str
) -> None:
    job = await run_import(client, data)
    assert job["status"] == "failed"
    assert job["error"]["code"] == code, job["error"]
    assert job["error"]["message"]
    assert await users_of(pool, tenant) == []


async def test_upsert_requires_the_key_column(client: httpx.AsyncClient) -> None:
    job = await run_import(client, "first_name,last_name\na,b\n", mode="upsert")
    assert job["error"]["code"] == "missing_column"


async def test_line_numbers_count_embedded_newlines(client: httpx.AsyncClient) -> None:
    a = next_ids(5)
    body = (
        f'{USERS}\r\n{a},"Multi\r\nLine\r\nName",X,1,\r\n'
        f'{a + 1},Bad,Age,"not\na number",\r\n{a + 2},"Also\nmulti",Y\r\n{a + 3},Ok,Z,4,\r\n'
    )
    job = await run_import(client, body, on_error="skip")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert error_codes(job) == [(5, "age", "invalid_value"), (7, None, "wrong_field_count")]
    assert job["result"]["errors"][0]["value"] == "not\na number"
    assert job["result"]["rows_inserted"] == 2


# --- Formats -----------------------------------------------------------------------------------


async def test_gzip_bom_reordered_subset_semicolon_and_latin1(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    a = next_ids(10)
    body = f"\ufeffemail;last_name;id;first_name\nx@y;Lovelace;{a};Ada\n;Hopper;{a + 1};Grace\n"
    job = await run_import(client, gzip.compress(body.encode()), delimiter=";")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    job = await run_import(
        client, f"id\u00a7first_name\u00a7last_name\n{a + 3}\u00a7S\u00a7T\n", delimiter="\u00a7"
    )
    assert job["status"] == "succeeded", (job["error"], job["result"])  # not a one-byte delimiter
    utf16 = f"id\tfirst_name\tlast_name\n{a + 4}\tU\tSixteen\n".encode("utf-16")
    job = await run_import(client, utf16, encoding="utf-16", delimiter="\t")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    latin = f"last_name,first_name,id\nG\u00f6del,Kurt,{a + 2}\n".encode("latin-1")
    job = await run_import(client, latin, encoding="latin-1")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    rows = await users_of(pool, tenant)
    assert rows == [
        (a, "Ada", "Lovelace", None, "x@y"),
        (a + 1, "Grace", "Hopper", None, None),
        (a + 2, "Kurt", "G\u00f6del", None, None),
        (a + 3, "S", "T", None, None),
        (a + 4, "U", "Sixteen", None, None),
    ]
    created = await pool.fetchval(
        "SELECT count(*) FROM users WHERE tenant_id = $1 AND created_at IS NOT NULL", tenant.name
    )
    assert created == 5  # a missing column takes its default


AWKWARD = "id,label,amount,ratio,active,born,seen_at,ref,doc,code,big"


async def test_typed_columns_are_validated_and_loaded(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    a = next_ids(20)
    ref = uuid.uuid4()
    good = [
        f"{a},x,1234.5,0.25,yes,2024-02-29,2024-01-01T10:00:00+02:00,{ref},"
        f'"{{""a"": [1]}}",abcdefgh,9223372036854775807',
        f"{a + 1},,,,,,,,,,",
        f'{a + 2},"",-0.01,-1e10,f,Jan 5 2024,2024-06-01 12:00,{{{ref.hex}}},null,"",-5',
    ]
    bad = [
        (f"{a + 3},x,1e10,,,,,,,,", "amount"),
        (f"{a + 4},x,,abc,,,,,,,", "ratio"),
        (f"{a + 5},x,,,maybe,,,,,,", "active"),
        (f"{a + 6},x,,,,2023-02-29,,,,,", "born"),
        (f"{a + 7},x,,,,,yesterdayish,,,,", "seen_at"),
        (f"{a + 8},x,,,,,,not-a-uuid,,,", "ref"),
        (f"{a + 9},x,,,,,,,{{oops,,", "doc"),
        (f"{a + 10},x,,,,,,,,abcdefghi,", "code"),
        (f"{a + 11},x,,,,,,,,,9223372036854775808", "big"),
        (f"x{a},x,,,,,,,,,", "id"),
    ]
    body = "\n".join([AWKWARD, *good, *(row for row, _ in bad)]) + "\n"
    job = await run_import(client, body, resource="awkward", on_error="skip")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert error_codes(job) == [
        (5 + i, column, "invalid_value") for i, (_, column) in enumerate(bad)
    ]
    assert job["result"]["rows_inserted"] == 3
    rows = await pool.fetch("SELECT * FROM awkward WHERE tenant_id = $1 ORDER BY id", tenant.name)
    assert [r["id"] for r in rows] == [a, a + 1, a + 2]
    first, empty, third = rows
    assert str(first["amount"]) == "1234.50" and first["active"] is True
    assert first["doc"] == {"a": [1]} and first["big"] == 2**63 - 1 and first["ref"] == ref
    assert all(empty[c] is None for c in AWKWARD.split(",")[1:])
    assert third["label"] == "" and third["code"] == "" and str(third["born"]) == "2024-01-05"


async def test_clean_typed_file_takes_the_same_values_either_path(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    """The same rows, once clean (COPY fast path) and once next to a bad row (validating)."""
    a = next_ids(10)
    rows = [
        f'{a},"q""uote",0.005,1.5,on,2024-01-02,2024-01-01 00:00:00Z,,"[1, ""x""]",ab  ,-1',
        f'{a + 1},"new\nline",12,2,0,2000-12-31,2024-01-01T00:00:00.5+00:00,,{{}},,0',
    ]
    job = await run_import(client, "\n".join([AWKWARD, *rows]) + "\n", resource="awkward")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    fast = await pool.fetch("SELECT * FROM awkward WHERE tenant_id = $1 ORDER BY id", tenant.name)
    body = "\n".join([AWKWARD, *rows, f"{a + 2},x,zz,,,,,,,,"]) + "\n"
    job = await run_import(client, body, resource="awkward", mode="replace", on_error="skip")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert job["result"]["rows_failed"] == 1
    slow = await pool.fetch("SELECT * FROM awkward WHERE tenant_id = $1 ORDER BY id", tenant.name)
    assert [dict(r) for r in slow] == [dict(r) for r in fast]


async def test_the_validating_path_takes_what_postgres_takes(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    """A hex float and JSON nested past Python's parser, next to a bad row (validating path)."""
    a = next_ids(3)
    deep = "[" * 3000 + "]" * 3000
    body = f"{AWKWARD}\n{a},x,,0x10,,,,,,,\n{a + 1},x,,,,,,,{deep},,\n{a + 2},x,zz,,,,,,,,\n"
    job = await run_import(client, body, resource="awkward", on_error="skip")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert error_codes(job) == [(4, "amount", "invalid_value")]
    rows = await pool.fetch("SELECT id, ratio FROM awkward WHERE tenant_id = $1", tenant.name)
    assert sorted(tuple(r) for r in rows) == [(a, 16.0), (a + 1, None)]


async def test_a_ten_megabyte_field(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    a = next_ids(3)
    big = "x" * (10 * 1024 * 1024)
    body = f'id,label\n{a},"{big}"\n{a + 1},small\n'
    job = await run_import(client, body, resource="awkward")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    length = await pool.fetchval("SELECT length(label) FROM awkward WHERE id = $1", a)
    assert length == len(big)
    # The validating path too (a bad row forces it); a bad 10 MB value is clipped in the report.
    body = f'id,code\n{a + 2},"{big}"\n'
    job = await run_import(client, body, resource="awkward")
    assert job["error"]["code"] == "invalid_rows"
    assert job["result"]["errors"][0]["column"] == "code"
    assert len(job["result"]["errors"][0]["value"]) <= 1001


# --- Upload forms and the API ------------------------------------------------------------------


async def test_presigned_upload_flow(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    a = next_ids(3)
    response = await client.post("/imports", json={"resource": "users", "mode": "upsert"})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "awaiting_upload" and job["params"]["mode"] == "upsert"
    assert job["upload_url"] and job["upload_expires_at"]
    signed = dict(parse_qsl(urlsplit(job["upload_url"]).query))
    assert signed["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert signed["X-Amz-SignedHeaders"] == "host"  # a plain PUT: no header is required
    assert signed["X-Amz-Expires"] == "3600"
    assert urlsplit(job["upload_url"]).path.endswith(f"/imports/{tenant.name}/{job['id']}/upload")
    openapi = (await client.get("/openapi.json")).json()["paths"]
    assert {"/imports", "/imports/{job_id}/start", "/imports/{job_id}/errors"} <= set(openapi)
    assert response.headers["location"].endswith(f"/jobs/{job['id']}")
    assert_problem(await client.post(f"/imports/{job['id']}/start"), 422, "upload_missing")
    async with httpx.AsyncClient(timeout=60) as plain:
        put = await plain.put(job["upload_url"], content=f"{USERS}\n{a},Pre,Signed,1,\n".encode())
    assert put.status_code == 200, put.text
    started = await client.post(f"/imports/{job['id']}/start")
    assert started.status_code == 202, started.text
    assert started.json()["status"] in ("queued", "running", "succeeded")
    done = await wait_for_job(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["rows_inserted"] == 1
    assert await users_of(pool, tenant) == [(a, "Pre", "Signed", 1, None)]
    again = await client.post(f"/imports/{job['id']}/start")
    assert_problem(again, 409, "job_not_awaiting_upload")
    key = await pool.fetchval(
        "SELECT upload_key FROM ferry.jobs WHERE id = $1", uuid.UUID(job["id"])
    )
    assert key == f"imports/{tenant.name}/{job['id']}/upload"


async def test_multipart_key_ignores_the_filename(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    job = await run_import(client, f"{USERS}\n{next_ids(1)},A,B,1,\n")
    key = await pool.fetchval(
        "SELECT upload_key FROM ferry.jobs WHERE id = $1", uuid.UUID(job["id"])
    )
    assert key == f"imports/{tenant.name}/{job['id']}/upload"
    assert job["params"] == {
        "resource": "users",
        "mode": "insert",
        "on_error": "abort",
        "max_errors": None,
        "dry_run": False,
        "delimiter": ",",
        "encoding": "utf-8",
    }


async def test_refused_import_requests_create_no_job(client: httpx.AsyncClient) -> None:
    assert_problem(await upload(client, b"a\n", resource="nope"), 422, "unknown_resource")
    assert_problem(await upload(client, b"a\n", resource="adults"), 422, "operation_not_allowed")
    body = assert_problem(await upload(client, b"a\n", mode="merge"), 422, "validation_error")
    assert body["errors"][0]["field"] == "mode"
    assert_problem(await client.post("/imports", json={"mode": "insert"}), 422, "validation_error")
    assert_problem(await client.post("/imports", json=[1]), 422, "validation_error")
    assert_problem(
        await client.post("/imports", json={"resource": "nope"}), 422, "unknown_resource"
    )
    no_file = await client.post("/imports", data={"resource": "users"}, files={"x": ("a", b"1")})
    assert_problem(no_file, 422, "validation_error")
    assert_problem(
        await client.post("/imports", content=b"x", headers={"content-type": "text/csv"}),
        415,
        "unsupported_media_type",
    )
    assert (await client.get("/jobs", params={"kind": "import"})).json()["items"] == []


@pytest.mark.parametrize("encoding", ["rot13", "hex", "base64", "zlib"])
async def test_a_codec_that_is_not_a_text_encoding_is_refused(
    client: httpx.AsyncClient, encoding: str
) -> None:
    body = assert_problem(await upload(client, b"a\n", encoding=encoding), 422, "validation_error")
    assert body["errors"][0]["field"] == "encoding"
    json_body = {"resource": "users", "encoding": encoding}
    assert_problem(await client.post("/imports", json=json_body), 422, "validation_error")
    assert (await client.get("/jobs", params={"kind": "import"})).json()["items"] == []


async def test_other_tenant_cannot_see_or_start_an_import(
    client: httpx.AsyncClient, stack: Stack, other_tenant: Tenant
) -> None:
    job = (await client.post("/imports", json={"resource": "users"})).json()
    async with httpx.AsyncClient(base_url=stack.api_url, headers=other_tenant.headers) as other:
        assert_problem(await other.post(f"/imports/{job['id']}/start"), 404, "job_not_found")
        assert_problem(await other.get(f"/imports/{job['id']}/errors"), 404, "job_not_found")


async def test_oversize_multipart_upload_is_413_and_leaves_nothing(
    stack: Stack, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    limit = 6 * 1024 * 1024  # over one S3 part, so a multipart upload was started and aborted
    process, url = stack.start_api(FERRY_MAX_UPLOAD_BYTES=str(limit))
    try:
        async with httpx.AsyncClient(base_url=url, headers=tenant.headers, timeout=60) as small:
            data = b"id,first_name,last_name\n" + b"1,a,b\n" * (limit // 6 + 10)
            response = await upload(small, data)
            assert_problem(response, 413, "upload_too_large")
            fits = await upload(small, b"id,first_name,last_name\n")
            assert fits.status_code == 202
            # The presigned form is checked when started: the job stays awaiting_upload.
            job = (await small.post("/imports", json={"resource": "users"})).json()
            async with httpx.AsyncClient(timeout=60) as plain:
                put = await plain.put(job["upload_url"], content=data)
                assert put.status_code == 200
                assert_problem(
                    await small.post(f"/imports/{job['id']}/start"), 413, "upload_too_large"
                )
                assert (await small.get(f"/jobs/{job['id']}")).json()["status"] == "awaiting_upload"
                await small.post(f"/jobs/{job['id']}/cancel")
    finally:
        stop(process)
    jobs = await pool.fetchval(
        "SELECT count(*) FROM ferry.jobs WHERE tenant_id = $1 AND status <> 'cancelled'",
        tenant.name,
    )
    assert jobs == 1

    async with AsyncExitStack() as exit_stack:
        storage = await Storage.open(Settings(), exit_stack)
        assert await storage.open_uploads(f"imports/{tenant.name}/") == []
        listed = await storage.client.list_objects_v2(
            Bucket=storage.bucket, Prefix=f"imports/{tenant.name}/"
        )
        assert len(listed.get("Contents", [])) == 2  # the accepted job's, the presigned PUT


async def test_idempotent_multipart_import(client: httpx.AsyncClient) -> None:
    data = f"{USERS}\n{next_ids(1)},I,D,1,\n".encode()
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    files = {"file": ("f.csv", data)}
    first = await client.post("/imports", data={"resource": "users"}, files=files, headers=headers)
    again = await client.post("/imports", data={"resource": "users"}, files=files, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = await client.post(
        "/imports", data={"resource": "users", "mode": "upsert"}, files=files, headers=headers
    )
    assert_problem(other, 409, "idempotency_key_reused")


@pytest.mark.slow
async def test_half_a_million_rows_exactly(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    n = 500_000
    a = next_ids(n)
    body = "".join(f"{a + i},First{i},Last,{i % 90},u{i}@example.com\n" for i in range(n))
    job = await run_import(client, gzip.compress((USERS + "\n" + body).encode(), 1))
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert job["result"]["rows_inserted"] == n and job["result"]["rows_total"] == n
    stats = await pool.fetchrow(
        "SELECT count(*) AS n, min(id) AS lo, max(id) AS hi, sum(age) AS ages"
        " FROM users WHERE tenant_id = $1",
        tenant.name,
    )
    assert (stats["n"], stats["lo"], stats["hi"]) == (n, a, a + n - 1)
    assert stats["ages"] == sum(i % 90 for i in range(n))


@pytest.mark.slow
async def test_cancel_mid_import_rolls_back(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    n = 300_000
    a = next_ids(n)
    # A bad first row sends the import down the (slower) validating path.
    body = f"{USERS}\n{a},Bad,Row,x,\n" + "".join(
        f"{a + i},F{i},L,{i % 90},\n" for i in range(1, n)
    )
    response = await upload(client, gzip.compress(body.encode(), 1), on_error="skip")
    assert response.status_code == 202
    job_id = response.json()["id"]
    running = await wait_for_job(client, job_id, statuses=("running", "succeeded", "failed"))
    assert running["status"] == "running"
    assert (await client.post(f"/jobs/{job_id}/cancel")).status_code == 202
    job = await wait_for_job(client, job_id)
    assert job["status"] == "cancelled"
    assert await users_of(pool, tenant) == []


async def test_client_disconnect_mid_upload_aborts_it(
    stack: Stack, tenant: Tenant, pool: asyncpg.Pool
) -> None:
    host, port = stack.api_url.removeprefix("http://").split(":")
    boundary = "ferryboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="resource"\r\n\r\nusers\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n'
        "Content-Type: text/csv\r\n\r\nid,first_name,last_name\r\n"
    ).encode()
    sent = 12 * 1024 * 1024  # more than one S3 part: a multipart upload is under way
    request = (
        f"POST /imports HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {tenant.key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(head) + sent * 2}\r\n\r\n"
    ).encode()
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(request + head)
    row = b"1,a,b\r\n" * 1024
    for _ in range(sent // len(row)):
        writer.write(row)
        await writer.drain()
    prefix = f"imports/{tenant.name}/"
    async with AsyncExitStack() as exit_stack:
        storage = await Storage.open(Settings(), exit_stack)
        deadline = time.monotonic() + 30
        while not await storage.open_uploads(prefix):  # the upload really started
            assert time.monotonic() < deadline, "no multipart upload was started"
            await asyncio.sleep(0.1)
        writer.close()  # the client goes away mid-body
        deadline = time.monotonic() + 30
        while await storage.open_uploads(prefix):
            assert time.monotonic() < deadline, "the multipart upload was not aborted"
            await asyncio.sleep(0.1)
        listed = await storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=prefix)
        assert listed.get("Contents", []) == []
    assert (
        await pool.fetchval("SELECT count(*) FROM ferry.jobs WHERE tenant_id = $1", tenant.name)
        == 0
    )


class _SilentRun(JobRun):
    async def report(self, *args: Any, **kwargs: Any) -> None:
        return None


async def test_an_attempt_without_the_lease_commits_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    """The rows and the job's status commit together, fenced by the lease: an attempt whose
    lease was taken over (e.g. after a long pause) writes nothing, and the job is untouched."""
    a = next_ids(3)
    job = (await client.post("/imports", json={"resource": "users"})).json()
    async with httpx.AsyncClient(timeout=60) as plain:
        await plain.put(job["upload_url"], content=f"{USERS}\n{a},Late,Worker,1,\n".encode())
    job_id = uuid.UUID(job["id"])
    current = uuid.uuid4()  # the lease another attempt holds now
    await pool.execute(
        "UPDATE ferry.jobs SET status = 'running', lease = $2,"
        " heartbeat_at = now() + interval '1 hour' WHERE id = $1",  # never looks dead
        job_id,
        current,
    )
    row = dict(await pool.fetchrow("SELECT * FROM ferry.jobs WHERE id = $1", job_id))
    row["lease"] = uuid.uuid4()  # this attempt's lease: stale
    async with open_services(Settings(), 4) as services:
        with pytest.raises(LeaseLost):
            await importer.run(_SilentRun(services, row))
    assert await users_of(pool, tenant) == []
    after = await pool.fetchrow(
        "SELECT status, lease, result FROM ferry.jobs WHERE id = $1", job_id
    )
    assert (after["status"], after["lease"], after["result"]) == ("running", current, None)
    await pool.execute(
        "UPDATE ferry.jobs SET status = 'cancelled', lease = NULL WHERE id = $1", job_id
    )


async def items_of(pool: asyncpg.Pool, tenant: Tenant) -> list[tuple[Any, ...]]:
    rows = await pool.fetch(
        "SELECT code, qty FROM scoped_items WHERE tenant_id = $1 ORDER BY code", tenant.name
    )
    return [tuple(r) for r in rows]


async def test_keys_unique_per_tenant(
    client: httpx.AsyncClient,
    stack: Stack,
    pool: asyncpg.Pool,
    tenant: Tenant,
    other_tenant: Tenant,
) -> None:
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=other_tenant.headers, timeout=60
    ) as other:
        assert (await run_import(other, "code,qty\nx,2\nw,3\n", resource="items"))["status"] == (
            "succeeded"
        )
        job = await run_import(client, "code,qty\nx,1\n", resource="items")
        assert job["status"] == "succeeded"  # the same key, another tenant: no conflict
        job = await run_import(
            client, "qty,code\n5,x\n,y\n-1,z\n", resource="items", mode="upsert", on_error="skip"
        )
        assert job["status"] == "succeeded", (job["error"], job["result"])
        r = job["result"]
        assert (r["rows_inserted"], r["rows_updated"], r["rows_failed"]) == (1, 1, 1)
        assert error_codes(job) == [(4, "qty", "invalid_value")]  # CHECK (qty >= 0)
        assert await items_of(pool, tenant) == [("x", 5), ("y", 0)]  # NULL took the default
        job = await run_import(client, "code,qty\nx,9\n", resource="items")
        assert error_codes(job) == [(2, "code", "duplicate_key")]
        job = await run_import(other, "code\nz\n", resource="items", mode="replace")
        assert job["status"] == "succeeded"
        assert await items_of(pool, other_tenant) == [("z", 0)]
        assert await items_of(pool, tenant) == [("x", 5), ("y", 0)]


async def test_file_part_before_the_fields(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    a = next_ids(1)
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        f"{USERS}\n{a},File,First,1,\n\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="mode"\r\n\r\nupsert\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="resource"\r\n\r\nusers\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    response = await client.post(
        "/imports",
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 202, response.text
    assert response.json()["params"]["mode"] == "upsert"
    job = await wait_for_job(client, response.json()["id"])
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert await users_of(pool, tenant) == [(a, "File", "First", 1, None)]


async def test_postgres_has_the_last_word_on_a_value(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    """Python's ISO parser takes a +23:00 offset, PostgreSQL does not: the row is an error."""
    a = next_ids(3)
    body = f"id,seen_at\n{a},2024-01-01T10:00:00+23:00\n{a + 1},2024-01-01T10:00:00+02:00\n"
    job = await run_import(client, body, resource="awkward", on_error="skip")
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert error_codes(job) == [(2, "seen_at", "invalid_value")]
    assert "time zone displacement out of range" in job["result"]["errors"][0]["message"]
    ids = await pool.fetch("SELECT id FROM awkward WHERE tenant_id = $1", tenant.name)
    assert [r["id"] for r in ids] == [a + 1]


async def test_dry_run_that_a_real_run_would_fail_still_ends_succeeded(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    a = next_ids(3)
    body = f"{USERS}\n{a},Ok,A,1,\n{a + 1},Bad,B,x,\n"
    job = await run_import(client, body, dry_run=True)  # on_error=abort
    assert job["status"] == "succeeded", (job["error"], job["result"])
    r = job["result"]
    assert (r["rows_total"], r["rows_inserted"], r["rows_updated"], r["rows_failed"]) == (
        2,
        0,
        0,
        1,
    )
    assert error_codes(job) == [(3, "age", "invalid_value")] and r["error_report_url"]
    assert await users_of(pool, tenant) == []
    job = await run_import(client, "nope\n1\n", dry_run=True)
    assert job["status"] == "failed" and job["error"]["code"] == "unknown_column"


def test_an_endless_record_is_cut_off() -> None:
    """A quote never closed must not pull the rest of a huge file into one record."""
    splitter = csvio.Records(",", max_chars=1000)
    list(splitter.feed('h\na,"open\n'))
    with pytest.raises(JobFailure) as e:
        for _ in range(100):
            list(splitter.feed("x" * 50 + "\n"))
    assert e.value.code == "malformed_csv" and "line 2" in e.value.message
    splitter = csvio.Records(",", max_chars=1000)
    with pytest.raises(JobFailure):
        for _ in range(100):
            list(splitter.feed("y" * 50))  # one endless physical line


async def _texts(chunks: list[str]) -> AsyncIterator[str]:
    for chunk in chunks:
        yield chunk


class _NoProgress:
    async def report(self, *args: Any) -> None:
        return None


async def test_an_end_marker_is_seen_however_the_text_is_cut(pool: asyncpg.Pool) -> None:
    """COPY ends its data at a `\\.` line and ignores the rest: the fast path must leave for
    the validating path even when one chunk ends with the backslash and the next starts with
    the dot."""
    text = "a,b\n1,x\n\\.\n2,y\n3,z\n"
    columns = [Column(name, "text", "text", True, False, True) for name in ("a", "b")]
    resource = Resource("marker", "public", "marker", ("a",), tuple(columns), ("import",))
    plan = importer.Plan(resource, ImportParams(resource="marker", mode="upsert"), "t", columns)
    run = cast(JobRun, _NoProgress())
    async with pool.acquire() as con, con.transaction():
        await importer.create_tables(con, plan)
        for cut in range(len(text) + 1):
            with pytest.raises(importer._Fallback):
                chunks = _texts([text[:cut], text[cut:]])
                await importer.fast_load(con, run, plan, chunks, importer.Counter())


async def test_an_end_marker_cut_between_reads_loses_no_row(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file read from S3 in two pieces, cut inside its `\\.` line: every row is either
    written or reported, none silently dropped (upsert: the fast path COPYs the file as is)."""
    a = next_ids(3)
    data = f"{USERS}\n{a},A,B,1,\n\\.\n{a + 1},C,D,2,\n{a + 2},E,F,3,\n".encode()
    params = {"resource": "users", "mode": "upsert", "on_error": "skip"}
    row = await _uploaded_and_leased(client, pool, params, data)
    job_id = row["id"]
    try:
        async with open_services(Settings(), 4) as services:
            read = services.storage.read

            async def read_cut(key: str) -> AsyncIterator[bytes]:
                whole = b"".join([chunk async for chunk in read(key)])
                cut = whole.index(b"\\.") + 1
                yield whole[:cut]
                yield whole[cut:]

            monkeypatch.setattr(services.storage, "read", read_cut)
            done = await importer.run(_SilentRun(services, row))
        assert done["status"] == "succeeded", done
        assert (done["result"]["rows_total"], done["result"]["rows_failed"]) == (4, 1)
        assert [r[0] for r in await users_of(pool, tenant)] == [a, a + 1, a + 2]
    finally:
        await pool.execute(
            "UPDATE ferry.jobs SET status = 'cancelled', lease = NULL"
            " WHERE id = $1 AND status = 'running'",
            job_id,
        )


async def test_bad_bytes_deep_in_a_file_fail_the_whole_import(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    """The error surfaces mid-COPY (past the first chunks): still a clean file-level failure."""
    a = next_ids(60_000)
    rows = "".join(f"{a + i},F,L,1,\n" for i in range(50_000))
    data = f"{USERS}\n{rows}".encode() + b"\xc3\x28,x,y,1,\n"
    job = await run_import(client, data)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_encoding", job["error"]
    assert await users_of(pool, tenant) == []


async def _uploaded_and_leased(
    client: httpx.AsyncClient, pool: asyncpg.Pool, params: dict[str, Any], data: bytes
) -> dict[str, Any]:
    """An import job with its file uploaded, leased as if a worker ran it (for in-process runs)."""
    job = (await client.post("/imports", json=params)).json()
    async with httpx.AsyncClient(timeout=60) as plain:
        await plain.put(job["upload_url"], content=data)
    job_id = uuid.UUID(job["id"])
    await pool.execute(
        "UPDATE ferry.jobs SET status = 'running', lease = $2,"
        " heartbeat_at = now() + interval '1 hour' WHERE id = $1",  # never looks dead
        job_id,
        uuid.uuid4(),
    )
    return dict(await pool.fetchrow("SELECT * FROM ferry.jobs WHERE id = $1", job_id))


async def test_gzip_bomb_in_the_worker_path_fails_upload_too_large(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    """The data path itself, with a 1 MiB limit: 64 MiB of CSV in ~70 KB of gzip is cut off."""
    line = b"1,a,b,1,\n"
    bomb = gzip.compress(USERS.encode() + b"\n" + line * (64 * 1024 * 1024 // len(line)), 9)
    row = await _uploaded_and_leased(client, pool, {"resource": "users"}, bomb)
    job_id = row["id"]
    try:
        async with open_services(Settings(max_upload_bytes=1024 * 1024), 4) as services:
            with pytest.raises(JobFailure) as e:
                await importer.run(_SilentRun(services, row))
        assert e.value.code == "upload_too_large"
        assert await users_of(pool, tenant) == []
    finally:
        await pool.execute(
            "UPDATE ferry.jobs SET status = 'cancelled', lease = NULL WHERE id = $1", job_id
        )


@pytest.mark.slow
async def test_worker_killed_mid_import_then_retried_writes_each_row_once(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant, stack: Stack
) -> None:
    assert stack.workers
    n = 300_000
    a = next_ids(n)
    # A bad first row sends the import down the (slower) validating path: time to kill it.
    body = f"{USERS}\n{a},Bad,Row,x,\n" + "".join(
        f"{a + i},F{i},L,{i % 90},\n" for i in range(1, n)
    )
    response = await upload(client, gzip.compress(body.encode(), 1), on_error="skip")
    job_id = response.json()["id"]
    deadline = time.monotonic() + 60
    while True:  # running, and rows flowing
        job = (await client.get(f"/jobs/{job_id}")).json()
        if job["status"] == "running" and job["progress"]["rows"] > 0:
            break
        assert job["status"] in ("queued", "running"), job
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    victim = stack.workers.pop(0)
    victim.kill()  # SIGKILL: no cleanup at all
    victim.wait()
    stack.workers.append(stack.start_worker())
    job = await wait_for_job(client, job_id, deadline_s=180)
    assert job["status"] == "succeeded", (job["error"], job["result"])
    assert job["attempts"] == 2
    assert (job["result"]["rows_inserted"], job["result"]["rows_failed"]) == (n - 1, 1)
    count = await pool.fetchval("SELECT count(*) FROM users WHERE tenant_id = $1", tenant.name)
    assert count == n - 1


async def test_a_dead_attempts_error_report_upload_is_aborted(tenant: Tenant, stack: Stack) -> None:
    """An error report being written by an attempt that no longer holds a lease is aborted by the
    reconciler (SPEC: within 60 s)."""
    key = f"imports/{tenant.name}/{uuid.uuid4()}/{uuid.uuid4()}/errors.csv"
    async with AsyncExitStack() as exit_stack:
        storage = await Storage.open(Settings(), exit_stack)
        await storage.client.create_multipart_upload(Bucket=storage.bucket, Key=key)
        prefix = f"imports/{tenant.name}/"
        assert await storage.open_uploads(prefix) == [key]
        deadline = time.monotonic() + 60
        while await storage.open_uploads(prefix):
            assert time.monotonic() < deadline, "not aborted within 60 s"
            await asyncio.sleep(0.25)


# --- The tenant column on the direct COPY path (unit) ------------------------------------------

_FIELD = st.text(alphabet='ab,"\n\r x', max_size=6)


@given(
    rows=st.lists(st.lists(_FIELD, min_size=2, max_size=2), min_size=1, max_size=12),
    size=st.integers(min_value=1, max_value=9),
    tenant=st.text(alphabet='t,"\n', min_size=1, max_size=4),
    newline=st.sampled_from(["\n", "\r\n"]),
    trailing=st.booleans(),
)
def test_tenant_prefix_starts_every_record_however_the_text_is_cut(
    rows: list[list[str]], size: int, tenant: str, newline: str, trailing: bool
) -> None:
    """Quoted newlines, doubled quotes, CRLF, and chunk boundaries anywhere (inside quotes, between
    \\r and \\n, right after a record's newline): the output parses as the same records, each
    with the tenant's value first."""

    def field(value: str) -> str:
        quoted = any(c in value for c in ',"\r\n') or value == "x"  # and some that need not be
        return '"' + value.replace('"', '""') + '"' if quoted else value

    text = newline.join(",".join(map(field, r)) for r in [["h1", "h2"], *rows])
    text += newline if trailing else ""
    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    prefix = importer.TenantPrefix(tenant, ",")
    fed = "".join(prefix.feed(chunk) for chunk in chunks)
    parsed = list(csv.reader(io.StringIO(fed, newline="")))
    assert parsed == [[tenant, *r] for r in [["h1", "h2"], *rows]]

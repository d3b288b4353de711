"""Security and bad input against the real API: tenant isolation on every endpoint, identifiers
only from the allow-list, values only as bound parameters, a bad-request corpus (each a precise
4xx that creates nothing), filenames, secrets in logs, presigned URL lifetimes, the image's user.

The CSV corpus for imports is in test_bad_csv.py, websocket isolation in test_ws_isolation.py.
"""

import asyncio
import base64
import csv
import io
import json
import re
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest

from app import auth, jobstore, logs
from app.errors import BadRequest
from app.storage import content_disposition
from tests.conftest import ROOT, Stack, Tenant, wait_for_job
from tests.test_exports import download, export, seed_users

PROBLEM = "application/problem+json"


def assert_problem(response: httpx.Response, status: int | tuple[int, ...], code: str) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body: dict = response.json()
    assert body["status"] == response.status_code and body["code"] == code, body
    assert body["title"] and body["detail"]
    if code == "validation_error":
        assert body["errors"] and all(e["field"] for e in body["errors"])
    return body


async def job_ids(client: httpx.AsyncClient) -> list[str]:
    response = await client.get("/jobs", params={"limit": 100})
    assert response.status_code == 200
    return [j["id"] for j in response.json()["items"]]


async def assert_healthy(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text


@pytest.fixture
async def other(stack: Stack, other_tenant: Tenant) -> Any:
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=other_tenant.headers, timeout=60
    ) as client:
        yield client


# --- Tenant isolation ----------------------------------------------------------------------


def _without_id(body: dict, job_id: str) -> dict:
    return json.loads(json.dumps(body).replace(job_id, "ID"))


async def test_another_tenants_job_answers_exactly_as_a_missing_one(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    job = await export(client, {"resource": "users"})
    missing = str(uuid.uuid4())
    for method, path in (
        ("GET", "/jobs/{}"),
        ("POST", "/jobs/{}/cancel"),
        ("GET", "/exports/{}/download"),
    ):
        foreign = await other.request(method, path.format(job["id"]))
        absent = await other.request(method, path.format(missing))
        assert_problem(foreign, 404, "job_not_found")
        assert foreign.status_code == absent.status_code
        assert dict(foreign.headers).keys() == dict(absent.headers).keys()
        assert _without_id(foreign.json(), job["id"]) == _without_id(absent.json(), missing)
    # The owner still sees it, untouched by the other tenant's cancel.
    assert (await client.get(f"/jobs/{job['id']}")).json()["status"] == "succeeded"


async def all_job_ids(client: httpx.AsyncClient, params: dict[str, Any]) -> set[str]:
    seen: set[str] = set()
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        body = (await client.get("/jobs", params=query)).json()
        seen |= {j["id"] for j in body["items"]}
        cursor = body["next_cursor"]
        if not cursor:
            return seen


async def test_lists_never_include_another_tenants_jobs(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    mine = {(await export(client, {"resource": "users"}))["id"] for _ in range(3)}
    theirs = (await export(other, {"resource": "users"}))["id"]
    for params in (
        {},
        {"kind": "export"},
        {"status": "succeeded"},
        {"resource": "users"},
        {"limit": 1},
    ):
        seen = await all_job_ids(other, params)
        assert theirs in seen and not seen & mine, params
    # A cursor names one of its tenant's jobs: in another tenant's hands it is refused.
    page = (await client.get("/jobs", params={"limit": 1})).json()
    assert page["next_cursor"]
    refused = await other.get("/jobs", params={"cursor": page["next_cursor"]})
    assert refused.status_code == 400 and refused.json()["code"] == "invalid_cursor"


async def test_idempotency_keys_are_per_tenant(
    client: httpx.AsyncClient, other: httpx.AsyncClient
) -> None:
    headers = {"Idempotency-Key": f"shared-{uuid.uuid4()}"}
    body = {"resource": "users"}
    first = await client.post("/exports", json=body, headers=headers)
    second = await other.post("/exports", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] != second.json()["id"]
    assert "idempotent-replayed" not in second.headers
    assert first.json()["id"] not in await job_ids(other)


@pytest.mark.parametrize(
    "flt",
    [
        # Values that would widen the WHERE clause if they were spliced into the SQL text.
        {"column": "first_name", "op": "eq", "value": "x' OR '1'='1"},
        {"column": "first_name", "op": "like", "value": "%' OR tenant_id <> '"},
        {"column": "first_name", "op": "ilike", "value": "%"},
        {"column": "first_name", "op": "ne", "value": "') OR true --"},  # never NULL
        {"column": "id", "op": "in", "value": ["0) OR (1=1"]},
        {"column": "first_name", "op": "not_in", "value": ["x'); DELETE FROM users; --"]},
    ],
    ids=["eq", "like", "ilike-all", "ne", "in", "not_in"],
)
async def test_export_filters_never_reach_another_tenants_rows(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    tenant: Tenant,
    other_tenant: Tenant,
    flt: dict,
) -> None:
    mine = await seed_users(pool, tenant.name, 3)
    await seed_users(pool, other_tenant.name, 4)
    before = await pool.fetchval("SELECT count(*) FROM public.users")
    response = await client.post("/exports", json={"resource": "users", "filter": [flt]})
    if response.status_code == 422:  # "0) OR (1=1" is no bigint: refused, not spliced
        assert_problem(response, 422, "invalid_value")
        return
    assert response.status_code == 202, response.text
    job = await wait_for_job(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    rows = list(csv.DictReader(io.StringIO((await download(client, job)).decode())))
    assert {int(r["id"]) for r in rows} <= set(range(mine, mine + 3))
    if flt["op"] in ("ilike", "ne", "not_in"):  # these match every row of mine, and only mine
        assert len(rows) == 3
    assert await pool.fetchval("SELECT count(*) FROM public.users") == before


async def test_views_are_tenant_scoped_too(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant, other_tenant: Tenant
) -> None:
    mine = await seed_users(pool, tenant.name, 40)
    await seed_users(pool, other_tenant.name, 40)
    job = await export(
        client, {"resource": "adults", "filter": [{"column": "age", "op": "gte", "value": 0}]}
    )
    rows = list(csv.DictReader(io.StringIO((await download(client, job)).decode())))
    assert rows and {int(r["id"]) for r in rows} <= set(range(mine, mine + 40))


# --- Identifiers only from the allow-list ---------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"resource": "users", "columns": ['id", tenant_id, "email']},
        {"resource": "users", "columns": ["id", "tenant_id"]},
        {"resource": "users", "columns": ["ID"]},
        {"resource": "users", "columns": ["id\u0000"]},
        {"resource": "users", "columns": ["(SELECT 1)"]},
        {"resource": "users", "order_by": ["id; DROP TABLE users"]},
        {"resource": "users", "order_by": ["-tenant_id"]},
        {"resource": "users", "order_by": ["--id"]},
        {"resource": "users", "order_by": ["-"]},
        {"resource": "users", "order_by": ["id DESC"]},
        {"resource": "users", "filter": [{"column": 'age" OR 1=1 --', "op": "eq", "value": 1}]},
        {"resource": "users", "filter": [{"column": "pg_sleep(10)", "op": "eq", "value": 1}]},
        {"resource": "adults", "columns": ["last_name"]},  # a users column, not the view's
    ],
)
async def test_identifiers_come_only_from_the_allow_list(
    client: httpx.AsyncClient, pool: asyncpg.Pool, body: dict
) -> None:
    before = await job_ids(client)
    assert_problem(await client.post("/exports", json=body), 422, "unknown_column")
    assert await job_ids(client) == before
    assert await pool.fetchval("SELECT to_regclass('public.users') IS NOT NULL")


@pytest.mark.parametrize(
    "resource", ["users; DROP TABLE users", "public.users", "USERS", "users\u0000", "../users"]
)
async def test_resources_come_only_from_the_allow_list(
    client: httpx.AsyncClient, resource: str
) -> None:
    assert_problem(
        await client.post("/exports", json={"resource": resource}), 422, "unknown_resource"
    )


@pytest.mark.parametrize(
    "flt",
    [
        {"column": "first_name", "op": "eq", "value": "nul\u0000byte"},
        {"column": "first_name", "op": "like", "value": "\u0000"},
        {"column": "first_name", "op": "in", "value": ["a", "b\u0000"]},
        {"column": "age", "op": "eq", "value": 10**40},
        {"column": "age", "op": "eq", "value": 1.5},
        {"column": "age", "op": "eq", "value": "1; DROP TABLE users"},
        {"column": "created_at", "op": "gte", "value": "yesterday-ish"},
        {"column": "created_at", "op": "gte", "value": "infinity; --"},
        {"column": "id", "op": "in", "value": [1, "x"]},
    ],
)
async def test_values_that_do_not_fit_are_422_invalid_value(
    client: httpx.AsyncClient, flt: dict
) -> None:
    before = await job_ids(client)
    assert_problem(
        await client.post("/exports", json={"resource": "users", "filter": [flt]}),
        422,
        "invalid_value",
    )
    assert await job_ids(client) == before


@pytest.mark.parametrize(
    "value",
    [
        "Infinity",  # JSON has no infinities: Python's parser takes this extension, we must not
        "NaN",
        "1e400",
        "-1e400",
    ],
)
async def test_non_finite_numbers_are_refused(client: httpx.AsyncClient, value: str) -> None:
    body = '{"resource": "awkward", "filter": [{"column": "ratio", "op": "gt", "value": %s}]}'
    response = await client.post(
        "/exports", content=body % value, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] in ("validation_error", "invalid_value")


# --- The bad-request corpus ---------------------------------------------------------------

NOT_AN_OBJECT = [
    b'{"resource": "users"',
    b"[1, 2",
    b"null",
    b"[]",
    b'"users"',
    b"42",
    b"",
    b"\xff\xfe{\x00}\x00",
    b'{"resource": "us\xe9rs"}',  # latin-1, not UTF-8
    b'{"resource": "users",}',
    b"{'resource': 'users'}",
    b'{"resource": "users"} trailing',
    b"\x00\x00\x00",
    b'{"resource": "users", "filter": [{"column": "age", "op": "eq", "value": '
    + b"9" * 5000
    + b"}]}",
]


@pytest.mark.parametrize("content", NOT_AN_OBJECT, ids=range(len(NOT_AN_OBJECT)))
async def test_bodies_that_are_not_a_json_object_are_422(
    client: httpx.AsyncClient, content: bytes
) -> None:
    before = await job_ids(client)
    response = await client.post(
        "/exports", content=content, headers={"content-type": "application/json"}
    )
    assert_problem(response, 422, "validation_error")
    assert await job_ids(client) == before


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
async def test_a_body_that_is_not_declared_json_is_422(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    before = await job_ids(client)
    response = await client.post("/exports", content=b'{"resource": "users"}', headers=headers)
    assert_problem(response, 422, "validation_error")
    assert await job_ids(client) == before


WRONG_TYPES: list[dict[str, Any]] = [
    {"resource": 1},
    {"resource": None},
    {"resource": ["users"]},
    {"resource": "users", "columns": "id"},
    {"resource": "users", "columns": []},
    {"resource": "users", "columns": [1]},
    {"resource": "users", "columns": ["id", "id"]},
    {"resource": "users", "filter": {"column": "age", "op": "eq", "value": 1}},
    {"resource": "users", "filter": [{"column": "age", "op": "eq", "value": {"a": 1}}]},
    {"resource": "users", "filter": [{"column": "age", "op": "eq"}]},
    {"resource": "users", "filter": [{"column": "age", "op": "eq", "value": 1, "or": 1}]},
    {"resource": "users", "filter": [{"column": "age", "op": "in", "value": []}]},
    {"resource": "users", "header": "yes"},
    {"resource": "users", "header": 1},
    {"resource": "users", "spreadsheet_safe": "true"},
    {"resource": "users", "run_at": 0},
    {"resource": "users", "run_at": "1700000000"},
    {"resource": "users", "run_at": "tomorrow"},
    {"resource": "users", "delimiter": ""},
    {"resource": "users", "delimiter": "\n"},
    {"resource": "users", "delimiter": '"'},
    {"resource": "users", "filename": ""},
    {"resource": "users", "filename": "x" * 256},
    {"resource": "users", "filename": "a\r\nSet-Cookie: x=1"},
    {"resource": "users", "filename": "a\\b.csv"},
    {"resource": "users", "filename": ".."},
    {"resource": "users", "filename": "a%5cb.csv"},
    {"resource": "users", "filename": "a%00.csv"},
    {"resource": "x" * 64},
    {"resource": "users", "columns": ["id"] * 1601},
    {"resource": "users", "filter": [{"column": "age", "op": "is_null", "value": True}] * 101},
]


@pytest.mark.parametrize("body", WRONG_TYPES, ids=range(len(WRONG_TYPES)))
async def test_wrong_types_and_shapes_are_422(client: httpx.AsyncClient, body: dict) -> None:
    before = await job_ids(client)
    assert_problem(await client.post("/exports", json=body), 422, "validation_error")
    assert await job_ids(client) == before


def _nested(depth: int) -> bytes:
    return b'{"resource": "users", "filter": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("depth", [100, 10_000, 200_000])
async def test_deeply_nested_bodies_are_a_clean_4xx(client: httpx.AsyncClient, depth: int) -> None:
    response = await client.post(
        "/exports", content=_nested(depth), headers={"content-type": "application/json"}
    )
    assert_problem(
        response, (413, 422), "upload_too_large" if depth > 500_000 else "validation_error"
    )
    await assert_healthy(client)


async def test_huge_bodies_are_413_before_being_read(client: httpx.AsyncClient) -> None:
    big = json.dumps({"resource": "users", "filename": "a", "pad": "x" * (2 * 1024 * 1024)})
    before = await job_ids(client)
    assert_problem(
        await client.post("/exports", content=big, headers={"content-type": "application/json"}),
        413,
        "upload_too_large",
    )

    async def chunks() -> Any:  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b" " * 64 * 1024

    response = await client.post(
        "/exports", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_problem(response, 413, "upload_too_large")
    assert await job_ids(client) == before
    await assert_healthy(client)


async def test_a_json_body_just_under_the_limit_is_still_validated(
    client: httpx.AsyncClient,
) -> None:
    body = json.dumps({"resource": "users", "columns": ["id"] * 5000})
    assert len(body) < 1024 * 1024
    assert_problem(
        await client.post("/exports", content=body, headers={"content-type": "application/json"}),
        422,
        "validation_error",
    )


@pytest.mark.parametrize(
    "path",
    [
        "/jobs/not-a-uuid",
        "/jobs/123",
        "/jobs/00000000-0000-0000-0000-00000000000g",
        "/jobs/%00",
        "/jobs/" + "a" * 5000,
        "/exports/not-a-uuid/download",
        "/exports/%2e%2e%2fjobs/download",
    ],
)
async def test_invalid_uuids_are_422_or_404(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code in (404, 422), response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    response = await client.post(path.removesuffix("/download") + "/cancel")
    assert response.status_code in (404, 405, 422), response.text


@pytest.mark.parametrize(
    "params",
    [
        [("status", "failed"), ("status", "queued")],  # repeated: refused, not one kept silently
        [("resource", "users"), ("resource", "x")],
        {"limit": 0},
        {"limit": 101},
        {"limit": -1},
        {"limit": "ten"},
        {"limit": 1.5},
        {"limit": 10**30},
        {"limit": ""},
        {"kind": "exports"},
        {"status": "done"},
        {"status": ""},
        {"resource": "x" * 64},
        {"cursor": "c" * 513},
        {"stauts": "failed"},  # unknown parameters are refused, as unknown body fields are
    ],
)
async def test_out_of_range_list_parameters_are_422(client: httpx.AsyncClient, params: Any) -> None:
    assert_problem(await client.get("/jobs", params=params), 422, "validation_error")


def _cursor(payload: Any) -> str:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


FORGED_CURSORS = [
    "not base64 !!",
    "====",
    "é",
    _cursor(b"\xff\xfe"),
    _cursor(b"not json"),
    _cursor({"created_at": "2024-01-01T00:00:00Z", "id": str(uuid.uuid4())}),
    _cursor([]),
    _cursor([1, 2]),
    _cursor(["2024-01-01T00:00:00Z"]),
    _cursor(["2024-01-01T00:00:00Z", "not-a-uuid"]),
    _cursor(["yesterday", str(uuid.uuid4())]),
    _cursor(["0001-01-01T00:00:00+05:00", str(uuid.uuid4())]),  # before year 1 in UTC
    _cursor(["9999-12-31T23:59:59-05:00", str(uuid.uuid4())]),  # after year 9999 in UTC
    _cursor(["2024-01-01T00:00:00Z", str(uuid.uuid4()), "extra"]),
    _cursor(["2024-01-01T00:00:00Z", 5]),
    _cursor([{"a": 1}, str(uuid.uuid4())]),
    _cursor("[" * 100 + "]" * 100),
]


@pytest.mark.parametrize("cursor", FORGED_CURSORS, ids=range(len(FORGED_CURSORS)))
async def test_forged_cursors_are_a_400_problem(client: httpx.AsyncClient, cursor: str) -> None:
    assert_problem(await client.get("/jobs", params={"cursor": cursor}), 400, "invalid_cursor")


def test_cursor_round_trip_and_tamper() -> None:
    from datetime import UTC, datetime

    job = {"created_at": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "id": uuid.uuid4()}
    assert jobstore.decode_cursor(jobstore.encode_cursor(job)) == (job["created_at"], job["id"])
    with pytest.raises(BadRequest):
        jobstore.decode_cursor(_cursor(["2024-01-02T03:04:05", str(job["id"])]))  # naive


@pytest.mark.parametrize("value", ["nul\u0000", "\u0000"])
async def test_nul_bytes_in_query_parameters_are_harmless(
    client: httpx.AsyncClient, value: str
) -> None:
    response = await client.get("/jobs", params={"resource": value})
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        assert response.json()["items"] == []


async def test_the_service_is_healthy_after_the_corpus(client: httpx.AsyncClient) -> None:
    await assert_healthy(client)
    await export(client, {"resource": "users"})


# --- Filenames, keys, secrets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "ascii_name"),
    [
        ("report.csv", "report.csv"),
        ('evil".csv', "evil_.csv"),
        ("a;b=c.csv", "a;b=c.csv"),
        ("ünïcødé ✓.csv", "_n_c_d_ _.csv"),
        ("line\u2028sep.csv", "line_sep.csv"),
    ],
)
def test_content_disposition_is_sanitised(filename: str, ascii_name: str) -> None:
    header = content_disposition(filename)
    assert header.startswith(f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''")
    assert all(32 <= ord(c) < 127 for c in header)  # nothing a header could be split on
    assert header.count('"') == 2


async def test_filename_reaches_only_the_content_disposition(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    job = await export(client, {"resource": "users", "filename": 'q"uote;é.csv'})
    url = urlsplit(job["result"]["download_url"])
    assert re.fullmatch(rf"/ferry-test/exports/{tenant.name}/{job['id']}/[0-9a-f-]+\.csv", url.path)
    disposition = parse_qs(url.query)["response-content-disposition"][0]
    assert disposition == content_disposition('q"uote;é.csv')
    async with httpx.AsyncClient() as plain:
        response = await plain.get(job["result"]["download_url"])
    assert response.status_code == 200


async def test_unknown_near_miss_and_revoked_keys_are_401(
    anonymous: httpx.AsyncClient, pool: asyncpg.Pool, tenant: Tenant
) -> None:
    near_misses = [
        tenant.key[:-1] + ("A" if tenant.key[-1] != "A" else "B"),
        tenant.key + "x",
        tenant.key[:8],
        tenant.key.upper(),
        tenant.key + "=",
    ]
    for key in near_misses:
        response = await anonymous.get("/resources", headers={"Authorization": f"Bearer {key}"})
        assert_problem(response, 401, "unauthorized")
    assert (
        await anonymous.get("/resources", headers={"Authorization": f"bearer {tenant.key}"})
    ).status_code == 200
    await pool.execute(
        "UPDATE ferry.api_keys SET revoked_at = now() WHERE key_hash = $1",
        auth.hash_key(tenant.key),
    )
    # The API remembers a key's tenant for FERRY_AUTH_CACHE_SECONDS (1 s in the test stack).
    deadline = time.monotonic() + 10
    while True:
        response = await anonymous.get(
            "/resources", headers={"Authorization": f"Bearer {tenant.key}"}
        )
        if response.status_code == 401 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert_problem(response, 401, "unauthorized")


async def test_a_new_key_works_at_once_and_unknown_keys_are_not_remembered(
    anonymous: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """A lookup that found nothing is not cached: a key created after it works at once."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    async with pool.acquire() as con:
        key = await auth.create_key(con, name)
    headers = {"Authorization": f"Bearer {key}"}
    assert (await anonymous.get("/resources", headers=headers)).status_code == 200

    unknown = auth.KEY_PREFIX + uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {unknown}"}
    assert_problem(await anonymous.get("/resources", headers=headers), 401, "unauthorized")
    await pool.execute(
        "INSERT INTO ferry.api_keys (key_hash, tenant_id, prefix) VALUES ($1, $2, $3)",
        auth.hash_key(unknown),
        name,
        unknown[:8],
    )
    assert (await anonymous.get("/resources", headers=headers)).status_code == 200


async def test_no_plaintext_key_is_stored(pool: asyncpg.Pool, tenant: Tenant) -> None:
    dump = await pool.fetch("SELECT row_to_json(k)::text AS row FROM ferry.api_keys k")
    assert all(tenant.key not in r["row"] and tenant.key[8:] not in r["row"] for r in dump)


async def test_secrets_never_reach_any_log(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant, anonymous: httpx.AsyncClient
) -> None:
    secret_query = f"fry_{uuid.uuid4().hex}"
    wrong_key = f"fry_{uuid.uuid4().hex}"
    await client.get(f"/resources?token={tenant.key}&x=1")
    await client.get(f"/jobs?cursor=%ZZ&token={secret_query}")
    await anonymous.get("/resources", headers={"Authorization": f"Bearer {wrong_key}"})
    await client.post(
        "/exports",
        content=f'{{"resource": "{tenant.key}"',
        headers={"content-type": "application/json"},
    )
    job = await export(client, {"resource": "users"})
    signature = parse_qs(urlsplit(job["result"]["download_url"]).query)["X-Amz-Signature"][0]
    await client.get(f"/exports/{job['id']}/download")
    text = "".join(p.read_text(errors="replace") for p in stack.logs.glob("*.log"))
    assert "/resources" in text
    for secret in (tenant.key, secret_query, wrong_key, signature):
        assert secret not in text


@pytest.mark.parametrize(
    "line",
    [
        "GET /ws/jobs?token=fry_secret HTTP/1.1",
        "GET /x?a=1&token=fry_secret&b=2",
        "Authorization: Bearer fry_secret",
        "https://s3/bucket/key?X-Amz-Signature=fry_secret&X-Amz-Expires=60",
    ],
)
def test_scrub_removes_tokens_bearer_keys_and_signatures(line: str) -> None:
    assert "fry_secret" not in logs.scrub(line)
    assert "[redacted]" in logs.scrub(line)


async def test_presigned_urls_are_short_lived(
    stack: Stack, client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job = await export(client, {"resource": "users"})
    query = parse_qs(urlsplit(job["result"]["download_url"]).query)
    assert int(query["X-Amz-Expires"][0]) == stack.settings.presign_ttl_seconds <= 3600
    # Never past the result's own expiry.
    await pool.execute(
        "UPDATE ferry.jobs SET expires_at = now() + interval '90 seconds' WHERE id = $1",
        uuid.UUID(job["id"]),
    )
    redirect = await client.get(f"/exports/{job['id']}/download")
    assert redirect.status_code == 307
    expires = int(parse_qs(urlsplit(redirect.headers["location"]).query)["X-Amz-Expires"][0])
    assert 1 <= expires <= 90


def test_the_image_runs_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    users = re.findall(r"^USER\s+(\S+)", final_stage, re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    assert "--no-access-log" in final_stage  # the middleware's access line has no query string

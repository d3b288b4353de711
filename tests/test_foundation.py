"""Foundation: health, readiness, metrics, auth, problem+json, resources, migrations, startup."""

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest

from app import db
from tests.conftest import ROOT, Stack, Tenant

PROBLEM = "application/problem+json"
ALL_MIGRATIONS = sorted(p.stem for p in (ROOT / "app" / "migrations").glob("*.sql"))


def assert_problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["code"] == code
    assert body["title"] and body["detail"]
    return body


async def test_healthz_and_readyz(anonymous: httpx.AsyncClient) -> None:
    assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
    ready = await anonymous.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"postgres": "ok", "redis": "ok", "s3": "ok"}


async def test_metrics_count_requests_by_route(anonymous: httpx.AsyncClient) -> None:
    await anonymous.get("/healthz")
    text = (await anonymous.get("/metrics")).text
    assert 'ferry_http_requests_total{method="GET",route="/healthz",status="200"}' in text
    assert "ferry_http_request_duration_seconds_bucket" in text


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer  x y", "Basic dXNlcjpwYXNz", "Bearer fry_unknown", "Token abc"],
)
async def test_missing_or_bad_key_is_401(
    anonymous: httpx.AsyncClient, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = await anonymous.get("/resources", headers=headers)
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_key_created_while_running_works_at_once(stack: Stack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "keys", "create", "--tenant", "fresh-tenant"],
        env=stack.env,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    key = result.stdout.strip()
    assert result.stdout == key + "\n" and key.startswith("fry_")
    response = httpx.get(f"{stack.api_url}/resources", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200


async def test_keys_are_stored_hashed(pool: asyncpg.Pool, tenant: Tenant) -> None:
    rows = await pool.fetch(
        "SELECT key_hash, prefix FROM ferry.api_keys WHERE tenant_id = $1", tenant.name
    )
    assert len(rows) == 1
    assert tenant.key.encode() not in rows[0]["key_hash"] and len(rows[0]["key_hash"]) == 32


async def test_every_error_is_problem_json(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/nope"), 404, "not_found")
    assert_problem(await client.delete("/resources"), 405, "method_not_allowed")
    assert_problem(await client.get("/jobs/not-a-uuid"), 422, "validation_error")
    body = assert_problem(
        await client.post(
            "/exports", content=b"[1, 2", headers={"content-type": "application/json"}
        ),
        422,
        "validation_error",
    )
    assert body["errors"]
    assert_problem(
        await client.get("/jobs/00000000-0000-0000-0000-000000000000"), 404, "job_not_found"
    )


async def test_resources_lists_columns_without_tenant_column(client: httpx.AsyncClient) -> None:
    items = {r["name"]: r for r in (await client.get("/resources")).json()["items"]}
    users = items["users"]
    assert [c["name"] for c in users["columns"]] == [
        "id",
        "first_name",
        "last_name",
        "age",
        "email",
        "created_at",
    ]
    assert users["columns"][0] == {"name": "id", "type": "bigint", "nullable": False}
    assert users["columns"][5]["type"] == "timestamp with time zone"
    assert users["key"] == ["id"] and users["operations"] == ["export", "import"]
    assert items["adults"]["operations"] == ["export"]  # a view is export-only
    assert all(c["name"] != "tenant_id" for r in items.values() for c in r["columns"])


async def test_openapi_lists_every_endpoint(anonymous: httpx.AsyncClient) -> None:
    paths = (await anonymous.get("/openapi.json")).json()["paths"]
    for path in (
        "/exports",
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/cancel",
        "/exports/{job_id}/download",
        "/resources",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths
    assert (await anonymous.get("/docs")).status_code == 200


async def test_migrations_are_idempotent_and_safe_concurrently(stack: Stack) -> None:
    results = await asyncio.gather(*(db.migrate(stack.dsn) for _ in range(3)))
    assert results == [[], [], []]
    con = await asyncpg.connect(stack.dsn)
    try:
        versions = await con.fetch("SELECT version FROM ferry.schema_migrations")
    finally:
        await con.close()
    assert [r["version"] for r in versions] == ALL_MIGRATIONS


async def test_fresh_database_migrates_concurrently(stack: Stack) -> None:
    name = "ferry_test_concurrent_migrate"
    dsn = stack.dsn.rsplit("/", 1)[0] + "/" + name
    admin = await asyncpg.connect(stack.dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        results = await asyncio.gather(db.migrate(dsn), db.migrate(dsn))
        assert sorted(results, key=len) == [[], ALL_MIGRATIONS]
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[resources.x]\ntable = "public.nope"\nkey = ["id"]\n', "public.nope does not exist"),
        (
            '[resources.x]\ntable = "public.users"\nkey = ["id"]\ncolumns = ["id", "shoe"]\n',
            "column 'shoe' does not exist",
        ),
        (
            '[resources.x]\ntable = "public.users"\nkey = ["email"]\ncolumns = ["id", "email"]\n',
            "key ['email'] is not a unique constraint",
        ),
    ],
)
def test_bad_resources_file_stops_startup(
    stack: Stack, tmp_path: Path, toml: str, message: str
) -> None:
    path = tmp_path / "resources.toml"
    path.write_text(toml)
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", "0"],
        env={**stack.env, "FERRY_RESOURCES_FILE": str(path)},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


async def test_logs_never_contain_keys(
    stack: Stack, client: httpx.AsyncClient, tenant: Tenant
) -> None:
    await client.get("/resources")
    await client.get(f"/resources?token={tenant.key}")
    logs = "".join(p.read_text(errors="replace") for p in stack.logs.glob("api-*.log"))
    assert "/resources" in logs
    assert tenant.key not in logs

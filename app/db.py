"""PostgreSQL: the connection pool and the migrations that `ferry migrate` applies."""

from importlib import resources as package_files
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import structlog

log = structlog.get_logger(__name__)

MIGRATIONS_LOCK = 0x46455252  # "FERR": one migrating process at a time


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(con: asyncpg.Connection) -> None:
    # orjson: every job row carries four jsonb columns, read and written on every submission.
    for name in ("jsonb", "json"):
        await con.set_type_codec(name, encoder=_json, decoder=orjson.loads, schema="pg_catalog")


async def _keep_session(con: asyncpg.Connection) -> None:
    """Release without asyncpg's default reset query (advisory unlock, CLOSE ALL, UNLISTEN,
    RESET ALL): a round trip on every release, a third of an API request's queries. Pooled
    connections never take session-level state: locks are transaction-scoped, nothing LISTENs
    or SETs a session variable. asyncpg still rolls back a transaction left open."""


async def create_pool(dsn: str, max_size: int) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=max_size, init=_init_connection, reset=_keep_session
    )
    return pool


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def ensure_database(dsn: str) -> None:
    """Create the database named in `dsn` when it does not exist yet."""
    try:
        con = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        name = urlsplit(dsn).path.lstrip("/")
        admin = await asyncpg.connect(_with_database(dsn, "postgres"))
        try:
            await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            # Another process created it first (concurrent `ferry migrate`).
            pass
        finally:
            await admin.close()
        log.info("database_created", database=name)
    else:
        await con.close()


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _migration_files() -> list[tuple[str, str]]:
    folder = package_files.files("app") / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


async def migrate(dsn: str) -> list[str]:
    """Apply pending migrations in order; returns the versions applied. Idempotent."""
    await ensure_database(dsn)
    con = await asyncpg.connect(dsn)
    applied: list[str] = []
    try:
        await con.execute("SELECT pg_advisory_lock($1)", MIGRATIONS_LOCK)
        await con.execute(
            "CREATE SCHEMA IF NOT EXISTS ferry;"
            "CREATE TABLE IF NOT EXISTS ferry.schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            r["version"] for r in await con.fetch("SELECT version FROM ferry.schema_migrations")
        }
        for version, sql in _migration_files():
            if version in done:
                continue
            async with con.transaction():
                await con.execute(sql)
                await con.execute(
                    "INSERT INTO ferry.schema_migrations (version) VALUES ($1)", version
                )
            applied.append(version)
            log.info("migration_applied", version=version)
    finally:
        await con.execute("SELECT pg_advisory_unlock($1)", MIGRATIONS_LOCK)
        await con.close()
    return applied


def record(row: asyncpg.Record | None) -> dict[str, Any] | None:
    return dict(row) if row is not None else None

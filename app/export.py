"""Exports: a query built from the allow-list, streamed by PostgreSQL's COPY into S3.

Read top to bottom: `build_query` turns a request into one SELECT (identifiers quoted from the
resource, values as parameters); `run` opens one REPEATABLE READ snapshot, streams `COPY (query)
TO STDOUT` through an optional gzip stream into a multipart upload, and finishes the job under
its lease. The object key holds the attempt's lease, so a retried attempt never overwrites or
half-writes another's object.
"""

import asyncio
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from app import jobstore
from app.errors import Invalid
from app.jobstore import Job
from app.resources import Column, Resource
from app.runner import JobRun
from app.schemas import ExportRequest, Filter, Op
from app.services import Services

CONTENT_TYPES = {"csv": "text/csv", "jsonl": "application/x-ndjson"}
GZIP_LEVEL = 1  # CSV compresses well even at level 1, and level 1 keeps up with COPY

_COMPARISONS = {Op.eq: "=", Op.ne: "<>", Op.lt: "<", Op.lte: "<=", Op.gt: ">", Op.gte: ">="}
# Text cells that a spreadsheet would evaluate as a formula (OWASP "CSV injection").
_FORMULA_START = r"'^[-=+@\t\r]'"


@dataclass(frozen=True)
class Query:
    sql: str
    args: tuple[Any, ...]
    params: tuple[str, ...]  # each argument as the typed expression the query uses


class _Params:
    def __init__(self) -> None:
        self.args: list[Any] = []
        self.exprs: list[str] = []

    def add(self, value: Any, cast: str) -> str:
        self.args.append(value)
        expr = f"${len(self.args)}::{cast}"
        self.exprs.append(expr)
        return expr


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _cast_type(column: Column) -> str:
    """The type a filter value is cast to: text for text columns (no varchar(n) truncation)."""
    return "text" if column.is_text else column.type


def _condition(column: Column, flt: Filter, params: _Params) -> str:
    col = column.sql
    if flt.op is Op.is_null:
        return f"{col} IS NULL" if flt.value else f"{col} IS NOT NULL"
    if flt.op in (Op.like, Op.ilike):
        pattern = params.add(_as_text(flt.value), "text")
        return f"{col}::text {flt.op.value.upper()} {pattern}"
    if flt.op in (Op.in_, Op.not_in):
        assert isinstance(flt.value, list)
        array = params.add([_as_text(v) for v in flt.value], f"text[]::{_cast_type(column)}[]")
        return f"{col} = ANY({array})" if flt.op is Op.in_ else f"NOT ({col} = ANY({array}))"
    value = params.add(_as_text(flt.value), f"text::{_cast_type(column)}")
    return f"{col} {_COMPARISONS[flt.op]} {value}"


def _select_item(column: Column, spreadsheet_safe: bool) -> str:
    if spreadsheet_safe and column.is_text:
        col = column.sql
        return f"CASE WHEN {col} ~ {_FORMULA_START} THEN '''' || {col} ELSE {col} END AS {col}"
    return column.sql


def build_query(resource: Resource, request: ExportRequest, tenant: str) -> Query:
    """The SELECT an export runs. Raises Invalid(unknown_column) for any name not allowed."""
    names = request.columns or [c.name for c in resource.columns]
    columns = [resource.column(n) for n in names]
    params = _Params()
    where = [_condition(resource.column(f.column), f, params) for f in request.filter]
    if resource.tenant_column is not None:
        where.insert(0, f"{resource.tenant_column.sql} = {params.add(tenant, 'text')}")

    order: list[str] = []
    for item in (request.order_by or []) + list(resource.key):
        descending = item.startswith("-")
        column = resource.column(item.removeprefix("-"))
        term = f"{column.sql} DESC" if descending else column.sql
        if not any(o.split(" ")[0] == column.sql for o in order):
            order.append(term)

    sql = "SELECT " + ", ".join(_select_item(c, request.spreadsheet_safe) for c in columns)
    sql += f" FROM {resource.sql}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY " + ", ".join(order)
    if request.format == "jsonl":
        # PostgreSQL writes the JSON: exact numbers past 2^53, RFC 3339 times, true booleans.
        sql = f"SELECT row_to_json(r)::text FROM ({sql}) r"
    return Query(sql, tuple(params.args), tuple(params.exprs))


async def check_values(con: asyncpg.Connection | asyncpg.Pool, query: Query) -> None:
    """Let PostgreSQL parse the filter values now, so a bad one is a 422, not a failed job."""
    if all(p.endswith("::text") and "[]" not in p for p in query.params) and not any(
        "\x00" in a for a in query.args
    ):
        return  # text without NUL is valid text: no round trip (the tenant alone, most often)
    try:
        await con.fetchrow("SELECT " + ", ".join(query.params), *query.args)
    except (asyncpg.DataError, asyncpg.InvalidTextRepresentationError) as e:
        raise Invalid(f"A filter value does not fit its column: {e}", code="invalid_value") from e


def copy_options(request: ExportRequest) -> dict[str, Any]:
    if request.format == "jsonl":
        # Each row is one JSON text with no raw newline; quote and delimiter bytes that JSON
        # never contains unescaped make CSV mode emit it verbatim (text mode would escape `\`).
        return {"format": "csv", "header": False, "quote": "\x01", "delimiter": "\x02"}
    return {"format": "csv", "header": request.header, "delimiter": request.delimiter}


class RowCounter:
    """Counts CSV records in COPY's output: newlines outside double quotes."""

    def __init__(self, header: bool) -> None:
        self.newlines = -1 if header else 0
        self._in_quotes = False

    def feed(self, chunk: bytes) -> None:
        if b'"' not in chunk and not self._in_quotes:
            self.newlines += chunk.count(b"\n")
            return
        segments = chunk.split(b'"')
        outside = 0 if not self._in_quotes else 1
        self.newlines += sum(s.count(b"\n") for s in segments[outside::2])
        if len(segments) % 2 == 0:
            self._in_quotes = not self._in_quotes

    @property
    def rows(self) -> int:
        return max(self.newlines, 0)


async def estimate_rows(con: asyncpg.Connection, query: Query) -> int | None:
    plan = await con.fetchval(f"EXPLAIN (FORMAT JSON) {query.sql}", *query.args)
    try:
        return int(plan[0]["Plan"]["Plan Rows"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def object_key(job: Job, lease: Any, request: ExportRequest) -> str:
    extension = "csv" if request.format == "csv" else "jsonl"
    if request.compression == "gzip":
        extension += ".gz"
    return f"exports/{job['tenant_id']}/{job['id']}/{lease}.{extension}"


async def run(run: JobRun) -> Job:
    services, job = run.services, run.job
    settings = services.settings
    request = ExportRequest.model_validate(job["params"])
    resource = services.resources.get(job["resource"], "export")
    query = build_query(resource, request, run.tenant)
    key = object_key(job, run.lease, request)
    counter = RowCounter(header=request.header and request.format == "csv")
    gzip = (
        zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31) if request.compression == "gzip" else None
    )
    raw_bytes = 0

    async with (
        services.pool.acquire() as con,
        con.transaction(isolation="repeatable_read", readonly=True),
    ):
        await jobstore.hold_attempt_lock(con, run.lease)
        await run.report(0, 0, total_rows=await estimate_rows(con, query), force=True)
        writer = services.storage.writer(
            key,
            settings.part_size_bytes,
            settings.parts_in_flight,
            CONTENT_TYPES[request.format],
        )
        async with writer:

            async def sink(chunk: bytes) -> None:
                nonlocal raw_bytes
                raw_bytes += len(chunk)
                counter.feed(chunk)
                await writer.write(gzip.compress(chunk) if gzip else chunk)
                await run.report(counter.rows, raw_bytes)

            status = await con.copy_from_query(
                query.sql, *query.args, output=sink, **copy_options(request)
            )
            if gzip is not None:
                await writer.write(gzip.flush())

    rows = int(status.split()[-1])
    finished = datetime.now(UTC)
    result = {
        "rows": rows,
        "bytes": writer.bytes_written,
        "format": request.format,
        "compression": request.compression,
    }
    try:
        return await run.finish(
            services.pool,
            "succeeded",
            result=result,
            progress=run.final_progress(rows, raw_bytes),
            result_key=key,
            expires_at=finished + timedelta(seconds=settings.result_ttl_seconds),
        )
    except BaseException:
        await asyncio.shield(_discard(services, job["id"], key))
        raise


async def _discard(services: Services, job_id: uuid.UUID, key: str) -> None:
    """Delete an attempt's object that no job points at. A finish whose answer was lost (a
    dropped connection, a cancel) may have committed all the same: the row says which."""
    try:
        job = await jobstore.get(services.pool, job_id)
    except Exception:
        return  # unknown: an orphaned object is better than a succeeded job without its file
    if job is None or job["result_key"] != key:
        await services.storage.delete(key)

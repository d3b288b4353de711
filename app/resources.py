"""Resources: the tables and views Ferry may move, checked against the live catalog.

Identifiers that reach SQL text come only from here: a request names columns, and they are
looked up in the allow-list and quoted; anything else is `unknown_column`.
"""

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from app.db import quote_ident
from app.errors import ConfigError, Invalid

OPERATIONS = ("export", "import")


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type(): "integer", "character varying(20)", "timestamp with time zone"
    base_type: str  # pg_type.typname of the column's type, or of its domain's base: "int4"
    nullable: bool
    has_default: bool
    is_text: bool

    @property
    def sql(self) -> str:
        return quote_ident(self.name)

    @property
    def required(self) -> bool:
        return not self.nullable and not self.has_default


@dataclass(frozen=True)
class Resource:
    name: str
    schema: str
    table: str
    key: tuple[str, ...]
    columns: tuple[Column, ...]
    operations: tuple[str, ...]
    tenant_column: Column | None = None
    conflict_columns: tuple[str, ...] = ()
    is_view: bool = False
    _by_name: dict[str, Column] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({c.name: c for c in self.columns})

    @property
    def sql(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    def column(self, name: str) -> Column:
        try:
            return self._by_name[name]
        except KeyError:
            raise Invalid(
                f"Resource {self.name!r} has no column {name!r}.", code="unknown_column"
            ) from None

    def allows(self, operation: str) -> bool:
        return operation in self.operations


class Registry:
    def __init__(self, resources: dict[str, Resource]) -> None:
        self._resources = resources

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._resources.values())

    def get(self, name: str, operation: str | None = None) -> Resource:
        resource = self._resources.get(name)
        if resource is None:
            raise Invalid(f"No resource named {name!r}.", code="unknown_resource")
        if operation is not None and not resource.allows(operation):
            raise Invalid(
                f"Resource {name!r} does not allow {operation}.", code="operation_not_allowed"
            )
        return resource


_CATALOG_COLUMNS = """
SELECT a.attname AS name,
       format_type(a.atttypid, a.atttypmod) AS type,
       coalesce(bt.typname, t.typname) AS base_type,
       coalesce(bt.typcategory, t.typcategory) = 'S' AS is_text,
       NOT a.attnotnull AS nullable,
       (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '') AS has_default
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_UNIQUE_INDEXES = """
SELECT array_agg(a.attname ORDER BY k.ord) AS columns
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
GROUP BY i.indexrelid
"""


def read_file(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"resources file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"resources file {path} is not valid TOML: {e}") from None
    resources = data.get("resources")
    if not isinstance(resources, dict) or not resources:
        raise ConfigError(f"resources file {path} declares no [resources.<name>] table")
    return resources


async def load(path: Path, con: asyncpg.Connection) -> Registry:
    """Read the resources file and check every declaration against PostgreSQL."""
    declared = read_file(path)
    return Registry({name: await _resolve(name, spec, con) for name, spec in declared.items()})


def _fail(name: str, message: str) -> ConfigError:
    return ConfigError(f"resource {name!r}: {message}")


async def _resolve(name: str, spec: dict[str, Any], con: asyncpg.Connection) -> Resource:
    table = spec.get("table")
    if not isinstance(table, str) or not table:
        raise _fail(name, "'table' is required")
    schema, _, relname = table.rpartition(".")
    schema = schema or "public"
    rel = await con.fetchrow(
        "SELECT c.oid, c.relkind::text AS relkind"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p', 'v', 'm')",
        schema,
        relname,
    )
    if rel is None:
        raise _fail(name, f"table {schema}.{relname} does not exist")
    is_view = rel["relkind"] in ("v", "m")
    catalog = {r["name"]: r for r in await con.fetch(_CATALOG_COLUMNS, rel["oid"])}

    def column(col: str) -> Column:
        if col not in catalog:
            raise _fail(name, f"column {col!r} does not exist in {schema}.{relname}")
        return Column(**dict(catalog[col]))

    tenant = column(spec["tenant_column"]) if spec.get("tenant_column") else None
    wanted = spec.get("columns") or [c for c in catalog if tenant is None or c != tenant.name]
    if tenant is not None and tenant.name in wanted:
        raise _fail(name, f"tenant column {tenant.name!r} cannot be in 'columns'")
    columns = tuple(column(c) for c in wanted)

    key = tuple(spec.get("key") or ())
    if not key:
        raise _fail(name, "'key' is required")
    for k in key:
        column(k)
        if k not in wanted:
            raise _fail(name, f"key column {k!r} must be one of 'columns'")

    operations = tuple(spec.get("operations") or (("export",) if is_view else OPERATIONS))
    for op in operations:
        if op not in OPERATIONS:
            raise _fail(name, f"unknown operation {op!r}")
    if is_view and "import" in operations:
        raise _fail(name, f"{schema}.{relname} is a view: it can only be exported")

    conflict: tuple[str, ...] = ()
    if not is_view:
        uniques = [tuple(r["columns"]) for r in await con.fetch(_UNIQUE_INDEXES, rel["oid"])]
        conflict = _conflict_target(key, tenant, uniques)
        if not conflict:
            raise _fail(name, f"key {list(key)} is not a unique constraint of {schema}.{relname}")
    return Resource(
        name=name,
        schema=schema,
        table=relname,
        key=key,
        columns=columns,
        operations=operations,
        tenant_column=tenant,
        conflict_columns=conflict,
        is_view=is_view,
    )


def _conflict_target(
    key: tuple[str, ...], tenant: Column | None, uniques: list[tuple[str, ...]]
) -> tuple[str, ...]:
    """The unique index an upsert targets: the key alone, or the key with the tenant column."""
    candidates = [set(key)]
    if tenant is not None:
        candidates.append({*key, tenant.name})
    for wanted in candidates:
        for unique in uniques:
            if set(unique) == wanted:
                return unique
    return ()

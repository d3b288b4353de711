"""`ferry` (also `python -m app`): migrate, keys create, seed-demo, dev."""

import argparse
import asyncio
import sys

import asyncpg

from app import auth, db
from app.config import get_settings

DEMO_TENANT = "demo"

DEMO_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS public.users (
    id          bigint PRIMARY KEY,
    tenant_id   text NOT NULL,
    first_name  text NOT NULL,
    last_name   text NOT NULL,
    age         integer CHECK (age >= 0),
    email       text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS users_tenant ON public.users (tenant_id, id);
"""


# Demo users with ids $1..$2 for tenant $3 (also used by the benchmarks).
SEED_ROWS = """
INSERT INTO public.users (id, tenant_id, first_name, last_name, age, email, created_at)
SELECT g, $3,
       (ARRAY['Ada','Grace','Alan','Edsger','Barbara','Donald','Frances',
              'Ken','Margaret','Niklaus'])[1 + g % 10],
       (ARRAY['Lovelace','Hopper','Turing','Dijkstra','Liskov','Knuth',
              'Allen','Thompson','Hamilton','Wirth'])[1 + (g / 10) % 10],
       CASE WHEN g % 17 = 0 THEN NULL ELSE 16 + g % 60 END,
       'user' || g || '@example.com',
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute'
FROM generate_series($1::bigint, $2::bigint) AS g
ON CONFLICT (id) DO NOTHING
"""


async def seed_demo(dsn: str, rows: int, tenant: str = DEMO_TENANT) -> None:
    """Create `public.users` and give tenant `demo` exactly `rows` rows (ids 1..rows)."""
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(DEMO_TABLE_SQL)
        async with con.transaction():
            await con.execute(
                "INSERT INTO ferry.tenants (id) VALUES ($1) ON CONFLICT DO NOTHING", tenant
            )
            await con.execute("DELETE FROM public.users WHERE tenant_id = $1", tenant)
            await con.execute(SEED_ROWS, 1, rows, tenant)
        await con.execute("ANALYZE public.users")
    finally:
        await con.close()


async def create_key(dsn: str, tenant: str) -> str:
    """A new API key for `tenant` (created if needed), over a connection of its own."""
    con = await asyncpg.connect(dsn)
    try:
        return await auth.create_key(con, tenant)
    finally:
        await con.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferry", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply database migrations (idempotent)")
    keys = commands.add_parser("keys", help="manage API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="create a key; prints it alone on stdout")
    create.add_argument("--tenant", required=True)
    seed = commands.add_parser("seed-demo", help="create and fill the demo users table")
    seed.add_argument("--rows", type=int, default=100_000)
    commands.add_parser("dev", help="run the whole local stack (S3 emulator, API, worker)")
    args = parser.parse_args(argv)

    settings = get_settings()
    dsn = settings.database_url
    try:
        if args.command == "migrate":
            applied = asyncio.run(db.migrate(dsn))
            print(
                f"migrations applied: {', '.join(applied) or 'none (up to date)'}", file=sys.stderr
            )
        elif args.command == "keys":
            print(asyncio.run(create_key(dsn, args.tenant)))
        elif args.command == "seed-demo":
            asyncio.run(seed_demo(dsn, args.rows))
            print(f"seeded {args.rows} users for tenant {DEMO_TENANT!r}", file=sys.stderr)
        elif args.command == "dev":
            from app import dev

            sys.exit(dev.run(settings))
    except (OSError, asyncpg.PostgresError) as e:
        sys.exit(f"ferry: cannot reach PostgreSQL at {_safe(dsn)}: {e}\n{POSTGRES_HELP}")


POSTGRES_HELP = (
    "Start PostgreSQL and point FERRY_DATABASE_URL at it: `docker compose up -d postgres`,"
    " or install your distribution's package (e.g. `apt-get install postgresql`)."
)


def _safe(dsn: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(dsn)
    host = parts.hostname or "localhost"
    return f"{parts.scheme}://{host}:{parts.port or 5432}{parts.path}"

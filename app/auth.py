"""API keys: created by `ferry keys create`, stored as SHA-256, looked up on every request."""

import hashlib
import secrets

import asyncpg

KEY_PREFIX = "fry_"


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def create_key(con: asyncpg.Connection, tenant: str) -> str:
    """Create the tenant if needed and a new key for it; returns the key (shown once)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    async with con.transaction():
        await con.execute(
            "INSERT INTO ferry.tenants (id) VALUES ($1) ON CONFLICT DO NOTHING", tenant
        )
        await con.execute(
            "INSERT INTO ferry.api_keys (key_hash, tenant_id, prefix) VALUES ($1, $2, $3)",
            hash_key(key),
            tenant,
            key[:8],
        )
    return key


async def tenant_for_key(pool: asyncpg.Pool, key: str) -> str | None:
    """The tenant owning `key`, or None. The lookup is by hash, so it leaks no key timing."""
    tenant: str | None = await pool.fetchval(
        "SELECT tenant_id FROM ferry.api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        hash_key(key),
    )
    return tenant


def bearer_token(authorization: str | None) -> str | None:
    """The key in `Bearer <key>`; a malformed header counts as missing."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token

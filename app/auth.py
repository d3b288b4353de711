"""API keys: created by `ferry keys create`, stored as SHA-256, looked up on every request."""

import hashlib
import secrets

import asyncpg
from cachetools import TTLCache

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


async def tenant_for_hash(pool: asyncpg.Pool, digest: bytes) -> str | None:
    """The tenant owning the key with this digest, or None. The lookup is by hash, so it leaks
    no key timing."""
    tenant: str | None = await pool.fetchval(
        "SELECT tenant_id FROM ferry.api_keys WHERE key_hash = $1 AND revoked_at IS NULL", digest
    )
    return tenant


class KeyLookup:
    """A key's tenant, remembered for `ttl` seconds (0: never): the lookup is a round trip on
    every request otherwise. A revoked key therefore stops working within `ttl`. Unknown keys
    are never remembered, so a new key works at once."""

    def __init__(self, pool: asyncpg.Pool, ttl: float, max_keys: int = 10_000) -> None:
        self.pool = pool
        self._tenants: TTLCache[bytes, str] | None = TTLCache(max_keys, ttl) if ttl > 0 else None

    async def tenant(self, key: str) -> str | None:
        digest = hash_key(key)
        tenant = self._tenants.get(digest) if self._tenants is not None else None
        if tenant is None:
            tenant = await tenant_for_hash(self.pool, digest)
            if tenant is not None and self._tenants is not None:
                self._tenants[digest] = tenant
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

CREATE TABLE ferry.tenants (
    id          text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Only the SHA-256 of a key is stored; `prefix` lets an operator recognise a key.
CREATE TABLE ferry.api_keys (
    key_hash    bytea PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES ferry.tenants (id),
    prefix      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE ferry.jobs (
    id               uuid PRIMARY KEY,
    tenant_id        text NOT NULL REFERENCES ferry.tenants (id),
    kind             text NOT NULL CHECK (kind IN ('export', 'import')),
    status           text NOT NULL CHECK (status IN
                        ('awaiting_upload', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
    resource         text NOT NULL,
    params           jsonb NOT NULL,
    progress         jsonb NOT NULL DEFAULT
                        '{"rows": 0, "bytes": 0, "total_rows": null, "percent": null}',
    result           jsonb,
    error            jsonb,
    attempts         integer NOT NULL DEFAULT 0,
    run_at           timestamptz,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at       timestamptz,
    finished_at      timestamptz,
    -- Lease with a fencing token: a worker writes only while `lease` is the one it claimed.
    lease            uuid,
    heartbeat_at     timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    -- Sequence of published events: a snapshot at seq N is followed only by events > N.
    seq              bigint NOT NULL DEFAULT 0,
    -- Where an import's file is (or will be) uploaded; an export's result object.
    upload_key       text,
    -- The arq id of the job's latest queue message (the reconciler checks it still exists).
    queue_id         text,
    result_key       text,
    expires_at       timestamptz,
    idempotency_key  text,
    request_hash     text,
    idempotency_expires_at timestamptz,
    response_status  integer
);

CREATE INDEX jobs_tenant_created ON ferry.jobs (tenant_id, created_at DESC, id DESC);
CREATE INDEX jobs_active ON ferry.jobs (status, tenant_id) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_expiring ON ferry.jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE UNIQUE INDEX jobs_idempotency ON ferry.jobs (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

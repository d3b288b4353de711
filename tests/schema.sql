-- Tables the suite's resources.toml declares, beyond the demo `users` (created by seed-demo).
CREATE VIEW public.adult_users AS
    SELECT id, tenant_id, first_name, age FROM public.users WHERE age >= 18;

CREATE TABLE public.awkward (
    id          bigint PRIMARY KEY,
    tenant_id   text NOT NULL,
    label       text,
    amount      numeric(12, 2),
    ratio       double precision,
    active      boolean,
    born        date,
    seen_at     timestamptz,
    ref         uuid,
    doc         jsonb,
    code        varchar(8),
    big         bigint
);

-- Imports: a key unique per tenant (the unique index includes the tenant column).
CREATE TABLE public.scoped_items (
    tenant_id   text NOT NULL,
    code        text NOT NULL,
    qty         integer NOT NULL DEFAULT 0 CHECK (qty >= 0),
    PRIMARY KEY (tenant_id, code)
);

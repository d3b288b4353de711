-- Admission (ferry.admission) runs on every submission; two fixes to its plans.
--
-- 1. Every submission counts its tenant's queued and running jobs. jobs_active leads with
--    status, so that count walked the active jobs of every tenant (up to FERRY_MAX_QUEUED_JOBS
--    index entries, each a heap visit while the row is new) to find the tenant's. Led by the
--    tenant, it reads at most FERRY_MAX_ACTIVE_JOBS_PER_TENANT entries. jobs_active stays for
--    the queue-wide lookups by status (the queue count, the reconciler).
CREATE INDEX jobs_tenant_active ON ferry.jobs (tenant_id) WHERE status IN ('queued', 'running');

-- 2. PL/pgSQL keeps one generic plan per connection for the function's counts, made when the
--    connection first called it 6 times. Made while ferry.jobs was small (a new install, or
--    just after a large purge), that plan is a sequential scan, and it stays one as the table
--    grows until the next ANALYZE: each submission then read the whole table (measured: 1.3 ms
--    of PostgreSQL CPU per submission at 6,000 rows, against 0.1 ms by the index). Both counts
--    have an index that bounds them, so the scan is never the right plan here.
ALTER FUNCTION ferry.admission(text, integer, integer) SET enable_seqscan = off;

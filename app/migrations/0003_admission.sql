-- Admission of a submission in the same statement as its INSERT (one round trip, see
-- jobstore.create_within_limits): serialize the tenant's submissions with a lock held until the
-- caller's transaction ends, then count. A VOLATILE function's queries each take a fresh
-- snapshot, so a submission that committed while this one waited for the lock is counted.
-- A NULL p_max_queued skips the count of all queued jobs (the API knows the queue is far from
-- full) and returns queued = NULL.
CREATE FUNCTION ferry.admission(p_tenant text, p_max_queued integer, p_max_active integer)
RETURNS TABLE (queued integer, tenant_active integer)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('ferry.submit:' || p_tenant));
    IF p_max_queued IS NOT NULL THEN
        SELECT count(*) INTO queued
        FROM (SELECT 1 FROM ferry.jobs j WHERE j.status = 'queued' LIMIT p_max_queued) q;
    END IF;
    SELECT count(*) INTO tenant_active
    FROM (SELECT 1 FROM ferry.jobs j
          WHERE j.status IN ('queued', 'running') AND j.tenant_id = p_tenant
          LIMIT p_max_active) t;
    RETURN NEXT;
END
$$;

-- Set once the reconciler has deleted a finished job's objects (result, upload, error report).
ALTER TABLE ferry.jobs ADD COLUMN objects_deleted boolean NOT NULL DEFAULT false;

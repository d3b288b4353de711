"""Settings: every `FERRY_` environment variable in one place."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="ignore")

    database_url: str = "postgresql://localhost/ferry"
    redis_url: str = "redis://localhost:6379/0"
    s3_endpoint_url: str | None = None
    # Host that clients use to reach S3 when it differs from the service's (presigned URLs).
    s3_public_endpoint_url: str | None = None
    s3_bucket: str = "ferry"
    s3_region: str = "us-east-1"
    resources_file: Path = Path("resources.toml")

    max_queued_jobs: int = Field(1000, ge=1)
    max_active_jobs_per_tenant: int = Field(20, ge=1)
    max_upload_bytes: int = Field(5 * GiB, ge=1)
    job_max_attempts: int = Field(5, ge=1)
    worker_concurrency: int = Field(8, ge=1)
    result_ttl_seconds: int = Field(604800, ge=1)
    presign_ttl_seconds: int = Field(3600, ge=1, le=604800)
    reconcile_interval_seconds: float = Field(30, gt=0)
    heartbeat_timeout_seconds: float = Field(60, gt=0)

    # Not in the contract; tuning knobs with safe defaults.
    # Also how soon a running job notices a cancel (SPEC: within 2 s).
    heartbeat_interval_seconds: float = Field(1, gt=0)
    progress_interval_seconds: float = Field(1, gt=0)
    part_size_bytes: int = Field(8 * MiB, ge=5 * MiB)
    parts_in_flight: int = Field(4, ge=1)
    db_pool_max_size: int = Field(20, ge=2)
    # How long the API remembers an API key's tenant; a revoked key works for at most this long.
    auth_cache_seconds: float = Field(5, ge=0)
    shutdown_grace_seconds: float = Field(20, ge=0)
    # When set, a worker serves its Prometheus metrics (jobs, durations, rows, bytes) here.
    worker_metrics_port: int | None = Field(None, ge=1, le=65535)
    log_level: str = "INFO"
    log_json: bool | None = None  # default: JSON when stderr is not a terminal


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""Ferry: bulk data between PostgreSQL and S3 as background jobs."""

__version__ = "0.1.0"

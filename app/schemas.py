"""Request and response models: the API's JSON shapes, with examples for /docs."""

import codecs
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    StrictBool,
    field_validator,
    model_validator,
)

from app import csvio

Kind = Literal["export", "import"]
Status = Literal["awaiting_upload", "queued", "running", "succeeded", "failed", "cancelled"]


class Op(StrEnum):
    eq = "eq"
    ne = "ne"
    lt = "lt"
    lte = "lte"
    gt = "gt"
    gte = "gte"
    in_ = "in"
    not_in = "not_in"
    like = "like"
    ilike = "ilike"
    is_null = "is_null"


# Finite only: JSON has no Infinity or NaN (Python's parser takes them), and PostgreSQL's jsonb,
# where the normalized request is kept, refuses them.
Scalar = str | int | FiniteFloat | bool


class Filter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    column: str = Field(max_length=63)
    op: Op
    value: Scalar | list[Scalar] | None = None

    @model_validator(mode="after")
    def _value_fits_op(self) -> "Filter":
        if self.op in (Op.in_, Op.not_in):
            if not isinstance(self.value, list) or not self.value:
                raise ValueError(f"'{self.op.value}' takes a non-empty JSON array")
            if len(self.value) > 10_000:
                raise ValueError("at most 10000 values")
        elif self.op is Op.is_null:
            if not isinstance(self.value, bool):
                raise ValueError("'is_null' takes true (IS NULL) or false (IS NOT NULL)")
        elif self.value is None or isinstance(self.value, list):
            raise ValueError(f"'{self.op.value}' takes one value (use is_null for NULL)")
        return self


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")
_UNSAFE_FILENAME = re.compile(r"[/\\\x00-\x1f\x7f]|%2f|%5c|%00", re.IGNORECASE)


def _check_delimiter(value: str) -> str:
    if len(value) != 1 or value in '"\r\n' or (not value.isprintable() and value != "\t"):
        raise ValueError("one printable character other than a quote or newline, or a tab")
    return value


class ExportRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "resource": "users",
                    "columns": ["id", "email", "age"],
                    "filter": [{"column": "age", "op": "gte", "value": 18}],
                    "order_by": ["id"],
                    "format": "csv",
                    "compression": "none",
                    "filename": "adults.csv",
                }
            ]
        },
    )

    resource: str = Field(max_length=63, description="A resource from `GET /resources`.")
    columns: list[str] | None = Field(
        None, min_length=1, max_length=1600, description="Default: every column, in order."
    )
    filter: list[Filter] = Field(default_factory=list, max_length=100)
    order_by: list[str] | None = Field(
        None, max_length=32, description="Columns; prefix one with `-` to sort it descending."
    )
    format: Literal["csv", "jsonl"] = "csv"
    compression: Literal["none", "gzip"] = "none"
    delimiter: str = ","
    header: StrictBool = True
    spreadsheet_safe: StrictBool = Field(
        False, description="Prefix text cells starting with = + - @ TAB CR with `'`."
    )
    filename: str | None = Field(None, min_length=1, max_length=255)
    run_at: datetime | None = Field(None, description="Do not start before this time.")

    _delimiter = field_validator("delimiter")(_check_delimiter)

    @field_validator("columns")
    @classmethod
    def _unique_columns(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("columns must not repeat")
        return value

    @field_validator("filename")
    @classmethod
    def _plain_filename(cls, value: str | None) -> str | None:
        if value is not None and (_UNSAFE_FILENAME.search(value) or value in (".", "..")):
            raise ValueError("a plain file name: no path separators or control characters")
        return value

    @field_validator("run_at", mode="before")
    @classmethod
    def _rfc3339(cls, value: Any) -> Any:
        """Only an RFC 3339 string (or a datetime, when re-read by the worker): pydantic alone
        would also take a number of seconds, which the OpenAPI does not promise."""
        if value is None or isinstance(value, datetime):
            return value
        if not isinstance(value, str) or not _RFC3339.match(value):
            raise ValueError("an RFC 3339 date-time string, such as 2026-01-31T09:00:00Z")
        return value

    @field_validator("run_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class ImportParams(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"resource": "users", "mode": "upsert"}]},
    )

    resource: str = Field(max_length=63)
    mode: Literal["insert", "upsert", "replace"] = "insert"
    on_error: Literal["abort", "skip"] = "abort"
    max_errors: int | None = Field(None, ge=0)
    dry_run: bool = False
    delimiter: str = ","
    encoding: str = "utf-8"

    _delimiter = field_validator("delimiter")(_check_delimiter)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            if not csvio.is_text_encoding(value):
                raise ValueError(f"{value!r} is not a text encoding")
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}") from None
        return codecs.lookup(value).name


class Progress(BaseModel):
    rows: int = 0
    bytes: int = 0
    total_rows: int | None = None
    percent: float | None = None


class JobError(BaseModel):
    code: str
    message: str


class Links(BaseModel):
    self: str
    events: str
    download: str | None = None


class JobOut(BaseModel):
    id: str
    kind: Kind
    status: Status
    resource: str
    params: dict[str, Any]
    progress: Progress
    result: dict[str, Any] | None = None
    error: JobError | None = None
    attempts: int
    run_at: datetime | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    links: Links
    upload_url: str | None = Field(None, description="Only on `POST /imports` (JSON).")
    upload_expires_at: datetime | None = None


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class ColumnOut(BaseModel):
    name: str
    type: str
    nullable: bool


class ResourceOut(BaseModel):
    name: str
    columns: list[ColumnOut]
    key: list[str]
    operations: list[str]


class ResourceList(BaseModel):
    items: list[ResourceOut]


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def job_out(job: dict[str, Any]) -> dict[str, Any]:
    """The public job object of SPEC §3 (internal columns left out)."""
    job_id = str(job["id"])
    links = {"self": f"/jobs/{job_id}", "events": f"/ws/jobs/{job_id}"}
    if job["kind"] == "export":
        links["download"] = f"/exports/{job_id}/download"
    return {
        "id": job_id,
        "kind": job["kind"],
        "status": job["status"],
        "resource": job["resource"],
        "params": job["params"],
        "progress": job["progress"],
        "result": job["result"],
        "error": job["error"],
        "attempts": job["attempts"],
        "run_at": _time(job["run_at"]),
        "created_at": _time(job["created_at"]),
        "started_at": _time(job["started_at"]),
        "finished_at": _time(job["finished_at"]),
        "links": links,
    }

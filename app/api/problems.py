"""The one place where errors become `application/problem+json` (RFC 9457)."""

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.errors import FerryError

log = structlog.get_logger(__name__)

PROBLEM = "application/problem+json"

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "upload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
}


def problem(
    status: int,
    title: str,
    detail: str,
    code: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"type": "about:blank", "status": status, "title": title, "detail": detail, "code": code}
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM)


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


async def _ferry_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FerryError)
    return problem(exc.status, exc.title, exc.detail, exc.code, exc.headers, **exc.extra)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field(tuple(e.get("loc", ()))), "message": e.get("msg", ""), "type": e["type"]}
        for e in exc.errors()
    ] or [{"field": "body", "message": "invalid request", "type": "value_error"}]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return problem(422, "Unprocessable Content", detail, "validation_error", errors=errors)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    title = _title(status)
    detail = exc.detail if isinstance(exc.detail, str) else title
    headers = dict(exc.headers) if exc.headers else None
    return problem(status, title, detail, _CODES.get(status, "error"), headers)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled_error", exc_info=exc)
    return problem(500, "Internal Server Error", "An unexpected error occurred.", "internal_error")


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def install(app: FastAPI) -> None:
    app.add_exception_handler(FerryError, _ferry_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)

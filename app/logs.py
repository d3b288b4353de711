"""Structured logs (structlog): JSON when not on a terminal; request, tenant and job ids bound
through context variables; secrets scrubbed from anything that looks like a URL or header."""

import logging
import re
import sys
from typing import Any

import orjson
import structlog

_SECRET = re.compile(r"((?:[?&]token=)|(?:Bearer\s+)|(?:X-Amz-Signature=))[^&\s\"']+", re.I)


def scrub(text: str) -> str:
    # search() first: on a string with no secret (nearly every one) it is ~5x cheaper than
    # sub(), which expands its template on every call; this runs on every value of every log
    # line, the access line included.
    if _SECRET.search(text) is None:
        return text
    return _SECRET.sub(r"\1[redacted]", text)


def _scrub_event(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = scrub(value)
    return event


class ScrubFilter(logging.Filter):
    """Removes `?token=` and bearer keys from stdlib records (uvicorn's access log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.args = tuple(scrub(a) if isinstance(a, str) else a for a in args)
        if isinstance(record.msg, str):
            record.msg = scrub(record.msg)
        return True


def _to_str(_: Any, __: str, line: Any) -> str:
    return line.decode() if isinstance(line, bytes) else line


def _to_bytes(_: Any, __: str, line: Any) -> bytes:
    return line.encode() if isinstance(line, str) else line


def configure(level: str = "INFO", json: bool | None = None) -> None:
    """Ferry's own events go straight from structlog to stderr (no `logging` record, handler or
    formatter on the way: the access line is written on every request); other libraries' stdlib
    records are rendered the same way through `logging`."""
    if json is None:
        json = not sys.stderr.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _scrub_event,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=orjson.dumps)
        if json
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer, _to_bytes],
        logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
            _to_str,
        ],
    )
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    handler.addFilter(ScrubFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "arq"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.addFilter(ScrubFilter())
    # app.middleware writes one access line per request, with its request id, tenant and time;
    # uvicorn's own line would be a second one (uvicorn skips it when this logger has nowhere
    # to go).
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False
    for noisy in ("botocore", "aiobotocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

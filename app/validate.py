"""Checking one CSV value against its column's PostgreSQL type, without a round trip.

A checker answers None (PostgreSQL accepts the text), a message (PostgreSQL rejects it), or
UNSURE: the text is outside the common forms checked here (e.g. `Jan 5 2024` for a date, an
enum, an interval), and the importer asks PostgreSQL itself. A checker never says "valid" for a
text PostgreSQL would refuse.
"""

import json
import re
import uuid
from collections.abc import Callable
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Final

from app.resources import Column


class _Unsure:
    def __repr__(self) -> str:
        return "UNSURE"


UNSURE: Final = _Unsure()
Verdict = str | None | _Unsure
Checker = Callable[[str], Verdict]

_INTEGER = re.compile(r"\s*[+-]?\d+\s*\Z")
_DECIMAL = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*\Z")
_ISO_DATE = re.compile(r"\s*\d{4}-\d{2}-\d{2}\s*\Z")
_ISO_TIMESTAMP = re.compile(
    r"\s*\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?(Z|[+-]\d{2}(:?\d{2})?)?\s*\Z"
)
_UUID = re.compile(r"[0-9a-fA-F]{8}(-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}\Z")
_TYPMOD = re.compile(r"\((\d+)(?:,\s*(\d+))?\)")
_INT_RANGE = {"int2": 2**15, "int4": 2**31, "int8": 2**63}
_INT_NAME = {"int2": "smallint", "int4": "integer", "int8": "bigint"}
_FLOAT4_MAX = 3.4028235e38
_BOOL_WORDS = ("true", "false", "yes", "no", "on", "off", "1", "0")


def _typmod(column: Column) -> tuple[int | None, int | None]:
    match = _TYPMOD.search(column.type)
    if match is None:
        return None, None
    return int(match.group(1)), int(match.group(2)) if match.group(2) is not None else 0


def _integer(base: str) -> Checker:
    low, high = -_INT_RANGE[base], _INT_RANGE[base] - 1
    name = _INT_NAME[base]

    def check(text: str) -> Verdict:
        if _INTEGER.match(text) is None:
            return f'invalid input syntax for type {name}: "{text}"'
        if not low <= int(text) <= high:
            return f'value "{text}" is out of range for type {name}'
        return None

    return check


def _numeric(column: Column) -> Checker:
    precision, scale = _typmod(column)

    def check(text: str) -> Verdict:
        if _DECIMAL.match(text) is None:
            if text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
                return UNSURE
            return f'invalid input syntax for type numeric: "{text}"'
        if precision is None:
            return None
        try:
            value = Decimal(text.strip()).quantize(Decimal(1).scaleb(-(scale or 0)), ROUND_HALF_UP)
        except InvalidOperation:
            return UNSURE
        if abs(value) >= Decimal(10) ** (precision - (scale or 0)):
            return (
                f"numeric field overflow: a numeric({precision},{scale}) must round to an "
                f"absolute value less than 10^{precision - (scale or 0)}"
            )
        return None

    return check


def _float(base: str) -> Checker:
    limit = _FLOAT4_MAX if base == "float4" else float("inf")

    def check(text: str) -> Verdict:
        if _DECIMAL.match(text) is None:
            return UNSURE  # PostgreSQL (strtod) takes more: NaN, Infinity, hex such as 0x10
        value = float(text)
        if abs(value) >= limit or (value == 0 and any(c in "123456789" for c in text)):
            return UNSURE  # overflow or underflow: PostgreSQL's own rules decide
        return None

    return check


def _boolean(text: str) -> Verdict:
    word = text.strip().lower()
    if word and word != "o" and any(w.startswith(word) for w in _BOOL_WORDS):
        return None
    return f'invalid input syntax for type boolean: "{text}"'


def _date(text: str) -> Verdict:
    if _ISO_DATE.match(text) is None:
        return UNSURE
    try:
        date.fromisoformat(text.strip())
    except ValueError:
        return f'date/time field value out of range: "{text}"'
    return None


def _timestamp(text: str) -> Verdict:
    if _ISO_TIMESTAMP.match(text) is None:
        return UNSURE
    try:
        datetime.fromisoformat(text.strip())
    except ValueError:
        return UNSURE
    return None


def _uuid(text: str) -> Verdict:
    if _UUID.match(text) is None:
        return UNSURE
    uuid.UUID(text)
    return None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json(text: str) -> Verdict:
    if "\\u0000" in text:
        return UNSURE
    try:
        json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        return f"invalid input syntax for type json: {e}"
    except RecursionError:  # nested deeper than Python's parser goes; PostgreSQL's goes further
        return UNSURE
    return None


def _text(column: Column) -> Checker | None:
    length, _ = _typmod(column)
    if length is None or column.base_type not in ("varchar", "bpchar"):
        return None
    name = column.type

    def check(text: str) -> Verdict:
        if len(text) > length and len(text.rstrip(" ")) > length:
            return f"value too long for type {name}"
        return None

    return check


def _unsure(_: str) -> Verdict:
    return UNSURE


def checker(column: Column) -> Checker | None:
    """How to check a value of `column`; None when every text is accepted (text)."""
    base = column.base_type
    if base in _INT_RANGE:
        return _integer(base)
    if base == "numeric":
        return _numeric(column)
    if base in ("float4", "float8"):
        return _float(base)
    simple: dict[str, Checker] = {
        "bool": _boolean,
        "date": _date,
        "timestamp": _timestamp,
        "timestamptz": _timestamp,
        "uuid": _uuid,
        "json": _json,
        "jsonb": _json,
    }
    if base in simple:
        return simple[base]
    if column.is_text:
        return _text(column)
    return _unsure

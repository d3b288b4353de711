"""Reading an uploaded CSV as a stream: bytes -> (gunzip, capped) -> text -> records.

Every stage holds at most one chunk (plus one unfinished record), so memory does not grow with
the file. The record splitter follows PostgreSQL's CSV rules, which Python's `csv` module cannot:
an unquoted empty field is NULL (None), a quoted `""` is the empty string, and a `"` anywhere in
a field opens a quoted section. Each record carries the file line it starts on (header = line 1).
"""

import codecs
import zlib
from collections.abc import AsyncIterator, Iterator

from app.errors import JobFailure

GZIP_MAGIC = b"\x1f\x8b"
INFLATE_CHUNK = 256 * 1024
MAX_RECORD_CHARS = 64 * 1024 * 1024  # bounds memory when a quote is never closed

Fields = list[str | None]


def too_large(limit: int) -> JobFailure:
    return JobFailure(
        "upload_too_large", f"The file is larger than {limit} bytes once decompressed."
    )


class Gunzip:
    """Decompress gzip (several members too) in bounded pieces, counting the output."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            try:
                out = self._inflater.decompress(data, INFLATE_CHUNK)
            except zlib.error as e:
                raise JobFailure("malformed_csv", f"The gzip stream is corrupt: {e}") from None
            self.total += len(out)
            if self.total > self.limit:
                raise too_large(self.limit)
            if out:
                yield out
            if self._inflater.eof:
                data = self._inflater.unused_data
                if data:  # another gzip member follows
                    self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                data = self._inflater.unconsumed_tail

    def close(self) -> None:
        if not self._inflater.eof:
            raise JobFailure("malformed_csv", "The gzip stream is truncated.")


async def plain_bytes(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The file's bytes, gunzipped when it starts with the gzip magic, capped at `limit`."""
    head = b""
    async for chunk in chunks:
        head += chunk
        if len(head) >= len(GZIP_MAGIC):
            break
    if not head.startswith(GZIP_MAGIC):
        total = len(head)
        if total > limit:
            raise too_large(limit)
        if head:
            yield head
        async for chunk in chunks:
            total += len(chunk)
            if total > limit:
                raise too_large(limit)
            yield chunk
        return
    gunzip = Gunzip(limit)
    for out in gunzip.feed(head):
        yield out
    async for chunk in chunks:
        for out in gunzip.feed(chunk):
            yield out
    gunzip.close()


def is_text_encoding(encoding: str) -> bool:
    """Whether a codec decodes bytes to text: not rot13, hex, base64, zlib (as `str.encode`
    refuses them). Raises LookupError for an unknown name."""
    return bool(codecs.lookup(encoding)._is_text_encoding)


async def decoded(chunks: AsyncIterator[bytes], encoding: str) -> AsyncIterator[str]:
    """Text in `encoding` (strict), without a leading byte order mark."""
    if not is_text_encoding(encoding):  # e.g. a job queued before the API refused such codecs
        raise JobFailure("invalid_encoding", f"{encoding!r} is not a text encoding.")
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    offset = 0
    first = True
    final = False
    while not final:
        chunk = await anext(chunks, None)
        final = chunk is None
        data = b"" if chunk is None else chunk
        try:
            text = decoder.decode(data, final=final)
        except UnicodeDecodeError as e:
            raise JobFailure(
                "invalid_encoding",
                f"The file is not valid {encoding}: {e.reason} near byte {offset + e.start}.",
            ) from None
        offset += len(data)
        if first and text:
            first = False
            text = text.removeprefix("\ufeff")
        if text:
            yield text


class Records:
    """Cuts text into CSV records, each with the file line it starts on.

    A physical line ends a record when the record holds an even number of quotes so far (every
    quote, escaped `""` included, toggles PostgreSQL's quoted state). Blank lines are skipped.
    """

    def __init__(self, delimiter: str, max_chars: int = MAX_RECORD_CHARS) -> None:
        self.delimiter = delimiter
        self.max_chars = max_chars
        self.lines = 0  # physical lines completed so far
        self._pending: list[str] = []  # the unfinished physical line
        self._pending_chars = 0
        self._open: list[str] = []  # physical lines of a record inside quotes
        self._open_chars = 0
        self._open_line = 0
        self._quotes = 0

    def feed(self, text: str) -> Iterator[tuple[int, str]]:
        """Raw records (without their line end) completed by this text."""
        self._pending.append(text)
        self._pending_chars += len(text)
        if "\n" not in text:
            self._check_size(self._pending_chars)
            return
        lines = "".join(self._pending).split("\n")
        last = lines.pop()
        self._pending, self._pending_chars = [last], len(last)
        for line in lines:
            yield from self._line(line)

    def _check_size(self, chars: int) -> None:
        if self._open_chars + chars > self.max_chars:
            start = self._open_line if self._open else self.lines + 1
            raise JobFailure(
                "malformed_csv",
                f"The record at line {start} is longer than {self.max_chars} characters"
                " (a quote never closed?).",
            )

    def close(self) -> Iterator[tuple[int, str]]:
        last = "".join(self._pending)
        self._pending = []
        if last:
            yield from self._line(last)
        if self._open:
            raise JobFailure(
                "malformed_csv",
                f"The quoted field of the record at line {self._open_line} is never closed.",
            )

    def _line(self, line: str) -> Iterator[tuple[int, str]]:
        self.lines += 1
        quotes = line.count('"')
        if not self._open:
            if quotes % 2 == 0:
                record = line[:-1] if line.endswith("\r") else line
                if record:
                    yield self.lines, record
                return
            self._open, self._open_line, self._quotes = [line], self.lines, quotes
            self._open_chars = len(line)
            return
        self._open.append(line)
        self._open_chars += len(line) + 1
        self._check_size(0)
        self._quotes += quotes
        if self._quotes % 2 == 0:
            record = "\n".join(self._open)
            self._open, self._open_chars = [], 0
            yield self._open_line, record[:-1] if record.endswith("\r") else record


def split(record: str, delimiter: str) -> Fields:
    """The fields of one record: None for an unquoted empty field (NULL)."""
    if '"' not in record:
        return [field or None for field in record.split(delimiter)]
    fields: Fields = []
    i, n = 0, len(record)
    while True:
        parts: list[str] = []
        quoted = False
        while True:
            if i < n and record[i] == '"':
                quoted = True
                i += 1
                while True:
                    k = record.find('"', i)
                    if k < 0:
                        raise JobFailure("malformed_csv", "A quoted field is never closed.")
                    parts.append(record[i:k])
                    if k + 1 < n and record[k + 1] == '"':
                        parts.append('"')
                        i = k + 2
                        continue
                    i = k + 1
                    break
                if i >= n or record[i] == delimiter:
                    break
            else:
                end = record.find(delimiter, i)
                quote = record.find('"', i)
                if quote != -1 and (end == -1 or quote < end):
                    parts.append(record[i:quote])
                    i = quote
                    continue
                end = n if end == -1 else end
                parts.append(record[i:end])
                i = end
                break
        value = "".join(parts)
        fields.append(value if value or quoted else None)
        if i >= n:
            return fields
        i += 1  # the delimiter


async def records(
    text: AsyncIterator[str], delimiter: str
) -> AsyncIterator[list[tuple[int, Fields]]]:
    """Batches of (line, fields), one batch per text chunk."""
    splitter = Records(delimiter)
    async for chunk in text:
        batch = [(line, split(raw, delimiter)) for line, raw in splitter.feed(chunk)]
        if batch:
            yield batch
    batch = [(line, split(raw, delimiter)) for line, raw in splitter.close()]
    if batch:
        yield batch

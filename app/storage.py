"""S3: one client per process, a multipart writer with bounded parts in flight, presigning.

The writer is written by hand on purpose: `upload_fileobj` buffers up to hundreds of MiB and
does not abort its multipart upload when the task is cancelled (FIELD-NOTES).
"""

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aioboto3
import structlog
from botocore.config import Config

from app.config import Settings

log = structlog.get_logger(__name__)

MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_SIZE = 5 * 1024 * 1024 * 1024
# S3 takes at most 10,000 parts per upload. The part size doubles every 1,000 parts, so that
# 8 MiB parts reach about 8 TiB (S3's objects stop at 5 TiB) instead of failing at 78 GiB.
PARTS_PER_SIZE = 1000
READ_CHUNK = 512 * 1024


def _config() -> Config:
    return Config(
        signature_version="s3v4",
        # No SHA-256 of every body on the event loop (botocore signs S3 bodies whenever no
        # checksum header is sent, which is always with checksums `when_required`, https too):
        # UNSIGNED-PAYLOAD, as the AWS CLI streams. TLS protects the bytes in transit.
        s3={"addressing_style": "path", "payload_signing_enabled": False},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=50,
    )


@dataclass
class Storage:
    """The S3 client (and the one that signs URLs for clients) bound to the bucket."""

    client: Any
    presigner: Any
    bucket: str

    @classmethod
    async def open(cls, settings: Settings, stack: AsyncExitStack) -> "Storage":
        session = aioboto3.Session()
        options = {"region_name": settings.s3_region, "config": _config()}
        client = await stack.enter_async_context(
            session.client("s3", endpoint_url=settings.s3_endpoint_url, **options)
        )
        presigner = client
        if settings.s3_public_endpoint_url:
            presigner = await stack.enter_async_context(
                session.client("s3", endpoint_url=settings.s3_public_endpoint_url, **options)
            )
        return cls(client=client, presigner=presigner, bucket=settings.s3_bucket)

    async def ensure_bucket(self) -> None:
        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except self.client.exceptions.ClientError:
            await self.client.create_bucket(Bucket=self.bucket)

    async def ping(self) -> None:
        await self.client.head_bucket(Bucket=self.bucket)

    async def presign_get(self, key: str, expires_in: int, filename: str | None = None) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = content_disposition(filename)
        url: str = await self.presigner.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=expires_in
        )
        return url

    async def presign_put(self, key: str, expires_in: int) -> str:
        url: str = await self.presigner.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
        )
        return url

    async def size(self, key: str) -> int | None:
        try:
            head = await self.client.head_object(Bucket=self.bucket, Key=key)
        except self.client.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(head["ContentLength"])

    async def delete(self, key: str) -> None:
        await self.client.delete_object(Bucket=self.bucket, Key=key)

    async def put(self, key: str, body: bytes | bytearray, content_type: str = "text/csv") -> None:
        await self.client.put_object(
            Bucket=self.bucket, Key=key, Body=body, ContentType=content_type
        )

    async def read(self, key: str, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """Stream an object's bytes, returning the connection to the pool when done."""
        response = await self.client.get_object(Bucket=self.bucket, Key=key)
        body = response["Body"]
        async with body:  # its __aenter__ returns the raw aiohttp response: keep `body`
            async for chunk in body.iter_chunks(chunk_size=chunk_size):
                yield chunk

    def writer(
        self, key: str, part_size: int, parts_in_flight: int, content_type: str
    ) -> "MultipartWriter":
        return MultipartWriter(self, key, part_size, parts_in_flight, content_type)

    async def abort_stale_uploads(self, prefix: str, older_than: datetime) -> int:
        """Abort multipart uploads under `prefix` started before `older_than`."""
        aborted = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if upload["Initiated"] < older_than:
                    await self._abort(upload["Key"], upload["UploadId"])
                    aborted += 1
        return aborted

    async def open_uploads(self, prefix: str) -> list[str]:
        response = await self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix)
        return [u["Key"] for u in response.get("Uploads", [])]

    async def _abort(self, key: str, upload_id: str) -> None:
        await self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)


def content_disposition(filename: str) -> str:
    from urllib.parse import quote

    ascii_name = filename.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename)}"


class MultipartWriter:
    """Gathers written bytes into parts and uploads them, a bounded number at a time.

    Use as `async with storage.writer(...) as w: await w.write(b)`: on a clean exit the upload is
    completed (or, when it fits in one part, written with a single PUT); on any exception or
    cancellation it is aborted, shielded so that a cancel cannot skip the abort.

    Parts in flight are bounded by bytes: `parts_in_flight` parts of the first size. Once the
    parts grow (past 1,000 parts), fewer are in flight, and always at least one.
    """

    def __init__(
        self, storage: Storage, key: str, part_size: int, parts_in_flight: int, content_type: str
    ) -> None:
        self.storage = storage
        self.key = key
        self.first_part_size = max(part_size, MIN_PART_SIZE)
        self.content_type = content_type
        self.bytes_written = 0
        # The part being gathered. A BytesIO written to (never built from bytes) is handed to
        # botocore as the part's body as it is: aiohttp streams it in 64 KiB slices without the
        # whole-part copies that a bytes body costs (botocore wraps bytes in a shared BytesIO,
        # which aiohttp's getbuffer() then copies whole), so each part in flight holds its
        # bytes once, and a bytearray grown by += then copied by bytes() is gone too.
        self._part = io.BytesIO()
        self._upload_id: str | None = None
        self._parts: dict[int, str] = {}
        self._part_count = 0
        self._budget = self.first_part_size * parts_in_flight  # bytes in flight at most
        self._in_flight = 0
        self._room = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None

    async def __aenter__(self) -> "MultipartWriter":
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            try:
                await self._finish()
                return
            except BaseException:
                # The PUT or the completion may have taken effect before its answer was lost
                # (a cancel, a dropped connection): then an object exists that nobody names.
                await asyncio.shield(self._abort(written=True))
                raise
        await asyncio.shield(self._abort())

    @property
    def part_size(self) -> int:
        """The size of the part being gathered."""
        growth = self._part_count // PARTS_PER_SIZE
        return min(self.first_part_size << growth, MAX_PART_SIZE)

    async def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._part.write(data)
        self.bytes_written += len(data)
        if self._part.tell() >= self.part_size:
            await self._flush_part()

    async def _flush_part(self) -> None:
        if self._upload_id is None:
            created = await self.storage.client.create_multipart_upload(
                Bucket=self.storage.bucket, Key=self.key, ContentType=self.content_type
            )
            self._upload_id = created["UploadId"]
        size = self.part_size  # counted at its nominal size: a part overshoots it by one chunk
        body = self._take()
        self._part_count += 1
        number = self._part_count
        async with self._room:  # back pressure: the bytes in flight stay within the budget
            await self._room.wait_for(
                lambda: self._in_flight == 0 or self._in_flight + size <= self._budget
            )
            self._in_flight += size
        task = asyncio.create_task(self._upload_part(number, body, size))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take(self) -> io.BytesIO:
        body, self._part = self._part, io.BytesIO()
        body.seek(0)
        return body

    async def _upload_part(self, number: int, body: io.BytesIO, size: int) -> None:
        try:
            response = await self.storage.client.upload_part(
                Bucket=self.storage.bucket,
                Key=self.key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
            )
            self._parts[number] = response["ETag"]
        except BaseException as e:
            self._error = e
            raise
        finally:
            async with self._room:
                self._in_flight -= size
                self._room.notify_all()

    async def _finish(self) -> None:
        if self._upload_id is None:
            await self.storage.put(self.key, self._take().getvalue(), self.content_type)
            return
        if self._part.tell():
            await self._flush_part()
        await asyncio.gather(*list(self._tasks))
        if self._error is not None:
            raise self._error
        parts = [{"PartNumber": n, "ETag": etag} for n, etag in sorted(self._parts.items())]
        await self.storage.client.complete_multipart_upload(
            Bucket=self.storage.bucket,
            Key=self.key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": parts},
        )

    async def _abort(self, written: bool = False) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._upload_id is not None:
            try:
                await self.storage._abort(self.key, self._upload_id)
            except Exception:
                log.warning("multipart_abort_failed", key=self.key, exc_info=True)
        if written:
            try:
                await self.storage.delete(self.key)
            except Exception:
                log.warning("object_delete_failed", key=self.key, exc_info=True)

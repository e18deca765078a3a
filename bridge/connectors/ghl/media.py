"""Upload checks and multipart forms, streamed recording downloads, transcription decoding."""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import aiohttp
import anyio
import msgspec

from bridge.clock import Clock
from bridge.connectors.ghl.models import TranscriptSentence
from bridge.errors import Rejected, Retryable
from bridge.ratelimit import TokenBucket
from bridge.rest import apply_rate_headers, classify, classify_exception, pause_on_429

__all__ = [
    "ALLOWED_EXTENSIONS",
    "DEFAULT_MAX_RECORDING_BYTES",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "CheckedFile",
    "Upload",
    "check_file",
    "check_uploads",
    "decode_transcription",
    "open_stream",
    "stream_to_file",
    "upload_form",
]

# The spec's list (API_FACTS §2.3) plus VCF, which GHL accepts too (issue #233).
ALLOWED_EXTENSIONS = frozenset(
    {
        "jpg",
        "jpeg",
        "png",
        "mp4",
        "mpeg",
        "zip",
        "rar",
        "pdf",
        "doc",
        "docx",
        "txt",
        "mp3",
        "wav",
        "vcf",
    }
)

# The byte limit of POST /conversations/messages/upload is "not found" (API_FACTS §2.3). The
# nearest official figure is the 5 MB the spec gives for the upload/initiate path on every
# channel but WhatsApp, so that is the default; a location that accepts more can raise it.
DEFAULT_MAX_UPLOAD_BYTES = 5 * 1024 * 1024

# Call recordings are WAV (about 1 MB per minute at telephone quality); 100 MB is hours of
# audio, so anything larger is far more likely a broken response than a real call.
DEFAULT_MAX_RECORDING_BYTES = 100 * 1024 * 1024

_CHUNK = 64 * 1024
# A session's total timeout would cut off a long but healthy download; what should fail
# is a connection that stops delivering bytes.
_STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=60.0)

# A path, or (file name, binary file object) sent from its current position.
Upload = str | os.PathLike[str] | tuple[str, BinaryIO]

_TRANSCRIPTION = msgspec.json.Decoder(list[TranscriptSentence] | TranscriptSentence)


class CheckedFile(NamedTuple):
    """An attachment that passed the type and size checks."""

    name: str
    size: int
    source: Path | BinaryIO
    start: int


def check_file(name: str, size: int | None, max_bytes: int) -> None:
    """Refuse (``Rejected``) a file of a type GHL does not take, or over ``max_bytes``."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext not in ALLOWED_EXTENSIONS:
        shown = f".{ext}" if ext else "no extension"
        allowed = ", ".join(sorted(ALLOWED_EXTENSIONS))
        raise Rejected(
            f"attachment {name!r} has type {shown}, which GHL does not accept (allowed: {allowed})"
        )
    if size is not None and size > max_bytes:
        raise Rejected(
            f"attachment {name!r} is {size} bytes, over the upload limit of {max_bytes} bytes"
        )


async def check_uploads(files: Sequence[Upload], max_bytes: int) -> list[CheckedFile]:
    """Refuse (``Rejected``) a file of a type GHL does not take or over ``max_bytes``."""
    if not files:
        raise Rejected("upload needs at least one file")
    checked = []
    for item in files:
        source: Path | BinaryIO
        if isinstance(item, tuple):
            name, source = item
            start = source.tell()
            size = source.seek(0, os.SEEK_END) - start
            source.seek(start)
        else:
            path = source = Path(item)
            name, start = path.name, 0
            try:
                size = (await anyio.Path(path).stat()).st_size
            except OSError as exc:
                raise Rejected(f"attachment {name!r} cannot be read: {exc.strerror}") from None
        check_file(name, size, max_bytes)
        checked.append(CheckedFile(name, size, source, start))
    return checked


@contextlib.asynccontextmanager
async def upload_form(
    files: Sequence[CheckedFile], fields: Sequence[tuple[str, str]]
) -> AsyncIterator[aiohttp.FormData]:
    """A fresh multipart form whose file parts stream from disk; files close on exit.

    A form can be sent only once, so each attempt (a retry after a token refresh) builds
    its own and rewinds caller-supplied file objects to where they started.
    """
    with contextlib.ExitStack() as stack:
        form = aiohttp.FormData()
        for name, value in fields:
            form.add_field(name, value)
        for item in files:
            if isinstance(item.source, Path):
                handle: BinaryIO = await asyncio.to_thread(item.source.open, "rb")
                stack.callback(handle.close)
            else:
                handle = item.source
                handle.seek(item.start)
            content_type = mimetypes.guess_type(item.name)[0] or "application/octet-stream"
            # The part name is given only in the spec's prose (API_FACTS §9.5).
            form.add_field("fileAttachment", handle, filename=item.name, content_type=content_type)
        yield form


async def open_stream(
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    bucket: TokenBucket | None,
    clock: Clock,
    where: str,
) -> aiohttp.ClientResponse:
    """GET ``url`` and return the 2xx response with its body still unread; release it after.

    This is rest.request() (bucket, rate-limit headers, the one status table) for bodies
    too big to hold in memory.
    """
    # Held until the headers arrive: by then the server has counted the request.
    lease = bucket.lease() if bucket is not None else contextlib.nullcontext()
    try:
        async with lease:
            response = await session.get(url, headers=headers, timeout=_STREAM_TIMEOUT)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise classify_exception(exc, write=False, where=where) from None
    lowered = {k.lower(): v for k, v in response.headers.items()}
    if bucket is not None:
        apply_rate_headers(bucket, lowered)
    if response.status < 400:
        return response
    try:
        body = await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise classify_exception(exc, write=False, where=where) from None
    finally:
        response.release()
    status = response.status
    error = classify(status, lowered, body, now=clock.time(), where=where)
    pause_on_429(bucket, status, error, clock)
    raise error or Retryable(f"{where}: HTTP {status}")  # classify() maps every status >= 400


async def stream_to_file(
    response: aiohttp.ClientResponse, dest: Path, *, max_bytes: int, where: str
) -> int:
    """Write a response body to ``dest`` chunk by chunk; return its size.

    The body goes to ``dest.part`` first and is renamed only when complete, so ``dest``
    never holds a partial file; the part file is removed on any failure.
    """
    part = anyio.Path(dest.with_name(dest.name + ".part"))
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        raise Rejected(f"{where}: body is {declared} bytes, over the cap of {max_bytes} bytes")
    total = 0
    done = False
    try:
        async with await anyio.open_file(part, "wb") as out:
            try:
                async for chunk in response.content.iter_chunked(_CHUNK):
                    total += len(chunk)
                    if total > max_bytes:
                        raise Rejected(f"{where}: body exceeds the cap of {max_bytes} bytes")
                    await out.write(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise classify_exception(exc, write=False, where=where) from None
        await part.rename(dest)
        done = True
    finally:
        if not done:
            await part.unlink(missing_ok=True)
    return total


def decode_transcription(body: bytes, where: str) -> list[TranscriptSentence]:
    """Sentences from a transcription body, which may be one object or a list of them.

    Which of the two the live API sends is "not found" (API_FACTS §2.2), so both are read.
    """
    try:
        doc = _TRANSCRIPTION.decode(body)
    except msgspec.DecodeError as exc:
        raise Retryable(f"{where}: response is not a transcription ({exc})") from None
    return doc if isinstance(doc, list) else [doc]

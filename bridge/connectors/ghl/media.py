"""Upload checks and multipart forms, streamed recording downloads, transcription decoding."""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import aiohttp
import anyio
import msgspec

from bridge.connectors.ghl.models import TranscriptSentence
from bridge.errors import Rejected, Retryable

__all__ = [
    "ALLOWED_EXTENSIONS",
    "DEFAULT_MAX_RECORDING_BYTES",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "CheckedFile",
    "Upload",
    "check_file",
    "check_uploads",
    "decode_transcription",
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


def decode_transcription(body: bytes, where: str) -> list[TranscriptSentence]:
    """Sentences from a transcription body, which may be one object or a list of them.

    Which of the two the live API sends is "not found" (API_FACTS §2.2), so both are read.
    """
    try:
        doc = _TRANSCRIPTION.decode(body)
    except msgspec.DecodeError as exc:
        raise Retryable(f"{where}: response is not a transcription ({exc})") from None
    return doc if isinstance(doc, list) else [doc]

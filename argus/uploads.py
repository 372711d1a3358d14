"""Checking uploaded images before anything else touches them.

The browser's claims (name, MIME type, size) are never trusted. For every
file attached to a chat message we

1. read its size from disk (``os.stat``) *before* reading it, and refuse files
   over the limit without reading a byte (a 2 GB upload is never loaded);
2. decode it with Pillow, restricted to a few plain raster formats (so no
   Ghostscript/EPS or other exotic plugins are ever invoked): ``verify()``
   first, then a fresh ``open`` + ``load()`` to catch truncated data;
3. refuse decompression bombs: images with more than :data:`MAX_IMAGE_PIXELS`
   pixels are rejected from their header, before any pixel data is decoded;
4. take the MIME type from the *detected* format.

Each refused file gets one clear sentence (``"x.png is not an image I can
read."``); the rest of the message is still answered.

All functions here are blocking (file I/O, decoding): call them through
``asyncio.to_thread`` from the event loop.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from struct import error as StructError
from typing import Any, Iterable, Optional

from PIL import Image, UnidentifiedImageError

#: Formats we accept, by Pillow format name → MIME type we record.
ALLOWED_FORMATS: dict[str, str] = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
}

#: Largest accepted image, in pixels (width × height): 64 megapixels, e.g. 8000 × 8000.
MAX_IMAGE_PIXELS = 64_000_000

# Pillow's own guard: it warns above this and raises DecompressionBombError
# above twice this, already while reading the header. We also check explicitly.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class UploadRejected(Exception):
    """A file was refused; ``str(e)`` is one user-facing sentence naming the file."""


@dataclass(frozen=True)
class CheckedImage:
    """An upload that decoded cleanly.

    Attributes:
        name: the display name (the browser's file name, cleaned up).
        mime: MIME type of the *detected* format (e.g. ``"image/png"``).
        data: the file's bytes (at most the configured limit).
        width, height: size in pixels.
    """

    name: str
    mime: str
    data: bytes = field(repr=False)
    width: int
    height: int

    @property
    def size(self) -> int:
        """Size in bytes."""
        return len(self.data)


@dataclass
class UploadCheck:
    """Outcome of :func:`check_files`: accepted images and one sentence per refused file."""

    images: list[CheckedImage] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)


def display_name(name: Optional[str]) -> str:
    """A file name safe to show in a chat line: no path, no newlines, ≤ 80 characters."""
    base = os.path.basename((name or "").replace("\\", "/")) or "file"
    base = " ".join(base.split())  # collapses newlines/tabs
    base = base.replace("`", "'")
    return base if len(base) <= 80 else base[:77] + "..."


def format_size(n_bytes: int) -> str:
    """Human size: ``"12.3 MB"`` (1 MB = 1024² bytes), ``"2.0 GB"``, ``"512 bytes"``."""
    if n_bytes < 1024:
        return f"{n_bytes} bytes"
    if n_bytes < 1024**2:
        return f"{n_bytes / 1024:.1f} KB"
    if n_bytes < 1024**3:
        return f"{n_bytes / 1024**2:.1f} MB"
    return f"{n_bytes / 1024**3:.1f} GB"


def _format_limit(n_bytes: int) -> str:
    mb = n_bytes / 1024**2
    return f"{mb:g} MB" if mb >= 1 else format_size(n_bytes)


def _too_big(name: str, size: int, max_bytes: int) -> UploadRejected:
    return UploadRejected(f"{name} is {format_size(size)}; the limit is {_format_limit(max_bytes)}.")


def _unreadable(name: str) -> UploadRejected:
    return UploadRejected(f"{name} is not an image I can read.")


def check_image_bytes(data: bytes, name: str, max_bytes: int) -> CheckedImage:
    """Decode ``data`` and return it as a :class:`CheckedImage`.

    Args:
        data: the file's bytes.
        name: display name used in the error sentence.
        max_bytes: largest accepted size in bytes.

    Raises:
        UploadRejected: too large, not a decodable image of an allowed format,
            truncated/corrupt, or more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    name = display_name(name)
    if len(data) > max_bytes:
        raise _too_big(name, len(data), max_bytes)
    if not data:
        raise _unreadable(name)
    formats = list(ALLOWED_FORMATS)
    try:
        # Image.open reads the header only; Pillow raises DecompressionBombError
        # (or warns) for huge headers before any pixel data is decoded.
        with Image.open(io.BytesIO(data), formats=formats) as probe:
            fmt = probe.format
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UploadRejected(
                    f"{name} is {width} × {height} pixels; the limit is "
                    f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels."
                )
            probe.verify()  # structure/CRC checks without decoding everything
        # verify() leaves the image unusable: reopen and decode the pixels.
        with Image.open(io.BytesIO(data), formats=formats) as img:
            img.load()
    except UploadRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadRejected(
            f"{name} is too large in pixels; the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
            IndexError, TypeError, KeyError, StructError, MemoryError):
        # Pillow signals corrupt/truncated input with a variety of exceptions.
        raise _unreadable(name) from None
    mime = ALLOWED_FORMATS.get(fmt or "")
    if mime is None:  # pragma: no cover - formats= restricts what open() accepts
        raise _unreadable(name)
    return CheckedImage(name=name, mime=mime, data=data, width=width, height=height)


def check_image_file(path: str | os.PathLike, name: str, max_bytes: int) -> CheckedImage:
    """Check the file at ``path``: its size on disk first, then its content.

    The size comes from ``os.stat`` so an oversized file is refused without
    reading it; then at most ``max_bytes + 1`` bytes are read.

    Raises:
        UploadRejected: see :func:`check_image_bytes`; also when the file is
            missing or unreadable.
    """
    shown = display_name(name)
    try:
        size = os.stat(path).st_size
    except OSError:
        raise UploadRejected(f"{shown} could not be read; please upload it again.") from None
    if size > max_bytes:
        raise _too_big(shown, size, max_bytes)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # never more, even if it grew meanwhile
    except OSError:
        raise UploadRejected(f"{shown} could not be read; please upload it again.") from None
    if len(data) > max_bytes:
        raise _too_big(shown, len(data), max_bytes)
    return check_image_bytes(data, shown, max_bytes)


def check_element(element: Any, max_bytes: int) -> CheckedImage:
    """Check one Chainlit element (anything with ``name`` and ``path`` or ``content``).

    Raises:
        UploadRejected: as :func:`check_image_file`; also when the element has
            neither a path nor in-memory content.
    """
    name = getattr(element, "name", None) or "file"
    path = getattr(element, "path", None)
    if path:
        return check_image_file(path, name, max_bytes)
    content = getattr(element, "content", None)
    if isinstance(content, (bytes, bytearray)):
        return check_image_bytes(bytes(content), name, max_bytes)
    raise UploadRejected(f"{display_name(name)} could not be read; please upload it again.")


def check_files(elements: Iterable[Any], max_bytes: int) -> UploadCheck:
    """Check every element; never raises for a bad file (it becomes a rejection line).

    Args:
        elements: Chainlit elements (``message.elements``) or similar objects.
        max_bytes: per-file size limit in bytes.
    """
    out = UploadCheck()
    for element in elements or ():
        try:
            out.images.append(check_element(element, max_bytes))
        except UploadRejected as e:
            out.rejections.append(str(e))
    return out


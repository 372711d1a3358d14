"""Checking uploaded images before anything else touches them.

The browser's claims (name, MIME type, size) are never trusted. For every
file attached to a chat message we

1. read its size from disk (``os.stat``) *before* reading it, and refuse files
   over the limit without reading a byte (a 2 GB upload is never loaded);
2. open it with Pillow, restricted to a few plain raster formats (so no
   Ghostscript/EPS or other exotic plugins are ever invoked), and refuse
   images over :data:`MAX_IMAGE_PIXELS` from their header, before any pixel
   data is decoded; the images of one message together may not exceed
   :data:`MAX_MESSAGE_PIXELS`;
3. check the data without decoding huge images at full size (the local model
   reads text only; we just need to know the file is a sound image):
   ``verify()`` (for PNG: every chunk's CRC, up to ``IEND``), then a decode
   that is reduced where the format allows it (JPEG at 1/8 scale via
   ``draft``); PNGs over :data:`FULL_DECODE_PIXELS` rely on ``verify()``;
4. take the MIME type from the *detected* format.

Each refused file gets one clear sentence (``"x.png is not an image I can
read."``), whatever Pillow raised; the rest of the message is still answered.

All functions here are blocking (file I/O, decoding): call them through
``asyncio.to_thread`` from the event loop.
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from PIL import Image

log = logging.getLogger(__name__)

#: Formats we accept, by Pillow format name → MIME type we record.
ALLOWED_FORMATS: dict[str, str] = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
}

#: Largest accepted image, in pixels (width × height): 24 megapixels, e.g. 6000 × 4000.
MAX_IMAGE_PIXELS = 24_000_000
#: Largest total of the accepted images of one message, in pixels.
MAX_MESSAGE_PIXELS = 48_000_000
#: PNGs up to this many pixels are also fully decoded (at most ~32 MB of RAM);
#: larger ones are checked by ``verify()`` alone.
FULL_DECODE_PIXELS = 8_000_000

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
    """Outcome of :func:`check_files`: accepted images, one sentence per refused file, and
    the refused elements themselves (so the chat can take them out of the shown message)."""

    images: list[CheckedImage] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)
    refused: list[Any] = field(default_factory=list)


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


def _megapixels(n: int) -> str:
    return f"{n / 1_000_000:g} megapixels"


def _decode_check(data: bytes, fmt: str, width: int, height: int) -> None:
    """Decode ``data`` as cheaply as its format allows; raises whatever Pillow raises."""
    with Image.open(io.BytesIO(data), formats=[fmt]) as img:
        if fmt == "JPEG":  # decodes every block, at 1/8 of the size
            img.draft(None, (max(1, width // 8), max(1, height // 8)))
        elif fmt == "PNG" and width * height > FULL_DECODE_PIXELS:
            return  # verify() has checked every chunk's CRC up to IEND
        img.load()


def check_image_bytes(
    data: bytes, name: str, max_bytes: int, *, pixel_budget: Optional[int] = None
) -> CheckedImage:
    """Decode ``data`` and return it as a :class:`CheckedImage`.

    Args:
        data: the file's bytes.
        name: display name used in the error sentence.
        max_bytes: largest accepted size in bytes.
        pixel_budget: pixels still allowed in this message (None: no
            per-message limit); see :func:`check_files`.

    Raises:
        UploadRejected: too large, not a decodable image of an allowed format,
            truncated/corrupt (whatever Pillow raised), more than
            :data:`MAX_IMAGE_PIXELS` pixels, or more than ``pixel_budget``.
    """
    name = display_name(name)
    if len(data) > max_bytes:
        raise _too_big(name, len(data), max_bytes)
    if not data:
        raise _unreadable(name)
    try:
        # Image.open reads the header only; Pillow raises DecompressionBombError
        # (or warns) for huge headers before any pixel data is decoded.
        with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as probe:
            fmt = probe.format or ""
            width, height = probe.size
            pixels = width * height
            if pixels > MAX_IMAGE_PIXELS:
                raise UploadRejected(
                    f"{name} is {width} × {height} pixels; the limit is {_megapixels(MAX_IMAGE_PIXELS)}."
                )
            if pixel_budget is not None and pixels > pixel_budget:
                raise UploadRejected(
                    f"{name} was not checked: the images of one message may have at most "
                    f"{_megapixels(MAX_MESSAGE_PIXELS)} together; send it in another message."
                )
            probe.verify()  # structure/CRC checks without decoding
        _decode_check(data, fmt, width, height)  # verify() leaves the image unusable: reopen
    except UploadRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning: when warnings are errors
        raise UploadRejected(f"{name} is too large in pixels; the limit is {_megapixels(MAX_IMAGE_PIXELS)}.") from None
    except Exception as exc:  # Pillow signals corrupt input with many exception types
        log.info("upload %r refused: %s: %s", name, type(exc).__name__, exc)
        raise _unreadable(name) from None
    mime = ALLOWED_FORMATS.get(fmt)
    if mime is None:  # pragma: no cover - formats= restricts what open() accepts
        raise _unreadable(name)
    return CheckedImage(name=name, mime=mime, data=data, width=width, height=height)


def check_image_file(
    path: str | os.PathLike, name: str, max_bytes: int, *, pixel_budget: Optional[int] = None
) -> CheckedImage:
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
    return check_image_bytes(data, shown, max_bytes, pixel_budget=pixel_budget)


def check_element(element: Any, max_bytes: int, *, pixel_budget: Optional[int] = None) -> CheckedImage:
    """Check one Chainlit element (anything with ``name`` and ``path`` or ``content``).

    Raises:
        UploadRejected: as :func:`check_image_file`; also when the element has
            neither a path nor in-memory content.
    """
    name = getattr(element, "name", None) or "file"
    path = getattr(element, "path", None)
    if path:
        return check_image_file(path, name, max_bytes, pixel_budget=pixel_budget)
    content = getattr(element, "content", None)
    if isinstance(content, (bytes, bytearray)):
        return check_image_bytes(bytes(content), name, max_bytes, pixel_budget=pixel_budget)
    raise UploadRejected(f"{display_name(name)} could not be read; please upload it again.")


def check_files(
    elements: Iterable[Any], max_bytes: int, *, max_total_pixels: int = MAX_MESSAGE_PIXELS
) -> UploadCheck:
    """Check every element; never raises for a bad file (it becomes a rejection line).

    Args:
        elements: Chainlit elements (``message.elements``) or similar objects.
        max_bytes: per-file size limit in bytes.
        max_total_pixels: limit on the pixels of all accepted images together;
            an image that would go over it is refused without being decoded.
    """
    out = UploadCheck()
    budget = max_total_pixels
    for element in elements or ():
        try:
            image = check_element(element, max_bytes, pixel_budget=budget)
        except UploadRejected as e:
            out.rejections.append(str(e))
            out.refused.append(element)
        else:
            out.images.append(image)
            budget -= image.width * image.height
    return out

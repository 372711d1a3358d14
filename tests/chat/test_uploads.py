"""Image upload checks (argus.uploads): never trust the browser."""
from __future__ import annotations

import io
import random
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
from PIL import Image

from argus.uploads import (
    MAX_IMAGE_PIXELS,
    MAX_MESSAGE_PIXELS,
    UploadRejected,
    check_element,
    check_files,
    check_image_bytes,
    check_image_file,
    format_size,
)

MB = 1024 * 1024
LIMIT = 10 * MB


def image_bytes(fmt: str, size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR claiming ``width × height`` pixels, a tiny IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def valid_gray_png(width: int, height: int) -> bytes:
    """A complete, valid 8-bit grayscale PNG of ``width × height`` black pixels,
    built without allocating the pixels (the zeros compress ~1000:1)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@dataclass
class FakeElement:
    """The attributes of a Chainlit element we use (name, path, content, claimed mime)."""

    name: str
    path: Optional[str] = None
    content: Optional[bytes] = None
    mime: str = "image/png"


@pytest.mark.parametrize("fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")])
def test_valid_images_accepted_with_detected_mime(tmp_path, fmt, mime):
    p = tmp_path / "upload.bin"  # the name/extension does not matter
    data = image_bytes(fmt)
    p.write_bytes(data)
    img = check_image_file(p, "photo.bin", LIMIT)
    assert img.mime == mime
    assert (img.width, img.height) == (64, 48)
    assert img.data == data and img.size == len(data)
    assert img.name == "photo.bin"


def test_mime_comes_from_content_not_name_or_claim(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(image_bytes("JPEG"))
    res = check_files([FakeElement(name="a.png", path=str(p), mime="image/png")], LIMIT)
    assert res.rejections == []
    assert [i.mime for i in res.images] == ["image/jpeg"]


def test_text_file_renamed_png_rejected(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("just some text, not an image\n" * 20)
    with pytest.raises(UploadRejected) as e:
        check_image_file(p, "notes.png", LIMIT)
    assert str(e.value) == "notes.png is not an image I can read."


def test_empty_file_rejected(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(UploadRejected, match="not an image I can read"):
        check_image_file(p, "empty.png", LIMIT)


def test_oversized_sparse_file_rejected_without_reading(tmp_path, monkeypatch):
    p = tmp_path / "huge.png"
    with open(p, "wb") as f:
        f.truncate(2 * 1024**3)  # sparse: 2 GB apparent size, no disk used
    real_open = open
    opened = []

    def spy_open(file, *a, **kw):
        opened.append(str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr("builtins.open", spy_open)
    start = time.monotonic()
    with pytest.raises(UploadRejected) as e:
        check_image_file(p, "huge.png", LIMIT)
    assert time.monotonic() - start < 0.5
    assert str(p) not in opened  # refused from its size on disk alone
    assert str(e.value) == "huge.png is 2.0 GB; the limit is 10 MB."


def test_slightly_oversized_message(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(image_bytes("PNG") + b"\0" * int(12.3 * MB))
    with pytest.raises(UploadRejected) as e:
        check_image_file(p, "x.png", LIMIT)
    assert str(e.value) == "x.png is 12.3 MB; the limit is 10 MB."


def test_bytes_over_limit_rejected():
    with pytest.raises(UploadRejected, match="the limit is 1 MB"):
        check_image_bytes(b"\0" * (MB + 1), "big.png", MB)


def test_truncated_image_rejected(tmp_path):
    # a noisy image so the compressed data is long enough to cut in half
    noisy = Image.frombytes("RGB", (256, 256), bytes((i * 7919) % 251 for i in range(256 * 256 * 3)))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    data = buf.getvalue()
    for cut_data, name in [(data[: len(data) // 2], "half.png"), (image_bytes("JPEG", (300, 300))[:400], "cut.jpg")]:
        p = tmp_path / name
        p.write_bytes(cut_data)
        with pytest.raises(UploadRejected, match=f"^{name} is not an image I can read.$"):
            check_image_file(p, name, LIMIT)


def test_corrupted_png_crc_rejected():
    data = bytearray(image_bytes("PNG"))
    data[30] ^= 0xFF  # inside IHDR: CRC no longer matches
    with pytest.raises(UploadRejected, match="not an image I can read"):
        check_image_bytes(bytes(data), "bad.png", LIMIT)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns from 1× to 2× the limit
@pytest.mark.parametrize("side", [9000, 50_000])
def test_decompression_bomb_header_rejected(side):
    data = png_header_only(side, side)
    assert len(data) < 200  # tiny file, huge claimed image
    assert side * side > MAX_IMAGE_PIXELS
    start = time.monotonic()
    with pytest.raises(UploadRejected) as e:
        check_image_bytes(data, "bomb.png", LIMIT)
    assert time.monotonic() - start < 0.5  # rejected from the header, nothing decoded
    assert "bomb.png" in str(e.value) and "megapixels" in str(e.value)


def test_exotic_formats_refused():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(UploadRejected, match="not an image I can read"):
        check_image_bytes(buf.getvalue(), "scan.tiff", LIMIT)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(UploadRejected, match="not an image I can read"):
        check_image_bytes(eps, "evil.eps", LIMIT)


def test_check_files_mixes_good_and_bad(tmp_path):
    good = tmp_path / "good"
    good.write_bytes(image_bytes("PNG"))
    bad = tmp_path / "bad"
    bad.write_text("hello")
    res = check_files(
        [
            FakeElement(name="good.png", path=str(good)),
            FakeElement(name="bad.png", path=str(bad)),
            FakeElement(name="gone.png", path=str(tmp_path / "missing")),
            FakeElement(name="inline.jpg", content=image_bytes("JPEG")),
            FakeElement(name="nothing.png"),
        ],
        LIMIT,
    )
    assert [i.name for i in res.images] == ["good.png", "inline.jpg"]
    assert res.rejections == [
        "bad.png is not an image I can read.",
        "gone.png could not be read; please upload it again.",
        "nothing.png could not be read; please upload it again.",
    ]


def test_names_are_cleaned_for_display(tmp_path):
    p = tmp_path / "t"
    p.write_text("nope")
    with pytest.raises(UploadRejected) as e:
        check_element(FakeElement(name="../../etc/pass\nwd`x`.png", path=str(p)), LIMIT)
    assert str(e.value) == "pass wd'x'.png is not an image I can read."


def test_format_size():
    assert format_size(512) == "512 bytes"
    assert format_size(int(12.3 * MB)) == "12.3 MB"
    assert format_size(2 * 1024**3) == "2.0 GB"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_valid_30_megapixel_png_rejected_from_its_header():
    data = valid_gray_png(6000, 5000)  # a real, complete image of 30 MP
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (6000, 5000)
    start = time.monotonic()
    with pytest.raises(UploadRejected) as e:
        check_image_bytes(data, "wide.png", LIMIT)
    assert time.monotonic() - start < 0.5
    assert str(e.value) == "wide.png is 6000 × 5000 pixels; the limit is 24 megapixels."


def test_large_valid_png_under_the_limit_is_accepted():
    img = check_image_bytes(valid_gray_png(5000, 4000), "big.png", LIMIT)  # 20 MP
    assert (img.mime, img.width, img.height) == ("image/png", 5000, 4000)


def test_images_of_one_message_share_a_pixel_budget(tmp_path):
    assert MAX_MESSAGE_PIXELS == 48_000_000
    p = tmp_path / "16mp.png"
    p.write_bytes(valid_gray_png(4000, 4000))
    small = tmp_path / "small.png"
    small.write_bytes(image_bytes("PNG"))
    res = check_files([FakeElement(name=f"{i}.png", path=str(p)) for i in range(4)] + [FakeElement("s.png", str(small))], LIMIT)
    assert [i.name for i in res.images] == ["0.png", "1.png", "2.png"]  # 48 MP: exactly the budget
    refusal = "was not checked: the images of one message may have at most 48 megapixels together; send it in another message."
    assert res.rejections == [f"3.png {refusal}", f"s.png {refusal}"]
    assert [i.name for i in check_files([FakeElement("s.png", str(small))], LIMIT).images] == ["s.png"]


def test_truncated_large_jpeg_rejected_by_the_reduced_decode():
    noisy = Image.frombytes("RGB", (1200, 900), random.Random(0).randbytes(1200 * 900 * 3))
    buf = io.BytesIO()
    noisy.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    assert check_image_bytes(data, "whole.jpg", LIMIT).mime == "image/jpeg"
    with pytest.raises(UploadRejected, match="^cut.jpg is not an image I can read.$"):
        check_image_bytes(data[: len(data) * 3 // 5], "cut.jpg", LIMIT)


def test_large_png_checked_by_verify_alone_still_catches_damage():
    data = valid_gray_png(5000, 4000)  # 20 MP: over FULL_DECODE_PIXELS, so not fully decoded
    damaged = bytearray(data)
    damaged[200] ^= 0xFF  # inside IDAT: its CRC no longer matches
    for bad, name in [(data[: len(data) // 2], "half.png"), (data[:-5], "no-end.png"), (bytes(damaged), "crc.png")]:
        with pytest.raises(UploadRejected, match=f"^{name} is not an image I can read.$"):
            check_image_bytes(bad, name, LIMIT)

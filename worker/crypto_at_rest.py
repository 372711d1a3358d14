"""AES-256-GCM for model blocks at rest (NIST SP 800-38D), with one key per network.

Formats (all integers big-endian):

    blob   = b"AGB" || version (1 byte, 1) || nonce (12) || ciphertext || tag (16)
    stream = b"AGS" || version (1 byte, 1) || chunk_size (u32) || stream id (16 random bytes)
             || record_0 || ... || record_n
    record = nonce (12) || ciphertext || tag (16)

A blob's GCM associated data is ``header || associated_data`` (header = magic +
version), so neither the version nor the caller's context can be swapped. In a stream
every record holds ``chunk_size`` plaintext bytes except the last, which holds
0..chunk_size; record i is sealed with associated data
``stream header || i (u64) || final (1 byte: 1 on the last record, else 0) ||
associated_data``. A reordered record fails (wrong index), a record spliced in from
another stream fails (other stream id), a cut at a record boundary fails (the new
last record was sealed with final=0), a cut inside a record fails (short tag), and
bytes after the final record are refused.

Use ``block_aad(network_id, model_sha256, start, end, chunk_index)`` as the
associated data so that a blob only decrypts as the block range of the model and
network it was made for.

Nonces are 96 random bits per call. NIST SP 800-38D §8.3 allows at most 2^32
invocations of GCM with random nonces under one key; at the 4 MiB default chunk size
that is 16 PiB per network key, far beyond a home network's models, but a network
that re-encrypts continuously should rotate its key (``generate_key``). One GCM call
may seal at most 2^39 - 256 bits (~64 GiB); chunks are limited to ``MAX_CHUNK_SIZE``.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker.pki import atomic_write

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
VERSION = 1
BLOB_MAGIC = b"AGB"
STREAM_MAGIC = b"AGS"
CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
_BLOB_HEADER = BLOB_MAGIC + bytes([VERSION])
_STREAM_HEADER = struct.Struct(">3sBI16s")  # magic, version, chunk_size, stream id
STREAM_ID_BYTES = 16
_AAD_LABEL = b"argus-block-v1\x00"

PathLike = str | os.PathLike


class AtRestError(Exception):
    """Base of errors raised by encryption at rest."""


class IntegrityError(AtRestError):
    """Ciphertext was altered, truncated or reordered, or the key or associated data is wrong."""


class KeyFileError(AtRestError):
    """A key file is missing, has the wrong size, or is readable by group or others."""


# --- keys ---------------------------------------------------------------------------


def generate_key() -> bytes:
    """A fresh random 256-bit AES key."""
    return AESGCM.generate_key(bit_length=256)


def save_key(path: PathLike, key: bytes) -> None:
    """Write the raw 32-byte key to ``path`` atomically with mode 0600.

    Raises ValueError if ``key`` is not 32 bytes, OSError on write failure.
    """
    _check_key(key)
    atomic_write(path, key, mode=0o600)


def load_key(path: PathLike) -> bytes:
    """The 32-byte key in ``path``.

    Raises KeyFileError if the file is absent, accessible by group or others, or not
    exactly 32 bytes.
    """
    try:
        mode = os.stat(path).st_mode & 0o777
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise KeyFileError(f"network key file {path} does not exist") from e
    if mode & 0o077:
        raise KeyFileError(f"network key file {path} has permissions {mode:o}; run chmod 600 on it")
    if len(data) != KEY_BYTES:
        raise KeyFileError(f"network key file {path} holds {len(data)} bytes, expected {KEY_BYTES}")
    return data


def load_or_create_key(path: PathLike) -> bytes:
    """The key in ``path``, generating and saving one (0600) if the file does not exist."""
    if not Path(path).exists():
        save_key(path, generate_key())
    return load_key(path)


def _check_key(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ValueError(f"AES-256 key must be {KEY_BYTES} bytes")


# --- associated data ----------------------------------------------------------------


def block_aad(network_id: str, model_sha256: str | bytes, start: int, end: int, chunk_index: int = 0) -> bytes:
    """Associated data binding a blob to a network, a model, blocks [start, end) and a chunk.

    ``label || len(network_id) (u16) || network_id (UTF-8) || model SHA-256 (32 bytes)
    || start (u32) || end (u32) || chunk_index (u64)``. ``model_sha256`` is 32 raw bytes
    or 64 hex characters. Raises ValueError on a bad hash, empty range or negative index.
    """
    digest = bytes.fromhex(model_sha256) if isinstance(model_sha256, str) else bytes(model_sha256)
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError("model_sha256 must be a SHA-256 digest (32 bytes or 64 hex characters)")
    if not 0 <= start < end < 2**32 or not 0 <= chunk_index < 2**64:
        raise ValueError(f"block range [{start}, {end}) or chunk index {chunk_index} is out of range")
    net = network_id.encode("utf-8")
    return _AAD_LABEL + struct.pack(">H", len(net)) + net + digest + struct.pack(">IIQ", start, end, chunk_index)


# --- single blobs -------------------------------------------------------------------


def encrypt_blob(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """``b"AGB" || 0x01 || nonce (12) || ciphertext || tag (16)`` with a fresh random nonce.

    Output is ``len(plaintext) + 32`` bytes. Raises ValueError on a bad key.
    """
    _check_key(key)
    nonce = secrets.token_bytes(NONCE_BYTES)
    return _BLOB_HEADER + nonce + AESGCM(key).encrypt(nonce, plaintext, _BLOB_HEADER + associated_data)


def decrypt_blob(key: bytes, blob: bytes, associated_data: bytes) -> bytes:
    """The plaintext of ``encrypt_blob``'s output.

    Raises IntegrityError if the blob is not in this format or version, was altered in
    any byte, or ``key`` / ``associated_data`` differ from those used to encrypt.
    """
    _check_key(key)
    header_len = len(_BLOB_HEADER)
    if len(blob) < header_len + NONCE_BYTES + TAG_BYTES or blob[:header_len] != _BLOB_HEADER:
        raise IntegrityError("not an Argus encrypted blob of a known version")
    nonce = blob[header_len:header_len + NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, blob[header_len + NONCE_BYTES:], _BLOB_HEADER + associated_data)
    except InvalidTag as e:
        raise IntegrityError("encrypted blob failed authentication (tampered, wrong key or wrong context)") from e


# --- chunked streams ----------------------------------------------------------------


def _chunk_aad(header: bytes, index: int, final: bool, associated_data: bytes) -> bytes:
    return header + struct.pack(">QB", index, 1 if final else 0) + associated_data


def _read_exactly(src: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes from ``src``; fewer only at end of file."""
    parts, remaining = [], n
    while remaining:
        part = src.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def encrypt_stream(
    key: bytes, src: BinaryIO, dst: BinaryIO, associated_data: bytes, chunk_size: int = CHUNK_SIZE
) -> int:
    """Encrypt ``src`` to ``dst`` in ``chunk_size``-byte records; returns bytes written.

    Memory use is about two chunks. An empty ``src`` gives one empty final record.
    Raises ValueError on a bad key or chunk size outside 1..MAX_CHUNK_SIZE.
    """
    _check_key(key)
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be 1..{MAX_CHUNK_SIZE} bytes, got {chunk_size}")
    aead = AESGCM(key)
    header = _STREAM_HEADER.pack(STREAM_MAGIC, VERSION, chunk_size, secrets.token_bytes(STREAM_ID_BYTES))
    written = dst.write(header)
    index, chunk = 0, _read_exactly(src, chunk_size)
    while True:
        following = _read_exactly(src, chunk_size) if len(chunk) == chunk_size else b""
        final = not following
        nonce = secrets.token_bytes(NONCE_BYTES)
        written += dst.write(nonce + aead.encrypt(nonce, chunk, _chunk_aad(header, index, final, associated_data)))
        if final:
            return written
        index, chunk = index + 1, following


def decrypt_stream(key: bytes, src: BinaryIO, dst: BinaryIO, associated_data: bytes) -> int:
    """Decrypt ``encrypt_stream``'s output from ``src`` to ``dst``; returns plaintext bytes.

    Each record is authenticated before its plaintext is written, but truncation is
    only known at the end: treat ``dst`` as untrusted until this returns (or use
    ``decrypt_file``, which renames into place only on success).
    Raises IntegrityError on a bad header, an altered, reordered, missing or extra
    record, or a wrong key or associated data.
    """
    _check_key(key)
    header = _read_exactly(src, _STREAM_HEADER.size)
    if len(header) != _STREAM_HEADER.size:
        raise IntegrityError("encrypted stream is shorter than its header")
    magic, version, chunk_size, _ = _STREAM_HEADER.unpack(header)
    if magic != STREAM_MAGIC or version != VERSION or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise IntegrityError("not an Argus encrypted stream of a known version")
    aead, record_size = AESGCM(key), NONCE_BYTES + chunk_size + TAG_BYTES
    index, total, record = 0, 0, _read_exactly(src, record_size)
    while True:
        following = _read_exactly(src, record_size) if len(record) == record_size else b""
        final = not following
        if len(record) < NONCE_BYTES + TAG_BYTES:
            raise IntegrityError(f"encrypted stream is truncated at record {index}")
        try:
            plain = aead.decrypt(record[:NONCE_BYTES], record[NONCE_BYTES:],
                                 _chunk_aad(header, index, final, associated_data))
        except InvalidTag as e:
            raise IntegrityError(
                f"encrypted stream record {index} failed authentication (tampered, reordered, truncated, "
                "wrong key or wrong context)"
            ) from e
        dst.write(plain)
        total += len(plain)
        if final:
            return total
        index, record = index + 1, following


def encrypt_file(key: bytes, src: PathLike, dst: PathLike, associated_data: bytes,
                 chunk_size: int = CHUNK_SIZE) -> int:
    """``encrypt_stream`` from file ``src`` to file ``dst`` (written 0600, renamed into place)."""
    with open(src, "rb") as plain:
        return _via_temp(dst, lambda out: encrypt_stream(key, plain, out, associated_data, chunk_size))


def decrypt_file(key: bytes, src: PathLike, dst: PathLike, associated_data: bytes) -> int:
    """``decrypt_stream`` from file ``src`` to ``dst``; ``dst`` appears only if all of it verified.

    Raises IntegrityError (``dst`` untouched, the partial output deleted).
    """
    with open(src, "rb") as sealed:
        return _via_temp(dst, lambda out: decrypt_stream(key, sealed, out, associated_data))


def _via_temp(dst: PathLike, write: Callable[[BinaryIO], int]) -> int:
    """Run ``write(file)`` on a 0600 temporary beside ``dst``, fsync, rename over ``dst``."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            result = write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result

"""AES-256-GCM for model blocks at rest: blobs, chunked streams, key files."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import struct

import pytest

from worker import crypto_at_rest as car

MODEL = hashlib.sha256(b"smollm2-135m").hexdigest()
AAD = car.block_aad("network_001", MODEL, 0, 10, 0)
CHUNK = 1024  # small chunks so the tests run in microseconds; the default is 4 MiB
HEADER = 24  # magic 3, version 1, chunk size 4, stream id 16


@pytest.fixture()
def key():
    return car.generate_key()


def seal(key: bytes, data: bytes, aad: bytes = AAD, chunk_size: int = CHUNK) -> bytes:
    out = io.BytesIO()
    car.encrypt_stream(key, io.BytesIO(data), out, aad, chunk_size)
    return out.getvalue()


def unseal(key: bytes, sealed: bytes, aad: bytes = AAD) -> bytes:
    out = io.BytesIO()
    car.decrypt_stream(key, io.BytesIO(sealed), out, aad)
    return out.getvalue()


def records(sealed: bytes, chunk_size: int = CHUNK) -> tuple[bytes, list[bytes]]:
    """(header, records) of a sealed stream whose records are all full except the last."""
    header_len = HEADER
    size = car.NONCE_BYTES + chunk_size + car.TAG_BYTES
    body = sealed[header_len:]
    return sealed[:header_len], [body[i:i + size] for i in range(0, len(body), size)]


# --- blobs --------------------------------------------------------------------------


def test_blob_round_trips_and_hides_the_plaintext(key):
    plaintext = b"block weights " * 100
    blob = car.encrypt_blob(key, plaintext, AAD)
    assert car.decrypt_blob(key, blob, AAD) == plaintext
    assert plaintext[:32] not in blob
    assert len(blob) == len(plaintext) + 4 + 12 + 16 and blob[:4] == b"AGB\x01"


def test_each_encryption_uses_a_fresh_nonce(key):
    assert car.encrypt_blob(key, b"same", AAD)[4:16] != car.encrypt_blob(key, b"same", AAD)[4:16]


@pytest.mark.parametrize("position", [0, 3, 4, 15, 16, -17, -1])
def test_changing_any_byte_of_a_blob_raises_integrity_error(key, position):
    blob = bytearray(car.encrypt_blob(key, b"x" * 64, AAD))
    blob[position] ^= 0x01
    with pytest.raises(car.IntegrityError):
        car.decrypt_blob(key, bytes(blob), AAD)


def test_truncated_blob_raises_integrity_error(key):
    blob = car.encrypt_blob(key, b"x" * 64, AAD)
    for cut in (1, 16, len(blob) - 4):
        with pytest.raises(car.IntegrityError):
            car.decrypt_blob(key, blob[:-cut], AAD)


def test_blob_does_not_decrypt_with_another_key(key):
    with pytest.raises(car.IntegrityError):
        car.decrypt_blob(car.generate_key(), car.encrypt_blob(key, b"weights", AAD), AAD)


@pytest.mark.parametrize("other", [
    car.block_aad("network_002", MODEL, 0, 10, 0),
    car.block_aad("network_001", hashlib.sha256(b"another model").hexdigest(), 0, 10, 0),
    car.block_aad("network_001", MODEL, 10, 20, 0),
    car.block_aad("network_001", MODEL, 0, 10, 1),
])
def test_blob_does_not_decrypt_as_another_network_model_range_or_chunk(key, other):
    with pytest.raises(car.IntegrityError):
        car.decrypt_blob(key, car.encrypt_blob(key, b"weights", AAD), other)


def test_block_aad_encodes_every_field_unambiguously():
    assert car.block_aad("ab", MODEL, 1, 2, 3) != car.block_aad("a", MODEL, 1, 2, 3)
    assert car.block_aad("n", MODEL, 1, 2, 3) == car.block_aad("n", bytes.fromhex(MODEL), 1, 2, 3)
    with pytest.raises(ValueError):
        car.block_aad("n", "abc", 0, 1)
    with pytest.raises(ValueError):
        car.block_aad("n", MODEL, 5, 5)


# --- chunked streams ----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17])
def test_stream_round_trips_at_every_chunk_boundary(key, size):
    data = os.urandom(size)
    sealed = seal(key, data)
    assert unseal(key, sealed) == data
    full, rest = divmod(size, CHUNK)
    expected_records = max(1, full + (rest > 0))
    assert len(sealed) == HEADER + size + expected_records * (car.NONCE_BYTES + car.TAG_BYTES)


def test_stream_with_one_byte_changed_raises_integrity_error(key):
    sealed = bytearray(seal(key, os.urandom(3 * CHUNK)))
    sealed[HEADER + (car.NONCE_BYTES + CHUNK + car.TAG_BYTES) + 100] ^= 0x80
    with pytest.raises(car.IntegrityError, match="record 1"):
        unseal(key, bytes(sealed))


def test_reordered_records_raise_integrity_error(key):
    header, parts = records(seal(key, os.urandom(3 * CHUNK + 5)))
    parts[0], parts[1] = parts[1], parts[0]
    with pytest.raises(car.IntegrityError):
        unseal(key, header + b"".join(parts))


def test_stream_cut_at_a_record_boundary_raises_integrity_error(key):
    header, parts = records(seal(key, os.urandom(3 * CHUNK + 5)))
    with pytest.raises(car.IntegrityError):
        unseal(key, header + b"".join(parts[:-1]))


def test_stream_with_last_full_record_dropped_raises_integrity_error(key):
    header, parts = records(seal(key, os.urandom(3 * CHUNK)))
    with pytest.raises(car.IntegrityError):
        unseal(key, header + b"".join(parts[:2]))


def test_stream_cut_inside_a_record_raises_integrity_error(key):
    sealed = seal(key, os.urandom(2 * CHUNK))
    with pytest.raises(car.IntegrityError):
        unseal(key, sealed[:-10])


def test_bytes_appended_after_the_final_record_raise_integrity_error(key):
    sealed = seal(key, os.urandom(2 * CHUNK))
    with pytest.raises(car.IntegrityError):
        unseal(key, sealed + b"\x00" * 40)


def test_record_from_another_stream_raises_integrity_error(key):
    header, parts = records(seal(key, os.urandom(3 * CHUNK)))
    _, foreign = records(seal(key, os.urandom(3 * CHUNK)))
    parts[1] = foreign[1]
    with pytest.raises(car.IntegrityError):
        unseal(key, header + b"".join(parts))


def test_stream_does_not_decrypt_with_another_key_or_context(key):
    sealed = seal(key, b"weights" * 500)
    with pytest.raises(car.IntegrityError):
        unseal(car.generate_key(), sealed)
    with pytest.raises(car.IntegrityError):
        unseal(key, sealed, car.block_aad("network_001", MODEL, 0, 10, 1))


def test_stream_header_with_another_chunk_size_raises_integrity_error(key):
    sealed = seal(key, os.urandom(2 * CHUNK))
    magic_version = sealed[:4]
    for chunk_size in (CHUNK // 2, car.MAX_CHUNK_SIZE + 1):
        with pytest.raises(car.IntegrityError):
            unseal(key, magic_version + struct.pack(">I", chunk_size) + sealed[8:])


def test_file_decrypts_into_place_only_when_intact(key, tmp_path):
    data = os.urandom(5 * CHUNK + 3)
    (tmp_path / "block.bin").write_bytes(data)
    car.encrypt_file(key, tmp_path / "block.bin", tmp_path / "block.enc", AAD, chunk_size=CHUNK)
    car.decrypt_file(key, tmp_path / "block.enc", tmp_path / "block.out", AAD)
    assert (tmp_path / "block.out").read_bytes() == data
    (tmp_path / "cut.enc").write_bytes((tmp_path / "block.enc").read_bytes()[:-CHUNK])
    with pytest.raises(car.IntegrityError):
        car.decrypt_file(key, tmp_path / "cut.enc", tmp_path / "cut.out", AAD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.bin", "block.enc", "block.out", "cut.enc"]


def test_default_chunk_size_is_4_mib(key):
    data = os.urandom(4 * 1024 * 1024 + 1)
    out = io.BytesIO()
    car.encrypt_stream(key, io.BytesIO(data), out, AAD)
    assert len(out.getvalue()) == HEADER + len(data) + 2 * (car.NONCE_BYTES + car.TAG_BYTES)
    assert unseal(key, out.getvalue()) == data


# --- key files ----------------------------------------------------------------------


def test_network_key_file_is_0600_and_loads_back(tmp_path):
    old_umask = os.umask(0)
    try:
        key = car.load_or_create_key(tmp_path / "network.key")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "network.key").st_mode) == 0o600
    assert len(key) == 32 and car.load_or_create_key(tmp_path / "network.key") == key
    assert [p.name for p in tmp_path.iterdir()] == ["network.key"]


def test_group_readable_key_file_is_refused(tmp_path):
    car.save_key(tmp_path / "network.key", car.generate_key())
    os.chmod(tmp_path / "network.key", 0o644)
    with pytest.raises(car.KeyFileError, match="chmod 600"):
        car.load_key(tmp_path / "network.key")


def test_key_file_of_the_wrong_size_is_refused(tmp_path):
    (tmp_path / "network.key").write_bytes(b"short")
    os.chmod(tmp_path / "network.key", 0o600)
    with pytest.raises(car.KeyFileError, match="5 bytes"):
        car.load_key(tmp_path / "network.key")
    with pytest.raises(car.KeyFileError, match="does not exist"):
        car.load_key(tmp_path / "missing.key")

"""The worker's block store: shards received in chunks, sealed with AES-256-GCM per chunk,
resumed after an interruption or a restart, verified against their SHA-256, and refused when
tampered with, mis-sent or unreasonable."""
from __future__ import annotations

import hashlib
import os
from collections import namedtuple

import pytest

from worker import blocks as blocks_mod
from worker.blocks import BlockStore, BlockTransferError, ShardIntegrityError, ShardNotFound
from worker.crypto_at_rest import IntegrityError, generate_key

NET = "net-home"
MODEL_SHA = hashlib.sha256(b"a model file").hexdigest()
RANGE = {"model_id": "SmolLM2-135M-test", "start": 10, "end": 20, "total": 30}
CHUNK = 4096
MARKER = b"PLAINTEXT-MARKER-" * 8  # 136 recognisable bytes, repeated through the shard


def shard_bytes(n: int = 5 * CHUNK + 123, seed: int = 0) -> bytes:
    """A shard of ``n`` bytes: random data interleaved with MARKER (so plaintext is easy to spot)."""
    body = bytearray(os.urandom(n) if seed == 0 else hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))
    for i in range(0, n - len(MARKER), 1000):
        body[i:i + len(MARKER)] = MARKER
    return bytes(body[:n])


def offer(store: BlockStore, data: bytes, rng=RANGE, model=MODEL_SHA, sha=None, chunk=CHUNK, epoch=1):
    return store.offer(model, rng, sha or hashlib.sha256(data).hexdigest(), len(data), chunk, epoch=epoch)


def send(store: BlockStore, data: bytes, start: int = 0, stop: int | None = None, chunk: int = CHUNK, sha=None):
    """Send chunks from ``start`` until ``stop`` bytes (default: all); return the last status."""
    sha = sha or hashlib.sha256(data).hexdigest()
    status, stop = None, len(data) if stop is None else stop
    for off in range(start, stop, chunk):
        piece = data[off:min(off + chunk, stop)]
        status = store.write_chunk(sha, off, piece, hashlib.sha256(piece).hexdigest())
    return status


@pytest.fixture
def key():
    return generate_key()


@pytest.fixture
def store(tmp_path, key):
    return BlockStore(tmp_path / "blocks", NET, key)


def test_full_transfer_is_verified_found_and_loaded_back(store):
    data = shard_bytes()
    sha = hashlib.sha256(data).hexdigest()
    first = offer(store, data)
    assert (first.state, first.have_bytes) == ("need", 0)
    middle = send(store, data, stop=2 * CHUNK)
    assert (middle.state, middle.have_bytes) == ("receiving", 2 * CHUNK)
    last = send(store, data, start=2 * CHUNK)
    assert (last.state, last.have_bytes, last.shard_sha256) == ("verified", len(data), sha)
    assert store.find(MODEL_SHA, RANGE) == sha
    assert store.find(MODEL_SHA, {**RANGE, "end": 21}) is None
    assert store.load(sha) == data
    assert sorted(p.name for p in store.directory.iterdir()) == [f"{sha}.json", f"{sha}.sealed"]
    assert last.to_payload() == {"shard_sha256": sha, "have_bytes": len(data), "state": "verified",
                                 "message": last.message}


def test_transfer_resumes_after_restart_where_it_stopped(tmp_path, key):
    data = shard_bytes()
    sha = hashlib.sha256(data).hexdigest()
    before = BlockStore(tmp_path / "blocks", NET, key)
    offer(before, data)
    send(before, data, stop=3 * CHUNK)
    after = BlockStore(tmp_path / "blocks", NET, key)  # the daemon restarted
    resumed = offer(after, data)
    assert (resumed.state, resumed.have_bytes) == ("receiving", 3 * CHUNK)
    assert send(after, data, start=resumed.have_bytes).state == "verified"
    assert after.load(sha) == data


def test_a_record_cut_by_a_crash_is_dropped_and_resent(tmp_path, key):
    data = shard_bytes()
    sha = hashlib.sha256(data).hexdigest()
    before = BlockStore(tmp_path / "blocks", NET, key)
    offer(before, data)
    send(before, data, stop=2 * CHUNK)
    part = before.directory / f"{sha}.part"
    good = part.stat().st_size
    with open(part, "ab") as f:  # the start of a third record, as a crash mid-write leaves it
        f.write(b"\x00\x00\x10\x00AGB\x01" + os.urandom(700))
    after = BlockStore(tmp_path / "blocks", NET, key)
    resumed = offer(after, data)
    assert resumed.have_bytes == 2 * CHUNK
    assert part.stat().st_size == good
    assert send(after, data, start=2 * CHUNK).state == "verified"
    assert after.load(sha) == data


def test_chunk_with_wrong_hash_is_refused_and_not_stored(store):
    data = shard_bytes()
    sha = hashlib.sha256(data).hexdigest()
    offer(store, data)
    with pytest.raises(BlockTransferError, match="SHA-256") as e:
        store.write_chunk(sha, 0, data[:CHUNK], hashlib.sha256(b"something else").hexdigest())
    assert e.value.code == "invalid_payload"
    assert offer(store, data).have_bytes == 0


def test_chunk_at_wrong_offset_is_refused_with_the_offset_to_resume_at(store):
    data = shard_bytes()
    sha = hashlib.sha256(data).hexdigest()
    offer(store, data)
    send(store, data, stop=CHUNK)
    piece = data[2 * CHUNK:3 * CHUNK]
    with pytest.raises(BlockTransferError, match=f"send the chunk at {CHUNK}") as e:
        store.write_chunk(sha, 2 * CHUNK, piece, hashlib.sha256(piece).hexdigest())
    assert e.value.code == "conflict"
    assert offer(store, data).have_bytes == CHUNK


def test_oversized_chunk_unknown_shard_and_chunk_past_the_end_are_refused(store):
    data = shard_bytes(2 * CHUNK)
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(BlockTransferError, match="send blocks_offer first") as e:
        store.write_chunk(sha, 0, data[:CHUNK], hashlib.sha256(data[:CHUNK]).hexdigest())
    assert e.value.code == "not_found"
    offer(store, data)
    big = data[:CHUNK + 1]
    with pytest.raises(BlockTransferError, match=f"1..{CHUNK} bytes"):
        store.write_chunk(sha, 0, big, hashlib.sha256(big).hexdigest())
    send(store, data, stop=CHUNK)
    with pytest.raises(BlockTransferError, match="runs past"):
        offer_small = BlockStore(store.directory, NET, store._key)  # same state seen by a fresh object
        offer(offer_small, data, chunk=2 * CHUNK)
        tail = data[CHUNK:] + b"x"
        offer_small.write_chunk(sha, CHUNK, tail, hashlib.sha256(tail).hexdigest())


def test_offers_over_the_cap_or_the_free_disk_space_are_refused(tmp_path, key, monkeypatch):
    capped = BlockStore(tmp_path / "capped", NET, key, max_shard_bytes=10 * CHUNK)
    with pytest.raises(BlockTransferError, match="over this node's limit"):
        offer(capped, shard_bytes(10 * CHUNK + 1))
    assert offer(capped, shard_bytes(10 * CHUNK)).state == "need"
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(blocks_mod.shutil, "disk_usage", lambda path: Usage(1 << 40, (1 << 40) - (1 << 20), 1 << 20))
    with pytest.raises(BlockTransferError, match="free disk space") as e:
        offer(BlockStore(tmp_path / "full", NET, key), shard_bytes())
    assert e.value.code == "conflict"
    with pytest.raises(BlockTransferError, match="SHA-256 digest"):
        store = BlockStore(tmp_path / "other", NET, key)
        store.offer(MODEL_SHA, RANGE, "../../etc/passwd".ljust(64, "0"), 10, 10)
    with pytest.raises(BlockTransferError, match="block range"):
        store.offer(MODEL_SHA, {**RANGE, "start": 25}, "a" * 64, 10, 10)


def test_tampered_ciphertext_on_disk_fails_to_load(store):
    data = shard_bytes()
    sha = hashlib.sha256(data).hexdigest()
    offer(store, data)
    send(store, data)
    sealed = store.directory / f"{sha}.sealed"
    raw = bytearray(sealed.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    sealed.write_bytes(bytes(raw))
    with pytest.raises(ShardIntegrityError, match="failed authentication") as e:
        store.load(sha)
    assert isinstance(e.value, IntegrityError)


def test_truncated_shard_fails_to_load(store):
    data = shard_bytes()
    sha = hashlib.sha256(data).hexdigest()
    offer(store, data)
    send(store, data)
    sealed = store.directory / f"{sha}.sealed"
    raw = sealed.read_bytes()
    last = len(data) % CHUNK + blocks_mod.RECORD_OVERHEAD
    sealed.write_bytes(raw[:-last])  # cut at a record boundary: every remaining record authenticates
    with pytest.raises(ShardIntegrityError, match="not the"):
        store.load(sha)


def test_shard_sealed_for_another_network_does_not_load(tmp_path, key):
    data = shard_bytes()
    sha = hashlib.sha256(data).hexdigest()
    home = BlockStore(tmp_path / "home", NET, key)
    offer(home, data)
    send(home, data)
    other = BlockStore(tmp_path / "home", "net-other", key)  # same key, other network id in the AAD
    with pytest.raises(ShardIntegrityError):
        other.load(sha)
    stranger = BlockStore(tmp_path / "home", NET, generate_key())
    with pytest.raises(ShardIntegrityError):
        stranger.load(sha)


def test_reoffer_of_a_held_shard_is_verified_without_resending(tmp_path, key):
    data = shard_bytes()
    sha = hashlib.sha256(data).hexdigest()
    store = BlockStore(tmp_path / "blocks", NET, key)
    offer(store, data)
    send(store, data)
    again = offer(BlockStore(tmp_path / "blocks", NET, key), data, epoch=2)
    assert (again.state, again.have_bytes) == ("verified", len(data))
    assert store.info(sha)["epoch"] == 2
    with pytest.raises(BlockTransferError, match="already complete") as e:
        store.write_chunk(sha, 0, data[:CHUNK], hashlib.sha256(data[:CHUNK]).hexdigest())
    assert e.value.code == "conflict"


def test_ciphertext_on_disk_contains_no_plaintext(store):
    data = shard_bytes()
    sha = hashlib.sha256(data).hexdigest()
    offer(store, data)
    send(store, data, stop=2 * CHUNK)
    partial = (store.directory / f"{sha}.part").read_bytes()
    send(store, data, start=2 * CHUNK)
    sealed = (store.directory / f"{sha}.sealed").read_bytes()
    for disk in (partial, sealed):
        assert MARKER[:32] not in disk
        assert data[:64] not in disk and data[-64:] not in disk
    assert len(sealed) == len(data) + 6 * blocks_mod.RECORD_OVERHEAD  # 6 chunks, one record each


def test_complete_shard_with_wrong_hash_fails_and_is_discarded(store):
    data = shard_bytes()
    claimed = hashlib.sha256(b"the shard the admin meant").hexdigest()
    offer(store, data, sha=claimed)
    status = send(store, data, sha=claimed)
    assert (status.state, status.have_bytes) == ("failed", 0)
    assert "does not match its SHA-256" in status.message
    assert list(store.directory.iterdir()) == []
    with pytest.raises(ShardNotFound):
        store.load(claimed)


def test_verifying_a_new_shard_deletes_the_old_one(store):
    old, new = shard_bytes(seed=1), shard_bytes(seed=2)
    old_sha, new_sha = hashlib.sha256(old).hexdigest(), hashlib.sha256(new).hexdigest()
    offer(store, old)
    send(store, old)
    offer(store, new, rng={**RANGE, "start": 0})
    send(store, new, stop=CHUNK)
    assert store.load(old_sha) == old  # still serving until the new one is verified
    send(store, new, start=CHUNK)
    assert store.find(MODEL_SHA, RANGE) is None
    assert store.find(MODEL_SHA, {**RANGE, "start": 0}) == new_sha
    assert sorted(p.name for p in store.directory.iterdir()) == [f"{new_sha}.json", f"{new_sha}.sealed"]


def test_a_new_offer_abandons_another_unfinished_transfer(store):
    a, b = shard_bytes(seed=3), shard_bytes(seed=4)
    offer(store, a)
    send(store, a, stop=CHUNK)
    offer(store, b)
    assert not (store.directory / f"{hashlib.sha256(a).hexdigest()}.part").exists()
    assert offer(store, a).have_bytes == 0


def test_transfer_complete_before_a_crash_is_verified_on_the_next_offer(tmp_path, key):
    data = shard_bytes()
    store = BlockStore(tmp_path / "blocks", NET, key)
    offer(store, data)
    sha = hashlib.sha256(data).hexdigest()
    send(store, data, stop=5 * CHUNK)
    last = data[5 * CHUNK:]
    # the record is appended exactly as write_chunk would, then the process "dies" before verifying
    t = store._transfers[sha]
    record = blocks_mod.RECORD_HEADER.pack(len(last)) + blocks_mod.encrypt_blob(key, last, store._aad(t.meta, 5))
    with open(store.directory / f"{sha}.part", "ab") as f:
        f.write(record)
    status = offer(BlockStore(tmp_path / "blocks", NET, key), data)
    assert (status.state, status.have_bytes) == ("verified", len(data))


def test_records_swapped_on_disk_fail_to_load(store):
    data = shard_bytes(4 * CHUNK)
    sha = hashlib.sha256(data).hexdigest()
    offer(store, data)
    send(store, data)
    sealed = store.directory / f"{sha}.sealed"
    raw = sealed.read_bytes()
    size = CHUNK + blocks_mod.RECORD_OVERHEAD  # every record holds a full chunk here
    records = [raw[i:i + size] for i in range(0, len(raw), size)]
    sealed.write_bytes(b"".join([records[1], records[0], *records[2:]]))
    with pytest.raises(ShardIntegrityError, match="record 0"):
        store.load(sha)

"""Shard files: the quantized tensors of one block range, deterministic, small, self-checking, and
loading into a Stage that computes exactly what a Stage loaded from the whole GGUF computes."""
from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pytest

from worker.engine import BlockRange, ModelFile, ModelLoadError, Stage, default_model_path
from worker.engine.shardfile import (
    ALIGNMENT, FORMAT_VERSION, MAGIC, ShardFile, ShardFormatError, build_shard, model_sha256,
)

BLOCK_TENSORS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]


@pytest.fixture(scope="module")
def mf() -> ModelFile:
    return ModelFile(default_model_path())


def rng_of(mf: ModelFile, start: int, end: int) -> BlockRange:
    return BlockRange(mf.model_id, start, end, mf.config.n_block)


def expected_names(mf: ModelFile, r: BlockRange) -> set[str]:
    names = {f"blk.{i}.{n}.weight" for i in r for n in BLOCK_TENSORS}
    if r.is_first or (r.is_last and mf.config.tied_output):
        names.add("token_embd.weight")
    if r.is_last:
        names.add("output_norm.weight")
        if not mf.config.tied_output:
            names.add("output.weight")
    return names


def split(data: bytes) -> tuple[dict, bytes]:
    """(header, data section) of shard bytes."""
    _, hlen = struct.unpack_from("<8sI", data, 0)
    return json.loads(data[12 : 12 + hlen]), data[12 + hlen : -32]


def rebuild(header: dict, section: bytes) -> bytes:
    """Shard bytes with ``header`` and a valid trailing checksum (to test checks past the checksum)."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-(12 + len(text)) % ALIGNMENT)
    body = MAGIC + struct.pack("<I", len(text)) + text + section
    return body + hashlib.sha256(body).digest()


def test_model_sha256_is_the_files_sha256_and_follows_changes(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(b"first version")
    assert model_sha256(p) == hashlib.sha256(b"first version").hexdigest()
    p.write_bytes(b"second, longer version")
    assert model_sha256(p) == hashlib.sha256(b"second, longer version").hexdigest()


def test_the_same_file_and_range_give_identical_bytes(mf):
    r = rng_of(mf, 10, 12)
    a, b = build_shard(mf, r), build_shard(default_model_path(), r)
    assert a.data == b.data
    assert a.sha256 == b.sha256 == hashlib.sha256(a.data).hexdigest()
    assert a.model_sha256 == model_sha256(mf.path)
    assert build_shard(mf, rng_of(mf, 11, 13)).sha256 != a.sha256


def test_a_two_block_shard_is_a_small_fraction_of_the_file(mf):
    b = build_shard(mf, rng_of(mf, 10, 12))
    file_bytes = os.path.getsize(mf.path)
    assert len(b.data) < file_bytes / 15  # two of 30 blocks, quantized, no embedding
    raw = sum(t.n_bytes for t in mf.reader.tensors if t.name.startswith(("blk.10.", "blk.11.")))
    assert raw <= len(b.data) < raw + 64 * 1024  # the tensors as stored, plus header and padding
    assert b.tensors == 18


def test_the_header_names_the_model_range_and_config_and_tensors_are_aligned(mf):
    r = rng_of(mf, 0, 2)
    header, section = split(build_shard(mf, r).data)
    assert header["format"] == "argus-shard" and header["version"] == FORMAT_VERSION
    assert header["model_id"] == mf.model_id and header["model_sha256"] == model_sha256(mf.path)
    assert header["block_range"] == {"start": 0, "end": 2, "total": 30}
    assert header["config"]["d_model"] == mf.config.d_model and header["config"]["tied_output"] is True
    data = build_shard(mf, r).data
    assert (len(data) - 32 - len(section)) % ALIGNMENT == 0  # the data section starts aligned
    assert all(t["offset"] % ALIGNMENT == 0 for t in header["tensors"])
    embd = next(t for t in header["tensors"] if t["name"] == "token_embd.weight")
    assert embd["type"] == "Q8_0" and embd["shape"] == [mf.config.vocab_size, mf.config.d_model]
    stored = mf.reader.tensors[[t.name for t in mf.reader.tensors].index("blk.1.ffn_down.weight")]
    entry = next(t for t in header["tensors"] if t["name"] == "blk.1.ffn_down.weight")
    assert section[entry["offset"] : entry["offset"] + entry["nbytes"]] == bytes(
        mf.reader.data[stored.data_offset : stored.data_offset + stored.n_bytes]
    )


@pytest.mark.parametrize("start,end", [(0, 2), (14, 16), (28, 30), (0, 30)], ids=["first", "middle", "last", "whole"])
def test_a_shard_round_trips_to_the_model_files_tensors(mf, start, end):
    r = rng_of(mf, start, end)
    sf = ShardFile.from_bytes(build_shard(mf, r).data)
    assert set(sf.tensor_names()) == expected_names(mf, r)
    assert sf.config == mf.config and sf.model_id == mf.model_id and sf.block_range == r
    assert sf.model_sha256 == model_sha256(mf.path)
    for name in sf.tensor_names():
        a, b = sf.tensor(name), mf.tensor(name)
        assert a.dtype == np.float32 and a.shape == b.shape and np.array_equal(a, b), name


def test_a_shard_opened_from_a_file_equals_one_from_bytes(mf, tmp_path):
    b = build_shard(mf, rng_of(mf, 14, 16))
    path = tmp_path / "14-16.shard"
    path.write_bytes(b.data)
    sf = ShardFile.open(path)
    assert sf.sha256 == b.sha256 and sf.nbytes == len(b.data)
    assert np.array_equal(sf.tensor("blk.15.attn_q.weight"), mf.tensor("blk.15.attn_q.weight"))


def test_asking_for_a_tensor_outside_the_range_is_refused(mf):
    sf = ShardFile.from_bytes(build_shard(mf, rng_of(mf, 14, 16)).data)
    assert sf.has("blk.14.attn_q.weight") and not sf.has("blk.16.attn_q.weight")
    with pytest.raises(ShardFormatError, match="does not hold the tensor blk.16.attn_q.weight"):
        sf.tensor("blk.16.attn_q.weight")
    with pytest.raises(ShardFormatError, match="token_embd"):
        sf.tensor("token_embd.weight")
    with pytest.raises(ModelLoadError):  # what Stage.from_model_file callers catch for a whole GGUF
        Stage.from_model_file(sf, rng_of(mf, 15, 17))


def test_a_range_of_another_model_is_refused(mf):
    with pytest.raises(ValueError, match="not a block range"):
        build_shard(mf, BlockRange("another-model", 0, 2, 30))
    with pytest.raises(ValueError, match="not a block range"):
        build_shard(mf, BlockRange(mf.model_id, 0, 2, 31))


@pytest.fixture(scope="module")
def good(mf) -> bytes:
    return build_shard(mf, rng_of(mf, 14, 16)).data


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.mark.parametrize("damage,message", [
    (lambda d: d[: len(d) // 2], "checksum"),
    (lambda d: d[:-1], "checksum"),
    (lambda d: d[:200], "truncated"),
    (lambda d: d[:10], "too short"),
    (lambda d: b"", "too short"),
    (lambda d: _flip(d, len(d) - 1000), "checksum"),  # one bit of tensor data
    (lambda d: _flip(d, 40), "checksum"),  # one bit of the header
    (lambda d: b"GGUF" + d[4:], "not a shard"),
    (lambda d: d + b"\0", "checksum"),
], ids=["half", "last_byte_cut", "header_cut", "prefix_cut", "empty", "data_bit", "header_bit", "magic", "trailing_byte"])
def test_damaged_bytes_are_refused_with_a_clear_error(good, damage, message):
    with pytest.raises(ShardFormatError, match=message):
        ShardFile.from_bytes(damage(good))


def test_another_format_version_is_refused(good):
    header, section = split(good)
    header["version"] = FORMAT_VERSION + 1
    with pytest.raises(ShardFormatError, match=f"format version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        ShardFile.from_bytes(rebuild(header, section))


def test_a_header_listing_a_tensor_outside_its_range_is_refused(good):
    header, section = split(good)
    header["tensors"][0]["name"] = "blk.3.attn_norm.weight"
    with pytest.raises(ShardFormatError, match="outside its range: blk.3.attn_norm.weight"):
        ShardFile.from_bytes(rebuild(header, section))


def test_a_header_missing_a_tensor_or_inconsistent_with_the_data_is_refused(good):
    header, section = split(good)
    missing = dict(header, tensors=header["tensors"][1:])
    with pytest.raises(ShardFormatError, match="lacks tensors it needs: blk.14"):
        ShardFile.from_bytes(rebuild(missing, section))
    too_big = json.loads(json.dumps(header))
    too_big["tensors"][-1]["offset"] = header["data_bytes"]
    with pytest.raises(ShardFormatError, match="inconsistent"):
        ShardFile.from_bytes(rebuild(too_big, section))
    bad_config = json.loads(json.dumps(header))
    bad_config["config"]["n_block"] = "30"
    with pytest.raises(ShardFormatError, match="inconsistent"):
        ShardFile.from_bytes(rebuild(bad_config, section))
    with pytest.raises(ShardFormatError, match="should be"):
        ShardFile.from_bytes(rebuild(header, section + bytes(32)))


def test_opening_a_missing_or_empty_file_is_refused(tmp_path):
    with pytest.raises(ShardFormatError, match="Could not open"):
        ShardFile.open(tmp_path / "absent.shard")
    (tmp_path / "empty.shard").write_bytes(b"")
    with pytest.raises(ShardFormatError, match="empty"):
        ShardFile.open(tmp_path / "empty.shard")


@pytest.mark.parametrize("start,end", [(0, 3), (14, 16), (27, 30)], ids=["first", "middle", "last"])
def test_a_stage_from_a_shard_computes_exactly_what_a_stage_from_the_file_computes(mf, start, end):
    r = rng_of(mf, start, end)
    from_file = Stage.from_model_file(mf, r)
    from_shard = Stage.from_model_file(ShardFile.from_bytes(build_shard(mf, r).data), r)
    if r.is_first:
        x = np.array([1, 9690, 198, 504, 3575, 282, 4649, 314])
    else:
        x = np.random.default_rng(0).standard_normal((8, mf.config.d_model)).astype(np.float32)
    a, b = from_file.forward("s", x, 0), from_shard.forward("s", x, 0)
    assert np.array_equal(a, b)
    a, b = from_file.forward("s", x[:1], 8), from_shard.forward("s", x[:1], 8)
    assert np.array_equal(a, b)
    assert from_shard.nbytes == from_file.nbytes

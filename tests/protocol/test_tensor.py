"""Tensor frames (worker/protocol/tensor.py): the binary frame format, byte-exact round trips,
refusals, and pairing a frame with the message it follows.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from worker.protocol import (
    MAX_BLOCK_CHUNK,
    MAX_TENSOR_FRAME_BYTES,
    TENSOR_DTYPES,
    InvalidPayload,
    Message,
    ProtocolError,
    TensorFrame,
    check_tensor_for,
    decode_frame,
    decode_tensor,
    encode_message,
    encode_tensor,
    make_message,
)

from tests.protocol.samples import (
    DTYPES,
    NET,
    NOW,
    SESSION,
    SHA_SHARD,
    code_of,
    decode,
    sample,
    some_array,
)

SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (1, 2, 3, 2), (0,), (4, 0), (2, 0, 3), (0, 1, 1, 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensor_round_trip_is_byte_exact(dtype, shape):
    a = some_array(dtype, shape)
    frame = encode_tensor(a, "sess-42", 2**64 - 1, "req-1")
    t = decode_tensor(frame)
    assert isinstance(t, TensorFrame)
    assert (t.session_id, t.step, t.request_id) == ("sess-42", 2**64 - 1, "req-1")
    assert t.array.dtype == np.dtype(dtype).newbyteorder("<") and t.array.shape == shape
    assert t.array.tobytes() == a.tobytes()  # bit-exact, NaN payloads and -0.0 included
    assert encode_tensor(t.array, t.session_id, t.step, t.request_id) == frame


def test_decoded_array_is_a_read_only_view_of_the_frame():
    frame = encode_tensor(np.arange(12, dtype=np.float32).reshape(3, 4), "s", 0, "r")
    t = decode_tensor(frame)
    assert np.shares_memory(t.array, np.frombuffer(frame, np.uint8))
    assert not t.array.flags.writeable
    with pytest.raises(ValueError):
        t.array[0, 0] = 1.0
    buf = bytearray(frame)  # a writable buffer still gives a read-only view
    t2 = decode_tensor(buf)
    assert not t2.array.flags.writeable and np.shares_memory(t2.array, np.frombuffer(buf, np.uint8))
    assert decode_tensor(memoryview(frame)).array.tolist() == t.array.tolist()


@pytest.mark.parametrize("sid,rid", [("s", "r"), ("s" * 64, "r" * 64), ("ab", "cde"), ("sess-42", "r")])
def test_tensor_data_starts_aligned_to_8_bytes(sid, rid):
    a = np.arange(3, dtype=np.int64)
    frame = encode_tensor(a, sid, 1, rid)
    assert (len(frame) - a.nbytes) % 8 == 0
    assert frame[-a.nbytes:] == a.tobytes()


def test_big_endian_and_strided_arrays_are_sent_little_endian_c_order():
    a = np.arange(12, dtype=">f4").reshape(3, 4).T  # big-endian, Fortran-ordered view
    t = decode_tensor(encode_tensor(a, "s", 0, "r"))
    assert t.array.dtype.str == "<f4" and np.array_equal(t.array, a)
    assert encode_tensor(a, "s", 0, "r") == encode_tensor(np.ascontiguousarray(a, "<f4"), "s", 0, "r")


@pytest.mark.parametrize("array,err", [
    (np.zeros(2, np.float64), TypeError),
    (np.zeros(2, np.bool_), TypeError),
    (np.zeros(2, np.int16), TypeError),
    (np.zeros((1, 1, 1, 1, 1), np.float32), ValueError),
])
def test_encode_refuses_unsupported_arrays(array, err):
    with pytest.raises(err):
        encode_tensor(array, "s", 0, "r")


@pytest.mark.parametrize("sid,step,rid", [("", 0, "r"), ("s" * 65, 0, "r"), ("s", -1, "r"), ("s", 2**64, "r"),
                                          ("s", 0, "é"), ("s", 0, "a b"), ("s", True, "r")])
def test_encode_refuses_bad_ids_and_steps(sid, step, rid):
    with pytest.raises(ValueError):
        encode_tensor(np.zeros(1, np.float32), sid, step, rid)


def test_encode_refuses_frames_over_the_limit():
    big = np.zeros(MAX_TENSOR_FRAME_BYTES // 4, np.float32)  # data alone fills the limit; the header tips it over
    with pytest.raises(ValueError, match="exceeds the limit"):
        encode_tensor(big, "s", 0, "r")


def frame_parts(sid=b"s1", rid=b"r1", dtype=1, shape=(2, 3), step=7, data=None, magic=b"ARGT", version=1,
                ndim=None, pad=None) -> bytes:
    """A tensor frame assembled by hand, field by field, to corrupt one at a time."""
    ndim = len(shape) if ndim is None else ndim
    head = (struct.pack("<4sBBB", magic, version, dtype, ndim) + struct.pack(f"<{len(shape)}I", *shape)
            + bytes([len(sid)]) + sid + struct.pack("<Q", step) + bytes([len(rid)]) + rid)
    head += (b"\x00" * (-len(head) % 8)) if pad is None else pad
    if data is None:
        data = bytes(int(np.prod(shape)) * TENSOR_DTYPES.get(dtype, np.dtype("f4")).itemsize)
    return head + data


def test_hand_built_frame_matches_the_encoder():
    assert frame_parts() == encode_tensor(np.zeros((2, 3), np.float32), "s1", 7, "r1")


GOOD = frame_parts()
MALFORMED = {
    "empty": b"",
    "prefix only": GOOD[:7],
    "bad magic": frame_parts(magic=b"ARGX"),
    "lowercase magic": frame_parts(magic=b"argt"),
    "header version 0": frame_parts(version=0),
    "header version 2": frame_parts(version=2),
    "dtype code 0": frame_parts(dtype=0),
    "dtype code 6": frame_parts(dtype=6),
    "dtype code 255": frame_parts(dtype=255),
    "ndim 5": frame_parts(shape=(1, 1, 1, 1, 1)),
    "ndim 255, short": frame_parts(ndim=255),
    "ndim says 3, shape has 2": frame_parts(ndim=3),
    "shape product overflows": frame_parts(shape=(2**32 - 1,) * 4, data=b""),
    "shape over the max": frame_parts(shape=(MAX_TENSOR_FRAME_BYTES // 4 + 1,), data=b""),
    "data one byte short": GOOD[:-1],
    "trailing byte": GOOD + b"\x00",
    "data for another shape": frame_parts(shape=(2, 3), data=bytes(20)),
    "zero-length session id": frame_parts(sid=b""),
    "65-byte session id": frame_parts(sid=b"s" * 65),
    "non-ascii session id": frame_parts(sid="sé".encode()),
    "session id with NUL": frame_parts(sid=b"s\x00"),
    "zero-length request id": frame_parts(rid=b""),
    "request id with space": frame_parts(rid=b"r 1"),
    "non-zero padding": frame_parts(pad=b"\x00\x00\x00\x00\x00\x00\x01"),
    "padding missing": frame_parts(pad=b""),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_tensor_frames(name):
    with pytest.raises(ProtocolError) as ei:
        decode_tensor(MALFORMED[name])
    assert ei.value.code == "malformed_frame"


def test_every_truncation_of_a_frame_is_malformed():
    for n in range(len(GOOD)):
        assert code_of(decode_tensor, GOOD[:n]) == "malformed_frame"


def test_tensor_errors_carry_the_request_id_once_read():
    with pytest.raises(ProtocolError) as ei:
        decode_tensor(GOOD + b"\x00")
    assert ei.value.request_id == "r1"
    with pytest.raises(ProtocolError) as ei:
        decode_tensor(frame_parts(magic=b"NOPE"))
    assert ei.value.request_id is None


def test_tensor_frame_must_match_its_message():
    fwd = sample("forward", request_id="req-5")
    check_tensor_for(fwd, decode_tensor(encode_tensor(np.zeros((5, 576), np.float32), SESSION, 0, "req-5")))
    with pytest.raises(InvalidPayload, match="does not match"):
        check_tensor_for(fwd, decode_tensor(encode_tensor(np.zeros(1, np.float32), "net-1.conv-43", 0, "req-5")))
    with pytest.raises(InvalidPayload, match="does not match"):
        check_tensor_for(fwd, decode_tensor(encode_tensor(np.zeros(1, np.float32), SESSION, 0, "req-6")))
    with pytest.raises(InvalidPayload, match="does not carry"):
        check_tensor_for(sample("heartbeat"), decode_tensor(GOOD))
    with pytest.raises(InvalidPayload, match="does not carry"):
        check_tensor_for(sample("session_query"), decode_tensor(encode_tensor(np.zeros(1, np.float32), SESSION, 0,
                                                                              "req-1")))


def test_block_chunk_travels_as_a_u8_tensor_named_by_the_shard():
    """A blocks_chunk's data is a 1-d uint8 tensor frame; its session id names the transfer (blocks-<epoch>)."""
    import hashlib

    data = np.frombuffer(bytes(range(256)) * 16, np.uint8)
    m = make_message("blocks_chunk", {"shard_sha256": SHA_SHARD, "offset": 0,
                                      "sha256": hashlib.sha256(data.tobytes()).hexdigest()},
                     network_id=NET, session_id="blocks-3", timestamp=NOW)
    tf = decode_tensor(encode_tensor(data, m.session_id, 0, m.request_id))
    check_tensor_for(decode(encode_message(m)), tf)
    assert tf.array.dtype == np.uint8 and hashlib.sha256(tf.array).hexdigest() == m.payload["sha256"]
    frame = encode_tensor(np.zeros(MAX_BLOCK_CHUNK, np.uint8), "s" * 64, 0, "r" * 64)
    assert len(frame) <= MAX_TENSOR_FRAME_BYTES  # the largest chunk fits one binary frame


def test_decode_frame_dispatches_on_websockets_types():
    assert isinstance(decode_frame(encode_message(sample("leave")), now=NOW), Message)
    assert isinstance(decode_frame(GOOD), TensorFrame)

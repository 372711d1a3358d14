"""Tensor frames: the binary WebSocket message (opcode 0x2) that carries one array.

The project's own format (magic ``b"ARGT"``, layout below): ``encode_tensor``
builds one from a NumPy array, ``decode_tensor`` parses one into a
``TensorFrame`` whose array views the frame's bytes (no copy). Which message a
frame belongs to is checked by ``envelope.check_tensor_for``.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Union

import numpy as np

from worker.protocol.errors import MalformedFrame, ProtocolError
from worker.protocol.limits import ID_RULE, MAX_ID_CHARS, MAX_TENSOR_FRAME_BYTES, MAX_TENSOR_NDIM, check_frame_size
from worker.protocol.schema import is_id, safe_repr

# Layout (all integers little-endian), the project's own format:
#   0      4        magic b"ARGT"
#   4      1        header version (1)
#   5      1        dtype code (TENSOR_DTYPES)
#   6      1        ndim (0..4)
#   7      4*ndim   shape, u32 each
#   ..     1        session id length S (1..64), then S bytes UTF-8 session id
#   ..     8        step, u64
#   ..     1        request id length R (1..64), then R bytes UTF-8 request id
#   ..     0..7     zero padding, so the data starts at a multiple of 8
#   ..     N        data: prod(shape) * itemsize bytes, C order; nothing after it

TENSOR_MAGIC = b"ARGT"
TENSOR_HEADER_VERSION = 1
TENSOR_ALIGN = 8
TENSOR_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # f32
    2: np.dtype("<f2"),  # f16
    3: np.dtype("<i4"),  # i32
    4: np.dtype("<i8"),  # i64
    5: np.dtype("u1"),  # u8
}
_DTYPE_CODES = {dt: code for code, dt in TENSOR_DTYPES.items()}
_PREFIX = struct.Struct("<4sBBB")  # magic, header version, dtype code, ndim
_U8, _U64 = struct.Struct("<B"), struct.Struct("<Q")


@dataclass(frozen=True)
class TensorFrame:
    """A decoded tensor frame. ``array`` is a read-only view into the frame's bytes (no copy)."""

    array: np.ndarray
    session_id: str
    step: int
    request_id: str


def tensor_header_size(ndim: int, session_id: str, request_id: str) -> int:
    """Bytes before the data, padding included (a multiple of TENSOR_ALIGN)."""
    n = _PREFIX.size + 4 * ndim + 1 + len(session_id.encode()) + _U64.size + 1 + len(request_id.encode())
    return -(-n // TENSOR_ALIGN) * TENSOR_ALIGN


def encode_tensor(array: np.ndarray, session_id: str, step: int, request_id: str) -> bytes:
    """One binary frame (RFC 6455 opcode 0x2) carrying ``array``; see the layout above.

    ``array``: float32, float16, int32, int64 or uint8, 0..4 dimensions, any
    byte order or strides (sent little-endian, C order). ``step``: 0 ≤ step < 2**64.
    Ids: see ``ID_PATTERN``.
    Raises TypeError for another dtype, ValueError for other bad arguments or a
    frame over MAX_TENSOR_FRAME_BYTES.
    """
    a = np.asarray(array)
    code = _DTYPE_CODES.get(a.dtype.newbyteorder("<"))
    if code is None:
        raise TypeError(f"tensor dtype {a.dtype} is not one of float32, float16, int32, int64, uint8; cast it first")
    if a.ndim > MAX_TENSOR_NDIM:
        raise ValueError(f"tensor has {a.ndim} dimensions; the limit is {MAX_TENSOR_NDIM}")
    for name, v in (("session_id", session_id), ("request_id", request_id)):
        if not is_id(v):
            raise ValueError(f"{name} must be {ID_RULE}; got {safe_repr(v)}")
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or not 0 <= step < 1 << 64:
        raise ValueError(f"step must be an integer in 0..2**64-1, got {safe_repr(step)}")
    if any(d >= 1 << 32 for d in a.shape):
        raise ValueError(f"tensor dimension {max(a.shape)} does not fit a u32")
    a = np.asarray(a, dtype=TENSOR_DTYPES[code], order="C")  # keeps 0-d (ascontiguousarray would not)
    sid, rid = session_id.encode(), request_id.encode()
    head = b"".join((
        _PREFIX.pack(TENSOR_MAGIC, TENSOR_HEADER_VERSION, code, a.ndim),
        struct.pack(f"<{a.ndim}I", *a.shape),
        _U8.pack(len(sid)), sid, _U64.pack(int(step)), _U8.pack(len(rid)), rid,
    ))
    head += b"\x00" * (-len(head) % TENSOR_ALIGN)
    if len(head) + a.nbytes > MAX_TENSOR_FRAME_BYTES:
        raise ValueError(f"tensor frame of {len(head) + a.nbytes} bytes exceeds the limit of {MAX_TENSOR_FRAME_BYTES}")
    return b"".join((head, memoryview(a)))  # one copy: header and data into the frame


def decode_tensor(frame: Union[bytes, bytearray, memoryview]) -> TensorFrame:
    """Parse one binary frame into a TensorFrame whose array views ``frame`` (read-only, no copy).

    Raises FrameTooLarge over MAX_TENSOR_FRAME_BYTES, otherwise MalformedFrame
    for any inconsistency: short frame, bad magic or header version, unknown
    dtype code, ndim > 4, bad id length or characters, non-zero padding, data
    length other than prod(shape) * itemsize (no trailing bytes). Never
    anything else. ``request_id`` is set on the error once it was read.
    """
    mv = memoryview(frame).cast("B") if not isinstance(frame, bytes) else memoryview(frame)
    n = len(mv)
    check_frame_size(n, "tensor")
    if n < _PREFIX.size:
        raise MalformedFrame(f"tensor frame of {n} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, version, code, ndim = _PREFIX.unpack_from(mv, 0)
    if magic != TENSOR_MAGIC:
        raise MalformedFrame(f"tensor frame starts with {bytes(magic)!r}, not {TENSOR_MAGIC!r}")
    if version != TENSOR_HEADER_VERSION:
        raise MalformedFrame(f"tensor header version {version} is not supported (this node reads {TENSOR_HEADER_VERSION})")
    dtype = TENSOR_DTYPES.get(code)
    if dtype is None:
        raise MalformedFrame(f"tensor dtype code {code} is not defined (known: {sorted(TENSOR_DTYPES)})")
    if ndim > MAX_TENSOR_NDIM:
        raise MalformedFrame(f"tensor ndim {ndim} exceeds {MAX_TENSOR_NDIM}")
    pos = _PREFIX.size
    if n < pos + 4 * ndim:
        raise MalformedFrame(f"tensor frame of {n} bytes ends inside its shape")
    shape = struct.unpack_from(f"<{ndim}I", mv, pos)
    pos += 4 * ndim
    session_id, pos = _read_id(mv, pos, "session id")
    if n < pos + _U64.size:
        raise MalformedFrame(f"tensor frame of {n} bytes ends inside its step")
    (step,) = _U64.unpack_from(mv, pos)
    pos += _U64.size
    request_id, pos = _read_id(mv, pos, "request id")
    try:
        pad = -pos % TENSOR_ALIGN
        if n < pos + pad:
            raise MalformedFrame(f"tensor frame of {n} bytes ends inside its padding")
        if any(mv[pos:pos + pad]):
            raise MalformedFrame("tensor header padding must be zero bytes")
        pos += pad
        count = math.prod(shape)
        need = count * dtype.itemsize
        if need > MAX_TENSOR_FRAME_BYTES:
            raise MalformedFrame(f"tensor shape {list(shape)} {dtype.name} needs {need} bytes, over the frame limit")
        if n - pos != need:
            raise MalformedFrame(
                f"tensor shape {list(shape)} {dtype.name} needs {need} data bytes, frame has {n - pos}")
        array = np.frombuffer(mv, dtype=dtype, count=count, offset=pos).reshape(shape)
        array.flags.writeable = False
    except ProtocolError as e:
        e.request_id = request_id
        raise
    return TensorFrame(array, session_id, step, request_id)


def _read_id(mv: memoryview, pos: int, name: str) -> tuple[str, int]:
    if len(mv) < pos + 1:
        raise MalformedFrame(f"tensor frame ends before its {name} length")
    k = mv[pos]
    if not 1 <= k <= MAX_ID_CHARS:
        raise MalformedFrame(f"tensor {name} length {k} is outside 1..{MAX_ID_CHARS}")
    raw = bytes(mv[pos + 1:pos + 1 + k])
    if len(raw) != k:
        raise MalformedFrame(f"tensor frame ends inside its {name}")
    s = raw.decode("ascii", "replace")
    if not is_id(s):
        raise MalformedFrame(f"tensor {name} must be {ID_RULE}; got {safe_repr(s)}")
    return s, pos + 1 + k


__all__ = [
    "TENSOR_ALIGN", "TENSOR_DTYPES", "TENSOR_HEADER_VERSION", "TENSOR_MAGIC", "TensorFrame", "decode_tensor",
    "encode_tensor", "tensor_header_size",
]

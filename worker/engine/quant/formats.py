"""GGUF tensor storage types: block size and bytes per block, as ggml lays them out.

Format source: ggml's ``ggml-common.h`` (the ``block_q4_0`` … ``block_q6_K``
structs), its reference (de)quantization in ``ggml-quants.c``
(``dequantize_row_q4_1`` etc.), and the ``gguf`` package's ``gguf/quants.py``
and ``GGML_QUANT_SIZES`` (``gguf/constants.py``), which this table matches
(checked by the tests). All multi-byte fields are little-endian; ``f16`` is
IEEE half precision.

Byte layout of one block (offsets in bytes, ``QK_K = 256``)::

    F32   1 weight, 4 B   float32
    F16   1 weight, 2 B   float16
    BF16  1 weight, 2 B   bfloat16 (the top half of a float32)
    Q8_0  32 weights, 34 B   d:f16 @0 | qs:int8[32] @2            w = qs[j] * d
    Q4_0  32 weights, 18 B   d:f16 @0 | qs:u8[16] @2              w = d * (nib - 8)
    Q4_1  32 weights, 20 B   d:f16 @0 | m:f16 @2 | qs:u8[16] @4   w = d * nib + m
    Q5_0  32 weights, 22 B   d:f16 @0 | qh:u32 @2 | qs:u8[16] @6  w = d * (q - 16), q = nib | hbit << 4
    Q5_1  32 weights, 24 B   d:f16 @0 | m:f16 @2 | qh:u32 @4 | qs:u8[16] @8   w = d * q + m
    Q4_K  256 weights, 144 B  d:f16 @0 | dmin:f16 @2 | scales:u8[12] @4 | qs:u8[128] @16
    Q5_K  256 weights, 176 B  d:f16 @0 | dmin:f16 @2 | scales:u8[12] @4 | qh:u8[32] @16 | qs:u8[128] @48
    Q6_K  256 weights, 210 B  ql:u8[128] @0 | qh:u8[64] @128 | scales:int8[16] @192 | d:f16 @208

In the 32-weight types, weight ``j < 16`` is the low nibble of ``qs[j]`` and
weight ``16 + j`` its high nibble (Q5: plus bit ``j`` resp. ``16 + j`` of
``qh`` as bit 4; Q5_0 ``w = d * (q - 16)``, Q5_1 ``w = d * q + m``). So the
activations of one block are already split into the halves the low and the
high nibbles multiply: ``x[32b : 32b+16]`` and ``x[32b+16 : 32b+32]``.
Q4_K/Q5_K: 8 sub-blocks of 32 weights with 6-bit scale and min packed in
``scales`` (``get_scale_min_k4``); sub-block ``2p`` is the low nibbles of
``qs[32p : 32p+32]``, ``2p+1`` the high nibbles (Q5_K: bit ``2p`` resp.
``2p+1`` of ``qh[l]`` as bit 4); ``w = d*sc * q - dmin*m``. Q6_K: 16
sub-blocks of 16 weights with int8 scales, ``w = (d*scale) * (q - 32)``,
``q`` = 4 bits of ``ql`` | 2 bits of ``qh`` << 4 (see ``dequantize_row_q6_K``).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class GGMLType(IntEnum):
    """ggml's type ids (``enum ggml_type`` in ggml.h; equal to ``gguf.GGMLQuantizationType``)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


@dataclass(frozen=True)
class BlockLayout:
    """How one storage type packs weights: ``block_size`` weights in ``type_size`` bytes."""

    ggml_type: GGMLType
    block_size: int  # weights per block
    type_size: int  # bytes per block

    def row_bytes(self, n_in: int) -> int:
        """Bytes of one row of ``n_in`` weights (``n_in`` must be a multiple of ``block_size``)."""
        return n_in // self.block_size * self.type_size


QK_K = 256

LAYOUTS: dict[GGMLType, BlockLayout] = {
    t: BlockLayout(t, bs, ts)
    for t, bs, ts in (
        (GGMLType.F32, 1, 4),
        (GGMLType.F16, 1, 2),
        (GGMLType.BF16, 1, 2),
        (GGMLType.Q8_0, 32, 2 + 32),
        (GGMLType.Q4_0, 32, 2 + 16),
        (GGMLType.Q4_1, 32, 2 + 2 + 16),
        (GGMLType.Q5_0, 32, 2 + 4 + 16),
        (GGMLType.Q5_1, 32, 2 + 2 + 4 + 16),
        (GGMLType.Q4_K, QK_K, 2 + 2 + 12 + QK_K // 2),
        (GGMLType.Q5_K, QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
        (GGMLType.Q6_K, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    )
}

SUPPORTED_TYPES: tuple[str, ...] = tuple(t.name for t in LAYOUTS)

"""Weights kept in their GGUF storage type, multiplied by float32 activations with fused Numba kernels.

Public API::

    from worker.engine.quant import QuantizedMatrix, QuantFormatError, matmul, dequantize, SUPPORTED_TYPES

    qm = QuantizedMatrix.from_gguf(reader_tensor)   # or .from_bytes(name, type, (n_out, n_in), data)
    y = matmul(qm, x)        # x f32 [n_in] -> [n_out]; X [n_rows, n_in] -> [n_rows, n_out]
    w = dequantize(qm)       # f32 [n_out, n_in], bit-identical to gguf.quants.dequantize

Not wired into the stages yet (issue 16 items 1-2 as standalone kernels).
"""
from .formats import LAYOUTS, QK_K, SUPPORTED_TYPES, BlockLayout, GGMLType
from .matrix import FUSED_MAX_ROWS, TILE_ELEMS, QuantFormatError, QuantizedMatrix, dequantize, matmul, warm_up

__all__ = [
    "BlockLayout", "FUSED_MAX_ROWS", "GGMLType", "LAYOUTS", "QK_K", "QuantFormatError", "QuantizedMatrix",
    "SUPPORTED_TYPES", "TILE_ELEMS", "dequantize", "matmul", "warm_up",
]

"""QuantizedMatrix: a weight matrix kept in its GGUF storage type, and its products with f32 activations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..gguf_file import ModelLoadError
from . import kernels as K
from .formats import LAYOUTS, SUPPORTED_TYPES, BlockLayout, GGMLType


class QuantFormatError(ModelLoadError):
    """A tensor's storage type is not supported, or its bytes do not match its type and shape.

    ``str(e)`` names the tensor and the type. A ModelLoadError, so a stage
    that fails to load with it is reported like any unreadable model.
    """


#: ggml type -> (fused product kernel, dequantize kernel, lookup table). F32 has none: it is BLAS.
_KERNELS = {
    GGMLType.F16: (K.gemm_u16, K.deq_u16, K.F16_LUT),
    GGMLType.BF16: (K.gemm_u16, K.deq_u16, K.BF16_LUT),
    GGMLType.Q8_0: (K.gemm_q8_0, K.deq_q8_0, K.F16_LUT),
    GGMLType.Q4_0: (K.gemm_q4_0, K.deq_q4_0, K.F16_LUT),
    GGMLType.Q4_1: (K.gemm_q4_1, K.deq_q4_1, K.F16_LUT),
    GGMLType.Q5_0: (K.gemm_q5_0, K.deq_q5_0, K.F16_LUT),
    GGMLType.Q5_1: (K.gemm_q5_1, K.deq_q5_1, K.F16_LUT),
    GGMLType.Q4_K: (K.gemm_q4_k, K.deq_q4_k, K.F16_LUT),
    GGMLType.Q5_K: (K.gemm_q5_k, K.deq_q5_k, K.F16_LUT),
    GGMLType.Q6_K: (K.gemm_q6_k, K.deq_q6_k, K.F16_LUT),
}

#: Activation rows up to which ``matmul`` uses the fused kernel; above, tiles of dequantized weights + BLAS.
FUSED_MAX_ROWS = 16

#: Weights dequantized per tile by the BLAS path: 4 MiB of f32 scratch (SmolLM2: 1820 rows of 576, so
#: every block matrix is one tile and the 49152-row head 28; fewer switches between Numba and BLAS threads).
TILE_ELEMS = 1 << 20


def _ggml_type(name: str, ggml_type) -> GGMLType:
    label = getattr(ggml_type, "name", None) or str(ggml_type)
    try:
        t = GGMLType(int(ggml_type)) if not isinstance(ggml_type, str) else GGMLType[ggml_type]
    except (KeyError, ValueError, TypeError):
        t = None
    if t is None or t not in LAYOUTS:
        raise QuantFormatError(
            f"Tensor {name} is stored as {label}, which this engine cannot compute with "
            f"(supported: {', '.join(SUPPORTED_TYPES)})."
        )
    return t


@dataclass(frozen=True, eq=False)
class QuantizedMatrix:
    """A weight matrix W [n_out, n_in] held as the raw bytes of its GGUF tensor.

    ``data`` is ``uint8 [n_out, row_bytes]``, a view of the tensor's bytes
    (a memory map or a shard file's buffer: no copy when they are
    C-contiguous); ``nbytes`` is what it keeps resident. Build it with
    :meth:`from_bytes` (validates) or :meth:`from_gguf` (a ``gguf``
    ReaderTensor). Computing with it: :func:`matmul`, :func:`dequantize`.
    """

    name: str
    ggml_type: GGMLType
    shape: tuple[int, int]  # (n_out, n_in)
    data: np.ndarray  # uint8 [n_out, row_bytes]

    @property
    def layout(self) -> BlockLayout:
        return LAYOUTS[self.ggml_type]

    @property
    def nbytes(self) -> int:
        """Bytes of weight storage (what stays resident)."""
        return int(self.data.nbytes)

    @classmethod
    def from_bytes(cls, name: str, ggml_type, shape, data) -> "QuantizedMatrix":
        """Wrap ``data`` (any array or buffer holding the tensor's bytes) as W [n_out, n_in] of ``ggml_type``.

        ``ggml_type``: a ``GGMLType``, ``gguf.GGMLQuantizationType``, its int id
        or its name. ``shape``: (n_out, n_in), or (n_in,) for a vector (n_out = 1).
        Raises QuantFormatError (naming ``name`` and the type) for an
        unsupported type, an ``n_in`` that is not a whole number of blocks, or
        a byte length that does not match type and shape.
        """
        t = _ggml_type(name, ggml_type)
        layout = LAYOUTS[t]
        dims = tuple(int(s) for s in shape)
        if len(dims) == 1:
            dims = (1, dims[0])
        if len(dims) != 2 or dims[0] <= 0 or dims[1] <= 0:
            raise QuantFormatError(f"Tensor {name} ({t.name}) has shape {tuple(shape)}; a matrix [n_out, n_in] is needed.")
        n_out, n_in = dims
        if n_in % layout.block_size:
            raise QuantFormatError(
                f"Tensor {name} ({t.name}) has rows of {n_in} weights, not a whole number of {layout.block_size}-weight blocks."
            )
        raw = np.asarray(data)
        if not raw.flags.c_contiguous:
            raw = np.ascontiguousarray(raw)
        raw = raw.reshape(-1).view(np.uint8)
        expected = n_out * layout.row_bytes(n_in)
        if raw.size != expected:
            raise QuantFormatError(
                f"Tensor {name} ({t.name}, shape {n_out}x{n_in}) has {raw.size} bytes of data, "
                f"but that type and shape need {expected}; the file is truncated or corrupt."
            )
        return cls(name, t, (n_out, n_in), raw.reshape(n_out, layout.row_bytes(n_in)))

    @classmethod
    def from_gguf(cls, tensor) -> "QuantizedMatrix":
        """From a ``gguf.ReaderTensor``: its ``ne`` reversed is [n_out, n_in]; ``tensor.data`` stays a view of the file."""
        shape = tuple(int(s) for s in reversed(tensor.shape))
        return cls.from_bytes(tensor.name, tensor.tensor_type, shape, tensor.data)


def _kernel_weights(qm: QuantizedMatrix) -> np.ndarray:
    if qm.ggml_type in (GGMLType.F16, GGMLType.BF16):
        return qm.data.view(np.uint16)  # [n_out, n_in]
    if qm.ggml_type is GGMLType.Q8_0:
        return qm.data.view(np.int8)  # [n_out, row_bytes]
    return qm.data


def _f32_weights(qm: QuantizedMatrix) -> np.ndarray:
    return qm.data.view(np.float32)  # [n_out, n_in], a view


def dequantize(qm: QuantizedMatrix, rows: Optional[slice] = None, out: Optional[np.ndarray] = None) -> np.ndarray:
    """W[rows] as float32 [n, n_in], bit-identical to ``gguf.quants.dequantize``.

    ``rows`` (step 1) defaults to all; ``out`` (float32 C-contiguous with at
    least ``n`` rows of ``n_in``) is filled and its first ``n`` rows returned,
    so a caller can reuse one scratch buffer tile after tile. F32 returns a
    copy of the stored values.
    """
    n_out, n_in = qm.shape
    start, stop, _ = (rows or slice(None)).indices(n_out)
    n = max(0, stop - start)
    if out is None:
        out = np.empty((n, n_in), np.float32)
    dst = out[:n]
    if qm.ggml_type is GGMLType.F32:
        dst[...] = _f32_weights(qm)[start:stop]
        return dst
    _, deq, lut = _KERNELS[qm.ggml_type]
    deq(_kernel_weights(qm), lut, start, dst)
    return dst


def matmul(qm: QuantizedMatrix, x: np.ndarray, fused_max_rows: int = FUSED_MAX_ROWS) -> np.ndarray:
    """x Wᵀ: x float32 [n_in] -> [n_out], or X [n_rows, n_in] -> [n_rows, n_out].

    Up to ``fused_max_rows`` activation rows (decode, batched decode): one
    fused kernel pass that reads the quantized weights once for all rows.
    More rows (prefill): the weights are dequantized a tile of rows at a
    time (``TILE_ELEMS`` weights) into one reused scratch buffer and multiplied with BLAS. F32
    weights always go straight to BLAS. The weights' values are exactly the
    dequantized ones; only the f32 summation order differs from
    ``X @ dequantize(qm).T``. Raises ValueError if ``x``'s last axis is not ``n_in``.
    """
    n_out, n_in = qm.shape
    vec = x.ndim == 1
    X = np.ascontiguousarray(x.reshape(1, -1) if vec else x, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != n_in:
        raise ValueError(f"{qm.name}: activations of shape {x.shape} do not match n_in = {n_in}.")
    if qm.ggml_type is GGMLType.F32:
        Y = X @ _f32_weights(qm).T
    elif X.shape[0] <= fused_max_rows:
        gemm, _, lut = _KERNELS[qm.ggml_type]
        Y = np.empty((X.shape[0], n_out), np.float32)
        gemm(_kernel_weights(qm), X, lut, Y)
    else:
        Y = np.empty((X.shape[0], n_out), np.float32)
        rows = max(1, min(n_out, TILE_ELEMS // n_in))
        scratch = np.empty((rows, n_in), np.float32)
        for r0 in range(0, n_out, rows):
            tile = dequantize(qm, slice(r0, min(n_out, r0 + rows)), scratch)
            np.matmul(X, tile.T, out=Y[:, r0 : r0 + tile.shape[0]])
    return Y[0] if vec else Y


def warm_up() -> None:
    """Compile (or load from the cache) every kernel once, on tiny inputs; seconds on a cold cache."""
    X = np.zeros((1, 256), np.float32)
    for t in _KERNELS:
        layout = LAYOUTS[t]
        qm = QuantizedMatrix.from_bytes("warm-up", t, (1, 256), np.zeros(layout.row_bytes(256), np.uint8))
        matmul(qm, X)
        dequantize(qm)

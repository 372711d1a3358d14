"""Fused Numba kernels: products of GGUF-quantized weights with float32 activations, and dequantization.

Two kernels per storage type (layouts in :mod:`.formats`):

* ``gemm_<type>(w, X, lut, Y)``: ``Y[i, o] = sum_k W[o, k] * X[i, k]``, i.e.
  ``Y = X Wᵀ``, with ``w`` the raw bytes ``uint8 [n_out, row_bytes]`` (viewed as
  ``int8`` for Q8_0, as ``uint16 [n_out, n_in]`` for F16/BF16),
  ``X`` ``float32 [n_rows, n_in]`` (C-contiguous), ``Y`` ``float32 [n_rows, n_out]``.
  A matrix-vector product is the case ``n_rows == 1``. Each weight is
  dequantized in registers with exactly the float32 operations of ggml's
  ``dequantize_row_*`` (and of ``gguf.quants``), multiplied by the f32
  activation and accumulated in f32: one accumulator per lane of a block
  (16 or 32 lanes, so that the loop vectorizes without reassociating
  float additions), the lanes summed at the end of the row. Only the
  summation order differs from ``dequantize(W) @ x``.
  The loop shape is what makes these fast: one weight row per parallel
  iteration, its blocks in order, and inside a block one flat loop over the
  packed bytes whose low and high nibbles multiply the two halves of the
  block's activations (for these formats the halves are contiguous in ``x``,
  so no copy is needed). With several activation rows the weight bytes of a
  block are read once from memory and reused from L1 for every row.
* ``deq_<type>(w, lut, r0, out)``: ``out[r, :] = dequantize(W[r0 + r, :])``,
  ``out`` ``float32 [rows, n_in]``; bit-identical to ``gguf.quants.dequantize``.

``lut`` is a ``float32 [65536]`` table from 16-bit patterns to values: IEEE
half for every type's ``f16`` scales and for F16 weights (``F16_LUT``),
bfloat16 for BF16 weights (``BF16_LUT``); the lookup is exact.

All kernels are ``@njit(parallel=True, cache=True, fastmath=False)`` (both
cores via ``prange`` over output rows; no FMA contraction, so the
dequantized weights are exactly ggml's). Each has one signature (a 2D C
array of the weights' integer view, f32 2D C arrays), so there is one compilation per kernel, cached in
``__pycache__`` (or ``NUMBA_CACHE_DIR``).
"""
from __future__ import annotations

import os

# Numba's OpenMP workers must sleep, not spin, between kernel calls: a decode step alternates ~200
# short kernels with BLAS calls and NumPy work, and on 2 busy cores spinning workers steal the
# time those need (measured on a loaded 2-core VM: one decode-equivalent pass 1616 ms with the
# default policy, 33 ms with PASSIVE). Read once, when Numba first loads its OpenMP pool, so it
# is set before ``numba`` is imported; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

F16_LUT = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)  # [65536] f32
BF16_LUT = (np.arange(65536, dtype=np.uint32) << np.uint32(16)).view(np.float32)  # [65536] f32

_JIT = dict(parallel=True, cache=True, fastmath=False)


@njit(cache=True, inline="always")
def _u16(w, o, off):
    """Little-endian uint16 at byte ``off`` of row ``o`` as int64."""
    return np.int64(w[o, off]) | (np.int64(w[o, off + 1]) << 8)


@njit(cache=True, inline="always")
def _u32(w, o, off):
    """Little-endian uint32 at byte ``off`` of row ``o`` as int64."""
    return (
        np.int64(w[o, off])
        | (np.int64(w[o, off + 1]) << 8)
        | (np.int64(w[o, off + 2]) << 16)
        | (np.int64(w[o, off + 3]) << 24)
    )


@njit(cache=True, inline="always")
def _u16_of_i8(w, o, off):
    """Little-endian uint16 at byte ``off`` of row ``o`` of an ``int8`` view, as int64."""
    return (np.int64(w[o, off]) & 255) | ((np.int64(w[o, off + 1]) & 255) << 8)


@njit(cache=True, inline="always")
def _scale_min_k4(w, o, sc_off, j):
    """(scale, min) 6-bit pair ``j`` (0..7) of a Q4_K/Q5_K block (ggml's ``get_scale_min_k4``)."""
    if j < 4:
        sc = np.int64(w[o, sc_off + j]) & 63
        mn = np.int64(w[o, sc_off + j + 4]) & 63
    else:
        sc = (np.int64(w[o, sc_off + j + 4]) & 0xF) | ((np.int64(w[o, sc_off + j - 4]) >> 6) << 4)
        mn = (np.int64(w[o, sc_off + j + 4]) >> 4) | ((np.int64(w[o, sc_off + j]) >> 6) << 4)
    return sc, mn


@njit(cache=True, inline="always")
def _sum_lanes(acc, Y, nr, lanes, o):
    for i in range(nr):
        s = np.float32(0)
        for j in range(lanes):
            s += acc[i * lanes + j]
        Y[i, o] = s


# ---------------------------------------------------------------- Q4_0: d | qs[16]


@njit(**_JIT)
def gemm_q4_0(w, X, lut, Y):
    n_out, nb, nr = w.shape[0], w.shape[1] // 18, X.shape[0]
    for o in prange(n_out):
        acc = np.zeros(nr * 16, np.float32)
        for b in range(nb):
            off, xb = b * 18, b * 32
            d = lut[_u16(w, o, off)]
            for i in range(nr):
                a = i * 16
                for j in range(16):
                    q = np.int64(w[o, off + 2 + j])
                    acc[a + j] += (d * np.float32((q & 15) - 8)) * X[i, xb + j] + (d * np.float32((q >> 4) - 8)) * X[i, xb + 16 + j]
        _sum_lanes(acc, Y, nr, 16, o)


@njit(**_JIT)
def deq_q4_0(w, lut, r0, out):
    nb = w.shape[1] // 18
    for r in prange(out.shape[0]):
        o = r0 + r
        for b in range(nb):
            off, xb = b * 18, b * 32
            d = lut[_u16(w, o, off)]
            for j in range(16):
                q = np.int64(w[o, off + 2 + j])
                out[r, xb + j] = d * np.float32((q & 15) - 8)
                out[r, xb + 16 + j] = d * np.float32((q >> 4) - 8)


# ---------------------------------------------------------------- Q4_1: d | m | qs[16]


@njit(**_JIT)
def gemm_q4_1(w, X, lut, Y):
    n_out, nb, nr = w.shape[0], w.shape[1] // 20, X.shape[0]
    for o in prange(n_out):
        acc = np.zeros(nr * 16, np.float32)
        for b in range(nb):
            off, xb = b * 20, b * 32
            d = lut[_u16(w, o, off)]
            m = lut[_u16(w, o, off + 2)]
            for i in range(nr):
                a = i * 16
                for j in range(16):
                    q = np.int64(w[o, off + 4 + j])
                    acc[a + j] += (d * np.float32(q & 15) + m) * X[i, xb + j] + (d * np.float32(q >> 4) + m) * X[i, xb + 16 + j]
        _sum_lanes(acc, Y, nr, 16, o)


@njit(**_JIT)
def deq_q4_1(w, lut, r0, out):
    nb = w.shape[1] // 20
    for r in prange(out.shape[0]):
        o = r0 + r
        for b in range(nb):
            off, xb = b * 20, b * 32
            d = lut[_u16(w, o, off)]
            m = lut[_u16(w, o, off + 2)]
            for j in range(16):
                q = np.int64(w[o, off + 4 + j])
                out[r, xb + j] = d * np.float32(q & 15) + m
                out[r, xb + 16 + j] = d * np.float32(q >> 4) + m


# ---------------------------------------------------------------- Q5_0: d | qh(u32) | qs[16]


@njit(**_JIT)
def gemm_q5_0(w, X, lut, Y):
    n_out, nb, nr = w.shape[0], w.shape[1] // 22, X.shape[0]
    for o in prange(n_out):
        acc = np.zeros(nr * 16, np.float32)
        for b in range(nb):
            off, xb = b * 22, b * 32
            d = lut[_u16(w, o, off)]
            qh = _u32(w, o, off + 2)
            for i in range(nr):
                a = i * 16
                for j in range(16):
                    q = np.int64(w[o, off + 6 + j])
                    lo = (q & 15) | (((qh >> j) & 1) << 4)
                    hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
                    acc[a + j] += (d * np.float32(lo - 16)) * X[i, xb + j] + (d * np.float32(hi - 16)) * X[i, xb + 16 + j]
        _sum_lanes(acc, Y, nr, 16, o)


@njit(**_JIT)
def deq_q5_0(w, lut, r0, out):
    nb = w.shape[1] // 22
    for r in prange(out.shape[0]):
        o = r0 + r
        for b in range(nb):
            off, xb = b * 22, b * 32
            d = lut[_u16(w, o, off)]
            qh = _u32(w, o, off + 2)
            for j in range(16):
                q = np.int64(w[o, off + 6 + j])
                out[r, xb + j] = d * np.float32(((q & 15) | (((qh >> j) & 1) << 4)) - 16)
                out[r, xb + 16 + j] = d * np.float32(((q >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16)


# ---------------------------------------------------------------- Q5_1: d | m | qh(u32) | qs[16]


@njit(**_JIT)
def gemm_q5_1(w, X, lut, Y):
    n_out, nb, nr = w.shape[0], w.shape[1] // 24, X.shape[0]
    for o in prange(n_out):
        acc = np.zeros(nr * 16, np.float32)
        for b in range(nb):
            off, xb = b * 24, b * 32
            d = lut[_u16(w, o, off)]
            m = lut[_u16(w, o, off + 2)]
            qh = _u32(w, o, off + 4)
            for i in range(nr):
                a = i * 16
                for j in range(16):
                    q = np.int64(w[o, off + 8 + j])
                    lo = (q & 15) | (((qh >> j) & 1) << 4)
                    hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
                    acc[a + j] += (d * np.float32(lo) + m) * X[i, xb + j] + (d * np.float32(hi) + m) * X[i, xb + 16 + j]
        _sum_lanes(acc, Y, nr, 16, o)


@njit(**_JIT)
def deq_q5_1(w, lut, r0, out):
    nb = w.shape[1] // 24
    for r in prange(out.shape[0]):
        o = r0 + r
        for b in range(nb):
            off, xb = b * 24, b * 32
            d = lut[_u16(w, o, off)]
            m = lut[_u16(w, o, off + 2)]
            qh = _u32(w, o, off + 4)
            for j in range(16):
                q = np.int64(w[o, off + 8 + j])
                out[r, xb + j] = d * np.float32((q & 15) | (((qh >> j) & 1) << 4)) + m
                out[r, xb + 16 + j] = d * np.float32((q >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m


# ---------------------------------------------------------------- Q8_0: d | qs int8[32]


@njit(**_JIT)
def gemm_q8_0(w, X, lut, Y):
    """``w`` is the raw bytes viewed as ``int8``: the weights convert straight to f32, the f16 ``d`` is re-read unsigned."""
    n_out, nb, nr = w.shape[0], w.shape[1] // 34, X.shape[0]
    for o in prange(n_out):
        acc = np.zeros(nr * 32, np.float32)
        for b in range(nb):
            off, xb = b * 34, b * 32
            d = lut[_u16_of_i8(w, o, off)]
            for i in range(nr):
                a = i * 32
                for j in range(32):
                    acc[a + j] += (np.float32(w[o, off + 2 + j]) * d) * X[i, xb + j]
        _sum_lanes(acc, Y, nr, 32, o)


@njit(**_JIT)
def deq_q8_0(w, lut, r0, out):
    nb = w.shape[1] // 34
    for r in prange(out.shape[0]):
        o = r0 + r
        for b in range(nb):
            off, xb = b * 34, b * 32
            d = lut[_u16_of_i8(w, o, off)]
            for j in range(32):
                out[r, xb + j] = np.float32(w[o, off + 2 + j]) * d


# ---------------------------------------------------------------- Q4_K: d | dmin | scales[12] | qs[128]


@njit(**_JIT)
def gemm_q4_k(w, X, lut, Y):
    n_out, nb, nr = w.shape[0], w.shape[1] // 144, X.shape[0]
    for o in prange(n_out):
        acc = np.zeros(nr * 32, np.float32)
        for b in range(nb):
            off, xb = b * 144, b * 256
            d = lut[_u16(w, o, off)]
            dmin = lut[_u16(w, o, off + 2)]
            for p in range(4):
                sc1, m1 = _scale_min_k4(w, o, off + 4, 2 * p)
                sc2, m2 = _scale_min_k4(w, o, off + 4, 2 * p + 1)
                d1, dm1 = d * np.float32(sc1), dmin * np.float32(m1)
                d2, dm2 = d * np.float32(sc2), dmin * np.float32(m2)
                qo, xo = off + 16 + 32 * p, xb + 64 * p
                for i in range(nr):
                    a = i * 32
                    for j in range(32):
                        q = np.int64(w[o, qo + j])
                        acc[a + j] += (d1 * np.float32(q & 15) - dm1) * X[i, xo + j] + (d2 * np.float32(q >> 4) - dm2) * X[i, xo + 32 + j]
        _sum_lanes(acc, Y, nr, 32, o)


@njit(**_JIT)
def deq_q4_k(w, lut, r0, out):
    nb = w.shape[1] // 144
    for r in prange(out.shape[0]):
        o = r0 + r
        for b in range(nb):
            off, xb = b * 144, b * 256
            d = lut[_u16(w, o, off)]
            dmin = lut[_u16(w, o, off + 2)]
            for p in range(4):
                sc1, m1 = _scale_min_k4(w, o, off + 4, 2 * p)
                sc2, m2 = _scale_min_k4(w, o, off + 4, 2 * p + 1)
                d1, dm1 = d * np.float32(sc1), dmin * np.float32(m1)
                d2, dm2 = d * np.float32(sc2), dmin * np.float32(m2)
                qo, xo = off + 16 + 32 * p, xb + 64 * p
                for j in range(32):
                    q = np.int64(w[o, qo + j])
                    out[r, xo + j] = d1 * np.float32(q & 15) - dm1
                    out[r, xo + 32 + j] = d2 * np.float32(q >> 4) - dm2


# ---------------------------------------------------------------- Q5_K: d | dmin | scales[12] | qh[32] | qs[128]


@njit(**_JIT)
def gemm_q5_k(w, X, lut, Y):
    n_out, nb, nr = w.shape[0], w.shape[1] // 176, X.shape[0]
    for o in prange(n_out):
        acc = np.zeros(nr * 32, np.float32)
        for b in range(nb):
            off, xb = b * 176, b * 256
            d = lut[_u16(w, o, off)]
            dmin = lut[_u16(w, o, off + 2)]
            for p in range(4):
                sc1, m1 = _scale_min_k4(w, o, off + 4, 2 * p)
                sc2, m2 = _scale_min_k4(w, o, off + 4, 2 * p + 1)
                d1, dm1 = d * np.float32(sc1), dmin * np.float32(m1)
                d2, dm2 = d * np.float32(sc2), dmin * np.float32(m2)
                qo, xo, s = off + 48 + 32 * p, xb + 64 * p, 2 * p
                for i in range(nr):
                    a = i * 32
                    for j in range(32):
                        q = np.int64(w[o, qo + j])
                        h = np.int64(w[o, off + 16 + j])
                        lo = (q & 15) | (((h >> s) & 1) << 4)
                        hi = (q >> 4) | (((h >> (s + 1)) & 1) << 4)
                        acc[a + j] += (d1 * np.float32(lo) - dm1) * X[i, xo + j] + (d2 * np.float32(hi) - dm2) * X[i, xo + 32 + j]
        _sum_lanes(acc, Y, nr, 32, o)


@njit(**_JIT)
def deq_q5_k(w, lut, r0, out):
    nb = w.shape[1] // 176
    for r in prange(out.shape[0]):
        o = r0 + r
        for b in range(nb):
            off, xb = b * 176, b * 256
            d = lut[_u16(w, o, off)]
            dmin = lut[_u16(w, o, off + 2)]
            for p in range(4):
                sc1, m1 = _scale_min_k4(w, o, off + 4, 2 * p)
                sc2, m2 = _scale_min_k4(w, o, off + 4, 2 * p + 1)
                d1, dm1 = d * np.float32(sc1), dmin * np.float32(m1)
                d2, dm2 = d * np.float32(sc2), dmin * np.float32(m2)
                qo, xo, s = off + 48 + 32 * p, xb + 64 * p, 2 * p
                for j in range(32):
                    q = np.int64(w[o, qo + j])
                    h = np.int64(w[o, off + 16 + j])
                    out[r, xo + j] = d1 * np.float32((q & 15) | (((h >> s) & 1) << 4)) - dm1
                    out[r, xo + 32 + j] = d2 * np.float32((q >> 4) | (((h >> (s + 1)) & 1) << 4)) - dm2


# ---------------------------------------------------------------- Q6_K: ql[128] | qh[64] | scales int8[16] | d


@njit(cache=True, inline="always")
def _q6_scale(w, o, off, d, s):
    v = np.int64(w[o, off + 192 + s])
    return d * np.float32(v - ((v >> 7) << 8))


@njit(**_JIT)
def gemm_q6_k(w, X, lut, Y):
    n_out, nb, nr = w.shape[0], w.shape[1] // 210, X.shape[0]
    for o in prange(n_out):
        acc = np.zeros(nr * 16, np.float32)
        for b in range(nb):
            off, xb = b * 210, b * 256
            d = lut[_u16(w, o, off + 208)]
            for h in range(2):
                for half in range(2):
                    s = 8 * h + half
                    ds1, ds2 = _q6_scale(w, o, off, d, s), _q6_scale(w, o, off, d, s + 2)
                    ds3, ds4 = _q6_scale(w, o, off, d, s + 4), _q6_scale(w, o, off, d, s + 6)
                    l0 = 16 * half
                    lo_off, hi_off, xo = off + 64 * h + l0, off + 128 + 32 * h + l0, xb + 128 * h + l0
                    for i in range(nr):
                        a = i * 16
                        for j in range(16):
                            ql1 = np.int64(w[o, lo_off + j])
                            ql2 = np.int64(w[o, lo_off + 32 + j])
                            qh = np.int64(w[o, hi_off + j])
                            q1 = ((ql1 & 15) | ((qh & 3) << 4)) - 32
                            q2 = ((ql2 & 15) | (((qh >> 2) & 3) << 4)) - 32
                            q3 = ((ql1 >> 4) | (((qh >> 4) & 3) << 4)) - 32
                            q4 = ((ql2 >> 4) | (((qh >> 6) & 3) << 4)) - 32
                            acc[a + j] += (
                                (ds1 * np.float32(q1)) * X[i, xo + j]
                                + (ds2 * np.float32(q2)) * X[i, xo + 32 + j]
                                + (ds3 * np.float32(q3)) * X[i, xo + 64 + j]
                                + (ds4 * np.float32(q4)) * X[i, xo + 96 + j]
                            )
        _sum_lanes(acc, Y, nr, 16, o)


@njit(**_JIT)
def deq_q6_k(w, lut, r0, out):
    nb = w.shape[1] // 210
    for r in prange(out.shape[0]):
        o = r0 + r
        for b in range(nb):
            off, xb = b * 210, b * 256
            d = lut[_u16(w, o, off + 208)]
            for h in range(2):
                for half in range(2):
                    s = 8 * h + half
                    ds1, ds2 = _q6_scale(w, o, off, d, s), _q6_scale(w, o, off, d, s + 2)
                    ds3, ds4 = _q6_scale(w, o, off, d, s + 4), _q6_scale(w, o, off, d, s + 6)
                    l0 = 16 * half
                    lo_off, hi_off, xo = off + 64 * h + l0, off + 128 + 32 * h + l0, xb + 128 * h + l0
                    for j in range(16):
                        ql1 = np.int64(w[o, lo_off + j])
                        ql2 = np.int64(w[o, lo_off + 32 + j])
                        qh = np.int64(w[o, hi_off + j])
                        out[r, xo + j] = ds1 * np.float32(((ql1 & 15) | ((qh & 3) << 4)) - 32)
                        out[r, xo + 32 + j] = ds2 * np.float32(((ql2 & 15) | (((qh >> 2) & 3) << 4)) - 32)
                        out[r, xo + 64 + j] = ds3 * np.float32(((ql1 >> 4) | (((qh >> 4) & 3) << 4)) - 32)
                        out[r, xo + 96 + j] = ds4 * np.float32(((ql2 >> 4) | (((qh >> 6) & 3) << 4)) - 32)


# ---------------------------------------------------------------- F16 / BF16: 16-bit patterns through ``lut``


@njit(**_JIT)
def gemm_u16(w, X, lut, Y):
    """``w`` is ``uint16 [n_out, n_in]`` (the raw bytes viewed as 16-bit patterns)."""
    n_out, n_in, nr = w.shape[0], w.shape[1], X.shape[0]
    full = n_in // 32 * 32
    for o in prange(n_out):
        acc = np.zeros(nr * 32, np.float32)
        for c in range(0, full, 32):
            for i in range(nr):
                a = i * 32
                for j in range(32):
                    acc[a + j] += lut[w[o, c + j]] * X[i, c + j]
        for i in range(nr):
            for k in range(full, n_in):
                acc[i * 32 + k - full] += lut[w[o, k]] * X[i, k]
        _sum_lanes(acc, Y, nr, 32, o)


@njit(**_JIT)
def deq_u16(w, lut, r0, out):
    n_in = w.shape[1]
    for r in prange(out.shape[0]):
        o = r0 + r
        for k in range(n_in):
            out[r, k] = lut[w[o, k]]

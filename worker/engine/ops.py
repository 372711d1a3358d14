"""The Llama architecture as plain NumPy functions.

Written in the manner of picoGPT: one function per operation, shapes in the
signature comments, float32 throughout. Sources: Touvron et al. 2023
(LLaMA, arXiv:2302.13971); RMSNorm, Zhang & Sennrich 2019 (arXiv:1910.07467);
RoPE, Su et al. 2021 (arXiv:2104.09864) in llama.cpp's "normal" form, which
rotates adjacent pairs ``(x[2i], x[2i+1])`` of each head (GGUF's Q/K weights
are stored permuted for this form); grouped-query attention, Ainslie et al.
2023 (arXiv:2305.13245); SwiGLU, Shazeer 2020 (arXiv:2002.05202).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from .gguf_file import LlamaConfig
    from .kv_cache import KVCache
    from .stage import BlockWeights


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """[n, d] f32, [d] f32 -> [n, d] f32: x / sqrt(mean(x^2) + eps) * w."""
    ms = (x * x).sum(axis=-1, keepdims=True) / np.float32(x.shape[-1])
    return (x / np.sqrt(ms + np.float32(eps))) * w


def rope_rotations(positions: np.ndarray, head_dim: int, base: float) -> np.ndarray:
    """[n] int -> [n, head_dim // 2] complex64: exp(i * position * theta_j).

    theta_j = base^(-2j / head_dim); angles are computed in float64 and
    rounded once to float32 components, as llama.cpp does.
    """
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [hd/2]
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [n, hd/2]
    return (np.cos(angles) + 1j * np.sin(angles)).astype(np.complex64)


def rope(x: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """[n, h, hd] f32, rot [n, hd/2] complex64 -> [n, h, hd] f32.

    Rotates each adjacent pair (x[2j], x[2j+1]) by the angle of rot[:, j]:
    viewing the pair as the complex number x[2j] + i x[2j+1], the rotation
    is one complex multiplication.
    """
    return (x.view(np.complex64) * rot[:, None, :]).view(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    """[..., m] f32 -> [..., m] f32, numerically stable along the last axis."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    e /= np.sum(e, axis=-1, keepdims=True)
    return e


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int) -> np.ndarray:
    """Causal grouped-query attention.

    q: [n, n_head, hd] f32 for positions ``start_pos .. start_pos+n-1``;
    k, v: [n_kv_head, t, hd] f32 for positions ``0 .. t-1`` (t = start_pos + n);
    -> [n, n_head * hd] f32. Each KV head serves ``n_head // n_kv_head`` query heads.
    """
    n, n_head, hd = q.shape
    n_kv, t, _ = k.shape
    group = n_head // n_kv
    qg = q.transpose(1, 0, 2).reshape(n_kv, group * n, hd)  # [kv, g*n, hd]  (head h = kv*group + g)
    scores = (qg @ k.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(hd))  # [kv, g*n, t]
    if n > 1:
        qpos = start_pos + np.arange(n)  # [n]
        mask = np.arange(t)[None, :] > qpos[:, None]  # [n, t]
        scores = scores.reshape(n_kv, group, n, t)
        scores[:, :, mask] = -np.inf
        scores = scores.reshape(n_kv, group * n, t)
    out = softmax(scores) @ v  # [kv, g*n, hd]
    return out.reshape(n_head, n, hd).transpose(1, 0, 2).reshape(n, n_head * hd)


def linear(x: np.ndarray, w: np.ndarray, groups: Optional[Sequence[int]] = None) -> np.ndarray:
    """[n, i] f32 @ [i, o] f32 -> [n, o] f32.

    ``groups`` None: one product over all n rows (a gemm reads ``w`` once for
    all of them). ``groups`` = row bounds ``[0, b1, ..., n]``: one product per
    group ``x[b_k : b_k+1]``, each bit-identical to multiplying that group on its
    own (BLAS adds a one-row gemv and a many-row gemm in different orders).
    """
    if groups is None or len(groups) <= 2:
        return x @ w
    out = np.empty((x.shape[0], w.shape[1]), np.float32)
    for a, b in zip(groups[:-1], groups[1:]):
        np.matmul(x[a:b], w, out=out[a:b])
    return out


def swiglu(x: np.ndarray, w_gate_up: np.ndarray, w_down: np.ndarray, groups: Optional[Sequence[int]] = None) -> np.ndarray:
    """[n, d] f32, [d, 2*f] f32, [f, d] f32 -> [n, d] f32: down(silu(x W_gate) * (x W_up)); groups as in linear."""
    gu = linear(x, w_gate_up, groups)  # [n, 2f]
    f = w_down.shape[0]
    g, u = gu[:, :f], gu[:, f:]
    return linear((g / (np.float32(1.0) + np.exp(-g))) * u, w_down, groups)


def cached_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, rows: Sequence[tuple["KVCache", int, int]], layer: int,
) -> np.ndarray:
    """Attention of several sessions' rows, each over its own cached prefix.

    q: [N, n_head, hd], k, v: [N, n_kv_head, hd] f32: the rows of ``rows``
    concatenated in order; ``rows[i] = (kv, start_pos, n)`` says that the next
    ``n`` rows are positions ``start_pos .. start_pos+n-1`` of the session whose
    cache is ``kv``. Writes each row's keys/values into its cache at ``layer``,
    then attends over that cache's prefix -> [N, n_head * hd] f32.
    """
    out, i = [], 0
    for kv, start_pos, n in rows:
        keys, values = kv.write(layer, k[i : i + n].transpose(1, 0, 2), v[i : i + n].transpose(1, 0, 2), start_pos)
        out.append(attention(q[i : i + n], keys, values, start_pos))  # [n, n_head * hd]
        i += n
    return out[0] if len(out) == 1 else np.concatenate(out)


def transformer_block_batch(
    x: np.ndarray, w: "BlockWeights", cfg: "LlamaConfig", rot: np.ndarray,
    rows: Sequence[tuple["KVCache", int, int]], layer: int, groups: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """One pre-norm Llama block over the rows of several sessions. [N, d] f32 -> [N, d] f32.

    ``rows`` and the row order of ``x`` are as in :func:`cached_attention`;
    rot [N, hd/2] complex64 holds each row's own position (see rope). Keys,
    values and attention are per session; the matmuls run once over all N rows
    (``groups`` None), or once per row group (``groups`` as in :func:`linear`,
    e.g. the sessions' bounds, which makes each session's result bit-identical
    to running it alone).
    """
    n = x.shape[0]
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    qkv = linear(rms_norm(x, w.attn_norm, cfg.norm_eps), w.qkv, groups)  # [n, (nh + 2 nkv) hd]
    qk = rope(qkv[:, : (nh + nkv) * hd].reshape(n, nh + nkv, hd), rot)  # [n, nh + nkv, hd]
    q, k = qk[:, :nh], qk[:, nh:]  # [n, nh, hd], [n, nkv, hd]
    v = qkv[:, (nh + nkv) * hd :].reshape(n, nkv, hd)  # [n, nkv, hd]
    x = x + linear(cached_attention(q, k, v, rows, layer), w.wo, groups)  # [n, d]
    return x + swiglu(rms_norm(x, w.ffn_norm, cfg.norm_eps), w.gate_up, w.down, groups)


def transformer_block(
    x: np.ndarray, w: "BlockWeights", cfg: "LlamaConfig", rot: np.ndarray,
    kv: "KVCache", layer: int, start_pos: int,
) -> np.ndarray:
    """One pre-norm Llama block for one session. [n, d] f32 -> [n, d] f32; rot [n, hd/2] complex64 (see rope).

    Appends this step's keys/values (positions ``start_pos .. start_pos+n-1``)
    to ``kv`` at ``layer`` and attends over the whole cached prefix.
    """
    return transformer_block_batch(x, w, cfg, rot, [(kv, start_pos, x.shape[0])], layer)

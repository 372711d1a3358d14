"""The Llama architecture as pure NumPy functions: arrays in, arrays out.

Written in the manner of picoGPT: one function per operation, shapes in the
signature comments, float32 throughout, no state. Nothing here keeps or writes
a KV cache: :func:`block` takes a sequence's cached keys/values as plain input
arrays and returns the keys/values of the positions it computed, which the
caller (:class:`~worker.engine.stage.Stage`) appends to its cache.

Sources: Touvron et al. 2023 (LLaMA, arXiv:2302.13971); RMSNorm, Zhang &
Sennrich 2019 (arXiv:1910.07467); RoPE, Su et al. 2021 (arXiv:2104.09864) in
llama.cpp's "normal" form, which rotates adjacent pairs ``(x[2i], x[2i+1])`` of
each head (GGUF's Q/K weights are stored permuted for this form); grouped-query
attention, Ainslie et al. 2023 (arXiv:2305.13245); SwiGLU, Shazeer 2020
(arXiv:2002.05202).

Shape names: n positions (rows), d = d_model, h = n_head, kv = n_kv_head,
hd = head_dim, f = d_ff, t = cached positions before the n new ones.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from .gguf_file import LlamaConfig
    from .weights import BlockWeights

#: A sequence's cached keys and values: ([kv, t, hd] f32, [kv, t, hd] f32), positions 0 .. t-1.
Past = tuple[np.ndarray, np.ndarray]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """[n, d] f32, [d] f32 -> [n, d] f32: x / sqrt(mean(x^2) + eps) * w."""
    ms = (x * x).sum(axis=-1, keepdims=True) / np.float32(x.shape[-1])  # [n, 1]
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
    """[n, heads, hd] f32, rot [n, hd/2] complex64 -> [n, heads, hd] f32.

    Rotates each adjacent pair (x[2j], x[2j+1]) by the angle of rot[:, j]:
    viewing the pair as the complex number x[2j] + i x[2j+1], the rotation
    is one complex multiplication. ``x``'s last axis must be contiguous.
    """
    return (x.view(np.complex64) * rot[:, None, :]).view(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    """[..., m] f32 -> [..., m] f32, numerically stable along the last axis."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    e /= np.sum(e, axis=-1, keepdims=True)
    return e


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, past: Optional[Past] = None,
) -> np.ndarray:
    """Causal grouped-query attention of n new positions over the cached ones and themselves.

    q: [n, h, hd] f32, k, v: [n, kv, hd] f32 for positions ``t .. t+n-1``;
    past: the cached (keys, values) [kv, t, hd] f32 of positions ``0 .. t-1``
    (None: t = 0). New position i sees cached positions and new ones <= i.
    -> [n, h * hd] f32. Each KV head serves ``h // kv`` query heads
    (query head j uses KV head ``j // (h // kv)``).
    """
    n, n_head, hd = q.shape
    n_kv = k.shape[1]
    t = 0 if past is None else past[0].shape[1]
    group = n_head // n_kv
    qg = q.transpose(1, 0, 2).reshape(n_kv, group * n, hd)  # [kv, g*n, hd]  (head = kv*group + g)
    scores = np.empty((n_kv, group * n, t + n), np.float32)  # [kv, g*n, t+n]: cached keys, then new ones
    if t:
        np.matmul(qg, past[0].transpose(0, 2, 1), out=scores[:, :, :t])
    np.matmul(qg, k.transpose(1, 2, 0), out=scores[:, :, t:])
    scores *= np.float32(1.0 / np.sqrt(hd))
    if n > 1:
        mask = np.arange(t + n)[None, :] > (t + np.arange(n))[:, None]  # [n, t+n]: key after query
        s4 = scores.reshape(n_kv, group, n, t + n)
        s4[:, :, mask] = -np.inf
    p = softmax(scores)  # [kv, g*n, t+n]
    out = p[:, :, t:] @ v.transpose(1, 0, 2)  # [kv, g*n, hd]
    if t:
        out = p[:, :, :t] @ past[1] + out
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
    """The feed-forward network. [n, d] f32, [d, 2f] f32, [f, d] f32 -> [n, d] f32:
    down(silu(x W_gate) * (x W_up)), silu(g) = g / (1 + exp(-g)); groups as in :func:`linear`."""
    gu = linear(x, w_gate_up, groups)  # [n, 2f]
    f = w_down.shape[0]
    g, u = gu[:, :f], gu[:, f:]  # [n, f], [n, f]
    return linear((g / (np.float32(1.0) + np.exp(-g))) * u, w_down, groups)


def block(
    x: np.ndarray, w: "BlockWeights", cfg: "LlamaConfig", rot: np.ndarray,
    past: Optional[Sequence[Optional[Past]]] = None, bounds: Optional[Sequence[int]] = None,
    split_matmuls: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pre-norm Llama block over the new positions of one or several sequences.

    x: [n, d] f32, the rows of the sequences concatenated; ``bounds`` = their row
    bounds ``[0, b1, ..., n]`` (None: one sequence, ``[0, n]``); ``past[s]`` =
    sequence s's cached (keys, values) [kv, t_s, hd] f32, or None for no cached
    positions (``past`` None: none for any); its rows are positions
    ``t_s .. t_s + (b_s+1 - b_s) - 1``. rot: [n, hd/2] complex64, each row's own
    position (see :func:`rope_rotations`).

    Returns (y [n, d] f32, k [n, kv, hd] f32, v [n, kv, hd] f32): the block's
    output and the new rows' keys and values, for the caller to append to each
    sequence's cache. Attention is per sequence; the matmuls run once over all n
    rows, or once per sequence with ``split_matmuls`` (bit-identical to running
    each sequence alone, see :func:`linear`).
    """
    n = x.shape[0]
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    bounds = [0, n] if bounds is None else list(bounds)
    past = [None] * (len(bounds) - 1) if past is None else past
    groups = bounds if split_matmuls else None
    qkv = linear(rms_norm(x, w.attn_norm, cfg.norm_eps), w.qkv, groups)  # [n, (h + 2 kv) hd]
    qk = rope(qkv[:, : (nh + nkv) * hd].reshape(n, nh + nkv, hd), rot)  # [n, h + kv, hd]
    q, k = qk[:, :nh], qk[:, nh:]  # [n, h, hd], [n, kv, hd]
    v = qkv[:, (nh + nkv) * hd :].reshape(n, nkv, hd)  # [n, kv, hd]
    heads = [attention(q[a:b], k[a:b], v[a:b], p) for a, b, p in zip(bounds[:-1], bounds[1:], past)]  # [n_s, h hd]
    x = x + linear(heads[0] if len(heads) == 1 else np.concatenate(heads), w.wo, groups)  # [n, d]
    return x + swiglu(rms_norm(x, w.ffn_norm, cfg.norm_eps), w.gate_up, w.down, groups), k, v


def output_logits(x: np.ndarray, norm_w: np.ndarray, w_out: np.ndarray, eps: float,
                  groups: Optional[Sequence[int]] = None) -> np.ndarray:
    """[n, d] f32, [d] f32, [vocab, d] f32 -> logits [n, vocab] f32: final norm, then the output head
    (GGUF's [vocab, d] layout, which a tied head shares with the token embedding); groups as in :func:`linear`."""
    return linear(rms_norm(x, norm_w, eps), w_out.T, groups)

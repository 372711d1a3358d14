"""The pure ops (worker.engine.ops) against straightforward NumPy formulas, on small random arrays:
shapes and dtypes as documented, float32 results within float32 noise of a float64 loop, and no
input modified (the math keeps no state and writes no KV cache)."""
from __future__ import annotations

import numpy as np
import pytest

from worker.engine import ops
from worker.engine.gguf_file import LlamaConfig
from worker.engine.weights import BlockWeights

CFG = LlamaConfig(n_block=1, d_model=16, n_head=4, n_kv_head=2, head_dim=8, d_ff=24, vocab_size=11,
                  context_length=64, rope_base=10000.0, norm_eps=1e-5, tied_output=True)
RTOL, ATOL = 1e-5, 1e-5


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def weights(rng: np.random.Generator, cfg: LlamaConfig = CFG) -> BlockWeights:
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    s = lambda *shape: rand(rng, *shape) * np.float32(0.3)  # noqa: E731
    return BlockWeights(
        attn_norm=1 + s(d), qkv=s(d, (cfg.n_head + 2 * cfg.n_kv_head) * hd), wo=s(cfg.n_head * hd, d),
        ffn_norm=1 + s(d), gate_up=s(d, 2 * f), down=s(f, d),
    )


# reference formulas (float64, one element or one head at a time) ----------------------------

def ref_rms_norm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * w


def ref_rope(x, positions, base):
    """Rotate each adjacent pair (x[2j], x[2j+1]) of every head by position * base^(-2j/hd)."""
    n, heads, hd = x.shape
    out = np.empty((n, heads, hd))
    for i, p in enumerate(positions):
        for j in range(hd // 2):
            a = p * base ** (-2 * j / hd)
            x0, x1 = x[i, :, 2 * j].astype(np.float64), x[i, :, 2 * j + 1].astype(np.float64)
            out[i, :, 2 * j] = x0 * np.cos(a) - x1 * np.sin(a)
            out[i, :, 2 * j + 1] = x0 * np.sin(a) + x1 * np.cos(a)
    return out


def ref_attention(q, keys, values, t):
    """q [n, h, hd] at positions t.., keys/values [T, kv, hd] at positions 0..T-1 (T = t + n):
    per query head, softmax(q K^T / sqrt(hd)) V over the keys at or before its position."""
    n, h, hd = q.shape
    group = h // keys.shape[1]
    out = np.zeros((n, h, hd))
    for head in range(h):
        kh, vh = keys[:, head // group].astype(np.float64), values[:, head // group].astype(np.float64)
        for i in range(n):
            visible = t + i + 1
            s = kh[:visible] @ q[i, head].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[i, head] = (p / p.sum()) @ vh[:visible]
    return out.reshape(n, h * hd)


def ref_swiglu(x, w_gate_up, w_down):
    x = x.astype(np.float64)
    f = w_down.shape[0]
    g, u = x @ w_gate_up[:, :f], x @ w_gate_up[:, f:]
    return (g / (1 + np.exp(-g)) * u) @ w_down


# the ops ----------------------------------------------------------------------------------

def test_rms_norm_divides_by_the_root_mean_square_and_scales():
    rng = np.random.default_rng(0)
    x, w = rand(rng, 5, 16), rand(rng, 16)
    y = ops.rms_norm(x, w, 1e-5)
    assert y.shape == (5, 16) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref_rms_norm(x, w, 1e-5), rtol=RTOL, atol=ATOL)


def test_rope_rotates_adjacent_pairs_by_position_times_frequency():
    rng = np.random.default_rng(1)
    positions = np.array([0, 1, 7, 300, 8191])
    x = rand(rng, 5, 3, 8)
    rot = ops.rope_rotations(positions, 8, 10000.0)
    assert rot.shape == (5, 4) and rot.dtype == np.complex64
    y = ops.rope(x, rot)
    assert y.shape == (5, 3, 8) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref_rope(x, positions, 10000.0), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(y[0], x[0])  # position 0 is not rotated


def test_softmax_rows_sum_to_one_and_survive_large_scores():
    p = ops.softmax(np.array([[1000.0, 1000.0, -np.inf], [0.0, np.log(3.0), -5.0]], np.float32))
    assert p.shape == (2, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0])


@pytest.mark.parametrize("t,n", [(0, 1), (0, 6), (9, 1), (9, 4)], ids=["first", "prefill", "decode", "chunk"])
def test_attention_is_causal_grouped_query_attention_over_cached_and_new_positions(t, n):
    rng = np.random.default_rng(2)
    h, kv, hd = 4, 2, 8
    keys, values = rand(rng, t + n, kv, hd), rand(rng, t + n, kv, hd)  # positions 0 .. t+n-1
    q = rand(rng, n, h, hd)
    past = (keys[:t].transpose(1, 0, 2), values[:t].transpose(1, 0, 2)) if t else None  # cache layout [kv, t, hd]
    out = ops.attention(q, keys[t:], values[t:], past)
    assert out.shape == (n, h * hd) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref_attention(q, keys, values, t), rtol=1e-4, atol=1e-5)


def test_attention_does_not_see_later_positions():
    rng = np.random.default_rng(3)
    q, k, v = rand(rng, 5, 4, 8), rand(rng, 5, 2, 8), rand(rng, 5, 2, 8)
    first = ops.attention(q, k, v)
    k2, v2 = k.copy(), v.copy()
    k2[3:], v2[3:] = 99.0, -99.0  # change positions 3 and 4 only
    changed = ops.attention(q, k2, v2)
    np.testing.assert_array_equal(first[:3], changed[:3])
    assert not np.allclose(first[3:], changed[3:])


def test_swiglu_is_down_of_silu_gate_times_up():
    rng = np.random.default_rng(4)
    x, gate_up, down = rand(rng, 3, 16), rand(rng, 16, 48), rand(rng, 24, 16)
    y = ops.swiglu(x, gate_up, down)
    assert y.shape == (3, 16) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref_swiglu(x, gate_up, down), rtol=1e-4, atol=1e-4)


def test_linear_in_row_groups_is_bit_identical_to_each_group_alone():
    rng = np.random.default_rng(5)
    x, w = rand(rng, 9, 16), rand(rng, 16, 32)
    y = ops.linear(x, w, [0, 1, 4, 9])
    assert y.shape == (9, 32) and y.dtype == np.float32
    for a, b in [(0, 1), (1, 4), (4, 9)]:
        np.testing.assert_array_equal(y[a:b], x[a:b] @ w)


def test_block_is_pre_norm_attention_then_pre_norm_swiglu_with_residuals():
    rng = np.random.default_rng(6)
    w, x = weights(rng), rand(rng, 5, 16)
    nh, nkv, hd = CFG.n_head, CFG.n_kv_head, CFG.head_dim
    rot = ops.rope_rotations(np.arange(5), hd, CFG.rope_base)
    y, k, v = ops.block(x, w, CFG, rot)
    assert y.shape == (5, 16) and k.shape == v.shape == (5, nkv, hd)
    assert y.dtype == k.dtype == v.dtype == np.float32

    qkv = ref_rms_norm(x, w.attn_norm, CFG.norm_eps) @ w.qkv  # [n, (h + 2 kv) hd]
    q = ref_rope(qkv[:, : nh * hd].reshape(5, nh, hd), range(5), CFG.rope_base)
    k_ref = ref_rope(qkv[:, nh * hd : (nh + nkv) * hd].reshape(5, nkv, hd), range(5), CFG.rope_base)
    v_ref = qkv[:, (nh + nkv) * hd :].reshape(5, nkv, hd)
    h = x + ref_attention(q, k_ref, v_ref, 0) @ w.wo
    y_ref = h + ref_swiglu(ref_rms_norm(h, w.ffn_norm, CFG.norm_eps), w.gate_up, w.down)
    np.testing.assert_allclose(k, k_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(v, v_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)


def test_block_continues_from_the_keys_and_values_it_returned_and_changes_no_input():
    rng = np.random.default_rng(7)
    w, x = weights(rng), rand(rng, 7, 16)
    rot = ops.rope_rotations(np.arange(7), CFG.head_dim, CFG.rope_base)
    y_all, k_all, v_all = ops.block(x, w, CFG, rot)
    y4, k4, v4 = ops.block(x[:4], w, CFG, rot[:4])
    past = (k4.transpose(1, 0, 2).copy(), v4.transpose(1, 0, 2).copy())  # what a cache would hold
    saved = [a.copy() for a in (x, *past)]
    y3, k3, v3 = ops.block(x[4:], w, CFG, rot[4:], [past])
    assert all(np.array_equal(a, b) for a, b in zip(saved, (x, *past)))  # pure: inputs unchanged
    np.testing.assert_allclose(np.concatenate([y4, y3]), y_all, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([k4, k3]), k_all, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([v4, v3]), v_all, rtol=1e-6, atol=1e-6)


def test_block_over_several_sequences_with_split_matmuls_equals_each_sequence_alone_bit_for_bit():
    rng = np.random.default_rng(8)
    w = weights(rng)
    lengths, cached = [1, 5, 2], [3, 0, 6]
    xs = [rand(rng, n, 16) for n in lengths]
    pasts = [(rand(rng, 2, t, 8), rand(rng, 2, t, 8)) if t else None for t in cached]
    rots = [ops.rope_rotations(np.arange(t, t + n), CFG.head_dim, CFG.rope_base) for t, n in zip(cached, lengths)]
    bounds = [0, 1, 6, 8]
    y, k, v = ops.block(np.concatenate(xs), w, CFG, np.concatenate(rots), pasts, bounds, split_matmuls=True)
    assert y.shape == (8, 16) and k.shape == v.shape == (8, 2, 8)
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        ys, ks, vs = ops.block(xs[s], w, CFG, rots[s], [pasts[s]])
        assert np.array_equal(y[a:b], ys) and np.array_equal(k[a:b], ks) and np.array_equal(v[a:b], vs)


def test_output_logits_are_the_normed_states_times_the_head():
    rng = np.random.default_rng(9)
    x, norm, head = rand(rng, 2, 16), rand(rng, 16), rand(rng, 11, 16)  # head in GGUF's [vocab, d] layout
    logits = ops.output_logits(x, norm, head, 1e-5)
    assert logits.shape == (2, 11) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref_rms_norm(x, norm, 1e-5) @ head.T, rtol=1e-4, atol=1e-4)

"""The quantized-weight kernels against the ``gguf`` package's own numpy dequantization, type by type.

Blocks are written with ``gguf.quants.quantize`` where the package can quantize the type (F32, F16,
BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1); for the K-quants it can only dequantize, blocks are random
valid bytes (finite random f16 super-block scales, every other bit random). The reference is
``gguf.quants.dequantize``: our dequantization must be bit-identical to it, and the fused products
equal to ``dequantized @ x`` within float32 summation-order error.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from worker.engine.gguf_file import ModelFile, ModelLoadError, default_model_path
from worker.engine.quant import matrix as quant_matrix
from worker.engine.quant import LAYOUTS, SUPPORTED_TYPES, GGMLType, QuantFormatError, QuantizedMatrix, dequantize, matmul

QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
K_QUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]
ALL = QUANTIZABLE + K_QUANTS
#: byte offsets of the f16 super-block scales in each K-quant block (d, dmin / d)
K_F16_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
N_OUT = 5


def n_in_of(t: T) -> int:
    """Several blocks per row; the 1-weight types get a length that is no multiple of the kernels' 32 lanes."""
    block = gguf.GGML_QUANT_SIZES[t][0]
    return 100 if block == 1 else 4 * block


def random_tensor(t: T, rng: np.random.Generator, n_out: int = N_OUT) -> tuple[np.ndarray, np.ndarray]:
    """(stored bytes of a random [n_out, n_in] tensor of type ``t``, gguf's dequantization of them [n_out, n_in] f32)."""
    n_in = n_in_of(t)
    if t in QUANTIZABLE:
        w = (rng.standard_normal((n_out, n_in)) * rng.uniform(0.01, 2.0, (n_out, 1))).astype(np.float32)
        data = quants.quantize(w, t)
    else:
        block, size = gguf.GGML_QUANT_SIZES[t]
        blocks = rng.integers(0, 256, (n_out, n_in // block, size), dtype=np.uint8)
        for off in K_F16_FIELDS[t]:
            scale = (rng.standard_normal((n_out, n_in // block)) * 0.05).astype(np.float16)
            blocks[:, :, off : off + 2] = scale.view(np.uint8).reshape(n_out, n_in // block, 2)
        data = blocks.reshape(n_out, -1)
    ref = quants.dequantize(data, t).reshape(n_out, n_in)
    assert np.isfinite(ref).all()
    return data, ref


def assert_product_close(y: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """y == x @ w.T up to float32 rounding: error within 1e-5 of the sum of |w||x| (no cancellation hides it)."""
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.all(np.abs(y - ref) <= 1e-5 * scale + 1e-30), float(np.max(np.abs(y - ref) / (scale + 1e-30)))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(16)


def test_block_layouts_are_ggmls():
    for t in ALL:
        layout = LAYOUTS[GGMLType[t.name]]
        assert (layout.block_size, layout.type_size) == gguf.GGML_QUANT_SIZES[t]
        assert int(layout.ggml_type) == int(t)
    assert set(SUPPORTED_TYPES) == {t.name for t in ALL}


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_dequantize_is_bit_identical_to_gguf(t, rng):
    data, ref = random_tensor(t, rng)
    qm = QuantizedMatrix.from_bytes("blk.0.test.weight", t, ref.shape, data)
    out = dequantize(qm)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_dequantize_rows_into_a_reused_buffer(t, rng):
    data, ref = random_tensor(t, rng)
    qm = QuantizedMatrix.from_bytes("blk.0.test.weight", t, ref.shape, data)
    scratch = np.full((4, ref.shape[1]), np.nan, np.float32)
    for start in (0, 2, 4):
        tile = dequantize(qm, slice(start, start + 2), scratch)
        assert np.shares_memory(tile, scratch)
        np.testing.assert_array_equal(tile, ref[start : start + 2])


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_matrix_vector_product_matches_dequantized_weights(t, rng):
    data, ref = random_tensor(t, rng)
    qm = QuantizedMatrix.from_bytes("blk.0.test.weight", t, ref.shape, data)
    x = rng.standard_normal(ref.shape[1]).astype(np.float32)
    y = matmul(qm, x)
    assert y.shape == (N_OUT,)
    assert_product_close(y[None], ref, x[None])


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_batched_product_equals_rows_and_the_prefill_path(t, rng, monkeypatch):
    data, ref = random_tensor(t, rng)
    qm = QuantizedMatrix.from_bytes("blk.0.test.weight", t, ref.shape, data)
    X = rng.standard_normal((3, ref.shape[1])).astype(np.float32)
    fused = matmul(qm, X)
    assert_product_close(fused, ref, X)
    if t is not T.F32:  # F32 is plain BLAS; the fused kernels give each row the same lanes and order
        np.testing.assert_array_equal(fused, np.stack([matmul(qm, row) for row in X]))
    monkeypatch.setattr(quant_matrix, "TILE_ELEMS", 2 * ref.shape[1])  # tiles of 2 rows: 3 tiles, the last short
    tiled = matmul(qm, X, fused_max_rows=0)  # dequantized tiles + BLAS, as prefill does
    assert_product_close(tiled, ref, X)


def test_weights_are_a_view_of_the_stored_bytes(rng):
    data, ref = random_tensor(T.Q4_1, rng)
    qm = QuantizedMatrix.from_bytes("blk.0.attn_q.weight", "Q4_1", ref.shape, data)
    assert np.shares_memory(qm.data, data)
    assert qm.nbytes == data.nbytes and qm.shape == ref.shape and qm.ggml_type is GGMLType.Q4_1


def test_wrong_byte_length_is_refused_naming_tensor_and_type(rng):
    data, ref = random_tensor(T.Q6_K, rng)
    with pytest.raises(QuantFormatError, match=r"blk\.3\.ffn_down\.weight \(Q6_K.*truncated or corrupt") as e:
        QuantizedMatrix.from_bytes("blk.3.ffn_down.weight", T.Q6_K, ref.shape, data.reshape(-1)[:-1])
    assert isinstance(e.value, ModelLoadError)


@pytest.mark.parametrize("bad", [T.Q2_K, T.IQ4_XS, 99, "Q7_X"], ids=str)
def test_unsupported_type_is_refused_naming_tensor_and_type(bad):
    label = getattr(bad, "name", str(bad))
    with pytest.raises(QuantFormatError, match=rf"Tensor output\.weight is stored as {label}, which this engine cannot compute with"):
        QuantizedMatrix.from_bytes("output.weight", bad, (2, 256), np.zeros(512, np.uint8))


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(QuantFormatError, match=r"Tensor t \(Q4_0\) has rows of 40 weights"):
        QuantizedMatrix.from_bytes("t", T.Q4_0, (1, 40), np.zeros(18, np.uint8))


def test_activations_of_the_wrong_width_are_refused(rng):
    data, ref = random_tensor(T.Q8_0, rng)
    qm = QuantizedMatrix.from_bytes("t", T.Q8_0, ref.shape, data)
    with pytest.raises(ValueError, match="do not match n_in = 128"):
        matmul(qm, np.zeros(64, np.float32))


@pytest.fixture(scope="module")
def model_file() -> ModelFile:
    return ModelFile(default_model_path())  # a missing model fails the test, it is not skipped


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"])
def test_packaged_model_tensors_match_the_engines_f32_weights(model_file, name):
    tensor = next(t for t in model_file.reader.tensors if t.name == name)
    qm = QuantizedMatrix.from_gguf(tensor)
    w = model_file.tensor(name)  # what the engine computes with today: f32 [n_out, n_in]
    assert qm.ggml_type is GGMLType.Q4_1 and qm.shape == w.shape
    assert np.shares_memory(qm.data, tensor.data)  # the file's memory map, not a copy
    np.testing.assert_array_equal(dequantize(qm), w)
    X = np.random.default_rng(0).standard_normal((4, w.shape[1])).astype(np.float32)
    assert_product_close(matmul(qm, X[0])[None], w, X[:1])
    assert_product_close(matmul(qm, X), w, X)

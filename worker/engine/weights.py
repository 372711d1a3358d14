"""The float32 weights the ops read: one block's (:class:`BlockWeights`) and a block range's
(:class:`RangeWeights`), dequantized from a GGUF model file or a shard file.

Plain arrays in frozen dataclasses, laid out for ``x @ W`` (input dimension first), so
that :mod:`worker.engine.ops` multiplies without transposing. Loading needs only a
``tensor(name) -> np.ndarray`` method: :class:`~worker.engine.gguf_file.ModelFile` and
:class:`~worker.engine.shardfile.ShardFile` both have it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

from .block_range import BlockRange
from .gguf_file import LlamaConfig


class TensorSource(Protocol):
    """A GGUF ``ModelFile`` or a ``ShardFile``: its config and tensors by GGUF name."""

    config: LlamaConfig

    def tensor(self, name: str) -> np.ndarray:
        """The tensor ``name`` dequantized to float32, in GGUF's [out, in] layout.
        Raises ModelLoadError if it is missing."""
        ...


@dataclass(frozen=True)
class BlockWeights:
    """One block's weights, laid out for ``x @ W`` (input dimension first), f32."""

    attn_norm: np.ndarray  # [d]
    qkv: np.ndarray  # [d, (n_head + 2 n_kv_head) * head_dim]: Q, K and V projections side by side
    wo: np.ndarray  # [n_head * head_dim, d]
    ffn_norm: np.ndarray  # [d]
    gate_up: np.ndarray  # [d, 2 d_ff]: gate and up projections side by side
    down: np.ndarray  # [d_ff, d]

    @property
    def nbytes(self) -> int:
        """Bytes of the six arrays."""
        return sum(a.nbytes for a in (self.attn_norm, self.qkv, self.wo, self.ffn_norm, self.gate_up, self.down))


def load_block(mf: TensorSource, i: int) -> BlockWeights:
    """Dequantize block ``i`` of ``mf`` (a ModelFile or a ShardFile holding it). Raises ModelLoadError
    (ShardFormatError for a shard file) if a tensor is missing."""
    t = lambda name: mf.tensor(f"blk.{i}.{name}.weight")  # noqa: E731  [out, in]
    return BlockWeights(
        attn_norm=t("attn_norm"),
        qkv=np.ascontiguousarray(np.concatenate([t("attn_q"), t("attn_k"), t("attn_v")], axis=0).T),
        wo=np.ascontiguousarray(t("attn_output").T),
        ffn_norm=t("ffn_norm"),
        gate_up=np.ascontiguousarray(np.concatenate([t("ffn_gate"), t("ffn_up")], axis=0).T),
        down=np.ascontiguousarray(t("ffn_down").T),
    )


@dataclass(frozen=True)
class RangeWeights:
    """What a block range computes with: its blocks, plus the token embedding on the first range
    and the final norm and output head on the last (a tied head is the embedding array itself)."""

    blocks: tuple[BlockWeights, ...]
    embedding: Optional[np.ndarray] = None  # [vocab, d] f32, first range (and last, when tied)
    output_norm: Optional[np.ndarray] = None  # [d] f32, last range
    output: Optional[np.ndarray] = None  # [vocab, d] f32, last range

    @property
    def nbytes(self) -> int:
        """Bytes held (a tied embedding/head counted once)."""
        arrays = {id(a): a for a in (self.embedding, self.output_norm, self.output) if a is not None}
        return sum(b.nbytes for b in self.blocks) + sum(a.nbytes for a in arrays.values())


def load_range(mf: TensorSource, block_range: BlockRange) -> RangeWeights:
    """Exactly the tensors ``block_range`` needs from ``mf``, dequantized to f32.

    Raises ModelLoadError (ShardFormatError for a shard file) if a tensor is missing.
    """
    cfg = mf.config
    first, last = block_range.is_first, block_range.is_last
    emb = mf.tensor("token_embd.weight") if (first or (last and cfg.tied_output)) else None
    return RangeWeights(
        blocks=tuple(load_block(mf, i) for i in block_range),
        embedding=emb if first else None,
        output_norm=mf.tensor("output_norm.weight") if last else None,
        output=(emb if cfg.tied_output else mf.tensor("output.weight")) if last else None,
    )

"""A stage: the weights and per-session KV caches of one block range.

A model runs as a chain of stages whose ranges chain (``a.end == b.start``);
one stage holding all blocks is the single-process case. The first stage
owns the token embedding, the last owns the final norm and the output head.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .gguf_file import LlamaConfig, ModelFile
from .kv_cache import KVCache
from .ops import rms_norm, rope_rotations, transformer_block
from .paged_kv import SessionPagedKVCache
from .shard import BlockRange

#: A session's KV cache: the default contiguous one or the paged one (resumable from disk).
SessionCache = Union[KVCache, SessionPagedKVCache]


@dataclass(frozen=True)
class BlockWeights:
    """One block's weights, laid out for ``x @ W`` (input dimension first), f32."""

    attn_norm: np.ndarray  # [d]
    qkv: np.ndarray  # [d, (n_head + 2 n_kv_head) * head_dim]
    wo: np.ndarray  # [n_head * head_dim, d]
    ffn_norm: np.ndarray  # [d]
    gate_up: np.ndarray  # [d, 2 d_ff]
    down: np.ndarray  # [d_ff, d]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.attn_norm, self.qkv, self.wo, self.ffn_norm, self.gate_up, self.down))


def load_block(mf: ModelFile, i: int) -> BlockWeights:
    """Dequantize block ``i`` of ``mf``. Raises ModelLoadError if a tensor is missing."""
    t = lambda name: mf.tensor(f"blk.{i}.{name}.weight")  # noqa: E731  [out, in]
    return BlockWeights(
        attn_norm=t("attn_norm"),
        qkv=np.ascontiguousarray(np.concatenate([t("attn_q"), t("attn_k"), t("attn_v")], axis=0).T),
        wo=np.ascontiguousarray(t("attn_output").T),
        ffn_norm=t("ffn_norm"),
        gate_up=np.ascontiguousarray(np.concatenate([t("ffn_gate"), t("ffn_up")], axis=0).T),
        down=np.ascontiguousarray(t("ffn_down").T),
    )


class Stage:
    """Runs blocks ``shard.start .. shard.end-1`` for many sessions.

    ``forward`` is safe to call from several threads for *different* sessions;
    calls for one session must be sequential (a generation is sequential).

    ``kv_cache(session_id)`` makes the cache of a session on its first use:
    by default an in-memory :class:`KVCache`; ``SessionStore.open`` gives paged
    caches that resume sessions saved to disk (see ``paged_kv``).
    """

    def __init__(
        self,
        shard: BlockRange,
        cfg: LlamaConfig,
        blocks: Sequence[BlockWeights],
        embedding: Optional[np.ndarray] = None,  # [vocab, d] f32, first and (tied) last stage
        output_norm: Optional[np.ndarray] = None,  # [d] f32, last stage
        output: Optional[np.ndarray] = None,  # [vocab, d] f32, last stage
        kv_cache: Optional[Callable[[str], SessionCache]] = None,  # session id -> its new cache
    ):
        if len(blocks) != len(shard):
            raise ValueError(f"{shard} needs {len(shard)} blocks, got {len(blocks)}")
        if shard.is_first and embedding is None:
            raise ValueError("the first stage needs the token embedding")
        if shard.is_last and (output_norm is None or output is None):
            raise ValueError("the last stage needs the output norm and head")
        self.shard, self.cfg, self.blocks = shard, cfg, list(blocks)
        self.embedding, self.output_norm, self.output = embedding, output_norm, output
        self._sessions: dict[str, SessionCache] = {}
        self._new_cache = kv_cache or (lambda session_id: KVCache(len(shard), cfg.n_kv_head, cfg.head_dim))
        self._lock = threading.Lock()
        self._rot = rope_rotations(np.arange(0), cfg.head_dim, cfg.rope_base)  # [positions, hd/2] complex64

    def _rotations(self, start: int, end: int) -> np.ndarray:
        """RoPE rotations for positions [start, end): [end - start, hd/2] complex64 (table grown by doubling)."""
        rot = self._rot
        if end > rot.shape[0]:
            cap = max(end, 2 * rot.shape[0], 256)
            rot = self._rot = rope_rotations(np.arange(cap), self.cfg.head_dim, self.cfg.rope_base)
        return rot[start:end]

    @classmethod
    def from_model_file(
        cls, mf: ModelFile, shard: BlockRange, kv_cache: Optional[Callable[[str], SessionCache]] = None
    ) -> "Stage":
        """Load exactly the tensors ``shard`` needs from ``mf`` (dequantized to f32)."""
        cfg = mf.config
        emb = mf.tensor("token_embd.weight") if (shard.is_first or (shard.is_last and cfg.tied_output)) else None
        out = None
        if shard.is_last:
            out = emb if cfg.tied_output else mf.tensor("output.weight")
        return cls(
            shard, cfg, [load_block(mf, i) for i in shard],
            embedding=emb if shard.is_first else None,
            output_norm=mf.tensor("output_norm.weight") if shard.is_last else None,
            output=out, kv_cache=kv_cache,
        )

    @property
    def nbytes(self) -> int:
        """Bytes of weights held (a tied embedding/head counted once)."""
        arrays = {id(a): a for a in (self.embedding, self.output_norm, self.output) if a is not None}
        return sum(b.nbytes for b in self.blocks) + sum(a.nbytes for a in arrays.values())

    # sessions
    def _cache(self, session_id: str) -> SessionCache:
        with self._lock:
            kv = self._sessions.get(session_id)
        if kv is None:  # made outside the lock: it may load a saved session from disk
            new = self._new_cache(session_id)
            with self._lock:
                kv = self._sessions.setdefault(session_id, new)
        return kv

    def session_cache(self, session_id: str) -> Optional[SessionCache]:
        """The in-memory cache of ``session_id`` (to save it), or None."""
        with self._lock:
            return self._sessions.get(session_id)

    def cached_prefix(self, session_id: str, token_ids: Sequence[int]) -> int:
        """How many leading ``token_ids`` this stage holds keys/values for in ``session_id``
        (a saved session is loaded on first use); 0 for caches that do not record token ids."""
        kv = self._cache(session_id)
        return kv.matching_prefix(token_ids) if isinstance(kv, SessionPagedKVCache) else 0

    def session_length(self, session_id: str) -> int:
        """Cached positions of ``session_id`` (0 if unknown)."""
        with self._lock:
            kv = self._sessions.get(session_id)
            return 0 if kv is None else kv.length

    def drop_session(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def sessions(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    # compute
    def forward(
        self, session_id: str, x: np.ndarray, start_pos: int, all_logits: bool = False,
        token_ids: Optional[Sequence[int]] = None,
    ) -> np.ndarray:
        """Run this stage for positions ``start_pos .. start_pos+n-1`` of a session.

        x: first stage: token ids [n] int; other stages: hidden states [n, d] f32.
        token_ids: the [n] ids of these positions, recorded by paged caches so a
        resumed session can be checked (the first stage takes them from ``x``).
        Returns: last stage: logits [1, vocab] f32 for the final position
        ([n, vocab] with ``all_logits``); other stages: hidden states [n, d] f32.
        ``start_pos`` below the cached length rewinds the session to it.
        Raises ValueError for a wrong input shape/dtype or a position gap.
        """
        cfg = self.cfg
        if self.shard.is_first:
            x = np.asarray(x)
            if x.ndim != 1 or x.dtype.kind not in "iu":
                raise ValueError(f"first stage expects token ids [n] int, got {x.dtype}{list(x.shape)}")
            if x.size == 0 or x.min() < 0 or x.max() >= self.embedding.shape[0]:
                raise ValueError("token ids must be non-empty and within the vocabulary")
            h = self.embedding[x]  # [n, d]
            token_ids = x if token_ids is None else token_ids
        else:
            h = np.asarray(x, dtype=np.float32)
            if h.ndim != 2 or h.shape[1] != cfg.d_model:
                raise ValueError(f"stage {self.shard} expects hidden states [n, {cfg.d_model}], got {list(h.shape)}")
        n = h.shape[0]
        kv = self._cache(session_id)
        rot = self._rotations(start_pos, start_pos + n)
        for j, w in enumerate(self.blocks):
            h = transformer_block(h, w, cfg, rot, kv, j, start_pos)
        if isinstance(kv, SessionPagedKVCache):
            kv.commit(start_pos + n, token_ids)
        else:
            kv.commit(start_pos + n)
        if not self.shard.is_last:
            return h
        h = rms_norm(h if all_logits else h[-1:], self.output_norm, cfg.norm_eps)
        return h @ self.output.T  # [n or 1, vocab]


class Pipeline:
    """Stages chained in one process: the reference for the distributed chain.

    Raises ValueError if the ranges do not cover ``[0, total)`` contiguously.
    """

    def __init__(self, stages: Sequence[Stage]):
        ranges = [s.shard for s in stages]
        if not ranges or not ranges[0].is_first or not ranges[-1].is_last or any(
            a.end != b.start for a, b in zip(ranges, ranges[1:])
        ):
            raise ValueError(f"stages do not chain over the whole model: {[str(r) for r in ranges]}")
        self.stages = list(stages)

    @classmethod
    def load(cls, mf: ModelFile, blocks_per_stage: Optional[int] = None) -> "Pipeline":
        n = mf.config.n_block
        ranges = BlockRange.split_even(mf.model_id, n, blocks_per_stage or n)
        return cls([Stage.from_model_file(mf, r) for r in ranges])

    def forward(self, session_id: str, ids: np.ndarray, start_pos: int, all_logits: bool = False) -> np.ndarray:
        """ids [n] int -> logits [1, vocab] f32 (or [n, vocab] with ``all_logits``)."""
        x = ids
        for s in self.stages:
            x = s.forward(session_id, x, start_pos, all_logits=all_logits, token_ids=ids)
        return x

    def cached_prefix(self, session_id: str, ids: Sequence[int]) -> int:
        """Leading ``ids`` every stage holds keys/values for: where a resumed session's prefill starts."""
        return min(s.cached_prefix(session_id, ids) for s in self.stages)

    def drop_session(self, session_id: str) -> None:
        for s in self.stages:
            s.drop_session(session_id)

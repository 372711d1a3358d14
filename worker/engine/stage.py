"""A stage: the weights and per-session KV caches of one block range, and the chain of stages.

A model runs as a chain of stages whose ranges chain (``a.end == b.start``);
one stage holding all blocks is the single-process case. The first stage
owns the token embedding, the last owns the final norm and the output head.

The stage owns all state: the math (:mod:`worker.engine.ops`) takes arrays
and returns arrays; the stage reads each session's cached keys/values, passes
them to ``ops.block``, and appends the keys/values the block returns.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence

import numpy as np

from .block_range import BlockRange
from .gguf_file import LlamaConfig, ModelFile
from .kv_cache import KVCache, SessionCache
from .ops import block, output_logits, rope_rotations
from .weights import BlockWeights, RangeWeights, TensorSource, load_range

__all__ = ["PER_SESSION_MATMUL_MAX_ROWS", "Pipeline", "SessionCache", "Stage"]

#: ``Stage.forward_batch`` multiplies each session's rows separately up to this many sessions
#: (bit-identical to ``forward``), and all rows in one gemm beyond. For few decode rows the
#: separate products are also faster: after the first, each weight matrix (<= 7 MB for
#: SmolLM2-135M) comes from the L3 cache, while OpenBLAS's gemm with 2..8 rows is
#: compute-bound at a near-constant ~40 ms per step for 30 blocks. Measured on the 2-core
#: CI machine, decode tokens/s aggregate vs B: per-session 1.3x at B=2, 1.7x at B=4, 2.1x at
#: B=8; one gemm 0.9x, 1.8x, 3.0x. A Stage's ``per_session_matmul_max_rows`` overrides it.
PER_SESSION_MATMUL_MAX_ROWS = 4


class Stage:
    """Runs blocks ``block_range.start .. block_range.end-1`` for many sessions.

    ``forward`` runs one session; ``forward_batch`` runs a step of several
    sessions at once, reading the weights once for all of them. Both are safe
    to call from several threads for *different* sessions; calls for one
    session must be sequential (a generation is sequential).

    ``kv_cache(session_id)`` makes the cache of a session on its first use:
    by default an in-memory :class:`KVCache`; ``SessionStore.open`` gives paged
    caches that resume sessions saved to disk (see ``paged_kv``).
    ``per_session_matmul_max_rows``: see :data:`PER_SESSION_MATMUL_MAX_ROWS` (None: that value).

    Raises ValueError if the weights do not match ``block_range``.
    """

    def __init__(
        self,
        block_range: BlockRange,
        cfg: LlamaConfig,
        blocks: Sequence[BlockWeights],
        embedding: Optional[np.ndarray] = None,  # [vocab, d] f32, first and (tied) last stage
        output_norm: Optional[np.ndarray] = None,  # [d] f32, last stage
        output: Optional[np.ndarray] = None,  # [vocab, d] f32, last stage
        kv_cache: Optional[Callable[[str], SessionCache]] = None,  # session id -> its new cache
        *,
        per_session_matmul_max_rows: Optional[int] = None,
    ):
        if len(blocks) != len(block_range):
            raise ValueError(f"{block_range} needs {len(block_range)} blocks, got {len(blocks)}")
        if block_range.is_first and embedding is None:
            raise ValueError("the first stage needs the token embedding")
        if block_range.is_last and (output_norm is None or output is None):
            raise ValueError("the last stage needs the output norm and head")
        self.block_range, self.cfg, self.blocks = block_range, cfg, list(blocks)
        self.embedding, self.output_norm, self.output = embedding, output_norm, output
        self._sessions: dict[str, SessionCache] = {}
        self._new_cache = kv_cache or (lambda session_id: KVCache(len(block_range), cfg.n_kv_head, cfg.head_dim))
        self.per_session_matmul_max_rows = per_session_matmul_max_rows
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
        cls, mf: TensorSource, block_range: BlockRange, kv_cache: Optional[Callable[[str], SessionCache]] = None
    ) -> "Stage":
        """Load exactly the tensors ``block_range`` needs from ``mf`` (dequantized to f32).

        ``mf`` is a whole GGUF (:class:`ModelFile`) or a shard file holding at least
        ``block_range``'s tensors (:class:`~worker.engine.shardfile.ShardFile`); both give
        the same float32 weights. Raises ModelLoadError (ShardFormatError for a
        shard file) if a tensor is missing.
        """
        w = load_range(mf, block_range)
        return cls(block_range, mf.config, w.blocks, embedding=w.embedding, output_norm=w.output_norm,
                   output=w.output, kv_cache=kv_cache)

    @property
    def nbytes(self) -> int:
        """Bytes of weights held (a tied embedding/head counted once)."""
        return RangeWeights(tuple(self.blocks), self.embedding, self.output_norm, self.output).nbytes

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
        return self._cache(session_id).matching_prefix(token_ids)

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
        h = self._input(x)
        if self.block_range.is_first:
            token_ids = np.asarray(x) if token_ids is None else token_ids
        n = h.shape[0]
        kv = self._cache(session_id)
        self._check_position(session_id, kv, start_pos)
        h = self._blocks(h, self._rotations(start_pos, start_pos + n), [kv], [start_pos], [0, n])
        kv.commit(start_pos + n, token_ids)
        if not self.block_range.is_last:
            return h
        return self._head(h if all_logits else h[-1:])  # [n or 1, vocab]

    def forward_batch(self, rows: Sequence[tuple[str, int, Sequence[int]]], x: np.ndarray) -> np.ndarray:
        """Run this stage for rows of several sessions at once: one gemm per weight matrix for all of them.

        rows: ``(session_id, start_pos, marks)`` with distinct session ids; row i
        covers the ``n_i = len(marks)`` positions ``start_pos .. start_pos+n_i-1``
        of its session, and ``marks`` are what its cache records for them: the token
        ids, or per-position prefix digests (bytes) where the stage must not learn
        the tokens (see ``paged_kv``) (``start_pos`` below the cached length rewinds it, as in
        :meth:`forward`). x: first stage: the rows' token ids concatenated, [N] int
        (N = sum n_i); other stages: hidden states [N, d] f32 in the same order.
        Returns: last stage: logits [B, vocab] f32 of each row's last position
        (B = len(rows)); other stages: hidden states [N, d] f32.

        Up to :data:`PER_SESSION_MATMUL_MAX_ROWS` rows, the matmuls run per
        session and the results are bit-identical to calling :meth:`forward` row
        by row. Beyond, each matmul is one gemm over all rows (weights read once)
        and results equal per-row forward up to float32 summation order (a gemm
        and a gemv add in different orders: SmolLM2-135M's logits agree within
        1e-4, with the same argmax). Raises ValueError, before any session's
        cache changes, for a repeated session id, an empty row, inputs that do not
        match the rows, or a position gap.
        """
        if not rows:
            raise ValueError("forward_batch needs at least one row")
        sids = [str(r[0]) for r in rows]
        if len(set(sids)) != len(sids):
            raise ValueError(f"forward_batch rows must be of distinct sessions, got {sids}")
        starts = [int(r[1]) for r in rows]
        ids = [_marks(r[2]) for r in rows]
        ns = [len(a) for a in ids]
        if min(ns) < 1 or min(starts) < 0:
            raise ValueError("every forward_batch row needs a start position >= 0 and at least one token id")
        h = self._input(x)
        if h.shape[0] != sum(ns):
            raise ValueError(f"the rows cover {sum(ns)} positions but the input has {h.shape[0]}")
        if self.block_range.is_first and all(isinstance(a, np.ndarray) for a in ids) \
                and not np.array_equal(np.asarray(x), np.concatenate(ids)):
            raise ValueError("the first stage's token ids must be the rows' token ids concatenated")
        caches = [self._cache(sid) for sid in sids]
        for sid, kv, start in zip(sids, caches, starts):
            self._check_position(sid, kv, start)
        rot = np.concatenate([self._rotations(start, start + n) for start, n in zip(starts, ns)])  # [N, hd/2]
        bounds = [0, *np.cumsum(ns).tolist()]  # row bounds of the sessions
        limit = self.per_session_matmul_max_rows
        per_session = len(rows) <= (PER_SESSION_MATMUL_MAX_ROWS if limit is None else limit)
        h = self._blocks(h, rot, caches, starts, bounds, per_session)
        for kv, start, n, row_ids in zip(caches, starts, ns, ids):
            kv.commit(start + n, row_ids)
        if not self.block_range.is_last:
            return h
        last = h[np.asarray(bounds[1:]) - 1]  # [B, d]
        return self._head(last, list(range(len(rows) + 1)) if per_session else None)  # [B, vocab]

    def _input(self, x: np.ndarray) -> np.ndarray:
        """Check ``x`` and make the first block's input: [n, d] f32 (embedded ids on the first stage)."""
        if self.block_range.is_first:
            x = np.asarray(x)
            if x.ndim != 1 or x.dtype.kind not in "iu":
                raise ValueError(f"first stage expects token ids [n] int, got {x.dtype}{list(x.shape)}")
            if x.size == 0 or x.min() < 0 or x.max() >= self.embedding.shape[0]:
                raise ValueError("token ids must be non-empty and within the vocabulary")
            return self.embedding[x]  # [n, d]
        h = np.asarray(x, dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != self.cfg.d_model:
            raise ValueError(f"stage {self.block_range} expects hidden states [n, {self.cfg.d_model}], got {list(h.shape)}")
        return h

    @staticmethod
    def _check_position(session_id: str, kv: SessionCache, start_pos: int) -> None:
        """ValueError unless ``start_pos`` continues (or rewinds) the cached positions of the session."""
        if start_pos < 0:
            raise ValueError(f"session {session_id}: position {start_pos} is negative")
        if start_pos > kv.length:
            raise ValueError(
                f"session {session_id}: position {start_pos} skips past the cached {kv.length} positions"
            )

    def _blocks(
        self, h: np.ndarray, rot: np.ndarray, caches: Sequence[SessionCache], starts: Sequence[int],
        bounds: Sequence[int], split_matmuls: bool = False,
    ) -> np.ndarray:
        """[N, d] f32 through every block of the range, for sessions whose rows are
        ``h[bounds[s] : bounds[s+1]]`` at positions from ``starts[s]``: each block reads the
        sessions' cached keys/values and its new ones are written into ``caches`` (not yet
        committed). ``split_matmuls``: one matmul per session (see ops.block)."""
        for j, w in enumerate(self.blocks):
            past = [kv.read(j, start) for kv, start in zip(caches, starts)]  # views [kv, start, hd]
            h, k, v = block(h, w, self.cfg, rot, past, bounds, split_matmuls)  # k, v [N, kv, hd]
            for kv, start, a, b in zip(caches, starts, bounds[:-1], bounds[1:]):
                kv.write(j, k[a:b].transpose(1, 0, 2), v[a:b].transpose(1, 0, 2), start)
        return h

    def _head(self, h: np.ndarray, groups: Optional[list[int]] = None) -> np.ndarray:
        """[m, d] f32 -> logits [m, vocab] f32: final norm and output head (groups as in ops.linear)."""
        return output_logits(h, self.output_norm, self.output, self.cfg.norm_eps, groups)


def _marks(m: Sequence) -> "np.ndarray | list[Optional[bytes]]":
    """A row's marks: token ids as an int64 array [n], or prefix digests as a list of bytes
    (None: a position recorded without a mark)."""
    if not isinstance(m, np.ndarray) and len(m) and (m[0] is None or isinstance(m[0], (bytes, bytearray))):
        return [None if d is None else bytes(d) for d in m]
    return np.asarray(m, dtype=np.int64).reshape(-1)


class Pipeline:
    """Stages chained in one process: the reference for the distributed chain.

    Raises ValueError if the ranges do not cover ``[0, total)`` contiguously.
    """

    def __init__(self, stages: Sequence[Stage]):
        ranges = [s.block_range for s in stages]
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

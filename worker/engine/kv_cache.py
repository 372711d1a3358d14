"""Per-session KV cache of one stage (its block range only): the interface a Stage writes and reads
(:class:`SessionCache`) and the default in-memory implementation (:class:`KVCache`).

The math (:mod:`worker.engine.ops`) never touches a cache: the stage reads a session's cached
keys/values with :meth:`SessionCache.read`, hands them to ``ops.block`` as plain arrays, and
stores the keys/values the block returns with :meth:`SessionCache.write`, layer by layer; after
the last layer, :meth:`SessionCache.commit` makes the new positions valid.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import numpy as np


class SessionCache(Protocol):
    """What a :class:`~worker.engine.stage.Stage` needs of one session's cache
    (:class:`KVCache`, or :class:`~worker.engine.paged_kv.SessionPagedKVCache` which also saves to disk)."""

    #: Valid (committed) positions.
    length: int

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held."""
        ...

    def read(self, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the keys and values of positions ``0 .. end-1`` of ``layer``: ([n_kv_head, end, head_dim] f32, same)."""
        ...

    def write(self, layer: int, k: np.ndarray, v: np.ndarray, start_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v [n_kv_head, n, head_dim] f32 at positions ``start_pos .. start_pos+n-1`` of ``layer``."""
        ...

    def commit(self, length: int, token_ids: Optional[Sequence[int]] = None) -> None:
        """Mark positions ``0 .. length-1`` valid after every layer wrote; ``token_ids``: the ids of the new positions."""
        ...

    def matching_prefix(self, token_ids: Sequence[int]) -> int:
        """How many leading ``token_ids`` are cached with the same ids (0 for a cache that records none)."""
        ...


class KVCache:
    """Keys and values of ``n_layers`` blocks for one session, grown geometrically
    (capacity doubles, in multiples of ``CHUNK``), so a long session copies
    O(length) bytes in total rather than O(length^2).

    Per layer: ``k, v`` of shape [n_kv_head, capacity, head_dim] f32; the first
    ``length`` positions are valid. Memory: 2 * n_layers * n_kv_head * length *
    head_dim * 4 bytes (SmolLM2-135M, 30 blocks: 46 KiB per token).
    """

    CHUNK = 256  # capacity is a multiple of this many positions

    def __init__(self, n_layers: int, n_kv_head: int, head_dim: int):
        self.n_layers, self.n_kv_head, self.head_dim = n_layers, n_kv_head, head_dim
        self.length = 0
        self._k = [np.empty((n_kv_head, 0, head_dim), np.float32) for _ in range(n_layers)]
        self._v = [np.empty((n_kv_head, 0, head_dim), np.float32) for _ in range(n_layers)]

    @property
    def capacity(self) -> int:
        return self._k[0].shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of valid keys and values."""
        return 2 * self.n_layers * self.n_kv_head * self.length * self.head_dim * 4

    def read(self, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Views (no copy) of positions ``0..end-1`` of ``layer``: ([n_kv_head, end, head_dim] f32, same).
        Raises ValueError if ``end`` is past the valid prefix."""
        if end > self.length:
            raise ValueError(f"position {end} is past the cached {self.length} positions")
        return self._k[layer][:, :end], self._v[layer][:, :end]

    def write(self, layer: int, k: np.ndarray, v: np.ndarray, start_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v [n_kv_head, n, head_dim] at positions ``start_pos..start_pos+n-1`` of ``layer``;
        return views of positions ``0..start_pos+n-1``: ([n_kv_head, t, head_dim], same).

        ``length`` advances only through :meth:`commit`, after every layer wrote.
        Raises ValueError if ``start_pos`` is past the valid prefix.
        """
        if start_pos > self.length:
            raise ValueError(f"position {start_pos} skips past the cached {self.length} positions")
        end = start_pos + k.shape[1]
        if end > self._k[layer].shape[1]:
            new_cap = -(-max(end, 2 * self._k[layer].shape[1]) // self.CHUNK) * self.CHUNK
            for store in (self._k, self._v):
                grown = np.empty((self.n_kv_head, new_cap, self.head_dim), np.float32)
                grown[:, : self.length] = store[layer][:, : self.length]
                store[layer] = grown
        self._k[layer][:, start_pos:end] = k
        self._v[layer][:, start_pos:end] = v
        return self._k[layer][:, :end], self._v[layer][:, :end]

    def commit(self, length: int, token_ids: Optional[Sequence[int]] = None) -> None:
        """Mark positions ``0..length-1`` valid (after a forward pass through every layer).
        ``token_ids`` are not recorded by this cache."""
        self.length = length

    def matching_prefix(self, token_ids: Sequence[int]) -> int:
        """0: this cache records no token ids, so no prefix of a new request can be trusted."""
        return 0

    def arrays(self) -> dict[str, np.ndarray]:
        """Valid part as named arrays ``k{i}``/``v{i}`` [n_kv_head, length, head_dim] (for saving)."""
        out = {}
        for i in range(self.n_layers):
            out[f"k{i}"] = self._k[i][:, : self.length]
            out[f"v{i}"] = self._v[i][:, : self.length]
        return out

"""Paged per-session KV cache of one stage, and a disk store that keeps sessions across restarts.

Seed 004's ``SessionPagedKVCache``. The keys and values of one conversation on
one stage (a :class:`BlockRange` of blocks) are held in fixed-size pages of
``page_tokens`` positions, after vLLM's PagedAttention (Kwon et al.,
"Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP 2023): the page is the unit of allocation, of size
accounting and of saving (only used pages are written).

Where this differs from vLLM: vLLM scatters a sequence's pages over a global
pool and its attention kernel follows a block table. NumPy's matmul needs
each block's keys contiguous, and gathering scattered pages before every
attention call measured ~20 ms per decode step at 3000 cached tokens on the
2-core CI machine (+40% per step; contiguous writes: 0.3 ms). So a session's
pages are kept contiguous per block, in an arena of whole pages that grows
geometrically (the block table is the identity), and attention reads views
of it without copying, exactly as with :class:`~worker.engine.kv_cache.KVCache`.

The cache also records a *mark* for every cached position, so that a
conversation resumed after a restart is checked against what was cached and
only the new suffix is prefilled (:meth:`matching_prefix`). A mark is the
position's token id (the in-process engine) or an opaque prefix digest (bytes):
a stage of a network that must not learn the text is given, per position, a
keyed hash of the session's prefix up to it (``worker.inference.prefix_digests``)
and compares those, never token ids.

:class:`SessionStore` saves one file per session (``numpy.savez_compressed``,
written atomically), lists saved sessions, loads one lazily on first use and
evicts least-recently-used ones beyond a size and a count limit. One store per
stage per daemon, one directory per store; session id = conversation id. Given
a :class:`Sealer` (a pair of callables doing authenticated encryption; the
engine holds no key and imports no cryptography), every file is sealed at rest:

    sealed file = b"AKVS" || version (1 byte, 1) || meta length (u32, big-endian) || meta
                  || sealer.seal(npz bytes, associated data = everything before it)

``meta`` is the header (JSON, below) in the clear, so that listing needs no key;
it is bound to the ciphertext as associated data, so neither can be changed or
swapped. A file that does not open (wrong key, tampered, truncated, or a
plaintext file where a sealed one is expected) is refused like a damaged one:
logged, deleted, and the session is recomputed.

Units: positions and token counts are tokens; sizes are bytes; times are Unix
seconds. Arrays are float32 throughout.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import struct
import threading
import time
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .block_range import BlockRange

log = logging.getLogger(__name__)

FORMAT = "argus-paged-kv"
FORMAT_VERSION = 1
PAGE_TOKENS = 64  # positions per page (SmolLM2-135M: 48 KiB per page per block for K, as much for V)
SUFFIX = ".kv.npz"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB of saved session files per store
DEFAULT_MAX_SESSIONS = 100

SEALED_MAGIC = b"AKVS"
SEALED_VERSION = 1
_SEALED_HEAD = struct.Struct(">4sBI")  # magic, version, meta length
MAX_META_BYTES = 64 * 1024

PathLike = Union[str, os.PathLike]

#: What a cache records per position: a token id (int), a prefix digest (bytes), or None (not told).
Mark = Union[int, bytes, None]


@dataclass(frozen=True)
class Sealer:
    """Authenticated encryption of saved sessions, supplied by the daemon (``worker.stage_host``).

    ``seal(plaintext, associated_data) -> ciphertext``; ``open(ciphertext, associated_data)
    -> plaintext``, raising any exception when the ciphertext, the key or the associated data
    is not the one sealed (the store treats that as a damaged file). ``name`` is shown in logs.
    """

    seal: Callable[[bytes, bytes], bytes]
    open: Callable[[bytes, bytes], bytes]
    name: str = "sealed"


class SessionFileError(Exception):
    """A saved session file cannot be used: missing, truncated, corrupted or not a session file."""


class IncompatibleSessionFile(SessionFileError):
    """A readable session file written for another model, block range, shape or file format."""


class SessionPagedKVCache:
    """Keys and values of the blocks of ``block_range`` for one session, in pages of ``page_tokens`` positions.

    Per block (``layer`` = 0 .. len(block_range)-1, i.e. block ``block_range.start + layer``),
    K and V each live in an arena [n_kv_head, capacity_pages * page_tokens,
    head_dim] f32 of whole pages; position ``p`` is in page ``p // page_tokens``.
    The first ``length`` positions are valid and ``marks[p]`` identifies position
    ``p``: its token id, a prefix digest (bytes), or None where the stage was not
    told (see the module docstring). Memory:
    2 * n_layers * n_kv_head * head_dim * 4 bytes per position (SmolLM2-135M,
    30 blocks: 45 KiB per token, 2.8 MiB per 64-token page across the blocks).

    It is a :class:`~worker.engine.kv_cache.SessionCache`, as the default
    :class:`~worker.engine.kv_cache.KVCache`: the stage calls ``read`` and ``write``
    per layer, then ``commit`` once per forward pass.
    """

    GROWTH = 1.5  # an arena grows to at least this many times its pages: O(1) amortized copying, <= 1/3 unused

    def __init__(self, block_range: BlockRange, n_kv_head: int, head_dim: int, page_tokens: int = PAGE_TOKENS):
        if page_tokens < 1:
            raise ValueError(f"page_tokens must be >= 1, got {page_tokens}")
        self.block_range, self.n_kv_head, self.head_dim, self.page_tokens = block_range, n_kv_head, head_dim, page_tokens
        self.n_layers = len(block_range)
        self.length = 0
        self.computed_positions = 0  # positions whose K/V were computed here (not loaded), summed over commits
        self._k = [self._arena(0) for _ in range(self.n_layers)]  # [layer] -> [n_kv, capacity, hd]
        self._v = [self._arena(0) for _ in range(self.n_layers)]
        self._marks: list[Mark] = []  # [length]
        self._written: Optional[tuple[int, int]] = None  # (lowest start, highest end) written since the last commit

    def _arena(self, n_pages: int) -> np.ndarray:
        """A zeroed arena of ``n_pages`` pages: [n_kv_head, n_pages * page_tokens, head_dim] f32."""
        return np.zeros((self.n_kv_head, n_pages * self.page_tokens, self.head_dim), np.float32)

    # --- sizes ---------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Valid (committed) positions."""
        return self.length

    @property
    def n_pages(self) -> int:
        """Pages in use per block (for K; as many for V): ceil(length / page_tokens)."""
        return -(-self.length // self.page_tokens)

    @property
    def capacity_pages(self) -> int:
        """Pages held per block (for K; as many for V), used or not."""
        return self._k[0].shape[1] // self.page_tokens

    @property
    def page_nbytes(self) -> int:
        """Bytes of one page of one block's K (or V): n_kv_head * page_tokens * head_dim * 4."""
        return self.n_kv_head * self.page_tokens * self.head_dim * 4

    @property
    def nbytes(self) -> int:
        """Bytes of K and V held: 2 * sum over blocks of capacity_pages * page_nbytes."""
        return sum(a.nbytes for a in self._k) + sum(a.nbytes for a in self._v)

    @property
    def token_ids(self) -> list[int]:
        """Token id of each cached position [length] (-1 where unknown or recorded as a digest)."""
        return [m if isinstance(m, int) else -1 for m in self._marks]

    @property
    def marks(self) -> list[Mark]:
        """What was recorded for each cached position [length]: token id, digest bytes or None."""
        return list(self._marks)

    def matching_prefix(self, marks: Sequence[Any]) -> int:
        """How many leading ``marks`` (token ids, or prefix digests as bytes) are cached here with
        the same mark (0 .. min(len, length)); a position recorded without a mark ends the match."""
        n = 0
        for a, b in zip(self._marks, marks):
            if a is None or a != _mark(b):
                break
            n += 1
        return n

    # --- the Stage's interface (kv_cache.SessionCache) ------------------------
    def read(self, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Views (no copy) of positions ``0 .. end-1`` of ``layer``: ([n_kv_head, end, head_dim] f32, same).
        Raises ValueError if ``end`` is past the valid prefix."""
        if end > self.length:
            raise ValueError(f"position {end} is past the cached {self.length} positions")
        return self._k[layer][:, :end], self._v[layer][:, :end]

    def write(self, layer: int, k: np.ndarray, v: np.ndarray, start_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v [n_kv_head, n, head_dim] f32 at positions ``start_pos .. start_pos+n-1`` of ``layer``;
        return views of positions ``0 .. start_pos+n-1``: ([n_kv_head, t, head_dim], same).

        ``length`` advances only through :meth:`commit`. Raises ValueError if
        ``start_pos`` is past the valid prefix (``start_pos < length`` rewinds).
        """
        if start_pos > self.length:
            raise ValueError(f"position {start_pos} skips past the cached {self.length} positions")
        end = start_pos + k.shape[1]
        if end > self._k[layer].shape[1]:
            cap = self._k[layer].shape[1] // self.page_tokens
            pages = max(-(-end // self.page_tokens), math.ceil(cap * self.GROWTH))
            for arenas in (self._k, self._v):
                grown = self._arena(pages)
                grown[:, : self.length] = arenas[layer][:, : self.length]
                arenas[layer] = grown
        self._k[layer][:, start_pos:end] = k
        self._v[layer][:, start_pos:end] = v
        lo, hi = self._written or (start_pos, end)
        self._written = (min(lo, start_pos), max(hi, end))
        return self._k[layer][:, :end], self._v[layer][:, :end]

    def commit(self, length: int, token_ids: Optional[Sequence[Any]] = None) -> None:
        """Mark positions ``0 .. length-1`` valid after a forward pass wrote every layer.

        ``token_ids`` are the marks of the positions written since the last commit
        (``start_pos .. length-1``): token ids, or prefix digests (bytes); None
        records them as unknown. Without a write, ``length`` may only shrink
        (truncation). Raises ValueError for a length the writes do not cover or
        marks of the wrong count.
        """
        start, end = self._written if self._written else (length, self.length)
        if not 0 <= length <= end or start > length:
            raise ValueError(f"cannot commit {length} positions: positions {start}..{end - 1} were written, {self.length} cached")
        new = length - start
        if token_ids is None:
            ids: list[Mark] = [None] * new
        elif isinstance(token_ids, np.ndarray):
            ids = [int(t) for t in token_ids.reshape(-1)]
        else:
            ids = [_mark(t) for t in token_ids]
        if len(ids) != new:
            raise ValueError(f"{len(ids)} token ids for the {new} positions {start}..{length - 1}")
        self._marks[start:] = ids
        self.computed_positions += new
        self.length = length
        self._written = None

    def arrays(self) -> dict[str, np.ndarray]:
        """Valid part as named views ``k{i}``/``v{i}`` [n_kv_head, length, head_dim] f32, i = layer in the range."""
        out = {}
        for i in range(self.n_layers):
            out[f"k{i}"] = self._k[i][:, : self.length]
            out[f"v{i}"] = self._v[i][:, : self.length]
        return out

    # --- files ------------------------------------------------------------------
    def header(self, session_id: str = "") -> dict:
        """What a file saved now would say about itself (see :meth:`save_to_disk`)."""
        s = self.block_range
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "session_id": session_id,
            "model_id": s.model_id, "block_start": s.start, "block_end": s.end, "block_total": s.total,
            "n_kv_head": self.n_kv_head, "head_dim": self.head_dim, "page_tokens": self.page_tokens,
            "n_tokens": self.length, "dtype": "float32", "saved_at": time.time(),
        }

    def to_bytes(self, session_id: str = "", header: Optional[dict] = None) -> bytes:
        """This cache as one ``numpy.savez_compressed`` archive (no pickles) holding: ``header``, a
        JSON string (format, version, session id, model id, block range, n_kv_head, head_dim,
        page size, n_tokens, dtype, saved_at); ``token_ids`` int64 [n_tokens] (-1 where the
        mark is not a token id); ``digests`` uint8 [n_tokens, L] when the marks are prefix
        digests of L bytes (zeros where unknown); ``k{i}``, ``v{i}`` f32 [n_kv_head, n_tokens,
        head_dim] per block of the range: the used pages only."""
        digests = {}
        sizes = {len(m) for m in self._marks if isinstance(m, bytes)}
        if len(sizes) > 1:
            raise ValueError(f"prefix digests of several sizes in one cache: {sorted(sizes)}")
        if sizes:
            (size,) = sizes
            raw = b"".join(m if isinstance(m, bytes) else bytes(size) for m in self._marks)
            digests["digests"] = np.frombuffer(raw, np.uint8).reshape(len(self._marks), size)
        buf = io.BytesIO()
        np.savez_compressed(buf, header=np.array(json.dumps(header or self.header(session_id))),
                            token_ids=np.asarray(self.token_ids, np.int64), **digests, **self.arrays())
        return buf.getvalue()

    def save_to_disk(self, path: PathLike, session_id: str = "", sealer: Optional[Sealer] = None) -> int:
        """Write this cache to ``path`` atomically (a temporary file in the same directory, fsync, rename):
        the archive of :meth:`to_bytes`, sealed by ``sealer`` when given (format in the module
        docstring). Returns the file's size in bytes. Raises OSError if the disk refuses
        the write (``path`` unchanged).
        """
        path = Path(path)
        header = self.header(session_id)
        data = self.to_bytes(session_id, header)
        if sealer is not None:
            data = seal_bytes(data, header, sealer)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return path.stat().st_size

    def load_from_disk(self, path: PathLike, sealer: Optional[Sealer] = None) -> dict:
        """Replace this cache's contents with the session saved at ``path``; return the file's header.

        The file must be for this cache's model id, block range, KV shape and
        dtype, in this format version (the page size may differ: positions are
        re-paged), and sealed exactly when ``sealer`` is given (it must open).
        Raises IncompatibleSessionFile for a file written for anything else and
        SessionFileError for a missing, truncated, corrupted, tampered or
        wrongly sealed one; the cache is unchanged when either is raised.
        """
        path = Path(path)
        try:
            with _open_npz(path, sealer) as z:
                h = _header_of(z, path)
                self._check_compatible(h, path)
                n = int(h["n_tokens"])
                ids = z["token_ids"]
                if ids.shape != (n,) or ids.dtype.kind not in "iu":
                    raise SessionFileError(f"{path}: token_ids are {ids.dtype}{list(ids.shape)}, expected {n} integers")
                marks: list[Mark] = [int(t) if t >= 0 else None for t in ids]
                if "digests" in z.files:
                    d = z["digests"]
                    if d.ndim != 2 or d.shape[0] != n or d.dtype != np.uint8 or not 1 <= d.shape[1] <= 64:
                        raise SessionFileError(f"{path}: digests are {d.dtype}{list(d.shape)}, expected uint8[{n}, L]")
                    zero = bytes(d.shape[1])
                    marks = [m if m is not None else (row.tobytes() if row.tobytes() != zero else None)
                             for m, row in zip(marks, d)]
                shape = (self.n_kv_head, n, self.head_dim)
                arenas_k, arenas_v = [], []
                for i in range(self.n_layers):
                    for name, dest in (("k", arenas_k), ("v", arenas_v)):
                        a = z[f"{name}{i}"]
                        if a.shape != shape or a.dtype != np.float32:
                            raise SessionFileError(f"{path}: {name}{i} is {a.dtype}{list(a.shape)}, expected float32{list(shape)}")
                        arena = self._arena(-(-n // self.page_tokens))
                        arena[:, :n] = a
                        dest.append(arena)
        except _READ_ERRORS as e:
            raise _unreadable(path, e) from None
        self._k, self._v = arenas_k, arenas_v
        self._marks = marks
        self.length, self._written = n, None
        return h

    def _check_compatible(self, h: dict, path: Path) -> None:
        if h.get("format") != FORMAT or h.get("version") != FORMAT_VERSION:
            raise IncompatibleSessionFile(
                f"{path}: format {h.get('format')!r} version {h.get('version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}"
            )
        want = self.header()
        for key in ("model_id", "block_start", "block_end", "block_total", "n_kv_head", "head_dim", "dtype"):
            if h.get(key) != want[key]:
                raise IncompatibleSessionFile(
                    f"{path}: saved for {h.get('model_id')}[{h.get('block_start')}:{h.get('block_end')}]/{h.get('block_total')} "
                    f"(n_kv_head {h.get('n_kv_head')}, head_dim {h.get('head_dim')}, {h.get('dtype')}), "
                    f"this stage is {self.block_range} (n_kv_head {self.n_kv_head}, head_dim {self.head_dim}, float32)"
                )
        if not isinstance(h.get("n_tokens"), int) or h["n_tokens"] < 0:
            raise SessionFileError(f"{path}: header has no valid n_tokens")


def read_header(path: PathLike) -> dict:
    """The header of a saved session file, plain or sealed (reads only the header; a sealed
    file's header is in the clear, so no key is needed; it is authenticated when the file
    is loaded). Raises SessionFileError; the dict has ``"sealed": True`` for a sealed file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(_SEALED_HEAD.size)
            if head[:4] == SEALED_MAGIC:
                meta, _ = _sealed_meta(head + f.read(MAX_META_BYTES), path)
                return {**_meta_header(meta, path), "sealed": True}
        with _open_npz(path) as z:
            return _header_of(z, path)
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None


def _mark(t: Any) -> Mark:
    """A mark as recorded: bytes stay bytes, anything else is a token id (int)."""
    if t is None or isinstance(t, bytes):
        return t
    if isinstance(t, (bytearray, memoryview)):
        return bytes(t)
    return int(t)


def seal_bytes(archive: bytes, header: dict, sealer: Sealer) -> bytes:
    """The sealed file of ``archive`` (module docstring): clear meta, sealed body bound to it."""
    meta = json.dumps(header, sort_keys=True).encode()
    head = _SEALED_HEAD.pack(SEALED_MAGIC, SEALED_VERSION, len(meta)) + meta
    return head + sealer.seal(archive, head)


def open_sealed(data: bytes, sealer: Sealer, where: Any = "session") -> bytes:
    """The archive inside a sealed file's bytes. Raises SessionFileError when it is not a sealed
    file or does not open (tampered, truncated, another key or another file's header)."""
    meta, head = _sealed_meta(data, where)
    try:
        return sealer.open(data[len(head):], head)
    except Exception as e:  # the sealer's own error type: the engine does not know it
        raise SessionFileError(f"{where}: the sealed session does not open ({type(e).__name__}: {e or 'authentication failed'}); "
                               "it was altered, cut, or sealed with another key") from None


def _sealed_meta(data: bytes, where: Any) -> tuple[bytes, bytes]:
    """(meta, head) of a sealed file's leading bytes. Raises SessionFileError."""
    if len(data) < _SEALED_HEAD.size or data[:4] != SEALED_MAGIC:
        raise SessionFileError(f"{where}: not a sealed saved session")
    _, version, n = _SEALED_HEAD.unpack_from(data)
    if version != SEALED_VERSION or n > MAX_META_BYTES or len(data) < _SEALED_HEAD.size + n:
        raise SessionFileError(f"{where}: the sealed session's header is damaged or of another version ({version})")
    head = data[:_SEALED_HEAD.size + n]
    return head[_SEALED_HEAD.size:], head


def _meta_header(meta: bytes, where: Any) -> dict:
    try:
        h = json.loads(meta)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SessionFileError(f"{where}: the header is not valid JSON ({e})") from None
    if not isinstance(h, dict):
        raise IncompatibleSessionFile(f"{where}: not a saved session (header is not an object)")
    return h


#: What reading a damaged archive raises (zipfile checks each member's CRC-32 as it is read).
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def _unreadable(path: Path, e: Exception) -> SessionFileError:
    if isinstance(e, FileNotFoundError):
        return SessionFileError(f"{path}: no saved session file there")
    return SessionFileError(
        f"{path}: the saved session is unreadable (truncated or corrupted: {type(e).__name__}: {e}); "
        "drop it and the conversation will be recomputed"
    )


def _open_npz(path: Path, sealer: Optional[Sealer] = None) -> np.lib.npyio.NpzFile:
    """``path`` opened as an .npz archive (no pickles), unsealed first when ``sealer`` is given.
    Raises SessionFileError for any other file, and for a plaintext file where a sealed one is
    expected (or the reverse)."""
    if sealer is not None:
        data = path.read_bytes()
        if data[:4] == b"PK\x03\x04":
            raise SessionFileError(f"{path}: a plaintext saved session where a sealed one is expected; refused")
        source: Any = io.BytesIO(open_sealed(data, sealer, path))
    else:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == SEALED_MAGIC:
            raise SessionFileError(f"{path}: a sealed saved session, and no key to open it")
        if magic != b"PK\x03\x04":
            raise SessionFileError(f"{path}: not a saved session (not an .npz archive; empty or overwritten)")
        source = path
    z = np.load(source, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise SessionFileError(f"{path}: not a saved session (not an .npz archive)")
    return z


def _header_of(z: np.lib.npyio.NpzFile, path: Path) -> dict:
    if "header" not in z.files:
        raise IncompatibleSessionFile(f"{path}: not a saved session (no header)")
    try:
        h = json.loads(str(z["header"][()]))
    except json.JSONDecodeError as e:
        raise SessionFileError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(h, dict):
        raise IncompatibleSessionFile(f"{path}: not a saved session (header is not an object)")
    return h


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- the store ----------------------------------------------------------------

@dataclass(frozen=True)
class SavedSession:
    """One saved session as listed by :meth:`SessionStore.sessions`."""

    session_id: str
    nbytes: int  # size of the file on disk, bytes
    n_tokens: int  # cached positions
    last_used: float  # Unix seconds of the last save or load
    path: Path


_PLAIN_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,99}")


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class SessionStore:
    """Saved sessions of one stage in ``directory``: one ``<id>.kv.npz`` file per session.

    ``open`` is the Stage's cache factory (``Stage(..., kv_cache=store.open)``):
    a session saved before a restart is loaded on its first use, any other gets
    a new empty cache. Call ``save`` after each completed answer. Beyond
    ``max_bytes`` of files or ``max_sessions`` files, the least recently used
    (saved or loaded) sessions are deleted, each with an INFO log line.

    Safe for several threads of one process; one process per directory.
    Files that cannot be used (another model or range, unreadable, left-over
    temporary files, plaintext files in a store with a ``sealer``) are deleted
    when the store opens, with a WARNING: a session's cache can always be
    recomputed from its conversation. ``sealer``: seal every file at rest (see
    :class:`Sealer`); a file that then fails to open is dropped on its first use.
    """

    def __init__(
        self,
        directory: PathLike,
        block_range: BlockRange,
        n_kv_head: int,
        head_dim: int,
        *,
        page_tokens: int = PAGE_TOKENS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        sealer: Optional[Sealer] = None,
    ):
        if max_bytes < 0 or max_sessions < 0:
            raise ValueError(f"limits must be >= 0, got max_bytes={max_bytes}, max_sessions={max_sessions}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.block_range, self.n_kv_head, self.head_dim, self.page_tokens = block_range, n_kv_head, head_dim, page_tokens
        self.max_bytes, self.max_sessions, self.sealer = max_bytes, max_sessions, sealer
        self._lock = threading.Lock()
        self._index: dict[str, SavedSession] = {}
        self._last_touch = 0.0
        self._scan()

    def new_cache(self) -> SessionPagedKVCache:
        return SessionPagedKVCache(self.block_range, self.n_kv_head, self.head_dim, self.page_tokens)

    def path_for(self, session_id: str) -> Path:
        """The file of ``session_id``: the id itself when it is plain lowercase, else a hash of it."""
        name = session_id if _PLAIN_ID.fullmatch(session_id) else "_" + hashlib.sha256(session_id.encode()).hexdigest()[:40]
        return self.directory / (name + SUFFIX)

    # --- listing ----------------------------------------------------------------
    def sessions(self) -> list[SavedSession]:
        """Saved sessions, most recently used first."""
        with self._lock:
            return sorted(self._index.values(), key=lambda s: s.last_used, reverse=True)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._index.values())

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._index

    # --- use ----------------------------------------------------------------------
    def open(self, session_id: str) -> SessionPagedKVCache:
        """The saved cache of ``session_id`` loaded from disk, or a new empty one if none is usable."""
        return self.load(session_id) or self.new_cache()

    def load(self, session_id: str) -> Optional[SessionPagedKVCache]:
        """Load ``session_id`` from disk and mark it used; None if it was not saved.

        A file that turns out unreadable or incompatible is deleted with a
        WARNING and None is returned: the caller recomputes the conversation.
        """
        with self._lock:
            saved = self._index.get(session_id)
        if saved is None:
            return None
        cache = self.new_cache()
        try:
            cache.load_from_disk(saved.path, self.sealer)
        except SessionFileError as e:
            log.warning("dropped saved session %s: %s", session_id, e)
            self._forget(session_id, saved)
            return None
        now = self._touch(saved.path)
        with self._lock:
            if self._index.get(session_id) == saved:
                self._index[session_id] = SavedSession(session_id, saved.nbytes, saved.n_tokens, now, saved.path)
        return cache

    def save(self, session_id: str, cache: SessionPagedKVCache) -> SavedSession:
        """Write ``cache`` as ``session_id`` (replacing any earlier save), then evict beyond the limits.

        Raises IncompatibleSessionFile if ``cache`` is for another range or shape
        than this store, OSError if the disk refuses the write (nothing replaced).
        """
        if (cache.block_range, cache.n_kv_head, cache.head_dim) != (self.block_range, self.n_kv_head, self.head_dim):
            raise IncompatibleSessionFile(f"a cache for {cache.block_range} cannot be saved in the store for {self.block_range}")
        path = self.path_for(session_id)
        size = cache.save_to_disk(path, session_id, self.sealer)
        saved = SavedSession(session_id, size, cache.n_tokens, self._touch(path), path)
        with self._lock:
            self._index[session_id] = saved
            self._evict()
        return saved

    def drop(self, session_id: str) -> bool:
        """Delete the saved session; False if there was none."""
        with self._lock:
            saved = self._index.pop(session_id, None)
        if saved is None:
            return False
        saved.path.unlink(missing_ok=True)
        log.info("dropped saved session %s (%s)", session_id, _mib(saved.nbytes))
        return True

    # --- internals ------------------------------------------------------------------
    def _touch(self, path: Path) -> float:
        """Mark ``path`` used now: a time strictly after this store's previous one (so LRU order
        holds even for equal clock readings), also set as the file's mtime for after a restart."""
        with self._lock:
            now = self._last_touch = max(time.time(), self._last_touch + 1e-6)
        try:
            os.utime(path, (now, now))
        except OSError:
            pass
        return now

    def _forget(self, session_id: str, saved: SavedSession) -> None:
        with self._lock:
            if self._index.get(session_id) == saved:
                del self._index[session_id]
        saved.path.unlink(missing_ok=True)

    def _evict(self) -> None:
        """Delete least-recently-used sessions until both limits hold. Caller holds the lock."""
        by_age = sorted(self._index.values(), key=lambda s: s.last_used)
        total = sum(s.nbytes for s in by_age)
        for s in by_age:
            if total <= self.max_bytes and len(self._index) <= self.max_sessions:
                break
            limit = (
                f"{self.max_sessions} saved sessions" if len(self._index) > self.max_sessions
                else f"{_mib(self.max_bytes)} of saved sessions"
            )
            del self._index[s.session_id]
            s.path.unlink(missing_ok=True)
            total -= s.nbytes
            log.info(
                "evicted session %s (%s, last used %s) to stay under %s",
                s.session_id, _mib(s.nbytes), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.last_used)), limit,
            )

    def _scan(self) -> None:
        """Index the files already in the directory (after a restart); delete unusable ones; apply the limits."""
        probe = self.new_cache()
        for tmp in self.directory.glob(f".*{SUFFIX}.*.tmp"):
            tmp.unlink(missing_ok=True)  # a save interrupted by a crash
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                h = read_header(path)
                if bool(h.get("sealed")) != (self.sealer is not None):
                    raise SessionFileError(f"{path}: a {'sealed' if h.get('sealed') else 'plaintext'} file in a "
                                           f"{'sealed' if self.sealer else 'plaintext'} store")
                probe._check_compatible(h, path)
                sid = h.get("session_id")
                if not isinstance(sid, str) or self.path_for(sid) != path:
                    raise SessionFileError(f"{path}: header names session {sid!r}, which is not this file's")
            except SessionFileError as e:
                log.warning("deleted unusable saved session file: %s", e)
                path.unlink(missing_ok=True)
                continue
            st = path.stat()
            self._index[sid] = SavedSession(sid, st.st_size, int(h["n_tokens"]), st.st_mtime, path)
            self._last_touch = max(self._last_touch, st.st_mtime)
        with self._lock:
            self._evict()

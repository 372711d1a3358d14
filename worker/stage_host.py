"""The stage host: this node's part of the model on one network, its KV sessions, and the
stage messages of ``worker.protocol`` that drive them.

One ``StageHost`` per network per node. It holds at most one
``worker.engine.stage.Stage`` (the blocks this node runs), built either from
the model file (the admin: ``load_from_model``) or from a shard the admin sent
(a worker: ``load_shard``, from the encrypted ``worker.blocks.BlockStore``).
Its sessions' KV caches are paged (``worker.engine.paged_kv``) and saved per
block range under ``directory/sessions/<key>/``, where ``<key>`` is the first
16 hex characters of the shard's SHA-256 (or, for a stage built from the
model file, of a hash of its model id and range). A new range gets a new
directory; the old one stays on disk (its sessions fit only that range) and
is used again if the placement comes back to it.

Layout of ``directory``::

    blocks/                    the BlockStore (sealed shards, see worker/blocks.py)
    sessions/<key>/<id>.kv.npz one saved session per file (paged_kv.SessionStore), sealed

Privacy of the conversations: a session file is sealed with AES-256-GCM
(``worker.crypto_at_rest.encrypt_blob``) under the same per-network key as the
blocks, with associated data binding the network id, the block range and the
file's clear header (which names the session id), so a file only opens as the
session, range and network it was saved for; one that does not open (tampered,
cut, another key) is logged, deleted and recomputed. Plaintext session files
of earlier versions are deleted on sight. A stage whose range is not first
refuses rows that carry token ids (``forward``) and records the rows' prefix
digests instead (``worker.inference.prefix_digests``); the counts of rows
received and of rows with token ids are kept (``forward_rows``,
``token_id_rows``) and logged at DEBUG with each save.

The core methods take and return plain data, so the admin calls them directly
for its own stage and ``handle`` adapts them to messages arriving on a link:

=====================  ==============================================================
message                answer
=====================  ==============================================================
``forward``            ``forward_result`` (rows echoed, tensor = output, f32)
``session_query``      ``session_info`` (cached_tokens, n_tokens, saved)
``session_save``       ``session_info``
``session_drop``       ``session_info`` (zero tokens: nothing remains; ``saved``: there was something to drop)
``sessions_request``   ``sessions_response``
``blocks_offer``       ``blocks_status`` ("loaded" once the shard is verified and running)
``blocks_chunk``       ``blocks_status``
=====================  ==============================================================

Compute (``forward``) and session operations run in ONE dedicated thread, in
the order they were called, so the requests of one session never overlap and
the event loop stays free. Loading a stage runs in another thread
(``asyncio.to_thread``). Units: token counts are tokens, sizes bytes, times
Unix seconds.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import struct
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Awaitable, Callable, ClassVar, Optional, Sequence, Union

import numpy as np

from worker import protocol
from worker.blocks import (
    BlockStatus, BlockStore, BlockStoreError, BlockTransferError, ShardIntegrityError, ShardNotFound,
)
from worker.crypto_at_rest import decrypt_blob, encrypt_blob
from worker.engine.paged_kv import (
    DEFAULT_MAX_BYTES, DEFAULT_MAX_SESSIONS, SUFFIX, Sealer, SessionFileError, SessionPagedKVCache, SessionStore,
    read_header,
)
from worker.engine.block_range import BlockRange
from worker.engine.gguf_file import ModelFile, ModelLoadError
from worker.engine.shardfile import ShardFile
from worker.engine.stage import Stage
from worker.link import LinkClosed
from worker.protocol import Message, ProtocolError
from worker.protocol.messages import PREFIX_DIGEST_BYTES

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY_BYTES = 1 << 30  # 1 GiB of KV caches held in memory before the least recently used are saved and released
MAX_LISTED_SESSIONS = 1000  # sessions_response holds at most this many (worker.protocol)
_SESSION_AAD_LABEL = b"argus-kv-session-v1\x00"
_PREFIX_KEY_LABEL = b"argus-prefix-digest-key-v1"


def session_aad(network_id: str, block_range: BlockRange) -> bytes:
    """Associated data of the sealed session files of ``block_range`` on ``network_id``:
    ``label || len (u16) || network id || len (u16) || model id || start, end, total (u32 each)``;
    the paged_kv store appends the file's clear header (session id, range, sizes)."""
    net, model = network_id.encode("utf-8"), block_range.model_id.encode("utf-8")
    return (_SESSION_AAD_LABEL + struct.pack(">H", len(net)) + net + struct.pack(">H", len(model)) + model
            + struct.pack(">III", block_range.start, block_range.end, block_range.total))


def session_sealer(key: bytes, network_id: str, block_range: BlockRange) -> Sealer:
    """The AES-256-GCM sealer of the session files of ``block_range`` on ``network_id`` under ``key``
    (32 bytes). Opening raises ``worker.crypto_at_rest.IntegrityError`` for anything not sealed so."""
    aad = session_aad(network_id, block_range)
    return Sealer(seal=lambda data, ad: encrypt_blob(key, data, aad + ad),
                  open=lambda data, ad: decrypt_blob(key, data, aad + ad), name="AES-256-GCM")


class StageHostError(Exception):
    """Base of the stage host's errors; ``str()`` is a sentence for a log or a user."""


class StageNotLoaded(StageHostError):
    """This node holds no blocks on the network yet (or is loading them)."""


class WrongBlockRange(StageHostError):
    """A request names a block range other than the one this node runs."""


def range_label(r: BlockRange) -> str:
    """A block range as the daemon shows it: ``"<first>-<last>"`` (inclusive block numbers)."""
    return f"{r.start}-{r.end - 1}"


class StageHost:
    """This node's stage on one network, its KV sessions, and the stage messages.

    Args:
        directory: where the blocks and sessions are kept (created, 0700).
        network_id: the network, bound into the sealed blocks.
        key: the network's 32-byte AES-256 key for blocks at rest.
        max_session_bytes, max_sessions: limits of the saved sessions of one range
            (``paged_kv.SessionStore`` evicts the least recently used beyond them).
        max_memory_bytes: KV bytes held in memory; beyond it the least recently used
            sessions (not in the running batch) are saved and released.

    Raises ValueError for a key that is not 32 bytes.
    """

    def __init__(self, directory: Union[str, os.PathLike], network_id: str, key: bytes, *,
                 max_session_bytes: int = DEFAULT_MAX_BYTES, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.network_id = network_id
        self._blocks = BlockStore(self.directory / "blocks", network_id, key)
        self._key = bytes(key)
        self._prefix_key = hmac.digest(self._key, _PREFIX_KEY_LABEL, "sha256")
        self.forward_rows = 0  # forward rows received (all time)
        self.token_id_rows = 0  # ... of which carried token ids (only ever on the first range)
        self.sessions_root = self.directory / "sessions"
        self.max_session_bytes, self.max_sessions, self.max_memory_bytes = max_session_bytes, max_sessions, max_memory_bytes
        self._stage: Optional[Stage] = None
        self._store: Optional[SessionStore] = None
        self._shard_sha: Optional[str] = None  # the shard the stage came from (None: the model file)
        self._opened: Optional[tuple] = None  # ((real path, size, mtime), ModelFile) last opened by load_from_model
        self._used: "OrderedDict[str, None]" = OrderedDict()  # in-memory sessions, least recently used first
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage-{network_id}")
        self._load_lock: Optional[asyncio.Lock] = None
        self._blocks_lock: Optional[asyncio.Lock] = None
        self._state_lock = threading.Lock()  # _stage, _store, _shard_sha together

    # --- state ---------------------------------------------------------------------------
    @property
    def blocks(self) -> BlockStore:
        """The encrypted store of the shards sent to this node (``directory/blocks``)."""
        return self._blocks

    @property
    def prefix_key(self) -> bytes:
        """The key of the prefix digests the admin computes for its sessions (``worker.inference``):
        derived from this node's network key; it never leaves this node."""
        return self._prefix_key

    @property
    def stage(self) -> Optional[Stage]:
        """The loaded stage (weights and in-memory session caches), or None."""
        return self._stage

    @property
    def block_range(self) -> Optional[BlockRange]:
        """The blocks this node runs, or None before a stage is loaded."""
        stage = self._stage
        return None if stage is None else stage.block_range

    @property
    def ready(self) -> bool:
        """True once a stage is loaded (forward can run)."""
        return self._stage is not None

    @property
    def shard_sha256(self) -> Optional[str]:
        """The hash of the shard the stage was built from; None for the model file or no stage."""
        return self._shard_sha

    @property
    def session_store(self) -> Optional[SessionStore]:
        """The saved sessions of the current range, or None before a stage is loaded."""
        return self._store

    def memory_sessions(self) -> list[str]:
        """Ids of the sessions whose KV caches are in memory now."""
        stage = self._stage
        return [] if stage is None else stage.sessions()

    # --- loading -------------------------------------------------------------------------
    async def load_from_model(self, model: Union[str, os.PathLike, Any], block_range: BlockRange) -> None:
        """Build the stage of ``block_range`` straight from the GGUF model (the admin's way), in a
        worker thread; it replaces any stage held before.

        ``model``: a path, or an open ``ModelFile`` (opening one takes seconds; the host
        keeps the last file it opened and reuses it while the file is unchanged).
        Raises ModelLoadError (``worker.engine.gguf_file``) for a missing or unusable
        file, ValueError if ``block_range`` is not a range of this model.
        """
        def build() -> tuple[Stage, SessionStore]:
            mf = self._model_file(model)
            if block_range.total != mf.config.n_block or block_range.model_id != mf.model_id:
                raise ValueError(f"block range {block_range} is not a range of {mf.model_id}, "
                                 f"which has {mf.config.n_block} blocks")
            key = hashlib.sha256(f"model:{block_range.model_id}:{block_range.start}:{block_range.end}:"
                                 f"{block_range.total}".encode()).hexdigest()[:16]
            return self._build(mf, block_range, key)

        await self._replace(build, None, f"blocks {range_label(block_range)} from {getattr(model, 'path', model)}")

    def _model_file(self, model: Union[str, os.PathLike, Any]) -> Any:
        """``model`` if it is an open ModelFile, else the file at that path (reused while unchanged)."""
        if isinstance(model, ModelFile):
            return model
        real = os.path.realpath(model)
        try:
            st = os.stat(real)
        except OSError:
            raise ModelLoadError(f"The model file {model} does not exist. Set ARGUS_MODEL_PATH to a Llama GGUF file.") from None
        key = (real, st.st_size, st.st_mtime_ns)
        cached = self._opened
        if cached is None or cached[0] != key:
            cached = self._opened = (key, ModelFile(real))
        return cached[1]

    async def load_shard(self, shard_sha256: str) -> None:
        """Build the stage from a verified shard of the BlockStore (a worker's way), in a worker
        thread: decrypted, its SHA-256 checked, parsed (``worker.engine.shardfile.ShardFile``);
        it replaces any stage held before.

        Raises ShardNotFound / ShardIntegrityError (``worker.blocks``) if the shard is
        missing or damaged, ModelLoadError / ValueError if its contents are not a usable shard
        of the range recorded with it.
        """
        sha = shard_sha256.lower()

        def build() -> tuple[Stage, SessionStore]:
            info = self._blocks.info(sha) or {}
            if info.get("state") != "verified":
                raise ShardNotFound(f"no verified shard {sha[:16]}… is stored on this node")
            data = self._blocks.load(sha)  # raises unless verified and intact
            block_range = protocol.block_range_from_wire(info["block_range"])
            sf = ShardFile.from_bytes(data, verify=False)  # its SHA-256 was just checked: the bytes are the admin's
            if sf.block_range != block_range or sf.model_sha256 != info["model_sha256"]:
                raise ValueError(f"shard {sha[:16]}… holds blocks {sf.block_range} of model {sf.model_sha256[:16]}…, "
                                 f"but was offered as {block_range} of model {info['model_sha256'][:16]}…")
            return self._build(sf, block_range, sha[:16])

        await self._replace(build, sha, f"blocks of shard {sha[:16]}…")

    def _build(self, mf: Any, block_range: BlockRange, key: str) -> tuple[Stage, SessionStore]:
        """The stage of ``block_range`` from ``mf`` (a ModelFile or ShardFile) with paged caches
        kept in ``sessions/<key>``. Runs in a loading thread."""
        cfg = mf.config
        store = SessionStore(self.sessions_root / key, block_range, cfg.n_kv_head, cfg.head_dim,
                             max_bytes=self.max_session_bytes, max_sessions=self.max_sessions,
                             sealer=session_sealer(self._key, self.network_id, block_range))
        for _ in self._other_saved(store):  # deletes plaintext files of earlier versions in the other ranges
            pass
        return Stage.from_model_file(mf, block_range, kv_cache=store.open), store

    async def _replace(self, build, shard_sha: Optional[str], what: str) -> None:
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            with self._state_lock:  # release the old weights first: a small worker may not hold both
                old, self._stage, self._store, self._shard_sha = self._stage, None, None, None
            if old is not None:
                log.info("network %s: released blocks %s", self.network_id, range_label(old.block_range))
            del old
            t0 = time.perf_counter()
            stage, store = await asyncio.to_thread(build)
            with self._state_lock:
                self._stage, self._store, self._shard_sha = stage, store, shard_sha
            log.info("network %s: loaded %s in %.1f s (%.0f MiB of weights, %d saved sessions)", self.network_id,
                     what, time.perf_counter() - t0, stage.nbytes / 2**20, len(store.sessions()))

    def _require(self, block_range: Optional[BlockRange] = None) -> tuple[Stage, SessionStore]:
        with self._state_lock:
            stage, store = self._stage, self._store
        if stage is None or store is None:
            raise StageNotLoaded(f"this node holds no blocks on network {self.network_id} yet; "
                                 "wait for the admin to finish sending them")
        if block_range is not None and block_range != stage.block_range:
            raise WrongBlockRange(f"this node runs blocks {stage.block_range}, not {block_range}; "
                                  "the placement changed: apply it again or wait for the new blocks")
        return stage, store

    async def _run(self, fn, *args):
        """Run ``fn(*args)`` in the compute thread, after everything submitted before it."""
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    # --- the core methods ----------------------------------------------------------------
    async def forward(self, rows: Sequence[dict], x: np.ndarray, block_range: Optional[BlockRange] = None) -> np.ndarray:
        """Run this node's blocks for a batch of session rows.

        rows: ``worker.protocol.FORWARD_ROWS`` items (session_id, start_pos, n_tokens,
        token_ids or None, prefix_digests: base64 of n_tokens 16-byte digests, or None),
        at most one per session. Token ids are refused beyond the first range; the
        digests (else the first range's token ids) are what the caches record.
        x: first range: the rows' token ids
        concatenated, [N] int (N = sum of n_tokens); other ranges: hidden states
        [N, d_model] f32 (f16 accepted), rows in the same order.
        Returns: last range: logits [B, vocab] f32 of each row's last position (B = rows);
        other ranges: hidden states [N, d_model] f32. C-contiguous.
        Runs in the compute thread, in call order. Raises StageNotLoaded, WrongBlockRange
        (``block_range`` given and not this node's), ValueError for rows that do not
        match ``x`` or positions that skip past a session's cache.
        """
        stage, store = self._require(block_range)
        x = np.asarray(x)
        batch = []
        n_total, seen = 0, set()
        first = stage.block_range.is_first
        all_ids = []
        self.forward_rows += len(rows)
        for i, r in enumerate(rows):
            n = int(r["n_tokens"])
            ids, digests = r.get("token_ids"), r.get("prefix_digests")
            if ids is not None:
                self.token_id_rows += 1
                if not first:
                    raise ValueError(f"row {i}: token ids go only to the first blocks; blocks "
                                     f"{range_label(stage.block_range)} take hidden states and prefix digests")
                ids = [int(t) for t in ids]
                if len(ids) != n:
                    raise ValueError(f"row {i}: token_ids has {len(ids)} ids, n_tokens is {n}")
                all_ids.append(ids)
            if n < 1:
                raise ValueError(f"row {i}: n_tokens is {n}")
            if digests is not None:
                raw = protocol.unb64(digests) if isinstance(digests, str) else bytes(digests)
                if len(raw) != n * PREFIX_DIGEST_BYTES:
                    raise ValueError(f"row {i}: prefix_digests holds {len(raw)} bytes, not {n} digests")
                marks: list = [raw[j:j + PREFIX_DIGEST_BYTES] for j in range(0, len(raw), PREFIX_DIGEST_BYTES)]
            else:
                marks = ids if ids is not None else [None] * n
            if r["session_id"] in seen:
                raise ValueError(f"row {i}: session {r['session_id']} appears twice in one forward")
            seen.add(r["session_id"])
            batch.append((r["session_id"], int(r["start_pos"]), marks))
            n_total += n
        if not batch:
            raise ValueError("a forward needs at least one row")
        if x.shape[:1] != (n_total,):
            raise ValueError(f"the rows cover {n_total} positions, the input tensor has shape {list(x.shape)}")
        if first:
            if x.ndim != 1 or x.dtype.kind not in "iu":
                raise ValueError(f"the first blocks take token ids [N] int, got {x.dtype}{list(x.shape)}")
            if len(all_ids) == len(batch) and not np.array_equal(x, np.concatenate(all_ids)):
                raise ValueError("the input token ids differ from the rows' token_ids")
        elif x.ndim != 2 or x.dtype.kind != "f" or x.shape[1] != stage.cfg.d_model:
            raise ValueError(f"blocks {stage.block_range} take hidden states [N, {stage.cfg.d_model}] float, "
                             f"got {x.dtype}{list(x.shape)}")
        return await self._run(self._forward_sync, stage, store, batch, x)

    def _forward_sync(self, stage: Stage, store: SessionStore, batch: list, x: np.ndarray) -> np.ndarray:
        if not stage.block_range.is_first:
            x = np.ascontiguousarray(x, dtype=np.float32)
        out = stage.forward_batch(batch, x)
        for sid, _, _ in batch:
            self._touch(sid)
        self._trim_memory(stage, store, {sid for sid, _, _ in batch})
        return np.ascontiguousarray(out, dtype=np.float32)

    async def session_query(self, session_id: str, marks: Sequence[Any]) -> tuple[int, int]:
        """(cached_tokens, n_tokens): how many leading positions of ``marks`` (the prefix digests
        of the sequence the admin will continue, 16 bytes each; token ids for caches that
        recorded ids) this node holds keys and values for in ``session_id``, and how many
        positions it holds in all. A session saved to disk (before a restart too) is loaded
        on this first use, nothing is recomputed. Raises StageNotLoaded."""
        stage, _ = self._require()
        ids = [t if isinstance(t, bytes) else int(t) for t in marks]

        def query() -> tuple[int, int]:
            cached = stage.cached_prefix(session_id, ids)
            self._touch(session_id)
            return cached, stage.session_length(session_id)

        return await self._run(query)

    async def session_save(self, session_id: str) -> bool:
        """Save the session's KV cache of this range to disk (atomically; LRU eviction beyond the
        limits). False if the session is not in memory here (nothing to save).
        Raises OSError if the disk refuses the write."""
        with self._state_lock:
            stage, store = self._stage, self._store
        if stage is None or store is None:
            return False

        def save() -> bool:
            cache = stage.session_cache(session_id)
            if not isinstance(cache, SessionPagedKVCache) or cache.n_tokens == 0:
                return False
            store.save(session_id, cache)
            log.debug("network %s: saved session %s of blocks %s (%d positions, %s); forward rows received: %d, "
                      "with token ids: %d", self.network_id, session_id, range_label(stage.block_range), cache.n_tokens,
                      store.sealer.name if store.sealer else "plaintext", self.forward_rows, self.token_id_rows)
            return True

        return await self._run(save)

    async def session_drop(self, session_id: str) -> bool:
        """Forget the session: its cache in memory and its saved files of every range on this
        node (a deleted conversation leaves nothing behind). False if there was none."""
        with self._state_lock:
            stage, store = self._stage, self._store

        def drop() -> bool:
            found = False
            if stage is not None and stage.session_cache(session_id) is not None:
                stage.drop_session(session_id)
                found = True
            self._used.pop(session_id, None)
            if store is not None:
                found = store.drop(session_id) or found
            for path, header in self._other_saved(store):
                if header.get("session_id") == session_id:
                    path.unlink(missing_ok=True)
                    log.info("dropped saved session %s of blocks %s-%s", session_id, header.get("block_start"),
                             (header.get("block_end") or 1) - 1)
                    found = True
            return found

        return await self._run(drop)

    async def sessions(self) -> list[dict]:
        """The sessions held here (in memory first, then the saved ones most recently used first), as
        ``worker.protocol.SESSION_FIELDS``
        dicts: session_id; n_tokens (positions cached); bytes (of the saved file, or of the
        cache in memory if never saved); saved_at (Unix seconds of the last save or load, None
        if never saved); in_memory; block_range ("<first>-<last>"). Sessions saved for an
        earlier range of this node are listed too (in_memory False). At most 1000."""
        with self._state_lock:
            stage, store = self._stage, self._store

        def listing() -> list[dict]:
            rows: dict[str, dict] = {}
            label = range_label(stage.block_range) if stage is not None else ""
            if store is not None:
                for s in store.sessions():
                    rows[s.session_id] = {"session_id": s.session_id, "n_tokens": s.n_tokens, "bytes": s.nbytes,
                                          "saved_at": s.last_used, "in_memory": False, "block_range": label}
            if stage is not None:
                for sid in stage.sessions():
                    cache = stage.session_cache(sid)
                    if cache is None or cache.length == 0:
                        continue
                    row = rows.setdefault(sid, {"session_id": sid, "n_tokens": 0, "bytes": cache.nbytes,
                                                "saved_at": None, "in_memory": True, "block_range": label})
                    row["in_memory"], row["n_tokens"] = True, cache.length
            out = sorted(rows.values(), key=lambda r: (r["in_memory"], r["saved_at"] or 0), reverse=True)
            for path, h in self._other_saved(store):
                try:
                    out.append({"session_id": str(h["session_id"]), "n_tokens": int(h["n_tokens"]),
                                "bytes": path.stat().st_size, "saved_at": float(h.get("saved_at") or path.stat().st_mtime),
                                "in_memory": False, "block_range": f"{int(h['block_start'])}-{int(h['block_end']) - 1}"})
                except (KeyError, TypeError, ValueError, OSError):
                    continue
            return [r for r in out if 0 < len(r["session_id"]) <= 128][:MAX_LISTED_SESSIONS]

        return await self._run(listing)

    def _other_saved(self, current: Optional[SessionStore]):
        """(path, header) of the sealed session files saved for other ranges than ``current``'s;
        plaintext files of earlier versions met on the way are deleted (WARNING)."""
        if not self.sessions_root.is_dir():
            return
        for d in sorted(self.sessions_root.iterdir()):
            if not d.is_dir() or (current is not None and d == current.directory):
                continue
            for path in sorted(d.glob(f"*{SUFFIX}")):
                try:
                    header = read_header(path)
                except SessionFileError:
                    continue
                if not header.get("sealed"):
                    path.unlink(missing_ok=True)
                    log.warning("network %s: deleted a plaintext saved session of an earlier version: %s",
                                self.network_id, path)
                    continue
                yield path, header

    # --- memory --------------------------------------------------------------------------
    def _touch(self, session_id: str) -> None:
        self._used.pop(session_id, None)
        self._used[session_id] = None

    def _trim_memory(self, stage: Stage, store: SessionStore, keep: set) -> None:
        """Save and release the least recently used in-memory sessions (never those in ``keep``)
        while the caches in memory exceed ``max_memory_bytes``. Runs in the compute thread."""
        caches = {sid: stage.session_cache(sid) for sid in stage.sessions()}
        for sid in [sid for sid in self._used if sid not in caches]:  # sessions of a replaced stage
            del self._used[sid]
        total = sum(c.nbytes for c in caches.values() if c is not None)
        if total <= self.max_memory_bytes:
            return
        order = [sid for sid in self._used if sid in caches] + [sid for sid in caches if sid not in self._used]
        for sid in order:
            if total <= self.max_memory_bytes:
                break
            cache = caches[sid]
            if sid in keep or cache is None:
                continue
            if isinstance(cache, SessionPagedKVCache) and cache.n_tokens:
                try:
                    store.save(sid, cache)
                except OSError as e:
                    log.warning("could not save session %s before releasing it from memory: %s", sid, e)
            stage.drop_session(sid)
            self._used.pop(sid, None)
            total -= cache.nbytes
            log.info("released session %s from memory (%.1f MiB) to stay under %.0f MiB of KV caches",
                     sid, cache.nbytes / 2**20, self.max_memory_bytes / 2**20)

    # --- the link adapter ----------------------------------------------------------------
    def handlers(self, link: Any) -> dict[str, Callable[[Message], Awaitable[bool]]]:
        """Message type -> handler answering it on ``link`` (``handle``), one per stage message,
        for the link's ``worker.dispatch.Dispatcher``."""
        return {message_type: functools.partial(self.handle, link) for message_type in self._HANDLERS}

    async def handle(self, link: Any, m: Message) -> bool:
        """Answer one stage message that arrived on ``link``; False if ``m``'s type is not one of
        forward, session_query, session_save, session_drop, sessions_request, blocks_offer,
        blocks_chunk (the caller handles it).

        Failures are answered with ``link.send_error`` (a ProtocolError with a sentence and
        ``m.request_id``): "conflict" for no stage or another range, "invalid_payload" for
        inputs that do not fit, the block store's codes for refused chunks, "internal" for
        anything unexpected (logged with its traceback). Only ``LinkClosed`` from sending
        the answer propagates.
        """
        handler = self._HANDLERS.get(m.message_type)
        if handler is None:
            return False
        try:
            await handler(self, link, m)
        except Exception as e:  # the edge: every failure becomes an error reply
            if isinstance(e, LinkClosed):
                raise
            await link.send_error(self._protocol_error(e, m), request_id=m.request_id)
        return True

    def _protocol_error(self, e: Exception, m: Message) -> ProtocolError:
        rid = m.request_id
        if isinstance(e, ProtocolError):
            return e
        if isinstance(e, (StageNotLoaded, WrongBlockRange)):
            return protocol.Conflict(str(e), request_id=rid)
        if isinstance(e, BlockTransferError):
            return protocol.ERROR_TYPES.get(e.code, protocol.InvalidPayload)(str(e), request_id=rid)
        if isinstance(e, (ValueError, BlockStoreError)):
            return protocol.InvalidPayload(f"{m.message_type}: {e}", request_id=rid)
        log.exception("network %s: %s failed", self.network_id, m.message_type)
        return protocol.InternalError("The node failed to handle this request; its log has the details.", request_id=rid)

    async def _on_forward(self, link: Any, m: Message) -> None:
        if m.tensor is None:
            raise protocol.InvalidPayload("forward came without its tensor frame", request_id=m.request_id)
        block_range = protocol.block_range_from_wire(m.payload["block_range"])
        out = await self.forward(m.payload["rows"], m.tensor.array, block_range)
        await link.reply(m, "forward_result", {"block_range": m.payload["block_range"], "rows": m.payload["rows"]},
                         tensor=out)

    async def _on_session_query(self, link: Any, m: Message) -> None:
        raw = protocol.unb64(m.payload["prefix_digests"])
        digests = [raw[i:i + PREFIX_DIGEST_BYTES] for i in range(0, len(raw), PREFIX_DIGEST_BYTES)]
        cached, n = await self.session_query(m.session_id, digests)
        store = self._store
        saved = store is not None and m.session_id in store
        await link.reply(m, "session_info", {"cached_tokens": cached, "n_tokens": n, "saved": saved})

    async def _on_session_save(self, link: Any, m: Message) -> None:
        saved = await self.session_save(m.session_id)
        stage = self._stage
        n = stage.session_length(m.session_id) if stage is not None else 0
        await link.reply(m, "session_info", {"cached_tokens": n, "n_tokens": n, "saved": saved})

    async def _on_session_drop(self, link: Any, m: Message) -> None:
        found = await self.session_drop(m.session_id)
        # nothing of it remains; ``saved`` says whether there was something to drop
        await link.reply(m, "session_info", {"cached_tokens": 0, "n_tokens": 0, "saved": found})

    async def _on_sessions(self, link: Any, m: Message) -> None:
        await link.reply(m, "sessions_response", {"sessions": await self.sessions()})

    async def _on_blocks_offer(self, link: Any, m: Message) -> None:
        p = m.payload
        async with self._blocks_guard():
            status = await asyncio.to_thread(self._blocks.offer, p["model_sha256"], p["block_range"], p["shard_sha256"],
                                             p["shard_bytes"], p["chunk_bytes"], p["epoch"])
            if status.state == "verified":
                status = await self._load_verified(status)
        await link.reply(m, "blocks_status", status.to_payload())

    async def _on_blocks_chunk(self, link: Any, m: Message) -> None:
        p = m.payload
        if m.tensor is None:
            raise protocol.InvalidPayload("blocks_chunk came without its tensor frame", request_id=m.request_id)
        a = m.tensor.array
        if a.dtype != np.uint8 or a.ndim != 1:
            raise protocol.InvalidPayload(f"blocks_chunk carries uint8 [n] bytes, got {a.dtype}{list(a.shape)}",
                                          request_id=m.request_id)
        async with self._blocks_guard():
            status = await asyncio.to_thread(self._blocks.write_chunk, p["shard_sha256"], p["offset"], a, p["sha256"])
            if status.state == "verified":
                status = await self._load_verified(status)
        await link.reply(m, "blocks_status", status.to_payload())

    def _blocks_guard(self) -> asyncio.Lock:
        if self._blocks_lock is None:
            self._blocks_lock = asyncio.Lock()
        return self._blocks_lock

    async def _load_verified(self, status: BlockStatus) -> BlockStatus:
        """Load a verified shard as this node's stage (unless it already is): "loaded" or "failed"."""
        sha = status.shard_sha256
        if self._shard_sha == sha and self.ready:
            return BlockStatus(sha, status.have_bytes, "loaded", f"blocks {range_label(self.block_range)} are loaded")
        try:
            await self.load_shard(sha)
        except ShardIntegrityError as e:
            await asyncio.to_thread(self._blocks.delete, sha)
            log.error("network %s: %s; deleted it", self.network_id, e)
            return BlockStatus(sha, 0, "failed", f"{e}; it was deleted, offer it again")
        except Exception as e:  # a shard that verifies but does not load: say why, keep serving nothing
            log.exception("network %s: could not load shard %s…", self.network_id, sha[:16])
            return BlockStatus(sha, status.have_bytes, "failed", f"the blocks arrived but could not be loaded: {e}")
        return BlockStatus(sha, status.have_bytes, "loaded", f"blocks {range_label(self.block_range)} are loaded")

    _HANDLERS: ClassVar[dict] = {
        "forward": _on_forward, "session_query": _on_session_query, "session_save": _on_session_save,
        "session_drop": _on_session_drop, "sessions_request": _on_sessions, "blocks_offer": _on_blocks_offer,
        "blocks_chunk": _on_blocks_chunk,
    }

    def close(self) -> None:
        """Stop the compute thread (after the work already submitted) and the progress bars."""
        self._compute.shutdown(wait=True)
        self._blocks.close()


__all__ = ["DEFAULT_MAX_MEMORY_BYTES", "StageHost", "StageHostError", "StageNotLoaded", "WrongBlockRange", "range_label",
           "session_aad", "session_sealer"]

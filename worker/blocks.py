"""The worker's store of model blocks: shards received from the admin, encrypted at rest, resumable.

The admin sends a worker the tensors of its block range as one *shard* (bytes
built by ``worker.engine.shardfile.build_shard``, named by their SHA-256): a
``blocks_offer`` (model hash, block range, shard hash, size, chunk size), then
``blocks_chunk`` messages carrying consecutive pieces of it. The worker answers
each with a ``blocks_status`` (``BlockStatus.to_payload``). A worker that
already holds the shard answers the offer "verified" and is sent nothing; one
that holds part of it (a dropped link, a daemon restart) answers with the bytes
it has, and the admin resumes from there.

On disk, in one directory per network (``<network dir>/.../blocks``), for the
shard with hash ``<sha>`` (lowercase hex)::

    <sha>.json     metadata: model_sha256, block_range, epoch, shard_bytes, chunk_bytes,
                   state ("receiving" or "verified"), verified_at (Unix seconds)
    <sha>.part     the records received so far (while "receiving")
    <sha>.sealed   all the records (once "verified")

    record_i = plaintext length (u32, big-endian) || crypto_at_rest blob of chunk i

Each chunk is sealed on its own with AES-256-GCM under the network key
(``crypto_at_rest.encrypt_blob``, NIST SP 800-38D), its associated data
``crypto_at_rest.block_aad(network_id, model_sha256, start, end, i)`` binding
it to this network, this model, this block range and its place ``i`` in the
shard: a record moved to another position, another shard or another network
fails to decrypt. A record is appended and fsynced before its status is
answered, so the ``.part`` file itself is the persisted progress: on restart
it is read back record by record (each one authenticated) and cut after the
last good one. When the last byte arrives the whole shard is decrypted again
and hashed; it becomes "verified" only if the SHA-256 matches the offer
(otherwise it is deleted and the status is "failed"), and then every other
shard of the network is deleted, so the disk holds at most the shard in use
and one being received. ``load`` decrypts and hashes once more before a
stage is built from it.

Sizes are bytes; times are Unix seconds. One process per directory; the
methods are safe to call from several threads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

from worker import crypto_at_rest
from worker.crypto_at_rest import IntegrityError, block_aad, decrypt_blob, encrypt_blob
from worker.pki import atomic_write
from worker.protocol import MAX_BLOCK_CHUNK, block_range_from_wire, block_range_to_wire
from worker.protocol.units import format_mib

log = logging.getLogger(__name__)

FORMAT = "argus-shard-store"
FORMAT_VERSION = 1
MAX_SHARD_BYTES = 4 << 30  # 4 GiB: larger than any block range this engine can hold in memory
DISK_HEADROOM_BYTES = 64 << 20  # 64 MiB left free on the disk after a shard is stored
RECORD_HEADER = struct.Struct(">I")  # plaintext length of the record's chunk
RECORD_OVERHEAD = RECORD_HEADER.size + len(crypto_at_rest.BLOB_MAGIC) + 1 + crypto_at_rest.NONCE_BYTES + crypto_at_rest.TAG_BYTES
META_SUFFIX, PART_SUFFIX, SEALED_SUFFIX = ".json", ".part", ".sealed"
_SHA256 = re.compile(r"[0-9a-f]{64}")

State = Literal["need", "receiving", "verified", "loaded", "failed"]


class BlockStoreError(Exception):
    """Base of the block store's errors; ``str()`` is a sentence for a log or a user."""


class BlockTransferError(BlockStoreError):
    """An offer or a chunk the store refuses (too large, no space, bad hash, wrong offset, unknown shard).

    ``code`` is the ``worker.protocol`` error code to answer the sender with:
    "invalid_payload" (the request itself is wrong), "conflict" (it does not
    fit the transfer's state, e.g. a wrong offset: re-send ``blocks_offer`` to
    learn where to resume), "not_found" (no such transfer here).
    """

    def __init__(self, message: str, code: str = "invalid_payload"):
        super().__init__(message)
        self.code = code


class ShardNotFound(BlockStoreError):
    """No verified shard with that hash is stored here."""


class ShardIntegrityError(BlockStoreError, IntegrityError):
    """A stored shard failed authentication or its SHA-256 check (tampered, truncated, wrong key)."""


@dataclass(frozen=True)
class BlockStatus:
    """Where the transfer of one shard stands: the payload of a ``blocks_status`` message.

    ``have_bytes``: plaintext bytes of the shard received and stored (the offset
    the next chunk must have). ``state``: "need" (nothing yet), "receiving"
    (some), "verified" (all, hash checked), "loaded" (verified and running as
    this node's stage; set by the stage host), "failed" (the complete shard did
    not match its hash and was discarded). ``message``: a sentence for the log.
    """

    shard_sha256: str
    have_bytes: int
    state: State
    message: str = ""

    def to_payload(self) -> dict:
        """The ``blocks_status`` payload (``worker.protocol``)."""
        return {"shard_sha256": self.shard_sha256, "have_bytes": self.have_bytes, "state": self.state,
                "message": self.message[:1024]}


@dataclass
class _Meta:
    """A shard's ``<sha>.json``."""

    shard_sha256: str
    model_sha256: str
    block_range: dict  # wire form (worker.protocol.BLOCK_RANGE)
    epoch: int
    shard_bytes: int
    chunk_bytes: int
    state: Literal["receiving", "verified"]
    verified_at: Optional[float] = None

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **self.__dict__}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "_Meta":
        d = json.loads(data)
        if d.pop("format", None) != FORMAT or d.pop("version", None) != FORMAT_VERSION:
            raise ValueError("not a shard metadata file of this version")
        m = cls(**d)
        if not _SHA256.fullmatch(m.shard_sha256) or not _SHA256.fullmatch(m.model_sha256):
            raise ValueError("hashes must be 64 lowercase hex characters")
        if m.state not in ("receiving", "verified") or not 0 < m.shard_bytes <= MAX_SHARD_BYTES:
            raise ValueError(f"state {m.state!r} or size {m.shard_bytes} is not valid")
        block_range_from_wire(m.block_range)  # ValueError if empty or out of bounds
        return m

    def same_content(self, model_sha256: str, block_range: dict, shard_bytes: int) -> bool:
        return (self.model_sha256, self.block_range, self.shard_bytes) == (model_sha256, block_range, shard_bytes)


@dataclass
class _Transfer:
    """A shard being received: its metadata and how far it got."""

    meta: _Meta
    have_bytes: int = 0
    n_records: int = 0
    bar: object = None  # a tqdm bar, or None
    logged_quarter: int = 0  # 25% steps already logged


def _check_sha(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value.lower()):
        raise BlockTransferError(f"{what} must be a SHA-256 digest in 64 hex characters, got {str(value)[:70]!r}")
    return value.lower()


class BlockStore:
    """The shards of one network on this node, in ``directory``, sealed with ``key``.

    ``key``: the network's 32-byte AES-256 key (``crypto_at_rest.load_or_create_key``
    of ``<network dir>/blocks.key``, done by the caller). ``network_id`` is bound
    into every record's associated data. ``max_shard_bytes`` caps an offer.
    Raises ValueError for a key that is not 32 bytes; OSError if ``directory``
    cannot be created.
    """

    def __init__(self, directory: Union[str, os.PathLike], network_id: str, key: bytes, *,
                 max_shard_bytes: int = MAX_SHARD_BYTES):
        if not isinstance(key, (bytes, bytearray)) or len(key) != crypto_at_rest.KEY_BYTES:
            raise ValueError(f"the network's block key must be {crypto_at_rest.KEY_BYTES} bytes")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.network_id, self._key, self.max_shard_bytes = network_id, bytes(key), max_shard_bytes
        self._lock = threading.RLock()
        self._transfers: dict[str, _Transfer] = {}
        for tmp in self.directory.glob(".*.tmp"):  # an atomic_write interrupted by a crash
            tmp.unlink(missing_ok=True)

    # --- paths and metadata ----------------------------------------------------------
    def _path(self, sha: str, suffix: str) -> Path:
        return self.directory / f"{sha}{suffix}"

    def _read_meta(self, sha: str) -> Optional[_Meta]:
        """The metadata of ``sha``, or None; an unreadable file is deleted with its data (WARNING)."""
        path = self._path(sha, META_SUFFIX)
        try:
            meta = _Meta.from_json(path.read_bytes())
            if meta.shard_sha256 != sha:
                raise ValueError(f"it names shard {meta.shard_sha256[:16]}…")
            return meta
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("deleted shard %s…: its metadata file %s is unusable (%s)", sha[:16], path, e)
            self._delete(sha)
            return None

    def _write_meta(self, meta: _Meta) -> None:
        atomic_write(self._path(meta.shard_sha256, META_SUFFIX), meta.to_json(), mode=0o600)

    def _delete(self, sha: str) -> None:
        t = self._transfers.pop(sha, None)
        if t is not None and t.bar is not None:
            t.bar.close()
        for suffix in (PART_SUFFIX, SEALED_SUFFIX, META_SUFFIX):
            self._path(sha, suffix).unlink(missing_ok=True)

    def _shas(self) -> list[str]:
        return sorted(p.name[: -len(META_SUFFIX)] for p in self.directory.glob(f"*{META_SUFFIX}")
                      if _SHA256.fullmatch(p.name[: -len(META_SUFFIX)]))

    def _aad(self, meta: _Meta, index: int) -> bytes:
        r = meta.block_range
        return block_aad(self.network_id, meta.model_sha256, r["start"], r["end"], index)

    def _sealed_ok(self, meta: _Meta) -> bool:
        """The sealed file of a verified shard exists and its size fits ``shard_bytes`` in whole
        records (a resumed transfer may have changed the chunk size, so record sizes may differ)."""
        try:
            extra = self._path(meta.shard_sha256, SEALED_SUFFIX).stat().st_size - meta.shard_bytes
        except FileNotFoundError:
            return False
        return extra > 0 and extra % RECORD_OVERHEAD == 0 and extra // RECORD_OVERHEAD <= meta.shard_bytes

    def _records(self, path: Path, meta: _Meta) -> Iterator[tuple[int, int, bytes]]:
        """(file offset after the record, index, plaintext) of each record of ``path`` that
        authenticates, in order; stops at the first incomplete or failing record and then
        raises ShardIntegrityError naming it (callers resuming a transfer catch it)."""
        with open(path, "rb") as f:
            index, pos = 0, 0
            while True:
                head = f.read(RECORD_HEADER.size)
                if not head:
                    return
                if len(head) < RECORD_HEADER.size:
                    raise ShardIntegrityError(f"record {index} of {path.name} is cut short")
                (n,) = RECORD_HEADER.unpack(head)
                if not 0 < n <= MAX_BLOCK_CHUNK:
                    raise ShardIntegrityError(f"record {index} of {path.name} claims {n} bytes")
                blob_len = n + RECORD_OVERHEAD - RECORD_HEADER.size
                blob = f.read(blob_len)
                if len(blob) < blob_len:
                    raise ShardIntegrityError(f"record {index} of {path.name} is cut short")
                try:
                    plain = decrypt_blob(self._key, blob, self._aad(meta, index))
                except IntegrityError:
                    raise ShardIntegrityError(
                        f"record {index} of {path.name} failed authentication (tampered, moved, or sealed "
                        "with another network's key)") from None
                if len(plain) != n:
                    raise ShardIntegrityError(f"record {index} of {path.name} holds {len(plain)} bytes, not {n}")
                pos += RECORD_HEADER.size + blob_len
                yield pos, index, plain
                index += 1

    # --- the transfer ----------------------------------------------------------------
    def offer(self, model_sha256: str, block_range: dict, shard_sha256: str, shard_bytes: int,
              chunk_bytes: int, epoch: int = 0) -> BlockStatus:
        """Answer a ``blocks_offer``: "verified" if the shard is complete here (nothing to send),
        else "need" (nothing yet) or "receiving" with ``have_bytes`` = where to resume.

        ``block_range``: the wire form (``worker.protocol.BLOCK_RANGE``) or a
        ``BlockRange``. ``shard_bytes``: 1..max_shard_bytes; ``chunk_bytes``:
        1..MAX_BLOCK_CHUNK (8 MiB). Another shard's unfinished transfer is
        deleted (one transfer at a time); verified shards stay until this one
        is verified. Raises BlockTransferError for a bad hash, an empty range,
        a size over the cap or over the free disk space.
        """
        model_sha256 = _check_sha(model_sha256, "model_sha256")
        sha = _check_sha(shard_sha256, "shard_sha256")
        wire = block_range if isinstance(block_range, dict) else block_range_to_wire(block_range)
        try:
            block_range_from_wire(wire)
        except (ValueError, KeyError, TypeError) as e:
            raise BlockTransferError(f"the offered block range is not valid: {e}") from None
        if not 0 < shard_bytes <= self.max_shard_bytes:
            raise BlockTransferError(
                f"the offered shard of {shard_bytes} bytes is over this node's limit of {format_mib(self.max_shard_bytes)}")
        if not 0 < chunk_bytes <= MAX_BLOCK_CHUNK:
            raise BlockTransferError(f"chunk_bytes must be 1..{MAX_BLOCK_CHUNK}, got {chunk_bytes}")
        with self._lock:
            meta = self._transfers[sha].meta if sha in self._transfers else self._read_meta(sha)
            if meta is not None and not meta.same_content(model_sha256, wire, shard_bytes):
                log.warning("shard %s…: the new offer describes it differently; starting over", sha[:16])
                self._delete(sha)
                meta = None
            if meta is not None and meta.state == "verified":
                if self._sealed_ok(meta):
                    if meta.epoch != epoch:
                        meta.epoch = epoch
                        self._write_meta(meta)
                    return BlockStatus(sha, shard_bytes, "verified", "this node already holds the shard")
                log.warning("shard %s…: its sealed file is missing or has the wrong size; receiving it again", sha[:16])
                self._delete(sha)
                meta = None
            for other in list(self._transfers):
                if other != sha:
                    log.info("abandoned the unfinished transfer of shard %s… for shard %s…", other[:16], sha[:16])
                    self._delete(other)
            for other in self._shas():
                if other != sha and (m := self._read_meta(other)) is not None and m.state == "receiving":
                    self._delete(other)
            t = self._transfers.get(sha) or (self._resume(meta) if meta is not None else None)
            if t is None:
                self._check_space(shard_bytes, chunk_bytes)
                meta = _Meta(sha, model_sha256, wire, epoch, shard_bytes, chunk_bytes, "receiving")
                fd = os.open(self._path(sha, PART_SUFFIX), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.close(fd)
                self._write_meta(meta)
                t = self._transfers[sha] = _Transfer(meta)
                log.info("shard %s… of blocks [%d, %d): receiving %s", sha[:16], wire["start"], wire["end"], format_mib(shard_bytes))
            elif (t.meta.chunk_bytes, t.meta.epoch) != (chunk_bytes, epoch):
                t.meta.chunk_bytes, t.meta.epoch = chunk_bytes, epoch
                self._write_meta(t.meta)
            if t.have_bytes == shard_bytes:  # complete before a crash, not yet verified
                return self._finish(t)
            if t.bar is None:
                t.bar = _progress_bar(sha, shard_bytes, t.have_bytes)
            return self._status(t)

    def _check_space(self, shard_bytes: int, chunk_bytes: int) -> None:
        need = shard_bytes + -(-shard_bytes // chunk_bytes) * RECORD_OVERHEAD
        free = shutil.disk_usage(self.directory).free
        if need + DISK_HEADROOM_BYTES > free:
            raise BlockTransferError(
                f"this node has {format_mib(free)} of free disk space; storing the shard needs {format_mib(need)} "
                f"plus {format_mib(DISK_HEADROOM_BYTES)} to spare: free some space or lower this node's disk allocation",
                code="conflict")

    def _resume(self, meta: _Meta) -> Optional[_Transfer]:
        """The transfer of a "receiving" shard from its ``.part`` file (after a restart): the
        records that authenticate are kept, the file is cut after the last of them."""
        path, sealed = self._path(meta.shard_sha256, PART_SUFFIX), self._path(meta.shard_sha256, SEALED_SUFFIX)
        if not path.exists() and sealed.exists():  # a crash between sealing and recording it: check it again
            os.replace(sealed, path)
        if not path.exists():
            self._delete(meta.shard_sha256)
            return None
        t = _Transfer(meta)
        good = 0
        try:
            for pos, index, plain in self._records(path, meta):
                good, t.n_records, t.have_bytes = pos, index + 1, t.have_bytes + len(plain)
        except ShardIntegrityError as e:
            log.warning("shard %s…: kept the first %s received (%s)", meta.shard_sha256[:16], format_mib(t.have_bytes), e)
        if t.have_bytes > meta.shard_bytes:
            self._delete(meta.shard_sha256)
            return None
        if path.stat().st_size != good:
            with open(path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        self._transfers[meta.shard_sha256] = t
        if t.have_bytes:
            log.info("shard %s…: resuming at %s of %s", meta.shard_sha256[:16], format_mib(t.have_bytes), format_mib(meta.shard_bytes))
        return t

    def _status(self, t: _Transfer) -> BlockStatus:
        state = "receiving" if t.have_bytes else "need"
        return BlockStatus(t.meta.shard_sha256, t.have_bytes, state,
                           f"have {t.have_bytes} of {t.meta.shard_bytes} bytes")

    def write_chunk(self, shard_sha256: str, offset: int, data: Union[bytes, bytearray, memoryview],
                    sha256: str) -> BlockStatus:
        """Store the chunk of the shard at ``offset`` (sealed, appended, fsynced); answer its status.

        ``data``: 1..chunk_bytes bytes (a uint8 array's memoryview will do);
        ``sha256``: their SHA-256 in hex. ``offset`` must be the shard's
        ``have_bytes``. After the last chunk the whole shard is decrypted and
        hashed: "verified" (and every other shard of the network deleted) or
        "failed" (the shard deleted; offer it again). Raises BlockTransferError:
        code "not_found" for a shard never offered, "conflict" for a wrong
        offset or an already verified shard, "invalid_payload" for an empty or
        oversized chunk, one past the end, or a hash mismatch (nothing stored).
        Raises OSError if the disk refuses the write (nothing counted).
        """
        sha = _check_sha(shard_sha256, "shard_sha256")
        want = _check_sha(sha256, "the chunk's sha256")
        mv = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        with self._lock:
            t = self._transfers.get(sha)
            if t is None:
                meta = self._read_meta(sha)
                if meta is not None and meta.state == "verified":
                    raise BlockTransferError(f"shard {sha[:16]}… is already complete here; no more chunks are needed",
                                             code="conflict")
                t = self._resume(meta) if meta is not None else None
                if t is None:
                    raise BlockTransferError(f"no transfer of shard {sha[:16]}… is under way here; send blocks_offer first",
                                             code="not_found")
                if t.have_bytes == meta.shard_bytes:  # complete before a crash, not yet verified
                    status = self._finish(t)
                    raise BlockTransferError(f"shard {sha[:16]}… was already complete here ({status.state}); "
                                             "send blocks_offer to see its state", code="conflict")
            meta, n = t.meta, len(mv)
            if offset != t.have_bytes:
                raise BlockTransferError(
                    f"chunk at offset {offset} of shard {sha[:16]}…, but this node has {t.have_bytes} bytes of it; "
                    f"send the chunk at {t.have_bytes}", code="conflict")
            if not 0 < n <= meta.chunk_bytes:
                raise BlockTransferError(f"a chunk must hold 1..{meta.chunk_bytes} bytes (the offered chunk_bytes), got {n}")
            if offset + n > meta.shard_bytes:
                raise BlockTransferError(f"chunk of {n} bytes at offset {offset} runs past the shard's {meta.shard_bytes} bytes")
            got = hashlib.sha256(mv).hexdigest()
            if got != want:
                raise BlockTransferError(f"chunk at offset {offset} of shard {sha[:16]}… has SHA-256 {got[:16]}…, "
                                         f"the message says {want[:16]}…; it was not stored")
            record = RECORD_HEADER.pack(n) + encrypt_blob(self._key, mv.tobytes(), self._aad(meta, t.n_records))
            path = self._path(sha, PART_SUFFIX)
            with open(path, "ab") as f:
                start = f.tell()
                try:
                    f.write(record)
                    f.flush()
                    os.fsync(f.fileno())
                except BaseException:
                    f.truncate(start)
                    raise
            t.have_bytes += n
            t.n_records += 1
            self._progress(t, n)
            if t.have_bytes < meta.shard_bytes:
                return self._status(t)
            return self._finish(t)

    def _progress(self, t: _Transfer, n: int) -> None:
        if t.bar is not None:
            t.bar.update(n)
        quarter = 4 * t.have_bytes // t.meta.shard_bytes
        if quarter > t.logged_quarter:
            t.logged_quarter = quarter
            log.info("shard %s…: received %d%% (%s of %s)", t.meta.shard_sha256[:16], 25 * quarter,
                     format_mib(t.have_bytes), format_mib(t.meta.shard_bytes))

    def _finish(self, t: _Transfer) -> BlockStatus:
        """Verify a complete ``.part`` against the shard hash; seal it in place or discard it."""
        meta, sha = t.meta, t.meta.shard_sha256
        if t.bar is not None:
            t.bar.close()
            t.bar = None
        part = self._path(sha, PART_SUFFIX)
        digest, total = hashlib.sha256(), 0
        try:
            for _, _, plain in self._records(part, meta):
                digest.update(plain)
                total += len(plain)
            ok = total == meta.shard_bytes and digest.hexdigest() == sha
            why = f"its {total} bytes hash to {digest.hexdigest()[:16]}…"
        except ShardIntegrityError as e:
            ok, why = False, str(e)
        if not ok:
            self._delete(sha)
            log.error("shard %s…: discarded after the last chunk: %s", sha[:16], why)
            return BlockStatus(sha, 0, "failed", f"the received shard does not match its SHA-256 ({why}); "
                                                  "it was discarded, offer it again")
        os.replace(part, self._path(sha, SEALED_SUFFIX))
        meta.state, meta.verified_at = "verified", time.time()
        self._write_meta(meta)
        self._transfers.pop(sha, None)
        for other in self._shas():
            if other != sha:
                log.info("deleted shard %s…, replaced by shard %s…", other[:16], sha[:16])
                self._delete(other)
        log.info("shard %s… verified (%s)", sha[:16], format_mib(meta.shard_bytes))
        return BlockStatus(sha, meta.shard_bytes, "verified", "the shard is complete and its SHA-256 matches")

    # --- use -------------------------------------------------------------------------
    def find(self, model_sha256: str, block_range) -> Optional[str]:
        """The hash of the verified shard of ``block_range`` (wire dict or BlockRange) of the model
        with SHA-256 ``model_sha256``, or None."""
        wire = block_range if isinstance(block_range, dict) else block_range_to_wire(block_range)
        with self._lock:
            for sha in self._shas():
                m = self._read_meta(sha)
                if m is not None and m.state == "verified" and (m.model_sha256, m.block_range) == (model_sha256.lower(), wire):
                    return sha
        return None

    def info(self, shard_sha256: str) -> Optional[dict]:
        """The metadata of a stored shard (model_sha256, block_range as wire dict, epoch,
        shard_bytes, chunk_bytes, state, verified_at), or None."""
        sha = _check_sha(shard_sha256, "shard_sha256")
        with self._lock:
            m = self._transfers[sha].meta if sha in self._transfers else self._read_meta(sha)
            return None if m is None else dict(m.__dict__)

    def load(self, shard_sha256: str) -> bytes:
        """The plaintext of a verified shard, decrypted and checked against its SHA-256.

        Memory: about twice the shard's size at the peak. Raises ShardNotFound if
        no verified shard has that hash, ShardIntegrityError if the file was
        altered, truncated, extended, or sealed under another key or network.
        """
        sha = _check_sha(shard_sha256, "shard_sha256")
        with self._lock:
            meta = self._read_meta(sha)
        if meta is None or meta.state != "verified":
            raise ShardNotFound(f"no verified shard {sha[:16]}… is stored in {self.directory}")
        parts, digest = [], hashlib.sha256()
        try:
            for _, _, plain in self._records(self._path(sha, SEALED_SUFFIX), meta):
                digest.update(plain)
                parts.append(plain)
        except FileNotFoundError:
            raise ShardNotFound(f"the sealed file of shard {sha[:16]}… is missing from {self.directory}") from None
        data = b"".join(parts)
        if len(data) != meta.shard_bytes or digest.hexdigest() != sha:
            raise ShardIntegrityError(
                f"shard {sha[:16]}… decrypts to {len(data)} bytes hashing to {digest.hexdigest()[:16]}…, "
                f"not the {meta.shard_bytes} bytes it was verified as; delete it and let the admin send it again")
        return data

    def delete(self, shard_sha256: str) -> bool:
        """Delete a shard (verified or partial); False if there was none."""
        sha = _check_sha(shard_sha256, "shard_sha256")
        with self._lock:
            existed = sha in self._transfers or self._path(sha, META_SUFFIX).exists()
            self._delete(sha)
        return existed

    def close(self) -> None:
        """Close the progress bars (the store stays usable; transfers resume from disk)."""
        with self._lock:
            for t in self._transfers.values():
                if t.bar is not None:
                    t.bar.close()
                    t.bar = None


def _progress_bar(sha: str, total: int, initial: int):
    """A tqdm bar on stderr for one shard, or None when stderr is not a terminal (the log has the 25% lines)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"shard {sha[:12]}", unit="B", unit_scale=True,
                unit_divisor=1024, file=sys.stderr, leave=False)


__all__ = ["BlockStatus", "BlockStore", "BlockStoreError", "BlockTransferError", "MAX_SHARD_BYTES",
           "ShardIntegrityError", "ShardNotFound"]

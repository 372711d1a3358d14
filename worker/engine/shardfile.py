"""Shard files: the tensors of one block range of a GGUF model, as one self-contained byte string.

The admin sends each worker only the tensors of its :class:`BlockRange`
(``blocks_offer`` / ``blocks_chunk`` in ``worker.protocol``). A shard keeps
every tensor exactly as the GGUF stores it (still quantized: raw bytes, ggml
type, shape), so one SmolLM2-135M block is ~2.2 MB, 1/45 of the 98 MB file, and
a worker dequantizes it with ``gguf.quants.dequantize`` to the same float32
values :class:`~worker.engine.gguf_file.ModelFile` gives.

Layout (all integers little-endian; offsets in bytes)::

    offset        size  field
    0             8     magic b"ARGSHARD"
    8             4     u32 H: length of the header
    12            H     header: UTF-8 JSON (keys sorted, no spaces), right-padded with
                        spaces so that the data section starts at a multiple of 32
    12 + H        D     data section: each tensor's raw GGUF bytes at its header
                        ``offset`` (relative to the section, a multiple of 32),
                        gaps filled with zero bytes; D = header ``data_bytes``
    12 + H + D    32    SHA-256 of all the preceding bytes

The header object::

    {"format": "argus-shard", "version": 1,
     "model_id": str, "model_sha256": hex str (of the whole GGUF file),
     "block_range": {"start": int, "end": int, "total": int},
     "config": {LlamaConfig's fields},
     "tensors": [{"name": str, "type": ggml type name ("Q4_1", "F32", …),
                  "shape": [int] (row-major logical shape: GGUF ``ne`` reversed),
                  "offset": int, "nbytes": int}],
     "data_bytes": int}

A shard holds the tensors ``blk.{start..end-1}.*`` of its range, plus
``token_embd.weight`` if the range is first (or last, when the output head is
tied to the embedding), and ``output_norm.weight`` and ``output.weight`` (if
the model has one) if it is last. Tensors appear in the GGUF file's order.

The bytes are a pure function of the GGUF file and the range (no
timestamps, sorted JSON keys), so a shard's SHA-256 identifies it.
Alignment: GGUF's default, 32 bytes (ggml's docs/gguf.md, ``general.alignment``).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
import threading
from dataclasses import asdict, dataclass, fields
from typing import Union

import numpy as np

from .gguf_file import LlamaConfig, ModelFile, ModelLoadError
from .block_range import BlockRange

FORMAT = "argus-shard"
FORMAT_VERSION = 1
MAGIC = b"ARGSHARD"
ALIGNMENT = 32  # bytes
_PREFIX = struct.Struct("<8sI")  # magic, header length
_DIGEST = 32  # bytes of the trailing SHA-256
#: Per-block tensors of the Llama architecture that the engine loads (``blk.{i}.<name>.weight``).
BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.")


class ShardFormatError(ModelLoadError):
    """Shard bytes that cannot be used: truncated, corrupted, of another format version,
    inconsistent with their block range, or asked for a tensor they do not hold.

    A subclass of ModelLoadError, so code that loads a stage from a ModelFile or a
    ShardFile catches one type. ``str(e)`` is a sentence saying what is wrong.
    """


_sha_cache: dict[tuple[str, int, int], str] = {}
_sha_lock = threading.Lock()


def model_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex SHA-256 of the file at ``path`` (64 lowercase hex digits).

    Cached in this process per (real path, size in bytes, mtime in ns): a
    100 MB file is hashed once (~0.3 s), then answered from the cache until it
    changes. Raises ModelLoadError if the file cannot be read.
    """
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        key = (real, st.st_size, st.st_mtime_ns)
        with _sha_lock:
            hit = _sha_cache.get(key)
        if hit is not None:
            return hit
        with open(real, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise ModelLoadError(f"Could not read the model file {path} to hash it ({e.strerror or e}).") from None
    with _sha_lock:
        _sha_cache[key] = digest
    return digest


@dataclass(frozen=True)
class ShardBuild:
    """A built shard: ``data`` (the bytes, see the module docstring), ``sha256`` (hex, of ``data``),
    ``model_sha256`` (hex, of the source GGUF), its ``block_range`` and the count of ``tensors`` in it."""

    data: bytes
    sha256: str
    model_sha256: str
    block_range: BlockRange
    tensors: int

    def __repr__(self) -> str:  # the default would print megabytes of data
        return (f"ShardBuild({self.block_range}, {len(self.data)} bytes, {self.tensors} tensors, "
                f"sha256={self.sha256[:12]}…)")


def shard_tensor_names(names: list[str], r: BlockRange, tied_output: bool) -> list[str]:
    """The names among ``names`` (a model's tensor names, in file order) that the shard of ``r`` holds."""
    want_embd = r.is_first or (r.is_last and tied_output)

    def wanted(name: str) -> bool:
        m = _BLOCK_TENSOR.match(name)
        if m:
            return r.start <= int(m.group(1)) < r.end
        if name == "token_embd.weight":
            return want_embd
        return r.is_last and name in ("output_norm.weight", "output.weight")

    return [n for n in names if wanted(n)]


def required_tensor_names(r: BlockRange, tied_output: bool) -> list[str]:
    """The tensors a stage of ``r`` loads (see ``stage.load_block`` and ``Stage.from_model_file``)."""
    names = [f"blk.{i}.{n}.weight" for i in r for n in BLOCK_TENSORS]
    if r.is_first or (r.is_last and tied_output):
        names.append("token_embd.weight")
    if r.is_last:
        names += ["output_norm.weight"] + ([] if tied_output else ["output.weight"])
    return names


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def build_shard(model: Union[str, os.PathLike, ModelFile], block_range: BlockRange) -> ShardBuild:
    """The shard of ``block_range`` of the GGUF ``model`` (a path or an open ModelFile).

    Tensors are copied as stored (quantized), not dequantized. The same file and
    range always give the same bytes. Raises ValueError if ``block_range`` is not
    a range of this model (other model id or block count), ModelLoadError if the
    file cannot be read.
    """
    mf = model if isinstance(model, ModelFile) else ModelFile(model)
    cfg = mf.config
    if block_range.model_id != mf.model_id or block_range.total != cfg.n_block:
        raise ValueError(
            f"{block_range} is not a block range of {mf.model_id}, which has {cfg.n_block} blocks"
        )
    by_name = {t.name: t for t in mf.reader.tensors}
    names = shard_tensor_names([t.name for t in mf.reader.tensors], block_range, cfg.tied_output)
    entries, chunks, offset = [], [], 0
    for name in names:
        t = by_name[name]
        raw = mf.reader.data[t.data_offset : t.data_offset + t.n_bytes]  # uint8 memmap view, as stored
        start = _align(offset)
        if start > offset:
            chunks.append(bytes(start - offset))
        entries.append({
            "name": name, "type": t.tensor_type.name, "shape": [int(s) for s in reversed(t.shape)],
            "offset": start, "nbytes": int(t.n_bytes),
        })
        chunks.append(raw.tobytes())
        offset = start + int(t.n_bytes)
    digest = model_sha256(mf.path)
    header = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model_id": mf.model_id, "model_sha256": digest,
        "block_range": {"start": block_range.start, "end": block_range.end, "total": block_range.total},
        "config": asdict(cfg), "tensors": entries, "data_bytes": offset,
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (_align(_PREFIX.size + len(text)) - _PREFIX.size - len(text))
    body = b"".join([_PREFIX.pack(MAGIC, len(text)), text, *chunks])
    data = body + hashlib.sha256(body).digest()
    return ShardBuild(data, hashlib.sha256(data).hexdigest(), digest, block_range, len(entries))


_CONFIG_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,)}


def _config(d: dict) -> LlamaConfig:
    """LlamaConfig from its JSON object; ValueError unless it has exactly its fields, each of the right type."""
    fs = fields(LlamaConfig)
    if set(d) != {f.name for f in fs}:
        raise ValueError(f"config has the keys {sorted(d)}")
    for f in fs:
        v = d[f.name]
        if not isinstance(v, _CONFIG_TYPES[str(f.type)]) or (f.type != "bool" and isinstance(v, bool)):
            raise ValueError(f"config.{f.name} is {v!r}")
    return LlamaConfig(**{f.name: (float(d[f.name]) if f.type == "float" else d[f.name]) for f in fs})


@dataclass(frozen=True)
class _Entry:
    name: str
    qtype: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # from the start of the shard's bytes
    nbytes: int


class ShardFile:
    """An open shard: the part of :class:`ModelFile` that ``Stage.from_model_file`` uses.

    Attributes: ``config`` (LlamaConfig), ``model_id``, ``model_sha256`` (hex of the
    source GGUF), ``block_range`` (BlockRange), ``sha256`` (hex of these bytes),
    ``nbytes`` (bytes of the shard). Build with :meth:`from_bytes` or :meth:`open`.
    """

    def __init__(self, buf: memoryview, header: dict, entries: dict[str, _Entry], sha256: str, owner=None):
        self._buf, self._owner = buf, owner  # owner: an mmap to keep open while buf is used
        self._entries = entries
        self._sha256 = sha256
        self.model_id: str = header["model_id"]
        self.model_sha256: str = header["model_sha256"]
        r = header["block_range"]
        self.block_range = BlockRange(self.model_id, r["start"], r["end"], r["total"])
        self.config = _config(header["config"])

    @property
    def nbytes(self) -> int:
        """Bytes of the shard."""
        return len(self._buf)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the shard's bytes (what ``ShardBuild.sha256`` and ``blocks_offer`` name it by)."""
        if not self._sha256:
            self._sha256 = hashlib.sha256(self._buf).hexdigest()
        return self._sha256

    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview], verify: bool = True) -> "ShardFile":
        """Parse shard bytes (see the module docstring for the layout).

        ``verify`` checks the trailing SHA-256 of the whole shard (~0.3 s per 100 MB);
        without it only the structure is checked. The buffer is referenced, not copied.
        Raises ShardFormatError if the bytes are truncated or corrupted, of another
        format or version, or list tensors that do not fit the block range.
        """
        buf = memoryview(data).cast("B")
        return cls._parse(buf, verify, owner=None)

    @classmethod
    def open(cls, path: Union[str, os.PathLike], verify: bool = True) -> "ShardFile":
        """Map the shard file at ``path`` read-only and parse it as :meth:`from_bytes` does.

        Raises ShardFormatError for a missing, unreadable, empty or invalid file.
        """
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    raise ShardFormatError(f"The shard file {path} is empty.")
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ShardFormatError(f"Could not open the shard file {path} ({e.strerror or e}).") from None
        return cls._parse(memoryview(mm), verify, owner=mm)

    @classmethod
    def _parse(cls, buf: memoryview, verify: bool, owner) -> "ShardFile":
        from gguf import GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        size = len(buf)
        if size < _PREFIX.size + _DIGEST:
            raise ShardFormatError(f"These {size} bytes are too short to be a shard; the transfer was probably cut off.")
        magic, hlen = _PREFIX.unpack_from(buf, 0)
        if magic != MAGIC:
            raise ShardFormatError("These bytes are not a shard file (wrong magic number).")
        data_start = _PREFIX.size + hlen
        if data_start + _DIGEST > size:
            raise ShardFormatError(f"The shard is truncated: its header alone needs {data_start + _DIGEST} bytes, it has {size}.")
        if verify and hashlib.sha256(buf[: size - _DIGEST]).digest() != bytes(buf[size - _DIGEST :]):
            raise ShardFormatError("The shard's checksum does not match its contents; it is truncated or corrupted.")
        try:
            header = json.loads(bytes(buf[_PREFIX.size : data_start]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ShardFormatError("The shard's header is not valid JSON; the shard is corrupted.") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ShardFormatError("These bytes are not an argus shard (the header names another format).")
        if header.get("version") != FORMAT_VERSION:
            raise ShardFormatError(
                f"The shard has format version {header.get('version')!r}; this worker reads version {FORMAT_VERSION}. "
                "Update the worker and the admin to the same release."
            )
        try:
            r = header["block_range"]
            block_range = BlockRange(str(header["model_id"]), int(r["start"]), int(r["end"]), int(r["total"]))
            if not re.fullmatch(r"[0-9a-f]{64}", header["model_sha256"]):
                raise ValueError("model_sha256 is not a hex SHA-256")
            cfg = _config(header["config"])
            data_bytes = int(header["data_bytes"])
            entries = {}
            for t in header["tensors"]:
                qtype = GGMLQuantizationType[t["type"]]
                shape = tuple(int(s) for s in t["shape"])
                offset, nbytes = int(t["offset"]), int(t["nbytes"])
                need = int(np.prod(quant_shape_to_byte_shape(shape, qtype)))
                if nbytes != need or offset < 0 or offset % ALIGNMENT or offset + nbytes > data_bytes:
                    raise ValueError(f"tensor {t['name']} has {nbytes} bytes at {offset}")
                entries[str(t["name"])] = _Entry(str(t["name"]), qtype, shape, data_start + offset, nbytes)
        except (KeyError, TypeError, ValueError) as e:
            raise ShardFormatError(f"The shard's header is incomplete or inconsistent ({e}); the shard is corrupted.") from None
        if data_start % ALIGNMENT or data_start + data_bytes + _DIGEST != size:
            raise ShardFormatError(
                f"The shard should be {data_start + data_bytes + _DIGEST} bytes long but has {size}; "
                "it is truncated or corrupted."
            )
        if cfg.n_block != block_range.total:
            raise ShardFormatError(f"The shard's range {block_range} does not match its model's {cfg.n_block} blocks.")
        expected = shard_tensor_names(list(entries), block_range, cfg.tied_output)
        if expected != list(entries):
            stray = sorted(set(entries) - set(expected))
            raise ShardFormatError(f"The shard of {block_range} holds tensors outside its range: {', '.join(stray[:5])}.")
        missing = [n for n in required_tensor_names(block_range, cfg.tied_output) if n not in entries]
        if missing:
            raise ShardFormatError(f"The shard of {block_range} lacks tensors it needs: {', '.join(missing[:5])}.")
        return cls(buf, header, entries, "", owner)

    def has(self, name: str) -> bool:
        """Whether the shard holds tensor ``name``."""
        return name in self._entries

    def tensor_names(self) -> list[str]:
        """Names of the tensors held, in file order."""
        return list(self._entries)

    def tensor(self, name: str, dtype=np.float32) -> np.ndarray:
        """Dequantized tensor ``name`` in row-major logical shape, as :meth:`ModelFile.tensor` gives it.

        A GGUF matrix with ``ne = [n_in, n_out]`` comes back as ``[n_out, n_in]``, an
        independent, writeable array of ``dtype``. Raises ShardFormatError if the
        shard does not hold ``name`` (e.g. a block outside its range) or its type
        cannot be dequantized.
        """
        from gguf import quants

        e = self._entries.get(name)
        if e is None:
            raise ShardFormatError(f"The shard of {self.block_range} does not hold the tensor {name}.")
        raw = np.frombuffer(self._buf, np.uint8, count=e.nbytes, offset=e.offset)
        try:
            arr = quants.dequantize(raw.reshape(quants.quant_shape_to_byte_shape(e.shape, e.qtype)), e.qtype)
        except NotImplementedError:
            raise ShardFormatError(f"Tensor {name} is stored as {e.qtype.name}, which cannot be dequantized here.") from None
        arr = arr.reshape(e.shape)
        if np.may_share_memory(arr, raw):  # F32 is a view of the shard's bytes: copy, so the buffer can go
            return np.array(arr, dtype=dtype, order="C", copy=True)
        return np.ascontiguousarray(arr, dtype=dtype)

    def __repr__(self) -> str:
        return f"ShardFile({self.block_range}, {self.nbytes} bytes, {len(self._entries)} tensors)"

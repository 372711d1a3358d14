"""What a worker machine has, and how much of it the admin gives to the network.

``snapshot`` reports the machine (psutil): the flat dict a worker sends in its join
request and status reports (protocol ``FlatObject``: JSON scalars only). ``measure_speed``
is an optional short benchmark of the local engine, cached in ``<data_dir>/speed.json``.
``Allocation`` is the admin's share of one worker (CPU share, RAM bytes, disk bytes),
stored per member in the network config; ``parse_allocation`` reads the chat's
``/workers allocate <node> cpu=50% ram=2G disk=10G``.

Units
-----
Sizes are bytes (ints). Size text uses binary units only: ``K``, ``M``, ``G``, ``T``
mean KiB, MiB, GiB, TiB (2^10, 2^20, 2^30, 2^40 bytes), with or without ``B``/``iB``
(``2G`` = ``2GB`` = ``2GiB`` = 2147483648). RAM is sold and reported in binary units,
so a decimal reading of ``GB`` would only surprise; ``worker.protocol.units.format_bytes`` prints IEC names
(``1.5 GiB``) so what is shown parses back to the same value. CPU share is a fraction
of the machine's logical CPUs in (0, 1]; as text ``50%`` or ``0.5``.

Sources: psutil documentation (cpu_percent, virtual_memory, disk_usage, getloadavg);
IEC 80000-13 binary prefixes.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import platform
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from worker.pki import atomic_write
from worker.protocol import units
from worker.protocol.units import format_bytes

if TYPE_CHECKING:  # importing worker.engine loads the tokenizer stack
    from worker.engine import LocalModel

SPEED_FILE = "speed.json"
SPEED_PROMPT = "The quick brown fox jumps over the lazy dog."
DEFAULT_CPU_SHARE = 0.5
DEFAULT_RAM_FRACTION = 0.5  # of ram_total
DEFAULT_DISK_FRACTION = 0.25  # of disk_free

_ALLOCATION_KEYS = ("cpu", "ram", "disk")


class AllocationError(ValueError):
    """An allocation is malformed or asks for more than the worker has.

    The message is one sentence an admin can act on.
    """


# --- the machine ---------------------------------------------------------------------


def snapshot(data_dir: Path) -> dict[str, int | float | str]:
    """The machine's resources now, as a flat dict of JSON scalars.

    Keys: ``cpu_count`` (logical CPUs, int), ``cpu_percent`` (float, 0-100, system-wide
    use since the previous call: non-blocking, so the process's first call reports
    0.0), ``load_1m`` (float, 1-minute load average; emulated by psutil on Windows),
    ``ram_total``/``ram_available`` (bytes, int), ``disk_total``/``disk_free`` (bytes,
    int, of the filesystem holding ``data_dir``, or its nearest existing parent),
    ``platform`` (e.g. ``"Linux x86_64"``), and ``speed_tokens_s`` (float) when
    ``measure_speed`` has cached a result in ``data_dir``.

    Raises OSError when no ancestor of ``data_dir`` can be read.
    """
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(str(_existing(Path(data_dir))))
    out: dict[str, int | float | str] = {
        "cpu_count": psutil.cpu_count(logical=True) or 1,
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "load_1m": float(psutil.getloadavg()[0]),
        "ram_total": int(mem.total),
        "ram_available": int(mem.available),
        "disk_total": int(disk.total),
        "disk_free": int(disk.free),
        "platform": f"{platform.system()} {platform.machine()}".strip()[:64] or "unknown",
    }
    speed = cached_speed(data_dir)
    if speed is not None:
        out["speed_tokens_s"] = speed
    return out


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (a data dir may not exist yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# --- engine speed --------------------------------------------------------------------


def measure_speed(model_path: Path | None = None, tokens: int = 16, *, model: LocalModel | None = None) -> float:
    """Decode speed of the local engine, in generated tokens per second.

    Loads ``model_path`` (default: the engine's default model) unless an already
    loaded ``model`` is given, prefills ``SPEED_PROMPT``, runs one untimed decode step
    (warm-up), then times ``tokens`` greedy single-token decode steps through the
    whole block chain. Takes seconds (loading the model dominates); run it off the
    event loop. Cache the result with ``save_speed``.

    Raises ValueError (tokens < 1, or prompt + tokens exceed the context window),
    ModelLoadError (the model cannot be loaded).
    """
    import numpy as np

    from worker.engine import LocalModel

    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    if model is None:
        model = LocalModel.load(str(model_path) if model_path is not None else None)
    ids = model.tokenizer.encode(SPEED_PROMPT, allow_special=False)
    if len(ids) + tokens + 1 > model.context_length:
        raise ValueError(f"{tokens} tokens after the prompt exceed the context window of {model.context_length}")
    session = f"speed-{uuid.uuid4().hex}"
    pipeline = model.pipeline
    try:
        logits = pipeline.forward(session, np.asarray(ids, dtype=np.int64), 0)[0]  # [vocab]
        pos = len(ids)
        tok = int(np.argmax(logits))
        logits = pipeline.forward(session, np.asarray([tok], dtype=np.int64), pos)[0]  # warm-up step
        pos += 1
        start = time.perf_counter()
        for _ in range(tokens):
            tok = int(np.argmax(logits))
            logits = pipeline.forward(session, np.asarray([tok], dtype=np.int64), pos)[0]
            pos += 1
        elapsed = time.perf_counter() - start
    finally:
        pipeline.drop_session(session)
    return tokens / max(elapsed, 1e-9)


def save_speed(data_dir: Path, tokens_s: float, *, model_id: str | None = None, tokens: int | None = None) -> None:
    """Cache a measured speed in ``<data_dir>/speed.json`` (atomic write, mode 0644).

    File: ``{"speed_tokens_s": float, "model_id": str|null, "tokens": int|null,
    "measured_at": ISO-8601 UTC}``. Raises ValueError for a speed that is not a
    positive finite number, OSError when the file cannot be written.
    """
    if not isinstance(tokens_s, (int, float)) or isinstance(tokens_s, bool) or not math.isfinite(tokens_s) or tokens_s <= 0:
        raise ValueError(f"tokens_s must be a positive finite number, got {tokens_s!r}")
    record = {
        "speed_tokens_s": float(tokens_s), "model_id": model_id, "tokens": tokens,
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(data_dir) / SPEED_FILE, json.dumps(record).encode("utf-8"), mode=0o644)


def cached_speed(data_dir: Path, model_id: str | None = None) -> float | None:
    """The speed (tokens/s) cached by ``save_speed``, or None.

    None when there is no cache, it cannot be read or parsed, its value is not a
    positive finite number, or ``model_id`` is given and the cache was measured with
    another model: a cache is only a hint, so a bad one means "not measured".
    """
    try:
        record = json.loads((Path(data_dir) / SPEED_FILE).read_text(encoding="utf-8"))
        value = record["speed_tokens_s"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    if model_id is not None and record.get("model_id") != model_id:
        return None
    return float(value)


# --- sizes ---------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes in ``text`` (:func:`worker.protocol.units.parse_size`); raises AllocationError
    with its sentence otherwise."""
    try:
        return units.parse_size(text)
    except ValueError as e:
        raise AllocationError(str(e)) from None


def parse_cpu_share(text: str) -> float:
    """A CPU share from ``50%`` (percent in (0, 100]) or ``0.5`` (fraction in (0, 1]).

    Raises AllocationError otherwise.
    """
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 < value <= 1:
        raise AllocationError(f"cpu={text} must be a percentage (e.g. 50%) or a fraction in (0, 1] (e.g. 0.5) of this worker's CPUs")
    return value


# --- allocation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """The admin's share of one worker: ``cpu_share`` (fraction of its logical CPUs,
    (0, 1]), ``ram_bytes`` and ``disk_bytes`` (>= 0; disk in its data dir).

    Raises AllocationError on construction for values out of range or of a wrong type.
    """

    cpu_share: float
    ram_bytes: int
    disk_bytes: int

    def __post_init__(self) -> None:
        share = self.cpu_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or not 0 < share <= 1:
            raise AllocationError(f"cpu share must be a number in (0, 1], got {share!r}")
        for name in ("ram_bytes", "disk_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AllocationError(f"{name} must be a whole number of bytes >= 0, got {value!r}")
        object.__setattr__(self, "cpu_share", float(share))

    def to_wire(self) -> dict[str, int | float]:
        """``{"cpu_share": float, "ram_bytes": int, "disk_bytes": int}`` (a protocol FlatObject)."""
        return {"cpu_share": self.cpu_share, "ram_bytes": self.ram_bytes, "disk_bytes": self.disk_bytes}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Allocation:
        """The inverse of ``to_wire``. Raises AllocationError for missing or extra keys and bad values."""
        if not isinstance(d, Mapping):
            raise AllocationError(f"an allocation must be an object, got {type(d).__name__}")
        expected = {"cpu_share", "ram_bytes", "disk_bytes"}
        if set(d) != expected:
            raise AllocationError(f"an allocation has exactly the keys {sorted(expected)}, got {sorted(map(str, d))}")
        return cls(cpu_share=d["cpu_share"], ram_bytes=d["ram_bytes"], disk_bytes=d["disk_bytes"])

    def validate(self, resources: Mapping[str, Any]) -> None:
        """Check that the worker whose ``snapshot`` is ``resources`` has this much.

        RAM is compared with ``ram_total`` (what it has, not what is free right now),
        disk with ``disk_free`` at the time of the snapshot. Raises AllocationError,
        e.g. "ram=64 GiB is more than this worker has (15.5 GiB total)", or when the
        worker has not reported ``ram_total``/``disk_free``.
        """
        ram_total = _reported(resources, "ram_total")
        disk_free = _reported(resources, "disk_free")
        if self.ram_bytes > ram_total:
            raise AllocationError(f"ram={format_bytes(self.ram_bytes)} is more than this worker has ({format_bytes(ram_total)} total)")
        if self.disk_bytes > disk_free:
            raise AllocationError(
                f"disk={format_bytes(self.disk_bytes)} is more than this worker has free in its data directory ({format_bytes(disk_free)} free)"
            )

    def describe(self) -> str:
        """For people: ``cpu 50%, ram 2 GiB, disk 10 GiB`` (sizes rounded to one decimal)."""
        return f"cpu {self.cpu_share * 100:.4g}%, ram {format_bytes(self.ram_bytes)}, disk {format_bytes(self.disk_bytes)}"


def _reported(resources: Mapping[str, Any], key: str) -> int:
    value = resources.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AllocationError(f"this worker has not reported {key} yet; wait for its next status report and try again")
    return value


def default_allocation(resources: Mapping[str, Any]) -> Allocation:
    """What a new member gives unless the admin says otherwise: half its CPUs, half its
    RAM (of ``ram_total``), a quarter of the free disk (of ``disk_free``).

    Raises AllocationError when ``resources`` lacks ram_total or disk_free.
    """
    return Allocation(
        cpu_share=DEFAULT_CPU_SHARE,
        ram_bytes=int(_reported(resources, "ram_total") * DEFAULT_RAM_FRACTION),
        disk_bytes=int(_reported(resources, "disk_free") * DEFAULT_DISK_FRACTION),
    )


def parse_allocation(text: str, resources: Mapping[str, Any], current: Allocation) -> Allocation:
    """The allocation ``text`` asks for, e.g. ``cpu=50% ram=2G disk=10G``.

    Fields are ``key=value`` (no spaces around ``=``) separated by spaces or commas; keys ``cpu`` (``50%`` or
    ``0.5``), ``ram`` and ``disk`` (sizes, see ``parse_size``). Missing fields keep
    ``current``'s values. The result is validated against ``resources``.

    Raises AllocationError: no fields, a field without ``=``, unknown or repeated keys
    (named), a bad value, or more than the worker has.
    """
    fields: dict[str, str] = {}
    unknown: list[str] = []
    for part in (p for p in re.split(r"[\s,]+", text.strip()) if p):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or not value.strip():
            raise AllocationError(f"{part!r} is not key=value; write e.g. cpu=50% ram=2G disk=10G")
        if key not in _ALLOCATION_KEYS:
            unknown.append(key)
        elif key in fields:
            raise AllocationError(f"{key}= is given twice; give each of cpu=, ram=, disk= at most once")
        else:
            fields[key] = value
    if unknown:
        raise AllocationError(f"unknown allocation field(s): {', '.join(unknown)}; use cpu=, ram= and disk=")
    if not fields:
        raise AllocationError("give at least one of cpu=, ram=, disk= (e.g. cpu=50% ram=2G disk=10G)")
    allocation = Allocation(
        cpu_share=parse_cpu_share(fields["cpu"]) if "cpu" in fields else current.cpu_share,
        ram_bytes=_parse_field("ram", fields) if "ram" in fields else current.ram_bytes,
        disk_bytes=_parse_field("disk", fields) if "disk" in fields else current.disk_bytes,
    )
    allocation.validate(resources)
    return allocation


def _parse_field(key: str, fields: Mapping[str, str]) -> int:
    try:
        return parse_size(fields[key])
    except AllocationError as e:
        raise AllocationError(f"{key}={e}") from None


__all__ = [
    "Allocation", "AllocationError", "cached_speed", "default_allocation", "measure_speed",
    "parse_allocation", "parse_cpu_share", "parse_size", "save_speed", "snapshot",
]

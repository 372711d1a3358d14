"""Sizes and durations in words: the one place that writes bytes and seconds for people.

Pure functions, no I/O. Used by the chat's command replies (``argus.commands``), the
daemon's log lines and errors, and the sign-in throttle's messages. Binary (IEC) units:
1 KiB = 1024 bytes, 1 MiB = 1024² bytes (IEC 80000-13).
"""
from __future__ import annotations

import math
import re
from typing import Optional

#: Shown where a value is unknown (a worker that never reported its RAM, say).
UNKNOWN = "—"
MiB = 1 << 20
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_SIZE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([kmgtp]?)(i?b)?", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def format_bytes(n: Optional[int]) -> str:
    """``n`` bytes in IEC units with at most one decimal: 512 -> "512 B", 1536 -> "1.5 KiB",
    2**31 -> "2 GiB"; None -> "—". Raises ValueError for n < 0."""
    if n is None:
        return UNKNOWN
    if n < 0:
        raise ValueError(f"a size cannot be negative, got {n}")
    if n < 1024:
        return f"{int(n)} B"
    power = min(int(math.log(n, 1024)), len(_UNITS) - 1)
    value = round(n / 1024**power, 1)
    if value >= 1024 and power < len(_UNITS) - 1:  # 1023.96 MiB rounds to 1 GiB, not "1024 MiB"
        power, value = power + 1, round(n / 1024 ** (power + 1), 1)
    return f"{value:.1f}".removesuffix(".0") + f" {_UNITS[power]}"


def format_mib(n: Optional[float]) -> str:
    """Bytes as MiB with one decimal, for progress and tables: 12_900_000 -> "12.3 MiB"; None -> "—"."""
    return UNKNOWN if n is None else f"{n / MiB:.1f} MiB"


def format_share(share: Optional[float]) -> str:
    """A CPU share 0..1 as a percentage: 0.5 -> "50 %", 0.125 -> "12.5 %"; None -> "—"."""
    if share is None:
        return UNKNOWN
    return f"{share * 100:.1f}".rstrip("0").rstrip(".") + " %"


def format_duration(seconds: float) -> str:
    """A duration, rounded to whole seconds: "45 s", "15 min", "2 h", "1 h 30 min" (negative -> "0 s")."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    h, m = divmod(s // 60, 60)
    return f"{h} h {m} min" if m else f"{h} h"


def format_ago(ts: Optional[float], now: float) -> str:
    """How long ago Unix time ``ts`` was at ``now`` (both seconds): "just now", "12 s ago",
    "3 min ago", "2 h ago", "4 d ago"; None -> "—"."""
    if ts is None:
        return UNKNOWN
    s = now - ts
    if s < 1:
        return "just now"
    if s < 60:
        return f"{s:.0f} s ago"
    if s < 3600:
        return f"{s // 60:.0f} min ago"
    if s < 86400:
        return f"{s // 3600:.0f} h ago"
    return f"{s // 86400:.0f} d ago"


def format_wait(seconds: float) -> str:
    """A wait in words for a person told to try again: "30 seconds", "1 minute", "4 minutes";
    rounded up (at least 1 second) so nobody retries too early."""
    secs = max(1, math.ceil(seconds))
    if secs < 60:
        return f"{secs} second{'s' if secs != 1 else ''}"
    mins = math.ceil(secs / 60)
    return f"{mins} minute{'s' if mins != 1 else ''}"


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``2000000000``, ``512M``, ``2G``, ``2GB``, ``1.5GiB``, ``10 KiB``.

    Binary units (K = 1024), case-insensitive; a number without a unit is bytes and must be
    whole. Raises ValueError with a sentence saying what a size looks like.
    """
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a size; write bytes or a number with K, M, G or T "
                         "(binary: 1G = 1024 MiB), e.g. 2G or 512M")
    number, unit = m.group(1), m.group(2).lower()
    if not unit and "." in number:
        raise ValueError(f"{text!r} has a fraction of a byte; add a unit (e.g. 1.5G) or give whole bytes")
    return round(float(number) * 1024 ** _SIZE_POWERS[unit])

"""The worker's structured event log: one JSON object per line, secrets redacted.

A line::

    {"time": "2025-06-01T12:00:00.123Z", "network": "net-1", "node": "node-a",
     "event": "join_approved", "details": {"role": "worker"}}

``time`` is ISO-8601 UTC with milliseconds; ``network`` and ``node`` are ids or null;
``details`` is a JSON object. Lines are appended and flushed one by one: a crash loses
at most the line being written; ``read`` skips such a torn line, and the next open ends
it with a newline so that later records stay whole. When the file would
grow past ``max_bytes`` it is rotated like ``logging.handlers.RotatingFileHandler``:
``events.jsonl`` -> ``events.jsonl.1`` -> ... -> ``events.jsonl.<backups>`` (dropped).
One process writes a log; threads may share an ``EventLog``.

Refusals of unauthenticated peers (issue 13, finding 10) go through
:meth:`EventLog.write_limited` with the peer's address as ``source``: in each window of
``window_s`` seconds (60) at most ``per_source`` (10) such events per source and
``total`` (100) from all sources together are written; the rest are counted, and when the
window ends (the next limited write, :meth:`EventLog.flush_suppressed`, or ``close``) one
``events_suppressed`` event per source says how many of which event were dropped::

    {"event": "events_suppressed", "details": {"source": "192.0.2.7", "window_s": 60,
     "since": "2025-06-01T12:00:00.000Z", "suppressed": {"join_rejected": 990}}}

So a peer that is refused a thousand times a minute writes about 11 lines a minute, and
the log keeps the events of legitimate users (approvals, config changes) for hours
instead of rotating them out. A source that could not write a single event in a window
(the total was used up, or ``MAX_SOURCES`` were already tracked) is counted under the
source ``"other"``, so a window ends with at most ``total + 1`` summaries.

Redaction (a log is read by more people, and kept longer, than a key file):
* a ``details`` key that looks secret (contains token, key, secret, password, passwd,
  private, pem, signature, csr, credential, authorization, cookie; any case) has its
  value replaced by ``"[redacted]"`` at any depth, unless the value is a number,
  boolean or null (counts such as ``prompt_tokens`` stay readable; no secret of ours
  is a number);
* in every string (values, keys, ids), a join token (``argus1.``...) becomes
  ``"[redacted join token]"`` and a PEM block (from ``-----BEGIN`` to its END line, or
  to the end of the string when there is none) becomes ``"[redacted PEM]"``;
* bytes become ``"<N bytes>"``; other non-JSON values their ``str()``, then scrubbed.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO, Callable, Self

MAX_BYTES = 10 << 20  # 10 MiB per file
BACKUPS = 3
MAX_DEPTH = 16  # nesting of details kept; deeper values become "[too deep]"
REDACTED = "[redacted]"
#: write_limited defaults: events per source, and from all sources, written per window; the window (s).
LIMIT_PER_SOURCE = 10
LIMIT_TOTAL = 100
LIMIT_WINDOW_S = 60.0
MAX_SOURCES = 1024  # sources tracked in one window; later ones are counted under "other"

#: Event names the daemon writes (write() accepts any name matching EVENT_NAME).
EVENTS = frozenset({
    "network_created", "join_requested", "join_approved", "join_rejected", "member_joined", "member_left",
    "member_removed", "config_changed", "config_acked", "connection_refused", "error", "daemon_started",
    "daemon_stopped", "member_connected", "member_disconnected", "admin_connected", "config_applied",
    "config_refused", "token_issued", "network_left", "speed_measured", "events_suppressed",
})
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")

_SECRET_KEY = re.compile(r"token|key|secret|passw|private|pem|signature|csr|credential|authorization|cookie", re.IGNORECASE)
_JOIN_TOKEN = re.compile(r"argus1\.[A-Za-z0-9_.=-]*")
_PEM_BLOCK = re.compile(r"-----BEGIN.*?(?:-----END[^\n-]*-----|\Z)", re.DOTALL)


# --- redaction -----------------------------------------------------------------------


def scrub_text(text: str) -> str:
    """``text`` with join tokens and PEM blocks replaced (see the module docstring)."""
    text = _PEM_BLOCK.sub("[redacted PEM]", text)
    return _JOIN_TOKEN.sub("[redacted join token]", text)


def redact(value: Any, depth: int = 0) -> Any:
    """A JSON-ready copy of ``value`` with secrets removed (see the module docstring).

    Dict keys become strings; tuples, lists and sets become lists; non-finite floats
    become strings ("nan", "inf"). Never raises for any input.
    """
    if depth > MAX_DEPTH:
        return "[too deep]"
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key = scrub_text(str(k))
            secret = _SECRET_KEY.search(key) and not (v is None or isinstance(v, (bool, int, float)))
            out[key] = REDACTED if secret else redact(v, depth + 1)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        return [redact(v, depth + 1) for v in value]
    try:
        return scrub_text(str(value))
    except Exception:  # a __str__ that raises must not break logging  # noqa: BLE001
        return f"<{type(value).__name__}>"


def _utc_ms() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the log -------------------------------------------------------------------------


class EventLog:
    """An append-only JSON-lines event log at ``path``, rotated at ``max_bytes``.

    ``max_bytes`` is the size a file may reach (a single line longer than that still
    gets a file of its own); ``backups`` rotated files are kept (0: the log is
    truncated instead). The file and its directory are created on first use, the
    file with mode 0600. Raises ValueError for max_bytes < 1 or backups < 0.
    """

    def __init__(self, path: Path | str, max_bytes: int = MAX_BYTES, backups: int = BACKUPS, *,
                 per_source: int = LIMIT_PER_SOURCE, total: int = LIMIT_TOTAL, window_s: float = LIMIT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):
        if max_bytes < 1 or backups < 0:
            raise ValueError(f"need max_bytes >= 1 and backups >= 0, got {max_bytes}, {backups}")
        if per_source < 1 or total < 1 or not window_s > 0:
            raise ValueError(f"need per_source >= 1, total >= 1, window_s > 0, got {per_source}, {total}, {window_s}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._size = 0  # bytes in the current file
        self.per_source, self.total, self.window_s, self._clock = per_source, total, window_s, clock
        self._limit_lock = threading.Lock()  # taken before _lock, never after it
        self._window_start: float | None = None  # clock() at the window's first limited event
        self._window_since = ""  # the same moment as ISO-8601 UTC
        self._written: dict[str, int] = {}  # source -> limited events written in this window
        self._written_total = 0
        self._dropped: dict[str, dict[str, Any]] = {}  # source -> {"network" (the first's), "counts": {event: n}}

    # writing

    def write(self, event: str, *, network: str | None = None, node: str | None = None, **details: Any) -> dict:
        """Append one event and flush it; return the record as written (redacted).

        ``event`` must match ``EVENT_NAME`` (lowercase snake case; see ``EVENTS``).
        Thread-safe. Raises ValueError for a malformed event name, OSError when the
        file cannot be written (disk full, permissions).
        """
        if not isinstance(event, str) or not EVENT_NAME.fullmatch(event):
            raise ValueError(f"event name {event!r} must be lowercase snake case, 1-64 characters")
        record = {
            "time": _utc_ms(),
            "network": None if network is None else redact(str(network)),
            "node": None if node is None else redact(str(node)),
            "event": event,
            "details": redact(details),
        }
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        with self._lock:
            f = self._open()
            if self._size > 0 and self._size + len(line) > self.max_bytes:
                self._rotate()
                f = self._open()
            f.write(line)
            f.flush()
            self._size += len(line)
        return record

    def write_limited(self, event: str, *, source: str, network: str | None = None, node: str | None = None,
                      **details: Any) -> dict | None:
        """Like :meth:`write`, for an event an unauthenticated peer can cause at will (a refusal).

        ``source`` is the peer's address (no port). Writes the event (with ``source``
        among its details) and returns the record when this window still allows one
        from ``source``; otherwise counts it for the window's ``events_suppressed``
        summary and returns None. Thread-safe. Raises like :meth:`write`.
        """
        if not isinstance(event, str) or not EVENT_NAME.fullmatch(event):
            raise ValueError(f"event name {event!r} must be lowercase snake case, 1-64 characters")
        source = str(source)
        with self._limit_lock:
            now = self._clock()
            self._roll(now)
            if self._window_start is None:
                self._window_start, self._window_since = now, _utc_ms()
            if source not in self._written and (self._written_total >= self.total or
                                                len(self._written) + len(self._dropped) >= MAX_SOURCES):
                source = "other"  # one summary for every source that could not write any this window
            if self._written.get(source, 0) < self.per_source and self._written_total < self.total:
                self._written[source] = self._written.get(source, 0) + 1
                self._written_total += 1
                return self.write(event, network=network, node=node, source=source, **details)
            slot = self._dropped.setdefault(source, {"network": network, "counts": {}})
            slot["counts"][event] = slot["counts"].get(event, 0) + 1
            return None

    def flush_suppressed(self, *, force: bool = False) -> list[dict]:
        """Write the ``events_suppressed`` summaries of a window that has ended (``force``: of the
        current one too, as at shutdown) and start a new window. Returns the records written."""
        with self._limit_lock:
            return self._roll(self._clock(), force=force)

    def _roll(self, now: float, force: bool = False) -> list[dict]:
        """End the window if it is over (caller holds _limit_lock): one summary per source that lost events."""
        if self._window_start is None or (not force and now - self._window_start < self.window_s):
            return []
        out = [self.write("events_suppressed", network=slot["network"], source=source,
                          window_s=self.window_s, since=self._window_since, suppressed=dict(slot["counts"]))
               for source, slot in self._dropped.items()]
        self._window_start, self._written, self._written_total, self._dropped = None, {}, 0, {}
        return out

    def _open(self) -> BinaryIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_RDWR (not O_WRONLY) so pread can look at the last byte; O_APPEND for every write.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o600)
            self._file = os.fdopen(fd, "ab")
            self._size = os.fstat(fd).st_size
            if self._size and os.pread(fd, 1, self._size - 1) != b"\n":  # a line torn by a crash
                self._file.write(b"\n")  # ends it, so the next record starts a line of its own
                self._size += 1
        return self._file

    def _rotate(self) -> None:
        """events.jsonl.(n-1) -> .n, ..., events.jsonl -> .1 (caller holds the lock)."""
        self._file.close()
        self._file = None
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backups - 1, 0, -1):
            src = self._backup(i)
            if src.exists():
                os.replace(src, self._backup(i + 1))
        os.replace(self.path, self._backup(1))

    def _backup(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def files(self) -> list[Path]:
        """The log's existing files, newest first."""
        return [p for p in [self.path, *(self._backup(i) for i in range(1, self.backups + 1))] if p.exists()]

    # reading

    def read(self, limit: int = 100, network: str | None = None) -> list[dict]:
        """The last ``limit`` events (of ``network`` if given), oldest first, newest last.

        Reads the current file and then the backups until ``limit`` are found; lines
        that are not JSON objects (a torn write) are skipped. Raises OSError.
        """
        if limit < 1:
            return []
        found: deque[dict] = deque()
        with self._lock:
            for path in self.files():
                try:
                    lines = path.read_bytes().splitlines()
                except FileNotFoundError:
                    continue
                for raw in reversed(lines):
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        continue
                    if not isinstance(rec, dict) or (network is not None and rec.get("network") != network):
                        continue
                    found.appendleft(rec)
                    if len(found) >= limit:
                        return list(found)
        return list(found)

    # lifetime

    def close(self) -> None:
        """Write the pending ``events_suppressed`` summaries, close the file; a later ``write`` reopens it."""
        try:
            self.flush_suppressed(force=True)
        except OSError:  # closing must not fail because the disk is full
            pass
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["EVENTS", "EventLog", "redact", "scrub_text"]

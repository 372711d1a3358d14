"""SQLite implementation of :class:`argus.store.base.Store` (stdlib ``sqlite3``).

Layout under ``data_dir``::

    argus.db                      the database (WAL mode)
    files/<owner_id>/<sha256>     attachment bytes, content-addressed per owner

Concurrency: one connection per thread (``threading.local``), each with
``busy_timeout`` so writers queue instead of failing; WAL lets readers run
alongside the single writer. Writes go through ``BEGIN IMMEDIATE`` so
check-then-insert sequences (first user becomes admin) are atomic.

Paging uses keyset cursors: base64url of ``"<timestamp>|<id>"``. Rows are
ordered by ``(timestamp, id)``, so a cursor stays valid and exact while new
rows are inserted (new rows sort before the cursor and are not repeated).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from .base import (
    Attachment,
    Conversation,
    Message,
    NotFound,
    Page,
    Store,
    StoreUnavailable,
    User,
    UserExists,
)

DB_NAME = "argus.db"
FILES_DIR = "files"
USER_ROLES = ("admin", "user")
MESSAGE_ROLES = ("user", "assistant", "system")
MESSAGE_STATUSES = ("complete", "stopped", "error")
MAX_PAGE = 200  # larger ``limit`` values are clamped to this

# Each entry upgrades the schema by one version; append, never edit.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE users (
        id            TEXT PRIMARY KEY,
        email         TEXT NOT NULL UNIQUE,
        name          TEXT NOT NULL,
        role          TEXT NOT NULL CHECK (role IN ('admin', 'user')),
        password_hash TEXT NOT NULL,
        created_at    REAL NOT NULL
    );
    CREATE TABLE conversations (
        id         TEXT PRIMARY KEY,
        owner_id   TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        title      TEXT NOT NULL,
        model      TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX conversations_owner_updated ON conversations (owner_id, updated_at, id);
    CREATE TABLE attachments (
        id         TEXT PRIMARY KEY,
        owner_id   TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name       TEXT NOT NULL,
        mime       TEXT NOT NULL,
        size       INTEGER NOT NULL,
        sha256     TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX attachments_owner ON attachments (owner_id);
    CREATE TABLE messages (
        id              TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        owner_id        TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        role            TEXT NOT NULL,
        content         TEXT NOT NULL,
        status          TEXT NOT NULL,
        model           TEXT NOT NULL,
        created_at      REAL NOT NULL,
        attachment_ids  TEXT NOT NULL DEFAULT '[]'  -- JSON array of attachment ids
    );
    CREATE INDEX messages_conversation_created ON messages (conversation_id, created_at, id);
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_USER_COLS = "id, email, name, role, password_hash, created_at"
_CONV_COLS = "id, owner_id, title, model, created_at, updated_at"
_MSG_COLS = "id, conversation_id, owner_id, role, content, status, model, created_at, attachment_ids"
_ATT_COLS = "id, owner_id, name, mime, size, sha256, created_at"


def _unavailable(exc: BaseException, db_path: Path) -> StoreUnavailable:
    """Translate a sqlite/OS error into a StoreUnavailable with a human message."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        msg = "The database is busy (locked by another process); try again in a moment."
    elif "full" in text or getattr(exc, "errno", None) == 28:
        msg = f"The disk holding {db_path.parent} is full; free some space."
    elif "readonly" in text or "read-only" in text or isinstance(exc, PermissionError):
        msg = f"The data directory {db_path.parent} is not writable; check its permissions."
    elif "unable to open" in text or isinstance(exc, OSError):
        msg = f"Cannot open the database at {db_path}: check that the directory exists and is writable."
    elif "disk i/o" in text:
        msg = f"A disk I/O error occurred on {db_path}; check the disk and its free space."
    elif "not a database" in text or "malformed" in text:
        msg = f"The database file {db_path} is damaged or is not an Argus database."
    else:
        msg = f"The database at {db_path} cannot be used: {exc}"
    return StoreUnavailable(msg)


def _rollback(conn: sqlite3.Connection) -> None:
    """End the open transaction, if any, without masking the original error."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _encode_cursor(ts: float, row_id: str) -> str:
    raw = f"{ts!r}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, row_id = raw.split("|", 1)
        return float(ts), row_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError("invalid paging cursor") from None


def _limit(limit: int) -> int:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return min(limit, MAX_PAGE)


def _user(row: sqlite3.Row) -> User:
    return User(*row)


def _conv(row: sqlite3.Row) -> Conversation:
    return Conversation(*row)


def _msg(row: sqlite3.Row) -> Message:
    *head, att = row
    return Message(*head, attachment_ids=tuple(json.loads(att)))


def _att(row: sqlite3.Row) -> Attachment:
    return Attachment(*row)


class SQLiteStore(Store):
    """Store backed by ``<data_dir>/argus.db`` and ``<data_dir>/files/``.

    Args:
        data_dir: directory for the database and attachment files; created
            (mode 0700) when missing. An existing ``argus.db`` (and its
            ``-wal``/``-shm`` files) readable by others is made 0600.
        busy_timeout_ms: how long a writer waits for the lock, in milliseconds,
            before giving up with StoreUnavailable.
        clock: returns the current time in UNIX seconds (injectable for tests).

    Raises:
        StoreUnavailable: the directory or database cannot be created, opened
            or migrated (unwritable path, full disk, damaged file, newer schema).

    Thread-safe: each thread gets its own connection. Call :meth:`close` once
    at shutdown; later calls raise StoreUnavailable.
    """

    def __init__(self, data_dir: Path | str, *, busy_timeout_ms: int = 5000, clock: Callable[[], float] = time.time):
        self.data_dir = Path(data_dir)
        self.db_path = self.data_dir / DB_NAME
        self.files_dir = self.data_dir / FILES_DIR
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._clock = clock
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.files_dir.mkdir(mode=0o700, exist_ok=True)
            if not self.db_path.exists():  # it holds password hashes: owner-only from the start
                os.close(os.open(self.db_path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._make_private()
        except OSError as exc:
            raise _unavailable(exc, self.db_path) from exc
        with self._errors():
            conn = self._conn()
            conn.execute("PRAGMA journal_mode=WAL")
            self._migrate(conn)

    def _make_private(self) -> None:
        """chmod 0600 the database and its -wal/-shm files when others may read them
        (SQLite creates -wal/-shm with the database file's mode). Raises OSError."""
        for path in (self.db_path, Path(f"{self.db_path}-wal"), Path(f"{self.db_path}-shm")):
            try:
                mode = path.stat().st_mode & 0o777
            except FileNotFoundError:
                continue
            if mode & 0o077:
                os.chmod(path, 0o600)

    # ---- plumbing -------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreUnavailable("The store has been closed.")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: no corruption, may lose the last commit on power loss
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError:
            raise
        except (sqlite3.OperationalError, sqlite3.DatabaseError, OSError) as exc:
            raise _unavailable(exc, self.db_path) from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the database write lock from the start."""
        with self._errors():
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several SELECTs."""
        with self._errors():
            conn = self._conn()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                _rollback(conn)  # nothing was written; just end the snapshot

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            if version > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"The database {self.db_path} has schema version {version}, newer than this "
                    f"Argus ({SCHEMA_VERSION}); upgrade Argus."
                )
            for script in _MIGRATIONS[version:]:
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def close(self) -> None:
        """Close every thread's connection. Idempotent."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # ---- users ----------------------------------------------------------
    def create_user(self, email: str, name: str, password_hash: str, role: Optional[str] = None) -> User:
        """Insert a user. ``email`` is normalised (stripped, lower-cased).

        ``role=None``: "admin" for the very first user, otherwise "user"; the
        count and the insert share one ``BEGIN IMMEDIATE`` transaction.
        Raises UserExists (the UNIQUE index decides races), ValueError for a
        bad role, StoreUnavailable.
        """
        if role is not None and role not in USER_ROLES:
            raise ValueError(f"role must be one of {USER_ROLES}, got {role!r}")
        email = email.strip().lower()
        user_id = uuid.uuid4().hex
        try:
            with self._write() as conn:
                if role is None:
                    any_user = conn.execute("SELECT EXISTS (SELECT 1 FROM users)").fetchone()[0]
                    role = "user" if any_user else "admin"
                user = User(user_id, email, name, role, password_hash, self._clock())
                conn.execute(f"INSERT INTO users ({_USER_COLS}) VALUES (?, ?, ?, ?, ?, ?)", tuple(vars(user).values()))
        except sqlite3.IntegrityError:
            raise UserExists(f"A user with the email {email} already exists.") from None
        return user

    def get_user_by_email(self, email: str) -> Optional[User]:
        """The user with this email (compared case-insensitively), or None."""
        with self._errors():
            row = self._conn().execute(
                f"SELECT {_USER_COLS} FROM users WHERE email = ?", (email.strip().lower(),)
            ).fetchone()
        return _user(row) if row else None

    def get_user(self, user_id: str) -> Optional[User]:
        with self._errors():
            row = self._conn().execute(f"SELECT {_USER_COLS} FROM users WHERE id = ?", (user_id,)).fetchone()
        return _user(row) if row else None

    def count_users(self) -> int:
        with self._errors():
            return self._conn().execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def list_users(self) -> list[User]:
        """All users, oldest first (for the admin CLI; not part of the Store ABC yet)."""
        with self._errors():
            rows = self._conn().execute(f"SELECT {_USER_COLS} FROM users ORDER BY created_at, id").fetchall()
        return [_user(r) for r in rows]

    # ---- conversations --------------------------------------------------
    def create_conversation(self, owner_id: str, title: str, model: str) -> Conversation:
        """Raises NotFound when ``owner_id`` is not a user."""
        now = self._clock()
        conv = Conversation(uuid.uuid4().hex, owner_id, title, model, now, now)
        try:
            with self._write() as conn:
                conn.execute(f"INSERT INTO conversations ({_CONV_COLS}) VALUES (?, ?, ?, ?, ?, ?)", tuple(vars(conv).values()))
        except sqlite3.IntegrityError:
            raise NotFound("No such user.") from None
        return conv

    def get_conversation(self, conversation_id: str, owner_id: str) -> Conversation:
        with self._errors():
            row = self._conn().execute(
                f"SELECT {_CONV_COLS} FROM conversations WHERE id = ? AND owner_id = ?", (conversation_id, owner_id)
            ).fetchone()
        if row is None:
            raise NotFound("No such conversation.")
        return _conv(row)

    def list_conversations(self, owner_id: str, limit: int = 20, cursor: Optional[str] = None) -> Page[Conversation]:
        """Newest ``updated_at`` first. ``limit`` is clamped to 1..MAX_PAGE (ValueError below 1);
        a malformed ``cursor`` raises ValueError."""
        limit = _limit(limit)
        sql = f"SELECT {_CONV_COLS} FROM conversations WHERE owner_id = ?"
        args: list = [owner_id]
        if cursor:
            ts, cid = _decode_cursor(cursor)
            # A row-value comparison lets SQLite seek the (owner_id, updated_at, id) index
            # straight to the cursor; the equivalent OR form scans every row before it.
            sql += " AND (updated_at, id) < (?, ?)"
            args += [ts, cid]
        sql += " ORDER BY updated_at DESC, id DESC LIMIT ?"
        with self._errors():
            rows = self._conn().execute(sql, (*args, limit + 1)).fetchall()
        items = [_conv(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, _encode_cursor(items[-1].updated_at, items[-1].id) if more else None)

    def rename_conversation(self, conversation_id: str, owner_id: str, title: str) -> Conversation:
        """Change the title (``updated_at`` is left alone so the list order does not jump)."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE conversations SET title = ? WHERE id = ? AND owner_id = ?", (title, conversation_id, owner_id)
            )
            if cur.rowcount == 0:
                raise NotFound("No such conversation.")
        return self.get_conversation(conversation_id, owner_id)

    # ---- messages -------------------------------------------------------
    def add_message(
        self,
        conversation_id: str,
        owner_id: str,
        role: str,
        content: str,
        *,
        status: str = "complete",
        model: str = "",
        attachment_ids: Sequence[str] = (),
    ) -> Message:
        """Append a message and bump the conversation's ``updated_at``.

        ``created_at`` is strictly increasing within a conversation (a coarse
        clock cannot reorder messages). Raises NotFound when the conversation
        or any attachment is missing or not ``owner_id``'s; ValueError for an
        unknown role or status.
        """
        if role not in MESSAGE_ROLES:
            raise ValueError(f"role must be one of {MESSAGE_ROLES}, got {role!r}")
        if status not in MESSAGE_STATUSES:
            raise ValueError(f"status must be one of {MESSAGE_STATUSES}, got {status!r}")
        att_ids = tuple(attachment_ids)
        with self._write() as conn:
            self._check_conversation(conn, conversation_id, owner_id)
            if att_ids:
                marks = ",".join("?" * len(set(att_ids)))
                found = conn.execute(
                    f"SELECT COUNT(*) FROM attachments WHERE owner_id = ? AND id IN ({marks})", (owner_id, *set(att_ids))
                ).fetchone()[0]
                if found != len(set(att_ids)):
                    raise NotFound("No such attachment.")
            last = conn.execute(
                "SELECT MAX(created_at) FROM messages WHERE conversation_id = ?", (conversation_id,)
            ).fetchone()[0]
            now = self._clock()
            if last is not None and now <= last:
                now = last + 1e-6
            msg = Message(uuid.uuid4().hex, conversation_id, owner_id, role, content, status, model, now, att_ids)
            conn.execute(
                f"INSERT INTO messages ({_MSG_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*tuple(vars(msg).values())[:-1], json.dumps(list(att_ids))),
            )
            conn.execute(
                "UPDATE conversations SET updated_at = MAX(updated_at, ?) WHERE id = ?", (now, conversation_id)
            )
        return msg

    @staticmethod
    def _check_conversation(conn: sqlite3.Connection, conversation_id: str, owner_id: str) -> None:
        row = conn.execute(
            "SELECT 1 FROM conversations WHERE id = ? AND owner_id = ?", (conversation_id, owner_id)
        ).fetchone()
        if row is None:
            raise NotFound("No such conversation.")

    def update_message(self, message_id: str, owner_id: str, *, content: str, status: str) -> Message:
        """Replace a message's content and status (e.g. when streaming ends).
        Raises NotFound (missing/foreign), ValueError (unknown status)."""
        if status not in MESSAGE_STATUSES:
            raise ValueError(f"status must be one of {MESSAGE_STATUSES}, got {status!r}")
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE messages SET content = ?, status = ? WHERE id = ? AND owner_id = ?",
                (content, status, message_id, owner_id),
            )
            if cur.rowcount == 0:
                raise NotFound("No such message.")
            row = conn.execute(f"SELECT {_MSG_COLS} FROM messages WHERE id = ?", (message_id,)).fetchone()
        return _msg(row)

    def list_messages(
        self, conversation_id: str, owner_id: str, limit: int = 50, cursor: Optional[str] = None
    ) -> Page[Message]:
        """Newest first; ``next_cursor`` pages towards older messages.
        Raises NotFound for a missing/foreign conversation, ValueError for a bad cursor/limit."""
        limit = _limit(limit)
        sql = f"SELECT {_MSG_COLS} FROM messages WHERE conversation_id = ? AND owner_id = ?"
        args: list = [conversation_id, owner_id]
        if cursor:
            ts, mid = _decode_cursor(cursor)
            sql += " AND (created_at, id) < (?, ?)"  # seeks the index; see list_conversations
            args += [ts, mid]
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        with self._read() as conn:
            self._check_conversation(conn, conversation_id, owner_id)
            rows = conn.execute(sql, (*args, limit + 1)).fetchall()
        items = [_msg(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, _encode_cursor(items[-1].created_at, items[-1].id) if more else None)

    # ---- attachments ----------------------------------------------------
    def _file_path(self, owner_id: str, sha256: str) -> Path:
        if not _SAFE_ID.fullmatch(owner_id):
            raise NotFound("No such user.")
        return self.files_dir / owner_id / sha256

    def save_attachment(self, owner_id: str, name: str, mime: str, data: bytes) -> Attachment:
        """Store ``data`` at ``files/<owner_id>/<sha256>`` (atomic temp file +
        ``os.replace``; identical bytes are written once) and record its metadata.
        Raises NotFound when ``owner_id`` is not a user, StoreUnavailable on I/O failure."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._file_path(owner_id, digest)
        if self.get_user(owner_id) is None:
            raise NotFound("No such user.")
        try:
            if not (path.is_file() and path.stat().st_size == len(data)):
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")  # mode 0600
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
        except OSError as exc:
            raise _unavailable(exc, self.db_path) from exc
        att = Attachment(uuid.uuid4().hex, owner_id, name, mime, len(data), digest, self._clock())
        try:
            with self._write() as conn:
                conn.execute(f"INSERT INTO attachments ({_ATT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)", tuple(vars(att).values()))
        except sqlite3.IntegrityError:
            raise NotFound("No such user.") from None
        return att

    def get_attachment(self, attachment_id: str, owner_id: str) -> tuple[Attachment, bytes]:
        """Metadata and bytes. Raises NotFound (missing/foreign), StoreUnavailable
        when the file is missing or its bytes do not match the recorded sha256."""
        with self._errors():
            row = self._conn().execute(
                f"SELECT {_ATT_COLS} FROM attachments WHERE id = ? AND owner_id = ?", (attachment_id, owner_id)
            ).fetchone()
        if row is None:
            raise NotFound("No such attachment.")
        att = _att(row)
        path = self._file_path(owner_id, att.sha256)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreUnavailable(f"The file for attachment {att.id} cannot be read at {path}: {exc.strerror}.") from exc
        if hashlib.sha256(data).hexdigest() != att.sha256:
            raise StoreUnavailable(f"The file for attachment {att.id} at {path} is damaged (checksum mismatch).")
        return att, data

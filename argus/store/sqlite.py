"""SQLite implementation of :class:`argus.store.base.Store` (stdlib ``sqlite3``).

Layout under ``data_dir``::

    argus.db                      the database (WAL mode)
    search.db                     the message search index (WAL; derived, rebuilt if lost)
    files/<owner_id>/<sha256>     attachment bytes, content-addressed per owner

Concurrency: one connection per thread (``threading.local``), each with
``busy_timeout`` so writers queue instead of failing; WAL lets readers run
alongside the single writer. Writes go through ``BEGIN IMMEDIATE`` so
check-then-insert sequences (first user becomes admin) are atomic; writers of
one process queue on a Python lock before that (no busy-handler sleeps).
Several processes may share ``data_dir``.

Paging uses keyset cursors: base64url of ``"<timestamp>|<id>"``. Rows are
ordered by ``(timestamp, id)``, so a cursor stays valid and exact while new
rows are inserted (new rows sort before the cursor and are not repeated).

Search (``list_conversations(search=...)``, ``search_messages``) is a
case-insensitive substring match. Queries of 3 characters or more use FTS5
indexes with the ``trigram`` tokenizer (SQLite >= 3.34; substrings in any
script, Persian and CJK included); shorter queries, and SQLite builds without
FTS5/trigram, use ``LIKE`` (which folds ASCII letters only).

* Titles: ``conversations_fts`` in ``argus.db``, an external-content index on
  ``conversations.title`` kept in sync by triggers (titles are short and rarely
  written).
* Message contents: ``messages_fts`` in a separate file ``search.db``. Indexing
  a message in the same transaction as the append made appends 2-3 times slower
  and, through FTS5 segment merges, put 10-30 ms stalls on 1-2 % of them
  (bench/store.py, 100k messages: append p99 0.4 -> 8-16 ms). So an append does
  no indexing work: the index reads messages above its rowid watermark later,
  and triggers queue only changes to messages it has already read (updates,
  deletes, a reused rowid) in ``search_queue``. The index is brought up to date
  in batches by a background thread shortly after writes, and by every search
  before it reads (so a search sees every committed message). ``search.db`` has
  its own write lock, so indexing never blocks an append. It is derived data:
  deleted or damaged, it is rebuilt from ``messages`` (see ``_index_step``).

Both indexes are keyed by the base table's rowid; VACUUM keeps those rowids
(each table has a PRIMARY KEY index). Creating the indexes is not one of the
numbered migrations: it happens whenever the running SQLite supports them and
they are missing (existing rows are indexed then).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from .base import (
    KEY_STATES,
    MESSAGE_ROLES,
    MESSAGE_STATUSES,
    USER_ROLES,
    ApiKeyRecord,
    KeyExists,
    KeyWindow,
    UsageBucket,
    check_api_key_fields,
    dump_windows,
    load_windows,
    pick_api_key,
    decode_cursor,
    dump_metadata,
    encode_cursor,
    page_limit,
    Attachment,
    Conversation,
    Feedback,
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
    # 2: conversation metadata (Chainlit thread metadata), feedback, attachment lookup by bytes.
    """
    ALTER TABLE conversations ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';  -- JSON object
    CREATE TABLE feedback (
        id              TEXT PRIMARY KEY,
        message_id      TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        owner_id        TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        value           INTEGER NOT NULL CHECK (value IN (0, 1)),
        comment         TEXT,
        created_at      REAL NOT NULL,
        UNIQUE (message_id, owner_id)
    );
    CREATE INDEX feedback_conversation ON feedback (conversation_id, created_at, id);
    DROP INDEX attachments_owner;
    CREATE INDEX attachments_owner_sha256 ON attachments (owner_id, sha256);
    -- messages changed after the search index passed them (see SQLiteStore._index_step). seq
    -- only grows: pruning always keeps the newest applied row, so max(seq) + 1 is never reused.
    CREATE TABLE search_queue (seq INTEGER PRIMARY KEY, msg_rowid INTEGER NOT NULL);
    -- epoch: changes when the triggers are (re)created, so search.db rebuilds;
    -- pruned: queue rows up to this seq are deleted (an index behind it must rebuild);
    -- watermark: messages.rowid up to which the index may have read (never below search.db's)
    CREATE TABLE search_meta (epoch INTEGER NOT NULL, pruned INTEGER NOT NULL, watermark INTEGER NOT NULL);
    """,
    # 3: API keys of remote providers (argus.keys) and their usage per (key, user, model, day).
    """
    CREATE TABLE api_keys (
        id             TEXT PRIMARY KEY,
        provider       TEXT NOT NULL,
        source         TEXT NOT NULL CHECK (source IN ('env', 'app')),
        fingerprint    TEXT NOT NULL,
        state          TEXT NOT NULL CHECK (state IN ('enabled', 'disabled', 'invalid')),
        created_at     REAL NOT NULL,
        ciphertext     BLOB,                        -- app keys: AES-256-GCM, env keys: NULL
        cooldown_until REAL NOT NULL DEFAULT 0,
        last_used_at   REAL NOT NULL DEFAULT 0,
        last_seq       INTEGER NOT NULL DEFAULT 0,  -- rotation order: lowest goes next
        requests_total INTEGER NOT NULL DEFAULT 0,
        tokens_total   INTEGER NOT NULL DEFAULT 0,
        last_error     TEXT NOT NULL DEFAULT '',
        windows        TEXT NOT NULL DEFAULT '{}'   -- JSON: model -> rate-limit counters
    );
    CREATE INDEX api_keys_provider ON api_keys (provider, last_seq, id);
    CREATE TABLE api_usage (
        key_id        TEXT NOT NULL,
        user_id       TEXT NOT NULL,
        model         TEXT NOT NULL,
        day           TEXT NOT NULL,                -- UTC, YYYY-MM-DD
        requests      INTEGER NOT NULL,
        input_tokens  INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        PRIMARY KEY (key_id, user_id, model, day)
    );
    CREATE INDEX api_usage_day ON api_usage (day, key_id);
    """,
    # 4: session token version per user (sign-out and password change end older sessions).
    """
    ALTER TABLE users ADD COLUMN token_version INTEGER NOT NULL DEFAULT 0;
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)

# Full-text search (not numbered: created whenever supported and missing; see the module docstring).
SEARCH_DB_NAME = "search.db"
FTS_MIN_SQLITE = (3, 34, 0)  # the trigram tokenizer
FTS_MIN_QUERY = 3  # characters; shorter queries use LIKE (a trigram index cannot answer them)
INDEX_DELAY = 1.0  # seconds the background indexer waits after a write, to index in batches
INDEX_BATCH = 500  # messages (new ones; and queue entries) per background indexing transaction
CATCH_UP_BATCH = 20_000  # the same for a search that finds the index behind (bounds memory)
PRUNE_EVERY = 10.0  # seconds between deletions of applied queue entries (a short write on argus.db)
INDEX_NICE = 10  # the background indexer thread's nice value on Linux (searches catch up at full priority)
_FTS_TABLES = ("conversations_fts",)
_FTS_TRIGGERS = (
    "conversations_fts_insert", "conversations_fts_delete", "conversations_fts_update",
    "messages_search_insert", "messages_search_delete", "messages_search_update",
)
_FTS_DDL: tuple[str, ...] = (
    (
        "CREATE VIRTUAL TABLE conversations_fts USING fts5("
        "title, content='conversations', content_rowid='rowid', tokenize='trigram')"
    ),
    """CREATE TRIGGER conversations_fts_insert AFTER INSERT ON conversations BEGIN
        INSERT INTO conversations_fts (rowid, title) VALUES (new.rowid, new.title);
    END""",
    """CREATE TRIGGER conversations_fts_delete AFTER DELETE ON conversations BEGIN
        INSERT INTO conversations_fts (conversations_fts, rowid, title) VALUES ('delete', old.rowid, old.title);
    END""",
    """CREATE TRIGGER conversations_fts_update AFTER UPDATE OF title ON conversations
    WHEN old.title IS NOT new.title BEGIN
        INSERT INTO conversations_fts (conversations_fts, rowid, title) VALUES ('delete', old.rowid, old.title);
        INSERT INTO conversations_fts (rowid, title) VALUES (new.rowid, new.title);
    END""",
    "INSERT INTO conversations_fts (conversations_fts) VALUES ('rebuild')",  # titles written before the index
    # A new message above the watermark needs no entry (the index reads rowids above its own
    # watermark anyway): an append pays one lookup in a cached one-row table, no extra page.
    """CREATE TRIGGER messages_search_insert AFTER INSERT ON messages
    WHEN new.rowid <= (SELECT watermark FROM search_meta) BEGIN
        INSERT INTO search_queue (msg_rowid) VALUES (new.rowid);
    END""",
    """CREATE TRIGGER messages_search_delete AFTER DELETE ON messages BEGIN
        INSERT INTO search_queue (msg_rowid) VALUES (old.rowid);
    END""",
    """CREATE TRIGGER messages_search_update AFTER UPDATE OF content ON messages
    WHEN old.content IS NOT new.content BEGIN
        INSERT INTO search_queue (msg_rowid) VALUES (new.rowid);
    END""",
    # messages written while the triggers were missing: a new epoch makes search.db rebuild
    "DELETE FROM search_queue",
    "DELETE FROM search_meta",
    "INSERT INTO search_meta (epoch, pruned, watermark) VALUES (abs(random()), 0, 0)",
)
_SEARCH_DDL: tuple[str, ...] = (
    # hwm: search_queue entries up to this seq are applied; wm: messages up to this rowid were read
    (
        "CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY CHECK (id = 1), epoch INTEGER NOT NULL,"
        " hwm INTEGER NOT NULL, wm INTEGER NOT NULL)"
    ),
    "CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(content, tokenize='trigram')",
)

log = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_USER_COLS = "id, email, name, role, password_hash, created_at, token_version"
_CONV_COLS = "id, owner_id, title, model, created_at, updated_at, metadata"
_MSG_COLS = "id, conversation_id, owner_id, role, content, status, model, created_at, attachment_ids"
_ATT_COLS = "id, owner_id, name, mime, size, sha256, created_at"
_FB_COLS = "id, message_id, conversation_id, owner_id, value, comment, created_at"
_KEY_COLS = (
    "id, provider, source, fingerprint, state, created_at, ciphertext, cooldown_until, last_used_at, last_seq,"
    " requests_total, tokens_total, last_error, windows"
)
_USAGE_COLS = "key_id, user_id, model, day, requests, input_tokens, output_tokens"


def _cols(cols: str, alias: str) -> str:
    """``"a, b"`` -> ``"x.a, x.b"``."""
    return ", ".join(f"{alias}.{c}" for c in cols.split(", "))


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








def _user(row: sqlite3.Row) -> User:
    return User(*row)


def _conv(row: sqlite3.Row) -> Conversation:
    *head, meta = row
    return Conversation(*head, metadata=json.loads(meta))


def _fb(row: sqlite3.Row) -> Feedback:
    return Feedback(*row)




def _fts_phrase(text: str) -> str:
    """``text`` as one FTS5 string literal: every character literal (``*``, ``(``, ``:``,
    ``AND``...), ``"`` doubled. With the trigram tokenizer this matches it as a substring."""
    return '"' + text.replace('"', '""') + '"'


def _like_pattern(text: str) -> str:
    """A LIKE pattern (use with ``ESCAPE '\\'``) matching ``text`` as a literal substring."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _msg(row: sqlite3.Row) -> Message:
    *head, att = row
    return Message(*head, attachment_ids=tuple(json.loads(att)))


def _att(row: sqlite3.Row) -> Attachment:
    return Attachment(*row)


def _key(row: sqlite3.Row) -> ApiKeyRecord:
    *head, ciphertext, cooldown, used, seq, requests, tokens, error, windows = row
    return ApiKeyRecord(
        *head, ciphertext=bytes(ciphertext) if ciphertext is not None else None, cooldown_until=cooldown,
        last_used_at=used, last_seq=seq, requests_total=requests, tokens_total=tokens, last_error=error,
        windows=load_windows(windows),
    )


class SQLiteStore(Store):
    """Store backed by ``<data_dir>/argus.db``, ``<data_dir>/search.db`` and ``<data_dir>/files/``.

    Args:
        data_dir: directory for the databases and attachment files; created
            (mode 0700) when missing. An existing ``argus.db`` or ``search.db``
            (or their ``-wal``/``-shm`` files) readable by others is made 0600.
        busy_timeout_ms: how long a writer waits for the lock, in milliseconds,
            before giving up with StoreUnavailable.
        clock: returns the current time in UNIX seconds (injectable for tests).

    Raises:
        StoreUnavailable: the directory or database cannot be created, opened
            or migrated (unwritable path, full disk, damaged file, newer schema).

    Thread-safe: each thread gets its own connections. A daemon thread
    ("argus-search-index") indexes new messages for search, started by the first
    message write. Call :meth:`close` once at shutdown (it stops that thread);
    later calls raise StoreUnavailable.
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
        self._write_lock = threading.Lock()  # see _write
        self._closed = False
        self._fts = False  # set by _migrate: the FTS5 trigram indexes exist and are usable
        self.search_path = self.data_dir / SEARCH_DB_NAME
        self._search_conns: list[sqlite3.Connection] = []
        self._index_lock = threading.Lock()  # one indexing transaction at a time in this process
        self._index_wanted = threading.Event()  # set by message writes: the indexer has work
        self._stop = threading.Event()  # set by close()
        self._indexer: Optional[threading.Thread] = None
        self._indexer_lock = threading.Lock()
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
        if self._fts:
            self._open_search()

    def _make_private(self) -> None:
        """chmod 0600 the database and its -wal/-shm files when others may read them
        (SQLite creates -wal/-shm with the database file's mode). Raises OSError."""
        for path in (
            *(Path(f"{db}{suffix}") for db in (self.db_path, self.search_path) for suffix in ("", "-wal", "-shm")),
        ):
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
        """A write transaction holding the database write lock from the start.

        Writers of this process queue on a Python lock first: SQLite's own busy handler
        sleeps 1, 2, 5, 10... ms between retries, far longer than a typical write holds the
        lock. Other processes still meet the busy timeout. Not reentrant."""
        if not self._write_lock.acquire(timeout=self._busy_timeout_ms / 1000):
            raise StoreUnavailable("The database is busy (locked by another thread for too long); try again in a moment.")
        try:
            with self._errors():
                conn = self._conn()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
        finally:
            self._write_lock.release()

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
            self._fts = self._ensure_fts(conn)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _ensure_fts(self, conn: sqlite3.Connection) -> bool:
        """Create the title index, its triggers and the message queue's triggers if this SQLite
        supports FTS5 with the trigram tokenizer and they are missing (existing titles are
        indexed then; ``search.db`` rebuilds). Returns whether search can use FTS. Raises
        StoreUnavailable when the database has them but this SQLite cannot use them (writes
        would fail)."""
        supported = sqlite3.sqlite_version_info >= FTS_MIN_SQLITE and bool(
            conn.execute("SELECT sqlite_compileoption_used('ENABLE_FTS5')").fetchone()[0]
        )
        names = (*_FTS_TABLES, *_FTS_TRIGGERS)
        present = {
            r[0] for r in conn.execute(f"SELECT name FROM sqlite_master WHERE name IN ({','.join('?' * len(names))})", names)
        }
        if present and not supported:
            raise StoreUnavailable(
                f"The database {self.db_path} has full-text indexes that need SQLite >= "
                f"{'.'.join(map(str, FTS_MIN_SQLITE))} with FTS5; this Python has SQLite {sqlite3.sqlite_version}."
            )
        if not supported:
            return False
        if present != set(names):  # missing (or, after a manual change, partial): start over
            for name in _FTS_TRIGGERS:
                conn.execute(f"DROP TRIGGER IF EXISTS {name}")
            for name in _FTS_TABLES:
                conn.execute(f"DROP TABLE IF EXISTS {name}")
            for statement in _FTS_DDL:
                conn.execute(statement)
        return True

    # ---- the message search index (search.db) ----------------------------
    def _open_search(self) -> None:
        """Create or open ``search.db`` (mode 0600) and start indexing if it is behind.
        A damaged file is deleted and rebuilt (it holds nothing that ``argus.db`` lacks).
        Raises StoreUnavailable."""
        for attempt in (1, 2):
            try:
                if not self.search_path.exists():
                    os.close(os.open(self.search_path, os.O_WRONLY | os.O_CREAT, 0o600))
                conn = self._search_conn()
                conn.execute("PRAGMA journal_mode=WAL")
                for statement in _SEARCH_DDL:
                    conn.execute(statement)
                backlog = self._search_backlog(conn)
                break
            except OSError as exc:
                raise _unavailable(exc, self.search_path) from exc
            except sqlite3.DatabaseError as exc:
                text = str(exc).lower()
                if attempt == 2 or not ("not a database" in text or "malformed" in text):
                    raise _unavailable(exc, self.search_path) from exc
                log.warning("%s is damaged (%s); rebuilding the search index", self.search_path, exc)
                self._drop_search_conn()
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{self.search_path}{suffix}")
        # A small backlog (a new database, a short outage) is indexed now; a big one (the first
        # open after an upgrade) in the background, so start-up is not held up.
        if backlog > INDEX_BATCH:
            self._wake()
        elif backlog:
            self._catch_up()

    def _search_conn(self) -> sqlite3.Connection:
        """This thread's connection to ``search.db`` with ``argus.db`` attached as ``argus``
        (read-only use: it never writes there, so it never takes the main write lock)."""
        if self._closed:
            raise StoreUnavailable("The store has been closed.")
        conn = getattr(self._local, "search_conn", None)
        if conn is None:
            conn = sqlite3.connect(self.search_path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("ATTACH DATABASE ? AS argus", (str(self.db_path),))
            self._local.search_conn = conn
            with self._conns_lock:
                self._conns.append(conn)
                self._search_conns.append(conn)
        return conn

    def _drop_search_conn(self) -> None:
        conn = getattr(self._local, "search_conn", None)
        if conn is not None:
            self._local.search_conn = None
            with self._conns_lock:
                for conns in (self._conns, self._search_conns):
                    if conn in conns:
                        conns.remove(conn)
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    @staticmethod
    def _search_backlog(conn: sqlite3.Connection) -> int:
        """How far ``search.db`` is behind the committed messages: 0 when up to date, else about
        how many messages indexing has to (re)read. One read of both files."""
        row = conn.execute(
            "SELECT (SELECT epoch FROM state), (SELECT hwm FROM state), (SELECT wm FROM state),"
            " (SELECT epoch FROM argus.search_meta), (SELECT pruned FROM argus.search_meta),"
            " (SELECT COALESCE(MAX(seq), 0) FROM argus.search_queue),"
            " (SELECT COALESCE(MAX(rowid), 0) FROM argus.messages)"
        ).fetchone()
        epoch, hwm, wm, main_epoch, pruned, top, last = row
        if epoch is None or epoch != main_epoch or hwm < (pruned or 0):  # a rebuild
            return 1 + last
        return max(0, top - hwm) + max(0, last - wm)

    def _index_step(self, batch: int) -> bool:
        """One indexing transaction on ``search.db``; returns whether work remains. Call with
        ``_index_lock`` held. Raises sqlite3 errors and StoreUnavailable.

        The index tracks two positions: ``wm``, the messages rowid up to which it has read
        (new messages are simply the rowids above it) and ``hwm``, the last applied
        ``search_queue`` entry (messages changed, deleted, or inserted again under a reused
        rowid, at or below the watermark). One step:

        1. raises ``search_meta.watermark`` in ``argus.db`` to the current max rowid W unless it
           is there already (a tiny write; from then on an insert at or below W, i.e. a reused
           rowid, is queued);
        2. in one ``search.db`` transaction: applies up to ``batch`` queue entries
           for rowids <= wm (re-index the current content, or drop it if deleted; order and
           repeats do not matter), reads new messages with rowids in (wm, min(W, wm + batch)],
           and records the new positions. Rowids above wm in the queue are left to the read of
           new messages. Or, when the index belongs to another epoch or fell behind the pruned
           part of the queue, rebuilds it from all messages up to W.

        Its first statement writes ``search.db``, so the write lock is held before anything of
        ``argus.db`` is read: indexers (threads or processes) take turns, each reading data at
        least as new as the previous one's. Outside a rebuild, ``argus.db`` is read in short
        autocommit statements (not one snapshot for the whole transaction), so checkpoints of
        its WAL are never held up by indexing; a row changed in between has a newer queue entry
        and is indexed again by the next step.
        """
        target, watermark = self._conn().execute(
            "SELECT (SELECT COALESCE(MAX(rowid), 0) FROM messages), watermark FROM search_meta"
        ).fetchone()
        if target > watermark:  # (a write only when messages were added since the last raise)
            with self._write() as mconn:
                mconn.execute("UPDATE search_meta SET watermark = ? WHERE watermark < ?", (target, target))
        conn = self._search_conn()
        conn.execute("BEGIN")
        try:
            conn.execute("UPDATE state SET hwm = hwm")  # takes the write lock (even on an empty table)
            state = conn.execute("SELECT epoch, hwm, wm FROM state").fetchone()
            epoch, pruned, top = self._conn().execute(
                "SELECT epoch, pruned, (SELECT COALESCE(MAX(seq), 0) FROM search_queue) FROM search_meta"
            ).fetchone()
            more = False
            if state is None or state[0] != epoch or state[1] < pruned:
                conn.execute("DROP TABLE messages_fts")
                conn.execute(_SEARCH_DDL[1])
                conn.execute(
                    "INSERT INTO messages_fts (rowid, content) SELECT rowid, content FROM argus.messages WHERE rowid <= ?",
                    (target,),
                )
                conn.execute("INSERT OR REPLACE INTO state (id, epoch, hwm, wm) VALUES (1, ?, ?, ?)", (epoch, top, target))
            else:
                _, hwm, wm = state
                mconn = self._conn()  # autocommit reads of argus.db, see above
                upto = hwm
                if top > hwm:
                    upto = mconn.execute(  # an existing seq (pruning keeps it)
                        "SELECT MAX(seq) FROM (SELECT seq FROM search_queue WHERE seq > ? ORDER BY seq LIMIT ?)",
                        (hwm, batch),
                    ).fetchone()[0]
                    changed = [
                        (r,) for (r,) in mconn.execute(
                            "SELECT DISTINCT msg_rowid FROM search_queue WHERE seq > ? AND seq <= ? AND msg_rowid <= ?",
                            (hwm, upto, wm),
                        )
                    ]
                    if changed:
                        conn.executemany("DELETE FROM messages_fts WHERE rowid = ?", changed)
                        conn.executemany(
                            "INSERT INTO messages_fts (rowid, content) VALUES (?, ?)",
                            mconn.execute(
                                "SELECT rowid, content FROM messages WHERE rowid IN (SELECT value FROM json_each(?))",
                                (json.dumps([r for (r,) in changed]),),
                            ).fetchall(),
                        )
                new_wm = max(wm, min(target, wm + batch))
                if new_wm > wm:
                    conn.executemany(
                        "INSERT INTO messages_fts (rowid, content) VALUES (?, ?)",
                        mconn.execute("SELECT rowid, content FROM messages WHERE rowid > ? AND rowid <= ?", (wm, new_wm)).fetchall(),
                    )
                conn.execute("UPDATE state SET hwm = ?, wm = ?", (upto, new_wm))
                more = upto < top or new_wm < target
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return more

    def _catch_up(self) -> sqlite3.Connection:
        """Bring ``search.db`` up to date with every committed message (a no-op read when it is);
        returns this thread's search connection. Raises StoreUnavailable."""
        with self._errors():
            conn = self._search_conn()
            if self._search_backlog(conn):
                with self._index_lock:
                    while self._index_step(CATCH_UP_BATCH):
                        pass
        return conn

    def _prune(self) -> None:
        """Delete the queue entries the index has applied, except the newest (it keeps seq
        growing). A short write on ``argus.db``."""
        hwm = self._search_conn().execute("SELECT hwm FROM state").fetchone()
        if hwm is None or hwm[0] <= 1:
            return
        with self._write() as conn:
            pruned = conn.execute("SELECT pruned FROM search_meta").fetchone()[0]
            if hwm[0] - 1 > pruned:
                conn.execute("DELETE FROM search_queue WHERE seq < ?", (hwm[0],))
                conn.execute("UPDATE search_meta SET pruned = ?", (hwm[0] - 1,))

    def _wake(self) -> None:
        """Messages changed: have the background indexer run soon (started on first use)."""
        if not self._fts or self._closed:
            return
        self._index_wanted.set()
        if self._indexer is None or not self._indexer.is_alive():
            with self._indexer_lock:
                if (self._indexer is None or not self._indexer.is_alive()) and not self._closed:
                    self._indexer = threading.Thread(target=self._index_loop, name="argus-search-index", daemon=True)
                    self._indexer.start()

    def _index_loop(self) -> None:
        """The background indexer: after a write, wait INDEX_DELAY seconds (so a burst of writes
        is indexed together), apply the queue in INDEX_BATCH-sized transactions; every
        PRUNE_EVERY seconds at most, delete the applied entries."""
        if sys.platform.startswith("linux"):  # a thread's own nice value: index with spare CPU only
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), INDEX_NICE)
        last_prune = time.monotonic()
        unpruned = False
        while not self._closed:
            self._index_wanted.wait()
            if self._stop.wait(INDEX_DELAY):
                break
            self._index_wanted.clear()
            try:
                conn = self._search_conn()
                while not self._closed and self._search_backlog(conn):
                    unpruned = True
                    with self._index_lock:
                        if not self._index_step(INDEX_BATCH):
                            break
                if unpruned and time.monotonic() - last_prune >= PRUNE_EVERY:
                    self._prune()
                    last_prune, unpruned = time.monotonic(), False
                elif unpruned:
                    self._index_wanted.set()  # come back to prune
            except Exception as exc:  # noqa: BLE001 - a search catches up by itself; retry later
                if self._closed:
                    break
                log.warning("Background search indexing failed (searches index by themselves): %s", exc)
                self._stop.wait(5)
        self._drop_search_conn()

    def close(self) -> None:
        """Stop the background indexer and close every thread's connection. Idempotent.
        Indexing that is under way is interrupted; the queue keeps what it did not apply."""
        self._closed = True
        self._stop.set()
        self._index_wanted.set()
        with self._conns_lock:
            for conn in self._search_conns:
                with contextlib.suppress(sqlite3.Error):
                    conn.interrupt()
        indexer = self._indexer
        if indexer is not None and indexer is not threading.current_thread():
            indexer.join(10)
        with self._conns_lock:
            conns, self._conns = self._conns, []
            self._search_conns = []
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
                conn.execute(f"INSERT INTO users ({_USER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)", tuple(vars(user).values()))
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

    def bump_token_version(self, user_id: str) -> int:
        """Add one to the user's token version (one ``UPDATE ... RETURNING``); the new value.
        Raises NotFound, StoreUnavailable."""
        with self._write() as conn:
            row = conn.execute(
                "UPDATE users SET token_version = token_version + 1 WHERE id = ? RETURNING token_version", (user_id,)
            ).fetchone()
        if row is None:
            raise NotFound("No such user.")
        return row[0]

    def set_password_hash(self, user_id: str, password_hash: str) -> User:
        """Store a new bcrypt hash and bump the token version in one ``UPDATE``.
        Raises NotFound, StoreUnavailable."""
        with self._write() as conn:
            row = conn.execute(
                f"UPDATE users SET password_hash = ?, token_version = token_version + 1 WHERE id = ?"
                f" RETURNING {_USER_COLS}",
                (password_hash, user_id),
            ).fetchone()
        if row is None:
            raise NotFound("No such user.")
        return _user(row)

    def list_users(self) -> list[User]:
        """All users, oldest first (for the admin CLI; not part of the Store ABC yet)."""
        with self._errors():
            rows = self._conn().execute(f"SELECT {_USER_COLS} FROM users ORDER BY created_at, id").fetchall()
        return [_user(r) for r in rows]

    # ---- conversations --------------------------------------------------
    def create_conversation(
        self,
        owner_id: str,
        title: str,
        model: str,
        *,
        conversation_id: Optional[str] = None,
        metadata: Optional[dict] = None,
    ) -> Conversation:
        """Create a conversation; its id is ``conversation_id`` (a Chainlit thread id) when given,
        else a new UUID4 hex.

        Idempotent per owner: if ``conversation_id`` already exists and is ``owner_id``'s, it is
        returned unchanged (title, model and metadata are not touched).
        Raises NotFound when ``owner_id`` is not a user or the id belongs to another user;
        ValueError for an empty ``conversation_id`` or metadata that is not a JSON-safe dict.
        """
        if conversation_id is not None and not conversation_id:
            raise ValueError("conversation_id must be a non-empty string")
        meta = dump_metadata(metadata)
        now = self._clock()
        conv = Conversation(conversation_id or uuid.uuid4().hex, owner_id, title, model, now, now, json.loads(meta))
        try:
            with self._write() as conn:
                if conversation_id is not None:
                    row = conn.execute(f"SELECT {_CONV_COLS} FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
                    if row is not None:
                        existing = _conv(row)
                        if existing.owner_id != owner_id:
                            raise NotFound("No such conversation.")
                        return existing
                conn.execute(
                    f"INSERT INTO conversations ({_CONV_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (conv.id, owner_id, title, model, now, now, meta),
                )
        except sqlite3.IntegrityError:
            raise NotFound("No such user.") from None
        return conv

    def get_conversation(self, conversation_id: str, owner_id: str) -> Conversation:
        """Raises NotFound if missing or not owned by ``owner_id``."""
        with self._errors():
            row = self._conn().execute(
                f"SELECT {_CONV_COLS} FROM conversations WHERE id = ? AND owner_id = ?", (conversation_id, owner_id)
            ).fetchone()
        if row is None:
            raise NotFound("No such conversation.")
        return _conv(row)

    def list_conversations(
        self, owner_id: str, limit: int = 20, cursor: Optional[str] = None, search: Optional[str] = None
    ) -> Page[Conversation]:
        """Newest ``updated_at`` first. ``limit`` is clamped to 1..MAX_PAGE (ValueError below 1);
        a malformed ``cursor`` raises ValueError.

        ``search`` (None or "" = no filter): only conversations whose title or any of whose
        messages contains the text, case-insensitively (see the module docstring); every
        character is literal. Cursors work the same with a search (pass the same text again).
        """
        limit = page_limit(limit)
        use_fts = bool(search) and self._use_fts(search)
        # With FTS the query runs on the search connection, where argus.db is the schema "argus".
        schema = "argus." if use_fts else ""
        sql = f"SELECT {_CONV_COLS} FROM {schema}conversations c WHERE owner_id = ?"
        args: list = [owner_id]
        if cursor:
            ts, cid = decode_cursor(cursor)
            # A row-value comparison lets SQLite seek the (owner_id, updated_at, id) index
            # straight to the cursor; the equivalent OR form scans every row before it.
            sql += " AND (updated_at, id) < (?, ?)"
            args += [ts, cid]
        if search:
            if use_fts:
                q = _fts_phrase(search)
                sql += (
                    " AND (c.rowid IN (SELECT rowid FROM argus.conversations_fts WHERE conversations_fts MATCH ?)"
                    " OR c.id IN (SELECT m.conversation_id FROM argus.messages m WHERE m.owner_id = ?"
                    " AND m.rowid IN (SELECT rowid FROM main.messages_fts WHERE messages_fts MATCH ?)))"
                )
                args += [q, owner_id, q]
            else:
                pat = _like_pattern(search)
                sql += (
                    " AND (c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m"
                    " WHERE m.conversation_id = c.id AND m.content LIKE ? ESCAPE '\\'))"
                )
                args += [pat, pat]
        sql += " ORDER BY updated_at DESC, id DESC LIMIT ?"
        with self._errors():
            conn = self._catch_up() if use_fts else self._conn()
            rows = conn.execute(sql, (*args, limit + 1)).fetchall()
        items = [_conv(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor(items[-1].updated_at, items[-1].id) if more else None)

    def _use_fts(self, text: str) -> bool:
        return self._fts and len(text) >= FTS_MIN_QUERY

    def rename_conversation(self, conversation_id: str, owner_id: str, title: str) -> Conversation:
        """Change the title (``updated_at`` is left alone so the list order does not jump).
        Raises NotFound (missing/foreign)."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE conversations SET title = ? WHERE id = ? AND owner_id = ?", (title, conversation_id, owner_id)
            )
            if cur.rowcount == 0:
                raise NotFound("No such conversation.")
        return self.get_conversation(conversation_id, owner_id)

    def update_conversation_metadata(self, conversation_id: str, owner_id: str, metadata: dict) -> Conversation:
        """Replace the metadata as a whole (``updated_at`` is left alone, as for a rename).
        Raises NotFound (missing/foreign), ValueError (not a JSON-safe dict)."""
        meta = dump_metadata(metadata)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE conversations SET metadata = ? WHERE id = ? AND owner_id = ?", (meta, conversation_id, owner_id)
            )
            if cur.rowcount == 0:
                raise NotFound("No such conversation.")
            row = conn.execute(f"SELECT {_CONV_COLS} FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return _conv(row)

    def delete_conversation(self, conversation_id: str, owner_id: str) -> None:
        """Delete the conversation, its messages and their feedback, and the attachments its
        messages reference, unless a message of another of the owner's conversations
        references them too. An attachment's file goes once no attachment record shares its
        bytes. All in one transaction; the files are moved aside inside it and removed after
        the commit (put back if it fails). Raises NotFound (missing/foreign), StoreUnavailable."""
        trash: list[tuple[Path, Path]] = []
        try:
            with self._write() as conn:
                self._check_conversation(conn, conversation_id, owner_id)
                referenced = [
                    r[0] for r in conn.execute(
                        "SELECT DISTINCT j.value FROM messages m, json_each(m.attachment_ids) j"
                        " WHERE m.conversation_id = ? AND m.attachment_ids != '[]'",
                        (conversation_id,),
                    )
                ]
                doomed: set[str] = set(referenced)
                if doomed:
                    doomed -= {
                        r[0] for r in conn.execute(
                            "SELECT DISTINCT j.value FROM conversations c"
                            " JOIN messages m ON m.conversation_id = c.id, json_each(m.attachment_ids) j"
                            " WHERE c.owner_id = ? AND c.id != ? AND m.attachment_ids != '[]'"
                            " AND j.value IN (SELECT value FROM json_each(?))",
                            (owner_id, conversation_id, json.dumps(sorted(doomed))),
                        )
                    }
                conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))  # cascades
                if doomed:
                    self._delete_attachment_rows(conn, owner_id, sorted(doomed), trash)
        except BaseException:
            self._restore(trash)
            raise
        self._empty(trash)
        self._wake()

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
        message_id: Optional[str] = None,
    ) -> Message:
        """Append a message and bump the conversation's ``updated_at``.

        ``created_at`` is strictly increasing within a conversation (a coarse
        clock cannot reorder messages). With ``message_id`` (a Chainlit step id)
        the call is an upsert: if that message exists in this conversation, its
        content and status are replaced, its model and attachment_ids only when
        the new ones are non-empty; role and created_at are kept; the
        conversation's ``updated_at`` is bumped all the same.

        Raises NotFound when the conversation or any attachment is missing or
        not ``owner_id``'s, or ``message_id`` exists in another conversation;
        ValueError for an unknown role or status, or an empty ``message_id``.
        """
        if role not in MESSAGE_ROLES:
            raise ValueError(f"role must be one of {MESSAGE_ROLES}, got {role!r}")
        if status not in MESSAGE_STATUSES:
            raise ValueError(f"status must be one of {MESSAGE_STATUSES}, got {status!r}")
        if message_id is not None and not message_id:
            raise ValueError("message_id must be a non-empty string")
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
            now = self._clock()
            row = None
            if message_id is not None:
                row = conn.execute(f"SELECT {_MSG_COLS} FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is not None:
                old = _msg(row)
                if old.conversation_id != conversation_id or old.owner_id != owner_id:
                    raise NotFound("No such message.")
                msg = replace(
                    old, content=content, status=status, model=model or old.model,
                    attachment_ids=att_ids or old.attachment_ids,
                )
                conn.execute(
                    "UPDATE messages SET content = ?, status = ?, model = ?, attachment_ids = ? WHERE id = ?",
                    (msg.content, msg.status, msg.model, json.dumps(list(msg.attachment_ids)), msg.id),
                )
            else:
                last = conn.execute(
                    "SELECT MAX(created_at) FROM messages WHERE conversation_id = ?", (conversation_id,)
                ).fetchone()[0]
                if last is not None and now <= last:
                    now = last + 1e-6
                msg = Message(
                    message_id or uuid.uuid4().hex, conversation_id, owner_id, role, content, status, model, now, att_ids
                )
                conn.execute(
                    f"INSERT INTO messages ({_MSG_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*tuple(vars(msg).values())[:-1], json.dumps(list(att_ids))),
                )
            conn.execute(
                "UPDATE conversations SET updated_at = MAX(updated_at, ?) WHERE id = ?", (now, conversation_id)
            )
        self._wake()
        return msg

    def get_message(self, message_id: str, owner_id: str) -> Message:
        """Raises NotFound if missing or not owned by ``owner_id``."""
        with self._errors():
            row = self._conn().execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE id = ? AND owner_id = ?", (message_id, owner_id)
            ).fetchone()
        if row is None:
            raise NotFound("No such message.")
        return _msg(row)

    def delete_message(self, message_id: str, owner_id: str) -> None:
        """Delete one message and its feedback. The attachments it references are kept
        (``delete_attachment`` removes those); the conversation's ``updated_at`` is left
        alone. Raises NotFound (missing/foreign)."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM messages WHERE id = ? AND owner_id = ?", (message_id, owner_id))
            if cur.rowcount == 0:
                raise NotFound("No such message.")
        self._wake()

    def search_messages(self, owner_id: str, text: str, limit: int = 20) -> list[Message]:
        """The owner's messages whose content contains ``text`` (case-insensitive, every
        character literal; see the module docstring), newest ``created_at`` first, at most
        ``limit`` (clamped to MAX_PAGE; ValueError below 1). An empty ``text`` finds nothing."""
        limit = page_limit(limit)
        if not text:
            return []
        use_fts = self._use_fts(text)
        if use_fts:
            sql = (
                f"SELECT {_MSG_COLS} FROM argus.messages WHERE owner_id = ?"
                " AND rowid IN (SELECT rowid FROM main.messages_fts WHERE messages_fts MATCH ?)"
                " ORDER BY created_at DESC, id DESC LIMIT ?"
            )
            args: tuple = (owner_id, _fts_phrase(text), limit)
        else:  # walk the owner's conversations, then their messages by index: no full-table scan
            sql = (
                f"SELECT {_cols(_MSG_COLS, 'm')} FROM conversations c JOIN messages m ON m.conversation_id = c.id"
                " WHERE c.owner_id = ? AND m.owner_id = ? AND m.content LIKE ? ESCAPE '\\'"
                " ORDER BY m.created_at DESC, m.id DESC LIMIT ?"
            )
            args = (owner_id, owner_id, _like_pattern(text), limit)
        with self._errors():
            conn = self._catch_up() if use_fts else self._conn()
            rows = conn.execute(sql, args).fetchall()
        return [_msg(r) for r in rows]

    @staticmethod
    def _check_conversation(conn: sqlite3.Connection, conversation_id: str, owner_id: str) -> None:
        row = conn.execute(
            "SELECT 1 FROM conversations WHERE id = ? AND owner_id = ?", (conversation_id, owner_id)
        ).fetchone()
        if row is None:
            raise NotFound("No such conversation.")

    def update_message(self, message_id: str, owner_id: str, *, content: str, status: str) -> Message:
        """Replace a message's content and status (e.g. when streaming ends); the conversation's
        ``updated_at`` is left alone. Raises NotFound (missing/foreign), ValueError (unknown status)."""
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
        self._wake()
        return _msg(row)

    def list_messages(
        self, conversation_id: str, owner_id: str, limit: int = 50, cursor: Optional[str] = None
    ) -> Page[Message]:
        """Newest first; ``next_cursor`` pages towards older messages.
        Raises NotFound for a missing/foreign conversation, ValueError for a bad cursor/limit."""
        limit = page_limit(limit)
        sql = f"SELECT {_MSG_COLS} FROM messages WHERE conversation_id = ? AND owner_id = ?"
        args: list = [conversation_id, owner_id]
        if cursor:
            ts, mid = decode_cursor(cursor)
            sql += " AND (created_at, id) < (?, ?)"  # seeks the index; see list_conversations
            args += [ts, mid]
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        with self._read() as conn:
            self._check_conversation(conn, conversation_id, owner_id)
            rows = conn.execute(sql, (*args, limit + 1)).fetchall()
        items = [_msg(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor(items[-1].created_at, items[-1].id) if more else None)

    # ---- feedback -------------------------------------------------------
    def set_feedback(self, message_id: str, owner_id: str, value: int, comment: Optional[str] = None) -> Feedback:
        """Rate one of the owner's messages: ``value`` 1 (thumbs up) or 0 (thumbs down), with an
        optional comment. A second call for the same (message, owner) replaces value, comment and
        ``created_at`` and keeps the feedback id. Raises NotFound (message missing/foreign),
        ValueError (value not 0 or 1)."""
        if isinstance(value, bool) or value not in (0, 1):
            raise ValueError(f"feedback value must be 0 or 1, got {value!r}")
        value = int(value)
        with self._write() as conn:
            row = conn.execute(
                "SELECT conversation_id FROM messages WHERE id = ? AND owner_id = ?", (message_id, owner_id)
            ).fetchone()
            if row is None:
                raise NotFound("No such message.")
            existing = conn.execute(
                "SELECT id FROM feedback WHERE message_id = ? AND owner_id = ?", (message_id, owner_id)
            ).fetchone()
            fb = Feedback(
                existing[0] if existing else uuid.uuid4().hex, message_id, row[0], owner_id, value, comment, self._clock()
            )
            if existing:
                conn.execute(
                    "UPDATE feedback SET value = ?, comment = ?, created_at = ? WHERE id = ?",
                    (fb.value, fb.comment, fb.created_at, fb.id),
                )
            else:
                conn.execute(f"INSERT INTO feedback ({_FB_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)", tuple(vars(fb).values()))
        return fb

    def delete_feedback(self, feedback_id: str, owner_id: str) -> None:
        """Raises NotFound (missing/foreign)."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM feedback WHERE id = ? AND owner_id = ?", (feedback_id, owner_id))
            if cur.rowcount == 0:
                raise NotFound("No such feedback.")

    def list_feedback(self, conversation_id: str, owner_id: str) -> list[Feedback]:
        """The owner's feedback on the conversation's messages, oldest ``created_at`` first.
        Raises NotFound for a missing/foreign conversation."""
        with self._read() as conn:
            self._check_conversation(conn, conversation_id, owner_id)
            rows = conn.execute(
                f"SELECT {_FB_COLS} FROM feedback WHERE conversation_id = ? AND owner_id = ?"
                " ORDER BY created_at, id",
                (conversation_id, owner_id),
            ).fetchall()
        return [_fb(r) for r in rows]

    # ---- attachments ----------------------------------------------------
    def _file_path(self, owner_id: str, sha256: str) -> Path:
        if not _SAFE_ID.fullmatch(owner_id):
            raise NotFound("No such user.")
        return self.files_dir / owner_id / sha256

    @staticmethod
    def _write_file(path: Path, data: bytes) -> None:
        """Write ``path`` atomically (temp file, fsync, ``os.replace``), mode 0600. Raises OSError."""
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

    def save_attachment(self, owner_id: str, name: str, mime: str, data: bytes) -> Attachment:
        """Store ``data`` at ``files/<owner_id>/<sha256>`` (atomic temp file +
        ``os.replace``; identical bytes are written once) and record its metadata.

        The file is written before the write transaction and checked again inside it:
        deletions remove shared files only while holding the write lock, so a file that
        vanished in between is written again and a recorded attachment never lacks its bytes.
        Raises NotFound when ``owner_id`` is not a user, StoreUnavailable on I/O failure."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._file_path(owner_id, digest)
        if self.get_user(owner_id) is None:
            raise NotFound("No such user.")
        try:
            try:
                present = path.stat().st_size == len(data)  # one stat: a concurrent delete may move it
            except FileNotFoundError:
                present = False
            if not present:
                self._write_file(path, data)
        except OSError as exc:
            raise _unavailable(exc, self.db_path) from exc
        att = Attachment(uuid.uuid4().hex, owner_id, name, mime, len(data), digest, self._clock())
        try:
            with self._write() as conn:
                conn.execute(f"INSERT INTO attachments ({_ATT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)", tuple(vars(att).values()))
                if not path.is_file():  # removed by a concurrent delete of the last record sharing it
                    self._write_file(path, data)
        except sqlite3.IntegrityError:
            raise NotFound("No such user.") from None
        return att

    def delete_attachment(self, attachment_id: str, owner_id: str) -> None:
        """Delete the attachment's record, and its file once no other of the owner's attachment
        records shares the bytes (same sha256). Messages that list its id keep the id;
        ``get_attachment`` then raises NotFound for it. Raises NotFound (missing/foreign),
        StoreUnavailable."""
        trash: list[tuple[Path, Path]] = []
        try:
            with self._write() as conn:
                if not self._delete_attachment_rows(conn, owner_id, [attachment_id], trash):
                    raise NotFound("No such attachment.")
        except BaseException:
            self._restore(trash)
            raise
        self._empty(trash)

    def _delete_attachment_rows(
        self, conn: sqlite3.Connection, owner_id: str, attachment_ids: Sequence[str], trash: list[tuple[Path, Path]]
    ) -> int:
        """Inside a write transaction: delete the owner's attachment records among ``attachment_ids``
        and move each file no remaining record shares to a ``.trash-`` name beside it, appending
        (path, trash path) to ``trash`` (the caller empties it after COMMIT or restores it after a
        failure). Returns the number of records deleted. Raises StoreUnavailable on I/O failure."""
        shas: set[str] = set()
        deleted = 0
        for att_id in attachment_ids:
            row = conn.execute(
                "SELECT sha256 FROM attachments WHERE id = ? AND owner_id = ?", (att_id, owner_id)
            ).fetchone()
            if row is not None:
                conn.execute("DELETE FROM attachments WHERE id = ?", (att_id,))
                deleted += 1
                shas.add(row[0])
        for sha in sorted(shas):
            if conn.execute("SELECT 1 FROM attachments WHERE owner_id = ? AND sha256 = ? LIMIT 1", (owner_id, sha)).fetchone():
                continue
            path = self._file_path(owner_id, sha)
            aside = path.with_name(f".trash-{uuid.uuid4().hex}")
            try:
                os.replace(path, aside)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _unavailable(exc, self.db_path) from exc
            trash.append((path, aside))
        return deleted

    @staticmethod
    def _restore(trash: Iterable[tuple[Path, Path]]) -> None:
        """Put files moved aside back (the transaction that deleted their records failed)."""
        for path, aside in trash:
            with contextlib.suppress(OSError):
                os.replace(aside, path)

    @staticmethod
    def _empty(trash: Iterable[tuple[Path, Path]]) -> None:
        """Remove files moved aside, once their records' deletion is committed. Best effort:
        a leftover ``.trash-`` file is unreferenced garbage, never a dangling record."""
        for _path, aside in trash:
            with contextlib.suppress(OSError):
                os.unlink(aside)

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

    # ---- API keys ------------------------------------------------------------------
    # Every change is one write transaction (BEGIN IMMEDIATE): SQLite's write lock makes the
    # read-pick-update of acquire_api_key atomic across all processes sharing argus.db.
    def add_api_key(
        self, key_id: str, provider: str, source: str, fingerprint: str, ciphertext: Optional[bytes] = None
    ) -> ApiKeyRecord:
        """Store a new enabled key. Raises KeyExists, ValueError (see Store.add_api_key)."""
        check_api_key_fields(provider, source, fingerprint, key_id)
        rec = ApiKeyRecord(key_id, provider, source, fingerprint, "enabled", self._clock(), ciphertext=ciphertext)
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO api_keys (id, provider, source, fingerprint, state, created_at, ciphertext)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (rec.id, rec.provider, rec.source, rec.fingerprint, rec.state, rec.created_at, ciphertext),
                )
        except sqlite3.IntegrityError:
            raise KeyExists("This key is already in the pool.") from None
        return rec

    def get_api_key(self, key_id: str) -> ApiKeyRecord:
        with self._errors():
            row = self._conn().execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound("No such key.")
        return _key(row)

    def list_api_keys(self, provider: Optional[str] = None) -> list[ApiKeyRecord]:
        sql, args = f"SELECT {_KEY_COLS} FROM api_keys", ()
        if provider is not None:
            sql, args = sql + " WHERE provider = ?", (provider,)
        with self._errors():
            rows = self._conn().execute(sql + " ORDER BY created_at, id", args).fetchall()
        return [_key(r) for r in rows]

    def _update_key(self, key_id: str, assignments: str, args: tuple) -> ApiKeyRecord:
        with self._write() as conn:
            cur = conn.execute(f"UPDATE api_keys SET {assignments} WHERE id = ?", (*args, key_id))
            if cur.rowcount == 0:
                raise NotFound("No such key.")
            row = conn.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return _key(row)

    def set_api_key_state(self, key_id: str, state: str, *, error: Optional[str] = None) -> ApiKeyRecord:
        if state not in KEY_STATES:
            raise ValueError(f"state must be one of {KEY_STATES}, got {state!r}")
        sets, args = ["state = ?"], [state]
        if state == "enabled":
            sets.append("cooldown_until = 0")
        if error is not None:
            sets.append("last_error = ?")
            args.append(error)
        return self._update_key(key_id, ", ".join(sets), tuple(args))

    def cool_down_api_key(self, key_id: str, until: float, *, error: str = "") -> ApiKeyRecord:
        return self._update_key(
            key_id, "cooldown_until = MAX(cooldown_until, ?), last_error = ?", (float(until), error)
        )

    def delete_api_key(self, key_id: str) -> None:
        with self._write() as conn:
            if conn.execute("DELETE FROM api_keys WHERE id = ?", (key_id,)).rowcount == 0:
                raise NotFound("No such key.")

    def acquire_api_key(
        self,
        provider: str,
        model: str,
        *,
        now: float,
        day: str,
        rpm: Optional[int] = None,
        tpm: Optional[int] = None,
        rpd: Optional[int] = None,
        tokens: int = 0,
        env_ids: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> Optional[ApiKeyRecord]:
        """See Store.acquire_api_key: one write transaction reads the provider's enabled keys,
        picks (base.pick_api_key), and counts the request."""
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT {_KEY_COLS} FROM api_keys WHERE provider = ? AND state = 'enabled' AND cooldown_until <= ?"
                " ORDER BY last_seq, id",
                (provider, now),
            ).fetchall()
            ranked = pick_api_key(
                [_key(r) for r in rows], model, now=now, day=day, rpm=rpm, tpm=tpm, rpd=rpd, tokens=tokens,
                env_ids=env_ids, exclude=exclude,
            )
            if not ranked:
                return None
            best = ranked[0]
            seq = conn.execute("SELECT COALESCE(MAX(last_seq), 0) + 1 FROM api_keys").fetchone()[0]
            windows = {**best.windows, model: best.windows.get(model, KeyWindow()).add(now, day, requests=1)}
            conn.execute(
                "UPDATE api_keys SET last_seq = ?, last_used_at = ?, requests_total = requests_total + 1, windows = ?"
                " WHERE id = ?",
                (seq, now, dump_windows(windows), best.id),
            )
        return replace(
            best, last_seq=seq, last_used_at=now, requests_total=best.requests_total + 1, windows=windows
        )

    def record_api_usage(
        self,
        key_id: str,
        user_id: str,
        model: str,
        *,
        now: float,
        day: str,
        usage_day: str,
        input_tokens: int,
        output_tokens: int,
    ) -> None:
        if input_tokens < 0 or output_tokens < 0:
            raise ValueError("token counts must not be negative")
        tokens = input_tokens + output_tokens
        with self._write() as conn:
            row = conn.execute("SELECT windows FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if row is not None:
                windows = load_windows(row[0])
                windows[model] = windows.get(model, KeyWindow()).add(now, day, tokens=tokens)
                conn.execute(
                    "UPDATE api_keys SET tokens_total = tokens_total + ?, last_error = '', windows = ? WHERE id = ?",
                    (tokens, dump_windows(windows), key_id),
                )
            conn.execute(
                f"INSERT INTO api_usage ({_USAGE_COLS}) VALUES (?, ?, ?, ?, 1, ?, ?)"
                " ON CONFLICT (key_id, user_id, model, day) DO UPDATE SET requests = requests + 1,"
                " input_tokens = input_tokens + excluded.input_tokens, output_tokens = output_tokens + excluded.output_tokens",
                (key_id, user_id, model, usage_day, input_tokens, output_tokens),
            )

    def list_api_usage(
        self, *, since_day: str = "", key_id: Optional[str] = None, user_id: Optional[str] = None
    ) -> list[UsageBucket]:
        sql, args = f"SELECT {_USAGE_COLS} FROM api_usage WHERE day >= ?", [since_day]
        if key_id is not None:
            sql += " AND key_id = ?"
            args.append(key_id)
        if user_id is not None:
            sql += " AND user_id = ?"
            args.append(user_id)
        with self._errors():
            rows = self._conn().execute(sql + " ORDER BY day, key_id, user_id, model", args).fetchall()
        return [UsageBucket(*r) for r in rows]

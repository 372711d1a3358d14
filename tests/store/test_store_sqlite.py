"""SQLiteStore: the shared store contract (tests/support/store_contract.py) plus SQLite specifics
(files and modes on disk, locking, migrations, the full-text indexes).

The contract runs twice: with the FTS5 trigram indexes, and as on a SQLite without them
(the LIKE fallback every search takes for queries shorter than 3 characters).
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
import time
import uuid

import pytest

pytest.register_assert_rewrite("store_contract")

from tests.support.store_contract import HASH, StoreContract, contents, race, titles

import argus.store.sqlite as sqlite_mod
from argus.store import SQLiteStore, StoreUnavailable

# The schema as version 1 created it (copied, so later edits cannot change what this tests).
V1_DDL = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version) VALUES (1);
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
    attachment_ids  TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX messages_conversation_created ON messages (conversation_id, created_at, id);
"""


@pytest.fixture
def no_fts(monkeypatch):
    """Make SQLiteStore behave as on a SQLite without the trigram tokenizer (< 3.34)."""
    monkeypatch.setattr(sqlite_mod, "FTS_MIN_SQLITE", (999, 0, 0))


def _open_stores(data_dir):
    opened: list[SQLiteStore] = []

    def make(**kwargs) -> SQLiteStore:
        s = SQLiteStore(data_dir, **kwargs)
        opened.append(s)
        return s

    return make, opened


def _db(tmp_path, sub="data") -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / sub / "argus.db")


def _check_search(data_dir) -> None:
    """Both indexes match their tables exactly (call after a search or ``_catch_up``)."""
    conn = sqlite3.connect(data_dir / "search.db")
    conn.execute("ATTACH DATABASE ? AS argus", (str(data_dir / "argus.db"),))
    conn.execute("INSERT INTO argus.conversations_fts (conversations_fts) VALUES ('integrity-check')")
    conn.execute("INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")
    indexed = conn.execute("SELECT rowid, content FROM messages_fts ORDER BY rowid").fetchall()
    assert indexed == conn.execute("SELECT rowid, content FROM argus.messages ORDER BY rowid").fetchall()
    conn.close()


def _wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class TestSQLiteStoreLikeOnly(StoreContract):
    """The contract again, every search through the LIKE fallback."""

    @pytest.fixture
    def make_store(self, tmp_path, no_fts):
        make, opened = _open_stores(tmp_path / "data")
        yield make
        for s in opened:
            s.close()

    @pytest.fixture
    def store(self, make_store):
        s = make_store()
        assert not s._fts
        return s


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def make_store(self, tmp_path):
        make, opened = _open_stores(tmp_path / "data")
        yield make
        for s in opened:
            s.close()

    @pytest.fixture
    def store(self, make_store):
        s = make_store()
        assert s._fts, f"SQLite {sqlite3.sqlite_version} lacks FTS5/trigram: the search tests would only cover LIKE"
        return s

    # ---- on disk ----
    def test_files_and_modes_on_disk(self, store: SQLiteStore, tmp_path):
        u = store.create_user("a@example.com", "A", HASH)
        data = b"\x89PNG fake"
        a = store.save_attachment(u.id, "x.png", "image/png", data)
        path = tmp_path / "data" / "files" / u.id / a.sha256
        assert path.read_bytes() == data
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "data" / "argus.db").stat().st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == [a.sha256]  # no temp files left behind

    def test_schema_wal_and_indexes(self, store: SQLiteStore, tmp_path):
        conn = _db(tmp_path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(sqlite_mod.SCHEMA_VERSION,)]
        assert sqlite_mod.SCHEMA_VERSION == 4
        assert "token_version" in [r[1] for r in conn.execute("PRAGMA table_info(users)")]
        idx = {r[0]: r[1] for r in conn.execute("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'")}
        assert idx["messages_conversation_created"] == "messages"
        assert idx["api_keys_provider"] == "api_keys" and idx["api_usage_day"] == "api_usage"
        assert idx["conversations_owner_updated"] == "conversations"
        assert idx["feedback_conversation"] == "feedback"
        assert idx["attachments_owner_sha256"] == "attachments" and "attachments_owner" not in idx
        cols = [r[2] for r in conn.execute("PRAGMA index_info(messages_conversation_created)")]
        assert cols[:2] == ["conversation_id", "created_at"]
        assert "metadata" in [r[1] for r in conn.execute("PRAGMA table_info(conversations)")]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"feedback", "conversations_fts", "search_queue", "search_meta"} <= tables
        assert "messages_fts" not in tables  # it lives in search.db
        triggers = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        assert triggers == set(sqlite_mod._FTS_TRIGGERS)
        conn.close()
        search = sqlite3.connect(tmp_path / "data" / "search.db")
        assert search.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert {"messages_fts", "state"} <= {r[0] for r in search.execute("SELECT name FROM sqlite_master")}
        search.close()
        assert stat.S_IMODE((tmp_path / "data" / "search.db").stat().st_mode) == 0o600

    def test_reopen_keeps_data(self, store: SQLiteStore, make_store):
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "kept", "m", metadata={"x": [1]})
        store.close()
        again = make_store()
        assert again.get_user(u.id) == u
        assert again.get_conversation(c.id, u.id).metadata == {"x": [1]}
        assert titles(again, u.id, "kept") == {"kept"}

    def test_equal_timestamps_page_and_order_correctly(self, tmp_path):
        s = SQLiteStore(tmp_path / "d", clock=lambda: 1_700_000_000.0)
        u = s.create_user("a@example.com", "A", HASH)
        convs = {s.create_conversation(u.id, str(i), "m").id for i in range(45)}
        seen, cursor = [], None
        while True:
            page = s.list_conversations(u.id, limit=20, cursor=cursor)
            seen += [c.id for c in page.items]
            if not (cursor := page.next_cursor):
                break
        assert len(seen) == 45 and set(seen) == convs
        c = s.create_conversation(u.id, "t", "m")
        for i in range(5):
            s.add_message(c.id, u.id, "user", f"m{i}")
        assert [m.content for m in s.list_messages(c.id, u.id).items] == ["m4", "m3", "m2", "m1", "m0"]
        s.close()

    # ---- failures ----
    def test_unwritable_db_path_is_unavailable(self, tmp_path):
        (tmp_path / "d" / "argus.db").mkdir(parents=True)  # a directory where the file should be
        with pytest.raises(StoreUnavailable, match="Cannot open the database"):
            SQLiteStore(tmp_path / "d")
        (tmp_path / "file").write_text("x")
        with pytest.raises(StoreUnavailable):
            SQLiteStore(tmp_path / "file" / "sub")

    def test_locked_database_is_unavailable(self, tmp_path):
        s = SQLiteStore(tmp_path / "d", busy_timeout_ms=100)
        other = sqlite3.connect(tmp_path / "d" / "argus.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreUnavailable, match="busy"):
                s.create_user("a@example.com", "A", HASH)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert s.create_user("a@example.com", "A", HASH).role == "admin"  # works again once released
        s.close()

    def test_newer_schema_is_refused(self, tmp_path):
        SQLiteStore(tmp_path / "d").close()
        conn = sqlite3.connect(tmp_path / "d" / "argus.db")
        conn.execute("UPDATE schema_version SET version = 99")
        conn.commit()
        conn.close()
        with pytest.raises(StoreUnavailable, match="newer"):
            SQLiteStore(tmp_path / "d")

    def test_closed_store_is_unavailable(self, store: SQLiteStore):
        store.close()
        with pytest.raises(StoreUnavailable):
            store.count_users()

    def test_many_threads_share_the_store(self, store: SQLiteStore):
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "t", "m")
        results = race(16, lambda i: store.add_message(c.id, u.id, "user", f"m{i}"))
        assert all(not isinstance(r, Exception) for r in results), results
        page = store.list_messages(c.id, u.id, limit=100)
        assert len(page.items) == 16 and len({m.created_at for m in page.items}) == 16

    def test_metadata_must_be_json_safe(self, store: SQLiteStore):
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "t", "m")
        for bad in ({"s": {1, 2}}, {1: "int key"}, {"t": (1, 2)}, {"nan": float("nan")}, ["not", "a dict"], {"o": object()}):
            with pytest.raises(ValueError):
                store.create_conversation(u.id, "t", "m", metadata=bad)
            with pytest.raises(ValueError):
                store.update_conversation_metadata(c.id, u.id, bad)
        assert len(store.list_conversations(u.id).items) == 1
        with pytest.raises(ValueError):
            store.create_conversation(u.id, "t", "m", conversation_id="")
        with pytest.raises(ValueError):
            store.add_message(c.id, u.id, "user", "x", message_id="")
        with pytest.raises(ValueError):
            store.set_feedback(store.add_message(c.id, u.id, "assistant", "a").id, u.id, True)

    # ---- migrations ----
    def test_migrates_a_version_1_database(self, tmp_path):
        data = tmp_path / "d"
        data.mkdir()
        conn = sqlite3.connect(data / "argus.db")
        conn.executescript(V1_DDL)
        uid, cid, mid, aid = (uuid.uuid4().hex for _ in range(4))
        img = b"old image bytes"
        sha = hashlib.sha256(img).hexdigest()
        with conn:
            conn.execute("INSERT INTO users VALUES (?, 'old@example.com', 'Old', 'admin', ?, 1.0)", (uid, HASH))
            conn.execute("INSERT INTO conversations VALUES (?, ?, 'Старый разговор', 'smol', 2.0, 3.0)", (cid, uid))
            conn.execute("INSERT INTO attachments VALUES (?, ?, 'x.png', 'image/png', ?, ?, 2.5)", (aid, uid, len(img), sha))
            conn.execute(
                "INSERT INTO messages VALUES (?, ?, ?, 'assistant', 'سلام دنیا from before', 'complete', 'smol', 3.0, ?)",
                (mid, cid, uid, json.dumps([aid])),
            )
        conn.close()
        (data / "files" / uid).mkdir(parents=True)
        (data / "files" / uid / sha).write_bytes(img)

        s = SQLiteStore(data)
        conv = s.get_conversation(cid, uid)
        assert (conv.title, conv.updated_at, conv.metadata) == ("Старый разговор", 3.0, {})
        assert s.get_message(mid, uid).attachment_ids == (aid,)
        assert titles(s, uid, "разговор") == {"Старый разговор"}  # rows written before the index exist in it
        assert titles(s, uid, "РАЗГОВОР") == {"Старый разговор"}  # trigram folds Cyrillic case too
        assert titles(s, uid, "سلام") == {"Старый разговор"}
        assert contents(s, uid, "from before") == {"سلام دنیا from before"}
        f = s.set_feedback(mid, uid, 1, "still good")
        assert s.list_feedback(cid, uid) == [f]
        s.update_conversation_metadata(cid, uid, {"chat_profile": "x"})
        assert s.get_user(uid).token_version == 0  # users from before session versions start at 0
        assert s.bump_token_version(uid) == 1
        s.close()

        conn = sqlite3.connect(data / "argus.db")
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(sqlite_mod.SCHEMA_VERSION,)]
        conn.close()
        _check_search(data)
        again = SQLiteStore(data)  # a second open migrates nothing and indexes nothing twice
        assert again.get_conversation(cid, uid).metadata == {"chat_profile": "x"}
        assert [m.id for m in again.search_messages(uid, "سلام")] == [mid]
        again.delete_conversation(cid, uid)
        assert not (data / "files" / uid / sha).exists()
        again.close()

    def test_fts_is_added_to_a_database_created_without_it(self, tmp_path, monkeypatch):
        monkeypatch.setattr(sqlite_mod, "FTS_MIN_SQLITE", (999, 0, 0))
        old = SQLiteStore(tmp_path / "d")
        u = old.create_user("a@example.com", "A", HASH)
        c = old.create_conversation(u.id, "Weekly Report", "m")
        old.add_message(c.id, u.id, "user", "quarterly numbers")
        assert not old._fts and titles(old, u.id, "report") == {"Weekly Report"}
        old.close()
        monkeypatch.undo()
        new = SQLiteStore(tmp_path / "d")
        assert new._fts
        assert titles(new, u.id, "REPORT") == {"Weekly Report"}
        assert contents(new, u.id, "rterly") == {"quarterly numbers"}
        new.close()

    def test_fts_database_refused_without_fts(self, tmp_path, monkeypatch):
        SQLiteStore(tmp_path / "d").close()
        monkeypatch.setattr(sqlite_mod, "FTS_MIN_SQLITE", (999, 0, 0))
        with pytest.raises(StoreUnavailable, match="full-text"):
            SQLiteStore(tmp_path / "d")

    # ---- search internals ----
    def test_fts_indexes_stay_in_sync(self, store: SQLiteStore, tmp_path):
        u = store.create_user("a@example.com", "A", HASH)
        c1 = store.create_conversation(u.id, "first", "m")
        c2 = store.create_conversation(u.id, "second", "m")
        ms = [store.add_message(c.id, u.id, "user", f"text {i} {c.title}") for i, c in enumerate((c1, c2, c1, c2))]
        store.search_messages(u.id, "text")  # indexed now; the changes below go through the queue again
        store.update_message(ms[0].id, u.id, content="changed", status="complete")
        store.update_message(ms[1].id, u.id, content=ms[1].content, status="stopped")  # status only
        store.add_message(c1.id, u.id, "user", "upserted", message_id=ms[2].id)
        store.delete_message(ms[3].id, u.id)
        store.rename_conversation(c2.id, u.id, "renamed")
        store.add_message(c2.id, u.id, "user", "late text")
        store.delete_conversation(c1.id, u.id)
        assert contents(store, u.id, "text") == {"text 1 second", "late text"}
        _check_search(tmp_path / "data")

    def test_background_indexer_catches_up_and_prunes(self, store: SQLiteStore, tmp_path, monkeypatch):
        monkeypatch.setattr(sqlite_mod, "INDEX_DELAY", 0.01)
        monkeypatch.setattr(sqlite_mod, "INDEX_BATCH", 7)  # several transactions
        monkeypatch.setattr(sqlite_mod, "PRUNE_EVERY", 0.0)
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "t", "m")
        ms = [store.add_message(c.id, u.id, "user", f"message {i}") for i in range(30)]
        _wait_for(lambda: store._search_backlog(store._search_conn()) == 0)  # new messages: read in batches
        for m in ms:  # changes to indexed messages: queued
            store.update_message(m.id, u.id, content=m.content.replace("message", "edited"), status="complete")
        main = _db(tmp_path)
        # applied and pruned, but for the newest entry (it keeps seq from being reused)
        _wait_for(lambda: main.execute("SELECT COUNT(*), MAX(seq) FROM search_queue").fetchone() == (1, 30))
        assert main.execute("SELECT pruned FROM search_meta").fetchone() == (29,)
        main.close()
        assert store._search_backlog(store._search_conn()) == 0
        _check_search(tmp_path / "data")
        store.add_message(c.id, u.id, "user", "one more")
        assert contents(store, u.id, "one more") == {"one more"}
        assert len(store.search_messages(u.id, "edited", limit=50)) == 30
        assert store._search_backlog(store._search_conn()) == 0
        _check_search(tmp_path / "data")
        store.close()
        assert not store._indexer.is_alive()

    def test_only_changes_below_the_watermark_are_queued(self, store: SQLiteStore, tmp_path):
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "t", "m")
        ms = [store.add_message(c.id, u.id, "user", f"first {i}") for i in range(10)]
        main = _db(tmp_path)
        def queued() -> int:
            return main.execute("SELECT COUNT(*) FROM search_queue").fetchone()[0]

        assert queued() == 0  # appends add nothing to the queue
        store.search_messages(u.id, "first")  # the index reads them; the watermark moves up
        store.add_message(c.id, u.id, "user", "second")
        assert queued() == 0
        store.update_message(ms[0].id, u.id, content="first, edited", status="complete")
        store.delete_message(ms[1].id, u.id)
        assert queued() == 2
        # a reused rowid: delete the newest indexed message, append another (SQLite reuses max + 1)
        newest = store.add_message(c.id, u.id, "user", "third")
        store.search_messages(u.id, "third")
        rowid = main.execute("SELECT rowid FROM messages WHERE id = ?", (newest.id,)).fetchone()[0]
        store.delete_message(newest.id, u.id)
        store.search_messages(u.id, "third")  # the deletion is applied first
        again = store.add_message(c.id, u.id, "user", "fourth")
        assert main.execute("SELECT rowid FROM messages WHERE id = ?", (again.id,)).fetchone()[0] == rowid
        main.close()
        assert contents(store, u.id, "fourth") == {"fourth"}
        assert contents(store, u.id, "third") == set()
        _check_search(tmp_path / "data")

    def test_appends_never_wait_for_the_search_index(self, tmp_path):
        s = SQLiteStore(tmp_path / "d", busy_timeout_ms=200)
        u = s.create_user("a@example.com", "A", HASH)
        c = s.create_conversation(u.id, "t", "m")
        blocker = sqlite3.connect(tmp_path / "d" / "search.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # as a long indexing transaction of another process would
        try:
            t0 = time.perf_counter()
            for i in range(20):
                s.add_message(c.id, u.id, "user", f"hello {i}")
            assert time.perf_counter() - t0 < 0.15  # not one busy wait
            assert len(s.search_messages(u.id, "he")) == 20  # the LIKE path does not need the index
            with pytest.raises(StoreUnavailable, match="busy"):
                s.search_messages(u.id, "hello")  # the index cannot catch up while it is locked
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert len(s.search_messages(u.id, "hello")) == 20
        s.close()

    def test_another_instance_sees_new_messages_at_once(self, store: SQLiteStore, make_store):
        other = make_store()
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "t", "m")
        for i in range(5):
            store.add_message(c.id, u.id, "user", f"from worker one {i}")
            assert len(other.search_messages(u.id, "worker one")) == i + 1
            other.add_message(c.id, u.id, "user", f"from worker two {i}")
            assert len(store.search_messages(u.id, "worker two")) == i + 1

    def test_search_db_deleted_or_damaged_is_rebuilt(self, store: SQLiteStore, make_store, tmp_path):
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "t", "m")
        store.add_message(c.id, u.id, "user", "remember the zebra")
        store.close()
        data = tmp_path / "data"
        for suffix in ("", "-wal", "-shm"):
            (data / f"search.db{suffix}").unlink(missing_ok=True)
        again = make_store()
        assert contents(again, u.id, "zebra") == {"remember the zebra"}
        again.close()
        for suffix in ("-wal", "-shm"):
            (data / f"search.db{suffix}").unlink(missing_ok=True)
        (data / "search.db").write_bytes(b"this is not a database" * 100)
        third = make_store()
        assert contents(third, u.id, "zebra") == {"remember the zebra"}
        _check_search(data)

    def test_index_older_than_the_pruned_queue_is_rebuilt(self, store: SQLiteStore, tmp_path):
        """E.g. search.db restored from an old backup: entries it never saw are gone from the queue."""
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "t", "m")
        m1 = store.add_message(c.id, u.id, "user", "before the backup")
        store.search_messages(u.id, "before")
        backup = sqlite3.connect(tmp_path / "data" / "search.db", isolation_level=None)
        old = backup.execute("SELECT hwm, wm FROM state").fetchone()
        store.update_message(m1.id, u.id, content="edited after the backup", status="complete")  # queued
        m2 = store.add_message(c.id, u.id, "user", "later")
        store.search_messages(u.id, "later")
        store.update_message(m2.id, u.id, content="later still", status="complete")  # queued
        store.search_messages(u.id, "later")
        store._prune()  # drops the first entry, which the old index never applied
        backup.execute("UPDATE state SET hwm = ?, wm = ?", old)  # "restore" the old index position
        backup.execute("INSERT INTO messages_fts (rowid, content) VALUES (999, 'a ghost after all')")
        backup.close()
        assert contents(store, u.id, "after") == {"edited after the backup"}
        _check_search(tmp_path / "data")

    def test_big_backlog_is_indexed_in_the_background(self, tmp_path, monkeypatch):
        s = SQLiteStore(tmp_path / "d")
        u = s.create_user("a@example.com", "A", HASH)
        c = s.create_conversation(u.id, "t", "m")
        s.close()
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / "d" / f"search.db{suffix}").unlink(missing_ok=True)
        conn = sqlite3.connect(tmp_path / "d" / "argus.db")
        with conn:
            conn.executemany(
                "INSERT INTO messages VALUES (?, ?, ?, 'user', ?, 'complete', 'm', ?, '[]')",
                [(uuid.uuid4().hex, c.id, u.id, f"bulk {i}", float(i)) for i in range(50)],
            )
        conn.close()
        monkeypatch.setattr(sqlite_mod, "INDEX_BATCH", 10)
        monkeypatch.setattr(sqlite_mod, "INDEX_DELAY", 0.01)
        s = SQLiteStore(tmp_path / "d")
        assert s._indexer is not None  # not indexed during the open
        _wait_for(lambda: s._search_backlog(s._search_conn()) == 0)
        assert len(s.search_messages(u.id, "bulk", limit=100)) == 50
        s.close()

    def test_search_queries_use_the_indexes(self, store: SQLiteStore):
        u = store.create_user("a@example.com", "A", HASH)
        for i in range(30):
            c = store.create_conversation(u.id, f"chat {i}", "m")
            store.add_message(c.id, u.id, "user", f"hello {i}")
        conn = store._catch_up()
        statements: list[str] = []
        conn.set_trace_callback(statements.append)
        try:
            page = store.list_conversations(u.id, limit=5, search="hello")
            store.list_conversations(u.id, limit=5, cursor=page.next_cursor, search="hello")
            store.search_messages(u.id, "hello")
        finally:
            conn.set_trace_callback(None)
        selects = [s for s in statements if s.startswith("SELECT") and "ORDER BY" in s]
        assert len(selects) == 3

        def plan(sql: str) -> str:
            return "\n".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql))

        for sql in selects[:2]:
            p = plan(sql)
            assert "USING INDEX conversations_owner_updated" in p, p
            assert p.count("VIRTUAL TABLE INDEX") == 2 and "TEMP B-TREE FOR ORDER BY" not in p, p
        assert "(owner_id=? AND (updated_at,id)<(?,?))" in plan(selects[1])  # the cursor seeks the index
        assert "VIRTUAL TABLE INDEX" in plan(selects[2]), plan(selects[2])

    # ---- attachments on disk ----
    def test_deletes_remove_files_on_disk(self, store: SQLiteStore, tmp_path):
        u = store.create_user("a@example.com", "A", HASH)
        files = tmp_path / "data" / "files" / u.id
        c1 = store.create_conversation(u.id, "one", "m")
        c2 = store.create_conversation(u.id, "two", "m")
        only = store.save_attachment(u.id, "a.png", "image/png", b"only in c1")
        shared1 = store.save_attachment(u.id, "b.png", "image/png", b"shared bytes")
        shared2 = store.save_attachment(u.id, "c.png", "image/png", b"shared bytes")
        store.add_message(c1.id, u.id, "user", "x", attachment_ids=[only.id, shared1.id])
        store.add_message(c2.id, u.id, "user", "y", attachment_ids=[shared2.id])
        store.delete_conversation(c1.id, u.id)
        assert sorted(p.name for p in files.iterdir()) == [shared1.sha256]  # no .trash- left behind
        store.delete_attachment(shared2.id, u.id)
        assert list(files.iterdir()) == []

    def test_failed_delete_puts_files_back(self, store: SQLiteStore, tmp_path, monkeypatch):
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "one", "m")
        a = store.save_attachment(u.id, "a.png", "image/png", b"precious")
        store.add_message(c.id, u.id, "user", "x", attachment_ids=[a.id])
        real = SQLiteStore._delete_attachment_rows

        def then_fail(self, conn, owner_id, ids, trash):
            real(self, conn, owner_id, ids, trash)
            assert trash  # the file was moved aside
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(SQLiteStore, "_delete_attachment_rows", then_fail)
        with pytest.raises(StoreUnavailable):
            store.delete_conversation(c.id, u.id)
        with pytest.raises(StoreUnavailable):
            store.delete_attachment(a.id, u.id)
        monkeypatch.undo()
        assert store.get_conversation(c.id, u.id).title == "one"  # rolled back
        assert store.get_attachment(a.id, u.id)[1] == b"precious"  # and the file is back
        assert [p.name for p in (tmp_path / "data" / "files" / u.id).iterdir()] == [a.sha256]

    def test_save_rewrites_a_file_deleted_meanwhile(self, store: SQLiteStore, monkeypatch):
        """A delete of the last record sharing the bytes may remove the file between the save's
        file write and its transaction; the save notices inside the transaction."""
        u = store.create_user("a@example.com", "A", HASH)
        real = SQLiteStore._write_file
        calls = []

        def write_then_lose(path, data):
            real(path, data)
            calls.append(path)
            if len(calls) == 1:
                path.unlink()  # as the concurrent delete would

        monkeypatch.setattr(SQLiteStore, "_write_file", staticmethod(write_then_lose))
        a = store.save_attachment(u.id, "a.png", "image/png", b"bytes")
        assert len(calls) == 2
        monkeypatch.undo()
        assert store.get_attachment(a.id, u.id)[1] == b"bytes"

    def test_concurrent_save_and_delete_of_shared_bytes(self, store: SQLiteStore):
        u = store.create_user("a@example.com", "A", HASH)
        for _ in range(20):
            first = store.save_attachment(u.id, "a.png", "image/png", b"contended")

            def delete_or_save(i, first_id=first.id):
                if i == 0:
                    return store.delete_attachment(first_id, u.id)
                return store.save_attachment(u.id, f"{i}.png", "image/png", b"contended")

            results = race(8, delete_or_save)
            for r in results:
                if r is not None:
                    assert not isinstance(r, Exception), r
                    assert store.get_attachment(r.id, u.id)[1] == b"contended"
                    store.delete_attachment(r.id, u.id)

    def test_search_with_fixed_clock_pages_exactly(self, tmp_path):
        s = SQLiteStore(tmp_path / "d", clock=lambda: 1_700_000_000.0)
        u = s.create_user("a@example.com", "A", HASH)
        want = {s.create_conversation(u.id, f"match {i}", "m").id for i in range(23)}
        for i in range(10):
            s.create_conversation(u.id, f"other {i}", "m")
        seen, cursor = [], None
        while True:
            page = s.list_conversations(u.id, limit=7, cursor=cursor, search="match")
            seen += [c.id for c in page.items]
            if not (cursor := page.next_cursor):
                break
        assert len(seen) == 23 and set(seen) == want
        s.close()

    def test_big_search_uses_the_index_not_a_scan(self, store: SQLiteStore, tmp_path):
        """Another user's 20,000 messages, then 20,000 more: the owner's search does no more work
        with twice the data, counted in SQLite virtual-machine steps (the progress handler), which
        no load on the machine changes; a scan's work doubles. Speed goals belong to bench/store.py."""
        u = store.create_user("a@example.com", "A", HASH)
        other = store.create_user("b@example.com", "B", HASH)
        conn = store._conn()

        def add_others(first: int) -> None:
            conn.execute("BEGIN")
            rows = []
            for i in range(first, first + 2000):
                cid = uuid.uuid4().hex
                conn.execute("INSERT INTO conversations (id, owner_id, title, model, created_at, updated_at) "
                             "VALUES (?, ?, ?, 'm', ?, ?)", (cid, other.id, f"chat {i}", float(i), float(i)))
                rows += [(uuid.uuid4().hex, cid, other.id, "user", f"some ordinary words {i} {j}", "complete", "m",
                          float(i) + j / 100, "[]") for j in range(10)]
            conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.execute("COMMIT")

        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0  # 0: go on

        def work(run) -> int:
            steps[0] = 0
            conn.set_progress_handler(count, 100)  # called every 100 VM instructions
            try:
                run()
            finally:
                conn.set_progress_handler(None, 100)
            return steps[0]

        def search() -> None:
            assert [x.id for x in store.list_conversations(u.id, search="zebra").items] == [c.id]
            assert len(store.search_messages(u.id, "zebra")) == 1

        def scan() -> None:
            conn.execute("SELECT count(*) FROM messages WHERE content LIKE '%zebra%'").fetchone()

        add_others(0)
        c = store.create_conversation(u.id, "mine", "m")
        store.add_message(c.id, u.id, "user", "a rare zebra")
        indexed, scanned = work(search), work(scan)
        add_others(2000)
        indexed2, scanned2 = work(search), work(scan)
        assert scanned2 > 1.8 * scanned  # the yardstick: a scan's work follows the data
        assert indexed2 <= 1.2 * indexed + 5, (indexed, indexed2)

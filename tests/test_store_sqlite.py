"""Store contract tests, run against SQLiteStore.

``StoreContract`` holds backend-independent tests; a backend subclasses it and
provides a ``store`` fixture (a fresh, empty store). A MongoDB store can reuse
it as ``class TestMongoStore(StoreContract)``.
"""
from __future__ import annotations

import hashlib
import sqlite3
import stat
import threading

import pytest

from argus.store import NotFound, SQLiteStore, StoreUnavailable, UserExists
from argus.store.base import Store

HASH = "$2b$04$" + "x" * 53  # stand-in: the store never inspects hashes


def _race(n: int, fn):
    """Run fn(i) in n threads released at the same instant; return results/exceptions."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - collected for the assertions
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


class StoreContract:
    """Tests every Store implementation must pass. Subclasses define ``store``."""

    @pytest.fixture
    def alice(self, store: Store):
        return store.create_user("alice@example.com", "Alice", HASH)

    @pytest.fixture
    def bob(self, store: Store, alice):
        return store.create_user("bob@example.com", "Bob", HASH)

    # ---- users ----
    def test_create_and_get_user(self, store: Store):
        u = store.create_user("  Alice@Example.COM ", "Alice", HASH)
        assert u.email == "alice@example.com"
        assert u.name == "Alice" and u.password_hash == HASH
        assert store.get_user(u.id) == u
        assert store.get_user_by_email("ALICE@example.com") == u
        assert store.get_user_by_email("nobody@example.com") is None
        assert store.get_user("nope") is None
        assert store.count_users() == 1

    def test_duplicate_email_is_case_insensitive(self, store: Store, alice):
        with pytest.raises(UserExists):
            store.create_user("ALICE@example.com ", "Other", HASH)
        assert store.count_users() == 1

    def test_first_user_is_admin_then_users(self, store: Store):
        assert store.create_user("a@example.com", "A", HASH).role == "admin"
        assert store.create_user("b@example.com", "B", HASH).role == "user"
        assert store.create_user("c@example.com", "C", HASH, role="admin").role == "admin"

    def test_racing_first_signups_make_exactly_one_admin(self, store: Store):
        results = _race(8, lambda i: store.create_user(f"user{i}@example.com", f"U{i}", HASH))
        assert all(not isinstance(r, Exception) for r in results), results
        assert [r.role for r in results].count("admin") == 1
        assert store.count_users() == 8

    def test_racing_same_email_creates_one_user(self, store: Store):
        results = _race(8, lambda i: store.create_user(("SAME@example.com" if i % 2 else "same@EXAMPLE.com"), "S", HASH))
        created = [r for r in results if not isinstance(r, Exception)]
        assert len(created) == 1 and created[0].role == "admin"
        assert all(isinstance(r, UserExists) for r in results if r is not created[0])
        assert store.count_users() == 1

    # ---- conversations ----
    def test_conversations_newest_first_and_paging_is_complete(self, store: Store, alice, bob):
        made = [store.create_conversation(alice.id, f"c{i}", "m") for i in range(45)]
        store.create_conversation(bob.id, "bob's", "m")
        seen, cursor, pages = [], None, 0
        while True:
            page = store.list_conversations(alice.id, limit=20, cursor=cursor)
            pages += 1
            seen += page.items
            if pages == 1:  # inserts while paging must not shift later pages
                for i in range(3):
                    store.create_conversation(alice.id, f"new{i}", "m")
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert pages == 3
        assert len(seen) == 45 and {c.id for c in seen} == {c.id for c in made}
        keys = [(c.updated_at, c.id) for c in seen]
        assert keys == sorted(keys, reverse=True)
        assert store.list_conversations(alice.id, limit=20).items[0].title == "new2"

    def test_add_message_bumps_conversation_to_top(self, store: Store, alice):
        old = store.create_conversation(alice.id, "old", "m")
        store.create_conversation(alice.id, "new", "m")
        store.add_message(old.id, alice.id, "user", "hi")
        top = store.list_conversations(alice.id).items[0]
        assert top.id == old.id and top.updated_at > old.updated_at

    def test_get_and_rename_conversation(self, store: Store, alice):
        c = store.create_conversation(alice.id, "Title", "smol")
        assert store.get_conversation(c.id, alice.id) == c
        renamed = store.rename_conversation(c.id, alice.id, "مرحبا")
        assert renamed.title == "مرحبا" and store.get_conversation(c.id, alice.id).title == "مرحبا"

    def test_bad_cursor_and_limit(self, store: Store, alice):
        with pytest.raises(ValueError):
            store.list_conversations(alice.id, cursor="not a cursor!")
        with pytest.raises(ValueError):
            store.list_conversations(alice.id, limit=0)

    # ---- ownership ----
    def test_other_users_records_are_not_found(self, store: Store, alice, bob):
        c = store.create_conversation(alice.id, "private", "m")
        m = store.add_message(c.id, alice.id, "user", "secret")
        a = store.save_attachment(alice.id, "x.png", "image/png", b"png bytes")
        for call in (
            lambda: store.get_conversation(c.id, bob.id),
            lambda: store.rename_conversation(c.id, bob.id, "mine now"),
            lambda: store.add_message(c.id, bob.id, "user", "hi"),
            lambda: store.list_messages(c.id, bob.id),
            lambda: store.update_message(m.id, bob.id, content="x", status="complete"),
            lambda: store.get_attachment(a.id, bob.id),
        ):
            with pytest.raises(NotFound):
                call()
        assert store.get_conversation(c.id, alice.id).title == "private"
        assert store.list_messages(c.id, alice.id).items[0].content == "secret"
        assert store.list_conversations(bob.id).items == []

    def test_missing_records_are_not_found(self, store: Store, alice):
        with pytest.raises(NotFound):
            store.get_conversation("nope", alice.id)
        with pytest.raises(NotFound):
            store.get_attachment("nope", alice.id)
        with pytest.raises(NotFound):
            store.create_conversation("no-such-user", "t", "m")

    def test_message_cannot_reference_foreign_attachment(self, store: Store, alice, bob):
        c = store.create_conversation(bob.id, "t", "m")
        a = store.save_attachment(alice.id, "x.png", "image/png", b"alice's")
        with pytest.raises(NotFound):
            store.add_message(c.id, bob.id, "user", "look", attachment_ids=[a.id])

    # ---- messages ----
    def test_messages_paging_newest_first(self, store: Store, alice):
        c = store.create_conversation(alice.id, "t", "m")
        made = [store.add_message(c.id, alice.id, "user" if i % 2 else "assistant", f"m{i}") for i in range(7)]
        seen, cursor = [], None
        while True:
            page = store.list_messages(c.id, alice.id, limit=3, cursor=cursor)
            assert len(page.items) <= 3
            seen += page.items
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert [m.content for m in seen] == [f"m{i}" for i in reversed(range(7))]
        assert [m.id for m in seen] == [m.id for m in reversed(made)]

    def test_update_message(self, store: Store, alice):
        c = store.create_conversation(alice.id, "t", "m")
        m = store.add_message(c.id, alice.id, "assistant", "", status="complete", model="smol")
        updated = store.update_message(m.id, alice.id, content="partial answer", status="stopped")
        assert (updated.content, updated.status, updated.model, updated.id) == ("partial answer", "stopped", "smol", m.id)
        assert store.list_messages(c.id, alice.id).items[0] == updated
        with pytest.raises(ValueError):
            store.update_message(m.id, alice.id, content="x", status="bogus")
        with pytest.raises(NotFound):
            store.update_message("nope", alice.id, content="x", status="complete")

    def test_invalid_message_role(self, store: Store, alice):
        c = store.create_conversation(alice.id, "t", "m")
        with pytest.raises(ValueError):
            store.add_message(c.id, alice.id, "robot", "hi")

    # ---- attachments ----
    def test_attachment_round_trip(self, store: Store, alice):
        data = bytes(range(256)) * 100
        a = store.save_attachment(alice.id, "photo.jpg", "image/jpeg", data)
        assert (a.name, a.mime, a.size, a.sha256) == ("photo.jpg", "image/jpeg", len(data), hashlib.sha256(data).hexdigest())
        got, got_bytes = store.get_attachment(a.id, alice.id)
        assert got == a and got_bytes == data
        c = store.create_conversation(alice.id, "t", "m")
        m = store.add_message(c.id, alice.id, "user", "see", attachment_ids=[a.id])
        assert m.attachment_ids == (a.id,)
        assert store.list_messages(c.id, alice.id).items[0].attachment_ids == (a.id,)
        again = store.save_attachment(alice.id, "copy.jpg", "image/jpeg", data)
        assert again.id != a.id and store.get_attachment(again.id, alice.id)[1] == data


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        s = SQLiteStore(tmp_path / "data")
        yield s
        s.close()

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
        conn = sqlite3.connect(tmp_path / "data" / "argus.db")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
        idx = {r[0]: r[1] for r in conn.execute("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'")}
        assert idx["messages_conversation_created"] == "messages"
        assert idx["conversations_owner_updated"] == "conversations"
        cols = [r[2] for r in conn.execute("PRAGMA index_info(messages_conversation_created)")]
        assert cols[:2] == ["conversation_id", "created_at"]
        conn.close()

    def test_reopen_keeps_data(self, store: SQLiteStore, tmp_path):
        u = store.create_user("a@example.com", "A", HASH)
        store.close()
        again = SQLiteStore(tmp_path / "data")
        assert again.get_user(u.id) == u
        again.close()

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
        results = _race(16, lambda i: store.add_message(c.id, u.id, "user", f"m{i}"))
        assert all(not isinstance(r, Exception) for r in results), results
        page = store.list_messages(c.id, u.id, limit=100)
        assert len(page.items) == 16 and len({m.created_at for m in page.items}) == 16

"""The store contract: backend-independent tests every :class:`argus.store.base.Store` must pass.

Use it from a test module::

    import pytest
    pytest.register_assert_rewrite("store_contract")  # before the import: readable assert messages
    from store_contract import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store(self):            # a fresh, empty store; closed afterwards
            ...

        @pytest.fixture
        def make_store(self, store):  # () -> another instance over the SAME data as ``store``
            ...                       # (as a second worker process would open it); closed afterwards

No SQL and no backend internals here: only the public Store API. Times only
ever compare as "later than", with short sleeps where an order must be certain.
"""
from __future__ import annotations

import hashlib
import threading
import time

import pytest

from argus.store.base import KeyExists, NotFound, Store, UserExists

HASH = "$2b$04$" + "x" * 53  # stand-in: the store never inspects hashes
TICK = 0.01  # seconds slept where a later timestamp must be strictly later


def race(n: int, fn):
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


def all_conversations(store: Store, owner_id: str, *, limit: int = 20, search=None) -> list:
    """Every conversation by following next_cursor; checks the page size along the way."""
    seen, cursor = [], None
    for _ in range(1000):
        page = store.list_conversations(owner_id, limit=limit, cursor=cursor, search=search)
        assert len(page.items) <= limit
        seen += page.items
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor
    raise AssertionError("paging does not end")


def titles(store: Store, owner_id: str, search: str) -> set[str]:
    return {c.title for c in all_conversations(store, owner_id, search=search)}


def contents(store: Store, owner_id: str, text: str) -> set[str]:
    return {m.content for m in store.search_messages(owner_id, text, limit=200)}


class StoreContract:
    """Tests every Store implementation must pass. Subclasses define ``store`` and ``make_store``."""

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
        assert {u.email for u in store.list_users()} == {"a@example.com", "b@example.com", "c@example.com"}

    def test_racing_first_signups_make_exactly_one_admin(self, store: Store):
        results = race(8, lambda i: store.create_user(f"user{i}@example.com", f"U{i}", HASH))
        assert all(not isinstance(r, Exception) for r in results), results
        assert [r.role for r in results].count("admin") == 1
        assert store.count_users() == 8

    def test_racing_same_email_creates_one_user(self, store: Store):
        results = race(8, lambda i: store.create_user(("SAME@example.com" if i % 2 else "same@EXAMPLE.com"), "S", HASH))
        created = [r for r in results if not isinstance(r, Exception)]
        assert len(created) == 1 and created[0].role == "admin"
        assert all(isinstance(r, UserExists) for r in results if r is not created[0]), results
        assert store.count_users() == 1

    def test_racing_same_email_across_instances_creates_one_user(self, store: Store, make_store):
        """Two workers on one database: uniqueness comes from the database, not a process lock."""
        other = make_store()
        results = race(8, lambda i: (store if i % 2 else other).create_user("same@example.com", "S", HASH))
        created = [r for r in results if not isinstance(r, Exception)]
        assert len(created) == 1, results
        assert all(isinstance(r, UserExists) for r in results if r is not created[0]), results
        assert store.count_users() == other.count_users() == 1

    # ---- session token versions ----
    def test_new_users_start_at_token_version_zero(self, store: Store, alice):
        assert alice.token_version == 0
        assert store.get_user(alice.id).token_version == 0
        assert store.get_user_by_email("alice@example.com").token_version == 0

    def test_bump_token_version_counts_up_and_is_per_user(self, store: Store, alice, bob):
        assert store.bump_token_version(alice.id) == 1
        assert store.bump_token_version(alice.id) == 2
        assert store.get_user(alice.id).token_version == 2
        assert store.get_user_by_email("alice@example.com").token_version == 2
        assert store.get_user(bob.id).token_version == 0
        assert {u.email: u.token_version for u in store.list_users()} == {"alice@example.com": 2, "bob@example.com": 0}

    def test_racing_bumps_across_instances_are_never_lost(self, store: Store, make_store, alice):
        """Two sign-outs at once (two workers) must both count: each gets its own new version."""
        other = make_store()
        results = race(8, lambda i: (store if i % 2 else other).bump_token_version(alice.id))
        assert sorted(results) == list(range(1, 9)), results
        assert other.get_user(alice.id).token_version == 8

    def test_set_password_hash_replaces_the_hash_and_bumps_the_version(self, store: Store, alice):
        new_hash = "$2b$04$" + "y" * 53
        updated = store.set_password_hash(alice.id, new_hash)
        assert updated.password_hash == new_hash and updated.token_version == 1
        assert (updated.id, updated.email, updated.name, updated.role, updated.created_at) == (
            alice.id, alice.email, alice.name, alice.role, alice.created_at
        )
        assert store.get_user(alice.id) == updated
        assert store.get_user_by_email("alice@example.com").password_hash == new_hash

    def test_token_version_of_unknown_user_is_not_found(self, store: Store, alice):
        with pytest.raises(NotFound):
            store.bump_token_version("nope")
        with pytest.raises(NotFound):
            store.set_password_hash("nope", HASH)
        assert store.get_user(alice.id).token_version == 0

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
        time.sleep(TICK)
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

    def test_create_conversation_with_given_id_is_idempotent(self, store: Store, alice, bob):
        c = store.create_conversation(alice.id, "Thread", "smol", conversation_id="thread-1", metadata={"k": 1})
        assert (c.id, c.title, c.model, c.metadata) == ("thread-1", "Thread", "smol", {"k": 1})
        again = store.create_conversation(alice.id, "Other title", "other", conversation_id="thread-1", metadata={"k": 2})
        assert again == c and again.metadata == {"k": 1}  # returned unchanged
        assert [x.id for x in store.list_conversations(alice.id).items] == ["thread-1"]
        with pytest.raises(NotFound):  # someone else's thread id: indistinguishable from "no such user"
            store.create_conversation(bob.id, "mine now", "m", conversation_id="thread-1")
        assert store.list_conversations(bob.id).items == []
        got = store.get_conversation("thread-1", alice.id)
        assert (got.title, got.metadata) == ("Thread", {"k": 1})
        with pytest.raises(NotFound):
            store.get_conversation("thread-1", bob.id)

    def test_create_conversation_with_given_id_across_instances(self, store: Store, make_store, alice):
        other = make_store()
        c = other.create_conversation(alice.id, "from worker 2", "m", conversation_id="thread-x")
        assert store.create_conversation(alice.id, "from worker 1", "m", conversation_id="thread-x") == c
        assert store.get_conversation("thread-x", alice.id).title == "from worker 2"

    def test_metadata_round_trip(self, store: Store, alice):
        meta = {
            "chat_settings": {"temperature": 0.7, "max_tokens": 512, "stream": True, "stop": None},
            "chat_profile": "Jarvis ✨",
            "tags": ["سلام", "東京", ""],
            "nested": {"list": [1, 2.5, {"deep": False}]},
        }
        c = store.create_conversation(alice.id, "t", "m", metadata=meta)
        assert c.metadata == meta
        assert store.get_conversation(c.id, alice.id).metadata == meta
        assert store.list_conversations(alice.id).items[0].metadata == meta
        plain = store.create_conversation(alice.id, "no metadata", "m")
        assert plain.metadata == {} and store.get_conversation(plain.id, alice.id).metadata == {}
        updated = store.update_conversation_metadata(c.id, alice.id, {"chat_profile": "other"})
        assert updated.metadata == {"chat_profile": "other"}  # replaced, not merged
        got = store.get_conversation(c.id, alice.id)
        assert got.metadata == {"chat_profile": "other"} and got.title == "t"
        assert store.update_conversation_metadata(c.id, alice.id, {}).metadata == {}

    # ---- ownership ----
    def test_other_users_records_are_not_found(self, store: Store, alice, bob):
        c = store.create_conversation(alice.id, "private", "m", metadata={"m": 1})
        m = store.add_message(c.id, alice.id, "user", "secret words")
        f = store.set_feedback(m.id, alice.id, 1, "mine")
        a = store.save_attachment(alice.id, "x.png", "image/png", b"png bytes")
        bobs = store.create_conversation(bob.id, "bob's", "m")
        for call in (
            lambda: store.get_conversation(c.id, bob.id),
            lambda: store.rename_conversation(c.id, bob.id, "mine now"),
            lambda: store.update_conversation_metadata(c.id, bob.id, {"m": 2}),
            lambda: store.delete_conversation(c.id, bob.id),
            lambda: store.add_message(c.id, bob.id, "user", "hi"),
            lambda: store.add_message(bobs.id, bob.id, "user", "hi", message_id=m.id),
            lambda: store.get_message(m.id, bob.id),
            lambda: store.delete_message(m.id, bob.id),
            lambda: store.list_messages(c.id, bob.id),
            lambda: store.update_message(m.id, bob.id, content="x", status="complete"),
            lambda: store.set_feedback(m.id, bob.id, 0, "spam"),
            lambda: store.delete_feedback(f.id, bob.id),
            lambda: store.list_feedback(c.id, bob.id),
            lambda: store.get_attachment(a.id, bob.id),
            lambda: store.delete_attachment(a.id, bob.id),
        ):
            with pytest.raises(NotFound):
                call()
        got = store.get_conversation(c.id, alice.id)
        assert (got.title, got.metadata) == ("private", {"m": 1})
        assert store.get_message(m.id, alice.id) == m
        assert store.list_messages(c.id, alice.id).items == [m]
        assert store.list_feedback(c.id, alice.id) == [f]
        assert store.get_attachment(a.id, alice.id)[1] == b"png bytes"
        assert [x.id for x in store.list_conversations(bob.id).items] == [bobs.id]
        assert store.list_conversations(bob.id, search="private").items == []
        assert store.list_conversations(bob.id, search="secret").items == []
        assert store.search_messages(bob.id, "secret") == []
        assert store.list_messages(bobs.id, bob.id).items == []

    def test_missing_records_are_not_found(self, store: Store, alice):
        for call in (
            lambda: store.get_conversation("nope", alice.id),
            lambda: store.update_conversation_metadata("nope", alice.id, {}),
            lambda: store.delete_conversation("nope", alice.id),
            lambda: store.add_message("nope", alice.id, "user", "hi", message_id="m-1"),
            lambda: store.get_message("nope", alice.id),
            lambda: store.delete_message("nope", alice.id),
            lambda: store.set_feedback("nope", alice.id, 1),
            lambda: store.delete_feedback("nope", alice.id),
            lambda: store.list_feedback("nope", alice.id),
            lambda: store.get_attachment("nope", alice.id),
            lambda: store.delete_attachment("nope", alice.id),
            lambda: store.create_conversation("no-such-user", "t", "m"),
            lambda: store.create_conversation("no-such-user", "t", "m", conversation_id="thread-9"),
        ):
            with pytest.raises(NotFound):
                call()

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
        assert store.get_message(m.id, alice.id) == updated
        with pytest.raises(ValueError):
            store.update_message(m.id, alice.id, content="x", status="bogus")
        with pytest.raises(NotFound):
            store.update_message("nope", alice.id, content="x", status="complete")

    def test_invalid_message_role(self, store: Store, alice):
        c = store.create_conversation(alice.id, "t", "m")
        with pytest.raises(ValueError):
            store.add_message(c.id, alice.id, "robot", "hi")

    def test_add_message_with_id_upserts(self, store: Store, alice):
        c = store.create_conversation(alice.id, "t", "m")
        a = store.save_attachment(alice.id, "x.png", "image/png", b"img")
        first = store.add_message(c.id, alice.id, "assistant", "", status="complete", model="smol", message_id="step-1")
        assert first.id == "step-1" and store.get_message("step-1", alice.id) == first
        other = store.create_conversation(alice.id, "other", "m")  # now on top
        time.sleep(TICK)
        before = store.get_conversation(c.id, alice.id).updated_at
        second = store.add_message(
            c.id, alice.id, "assistant", "the full answer", status="stopped", attachment_ids=[a.id], message_id="step-1"
        )
        assert (second.id, second.content, second.status) == ("step-1", "the full answer", "stopped")
        assert (second.role, second.created_at, second.conversation_id) == ("assistant", first.created_at, c.id)
        assert second.model == "smol"  # an empty model keeps the stored one
        assert second.attachment_ids == (a.id,)
        assert store.get_message("step-1", alice.id) == second
        assert store.list_messages(c.id, alice.id).items == [second]  # no second row
        convs = store.list_conversations(alice.id).items
        assert [x.id for x in convs] == [c.id, other.id] and convs[0].updated_at > before
        third = store.add_message(c.id, alice.id, "assistant", "edited", message_id="step-1")
        assert third.attachment_ids == (a.id,)  # no attachment_ids given: kept
        assert [m.content for m in store.list_messages(c.id, alice.id).items] == ["edited"]
        later = store.add_message(c.id, alice.id, "user", "next question", message_id="step-2")
        assert [m.id for m in store.list_messages(c.id, alice.id).items] == ["step-2", "step-1"]
        assert later.created_at > first.created_at

    def test_add_message_with_id_from_elsewhere_is_not_found(self, store: Store, alice, bob):
        c1 = store.create_conversation(alice.id, "one", "m")
        c2 = store.create_conversation(alice.id, "two", "m")
        bobs = store.create_conversation(bob.id, "bob's", "m")
        m = store.add_message(c1.id, alice.id, "user", "original", message_id="step-x")
        with pytest.raises(NotFound):  # the same owner, another conversation
            store.add_message(c2.id, alice.id, "user", "moved?", message_id="step-x")
        with pytest.raises(NotFound):  # another owner
            store.add_message(bobs.id, bob.id, "user", "hijack", message_id="step-x")
        assert store.get_message("step-x", alice.id) == m
        assert store.list_messages(c2.id, alice.id).items == []
        assert store.list_messages(bobs.id, bob.id).items == []
        with pytest.raises(NotFound):
            store.get_message("step-x", bob.id)

    def test_get_and_delete_message(self, store: Store, alice, bob):
        c = store.create_conversation(alice.id, "t", "m")
        m1 = store.add_message(c.id, alice.id, "user", "question")
        m2 = store.add_message(c.id, alice.id, "assistant", "answer")
        store.set_feedback(m2.id, alice.id, 1)
        assert store.get_message(m1.id, alice.id) == m1
        with pytest.raises(NotFound):
            store.get_message(m1.id, bob.id)
        with pytest.raises(NotFound):
            store.delete_message(m2.id, bob.id)
        assert store.get_message(m2.id, alice.id) == m2
        store.delete_message(m2.id, alice.id)
        with pytest.raises(NotFound):
            store.get_message(m2.id, alice.id)
        with pytest.raises(NotFound):
            store.delete_message(m2.id, alice.id)
        assert store.list_messages(c.id, alice.id).items == [m1]
        assert store.list_feedback(c.id, alice.id) == []  # its feedback went with it
        assert store.search_messages(alice.id, "answer") == []

    # ---- delete conversation ----
    def test_delete_conversation_cascades(self, store: Store, alice, bob):
        gone = store.create_conversation(alice.id, "to delete", "m")
        kept = store.create_conversation(alice.id, "to keep", "m")
        a1 = store.save_attachment(alice.id, "1.png", "image/png", b"one")
        a2 = store.save_attachment(alice.id, "2.png", "image/png", b"two")
        a3 = store.save_attachment(alice.id, "3.png", "image/png", b"three")
        a4 = store.save_attachment(alice.id, "4.png", "image/png", b"one")  # same bytes as a1
        m1 = store.add_message(gone.id, alice.id, "user", "doomed words", attachment_ids=[a1.id, a2.id])
        m2 = store.add_message(gone.id, alice.id, "assistant", "doomed reply")
        store.set_feedback(m2.id, alice.id, 0, "bad")
        k1 = store.add_message(kept.id, alice.id, "user", "kept words", attachment_ids=[a3.id, a4.id])
        kf = store.set_feedback(k1.id, alice.id, 1)
        with pytest.raises(NotFound):
            store.delete_conversation(gone.id, bob.id)
        assert store.get_conversation(gone.id, alice.id).title == "to delete"

        assert store.delete_conversation(gone.id, alice.id) is None
        for call in (
            lambda: store.get_conversation(gone.id, alice.id),
            lambda: store.list_messages(gone.id, alice.id),
            lambda: store.list_feedback(gone.id, alice.id),
            lambda: store.get_message(m1.id, alice.id),
            lambda: store.get_message(m2.id, alice.id),
            lambda: store.get_attachment(a1.id, alice.id),
            lambda: store.get_attachment(a2.id, alice.id),
            lambda: store.delete_conversation(gone.id, alice.id),
        ):
            with pytest.raises(NotFound):
                call()
        assert [c.id for c in store.list_conversations(alice.id).items] == [kept.id]
        assert store.search_messages(alice.id, "doomed") == []
        assert store.list_conversations(alice.id, search="doomed").items == []
        assert store.list_conversations(alice.id, search="to delete").items == []
        # the other conversation is untouched, bytes shared with a deleted attachment included
        assert store.get_attachment(a3.id, alice.id)[1] == b"three"
        assert store.get_attachment(a4.id, alice.id)[1] == b"one"
        assert store.list_messages(kept.id, alice.id).items == [k1]
        assert store.list_feedback(kept.id, alice.id) == [kf]
        # the conversation's id is free again: a new create does not resurrect anything
        again = store.create_conversation(alice.id, "reborn", "m", conversation_id=gone.id)
        assert store.list_messages(again.id, alice.id).items == []

    def test_delete_conversation_keeps_attachments_used_elsewhere(self, store: Store, alice):
        """An attachment that a message of another conversation references too is kept."""
        c1 = store.create_conversation(alice.id, "one", "m")
        c2 = store.create_conversation(alice.id, "two", "m")
        a = store.save_attachment(alice.id, "a.png", "image/png", b"bytes")
        store.add_message(c1.id, alice.id, "user", "x", attachment_ids=[a.id])
        store.add_message(c2.id, alice.id, "user", "y", attachment_ids=[a.id])
        store.delete_conversation(c1.id, alice.id)
        assert store.get_attachment(a.id, alice.id)[1] == b"bytes"
        store.delete_conversation(c2.id, alice.id)
        with pytest.raises(NotFound):
            store.get_attachment(a.id, alice.id)

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

    def test_delete_attachment_keeps_shared_bytes(self, store: Store, alice, bob):
        a = store.save_attachment(alice.id, "a.png", "image/png", b"same bytes")
        b = store.save_attachment(alice.id, "b.png", "image/png", b"same bytes")
        theirs = store.save_attachment(bob.id, "c.png", "image/png", b"same bytes")
        store.delete_attachment(a.id, alice.id)
        with pytest.raises(NotFound):
            store.get_attachment(a.id, alice.id)
        with pytest.raises(NotFound):
            store.delete_attachment(a.id, alice.id)
        assert store.get_attachment(b.id, alice.id)[1] == b"same bytes"
        store.delete_attachment(b.id, alice.id)
        with pytest.raises(NotFound):
            store.get_attachment(b.id, alice.id)
        assert store.get_attachment(theirs.id, bob.id)[1] == b"same bytes"  # per owner
        again = store.save_attachment(alice.id, "d.png", "image/png", b"same bytes")  # bytes come back
        assert store.get_attachment(again.id, alice.id)[1] == b"same bytes"

    # ---- feedback ----
    def test_feedback_set_replace_delete_list(self, store: Store, alice):
        c = store.create_conversation(alice.id, "t", "m")
        other = store.create_conversation(alice.id, "other", "m")
        m1 = store.add_message(c.id, alice.id, "assistant", "answer one")
        m2 = store.add_message(c.id, alice.id, "assistant", "answer two")
        mo = store.add_message(other.id, alice.id, "assistant", "elsewhere")
        assert store.list_feedback(c.id, alice.id) == []
        f1 = store.set_feedback(m1.id, alice.id, 1, "great")
        assert (f1.message_id, f1.conversation_id, f1.owner_id, f1.value, f1.comment) == (m1.id, c.id, alice.id, 1, "great")
        f2 = store.set_feedback(m2.id, alice.id, 0)
        assert (f2.value, f2.comment) == (0, None)
        fo = store.set_feedback(mo.id, alice.id, 1)
        assert {f.id: f for f in store.list_feedback(c.id, alice.id)} == {f1.id: f1, f2.id: f2}
        assert store.list_feedback(other.id, alice.id) == [fo]

        replaced = store.set_feedback(m1.id, alice.id, 0, "changed my mind")
        assert replaced.id == f1.id and (replaced.value, replaced.comment) == (0, "changed my mind")
        listed = {f.id: f for f in store.list_feedback(c.id, alice.id)}
        assert len(listed) == 2 and listed[f1.id] == replaced

        store.delete_feedback(f2.id, alice.id)
        assert store.list_feedback(c.id, alice.id) == [replaced]
        with pytest.raises(NotFound):
            store.delete_feedback(f2.id, alice.id)
        for bad in (2, -1, 5):
            with pytest.raises(ValueError):
                store.set_feedback(m2.id, alice.id, bad)
        assert store.list_feedback(c.id, alice.id) == [replaced]

    def test_feedback_ownership(self, store: Store, alice, bob):
        c = store.create_conversation(alice.id, "t", "m")
        m = store.add_message(c.id, alice.id, "assistant", "answer")
        f = store.set_feedback(m.id, alice.id, 1, "mine")
        with pytest.raises(NotFound):
            store.set_feedback(m.id, bob.id, 0, "bob was here")
        with pytest.raises(NotFound):
            store.delete_feedback(f.id, bob.id)
        with pytest.raises(NotFound):
            store.list_feedback(c.id, bob.id)
        assert store.list_feedback(c.id, alice.id) == [f]

    # ---- search ----
    def test_search_titles_and_messages(self, store: Store, alice, bob):
        trip = store.create_conversation(alice.id, "Trip to Paris", "m")
        groceries = store.create_conversation(alice.id, "Groceries", "m")
        store.add_message(groceries.id, alice.id, "user", "buy MILK and eggs")
        store.add_message(groceries.id, alice.id, "assistant", "Milk: 2 litres")
        store.create_conversation(alice.id, "Other", "m")
        bobs = store.create_conversation(bob.id, "paris notes", "m")
        store.add_message(bobs.id, bob.id, "user", "milk for bob")

        assert [c.id for c in store.list_conversations(alice.id, search="Paris").items] == [trip.id]
        assert titles(store, alice.id, "PARIS") == {"Trip to Paris"}  # case-insensitive
        assert titles(store, alice.id, "paris") == {"Trip to Paris"}
        assert titles(store, alice.id, "milk") == {"Groceries"}  # found in a message, listed once
        assert titles(store, alice.id, "o") == {"Trip to Paris", "Groceries", "Other"}  # short: still a substring
        assert titles(store, alice.id, "no such text") == set()
        assert titles(store, bob.id, "paris") == {"paris notes"}
        assert titles(store, bob.id, "Trip") == set()
        assert len(store.list_conversations(alice.id, search="").items) == 3  # "" = no filter
        assert len(store.list_conversations(alice.id, search=None).items) == 3

        assert contents(store, alice.id, "milk") == {"buy MILK and eggs", "Milk: 2 litres"}
        assert contents(store, alice.id, "MiLk:") == {"Milk: 2 litres"}
        assert contents(store, alice.id, "Paris") == set()  # titles are not messages
        assert contents(store, bob.id, "milk") == {"milk for bob"}
        assert store.search_messages(alice.id, "") == []

    def test_search_persian_and_cjk_substrings(self, store: Store, alice):
        greet = store.create_conversation(alice.id, "سلام دنیا", "m")
        chat = store.create_conversation(alice.id, "گفتگو", "m")
        store.add_message(chat.id, alice.id, "user", "متن: سلام دنیا و بیشتر")
        store.add_message(chat.id, alice.id, "assistant", "東京タワーに行きました")
        store.create_conversation(alice.id, "unrelated", "m")
        assert titles(store, alice.id, "سلام") == {"سلام دنیا", "گفتگو"}
        assert [c.id for c in store.list_conversations(alice.id, search="سلام").items] == [chat.id, greet.id]
        assert titles(store, alice.id, "لام دن") == {"سلام دنیا", "گفتگو"}  # mid-word, across a space
        assert titles(store, alice.id, "دنیا") == {"سلام دنیا", "گفتگو"}
        assert titles(store, alice.id, "سل") == {"سلام دنیا", "گفتگو"}  # two characters
        assert titles(store, alice.id, "گفت") == {"گفتگو"}
        assert contents(store, alice.id, "سلام") == {"متن: سلام دنیا و بیشتر"}
        assert contents(store, alice.id, "京タ") == {"東京タワーに行きました"}
        assert contents(store, alice.id, "タワーに") == {"東京タワーに行きました"}
        assert titles(store, alice.id, "東京") == {"گفتگو"}

    def test_search_special_characters_are_literal(self, store: Store, alice):
        c = store.create_conversation(alice.id, "specials", "m")
        texts = [
            'He said "hi" (twice)',
            "100% sure",
            "a*b=c",
            "snake_case",
            "snakeXcase",
            "back\\slash",
            "it's",
            "col:on AND NOT OR NEAR(x)",
            "plain",
        ]
        for t in texts:
            store.add_message(c.id, alice.id, "user", t)
        store.create_conversation(alice.id, "50%_off", "m")
        store.create_conversation(alice.id, "50xyoff", "m")

        def found(q):
            return contents(store, alice.id, q)

        assert found('"') == {'He said "hi" (twice)'}
        assert found('"hi"') == {'He said "hi" (twice)'}
        assert found('"hi" (') == {'He said "hi" (twice)'}
        assert found("(") == {'He said "hi" (twice)', "col:on AND NOT OR NEAR(x)"}
        assert found("(twice") == {'He said "hi" (twice)'}
        assert found("%") == {"100% sure"}
        assert found("0% s") == {"100% sure"}
        assert found("*") == {"a*b=c"}
        assert found("a*b") == {"a*b=c"}
        assert found("a*") == {"a*b=c"}
        assert found("_") == {"snake_case"}
        assert found("e_c") == {"snake_case"}
        assert found("snake_case") == {"snake_case"}
        assert found("\\") == {"back\\slash"}
        assert found("k\\s") == {"back\\slash"}
        assert found("'") == {"it's"}
        assert found("it's") == {"it's"}
        assert found("AND") == {"col:on AND NOT OR NEAR(x)"}
        assert found("NEAR(x)") == {"col:on AND NOT OR NEAR(x)"}
        assert found("col:on") == {"col:on AND NOT OR NEAR(x)"}
        for widening in ('hi" OR "plain', "plain OR hi", "pla*", "*lain*", "NOT plain", "%plain", "p_ain", "^plain"):
            assert found(widening) == set(), widening
        assert found("plain") == {"plain"}
        assert titles(store, alice.id, "%") == {"50%_off", "specials"}  # "specials" by its message
        assert titles(store, alice.id, "_") == {"50%_off", "specials"}
        assert titles(store, alice.id, "%_o") == {"50%_off"}
        assert titles(store, alice.id, '"') == {"specials"}  # found in a message

    def test_search_paging(self, store: Store, alice, bob):
        hits = set()
        for i in range(25):
            if i % 2:
                hits.add(store.create_conversation(alice.id, f"needle {i}", "m").id)
            else:
                c = store.create_conversation(alice.id, f"chat {i}", "m")
                store.add_message(c.id, alice.id, "user", f"a NEEDLE in message {i}")
                store.add_message(c.id, alice.id, "assistant", "and another needle")
                hits.add(c.id)
        for i in range(10):
            c = store.create_conversation(alice.id, f"hay {i}", "m")
            store.add_message(c.id, alice.id, "user", "just hay")
        store.create_conversation(bob.id, "bob's needle", "m")
        for q in ("needle", "ee"):  # the index and the short-query path
            seen = all_conversations(store, alice.id, limit=10, search=q)
            assert len(seen) == 25 and {c.id for c in seen} == hits, q
            keys = [(c.updated_at, c.id) for c in seen]
            assert keys == sorted(keys, reverse=True)
        page = store.list_conversations(alice.id, limit=10, search="needle")
        assert len(page.items) == 10 and page.next_cursor
        # the cursor's own conversation bumped while paging moves up: not repeated on later pages
        time.sleep(TICK)
        store.add_message(page.items[-1].id, alice.id, "user", "needle again")
        rest = all_conversations(store, alice.id, limit=10, search="needle")
        assert len(rest) == 25
        later = store.list_conversations(alice.id, limit=10, cursor=page.next_cursor, search="needle")
        assert not {c.id for c in later.items} & {c.id for c in page.items}

    def test_search_messages_newest_first_with_limit(self, store: Store, alice):
        c1 = store.create_conversation(alice.id, "one", "m")
        c2 = store.create_conversation(alice.id, "two", "m")
        made = []
        for i in range(6):
            time.sleep(TICK / 5)
            made.append(store.add_message((c1, c2)[i % 2].id, alice.id, "user", f"apple number {i}"))
        store.add_message(c1.id, alice.id, "user", "pear")
        got = store.search_messages(alice.id, "APPLE", limit=4)
        assert [m.id for m in got] == [m.id for m in reversed(made)][:4]
        assert got[0] == store.get_message(made[-1].id, alice.id)
        with pytest.raises(ValueError):
            store.search_messages(alice.id, "apple", limit=0)

    def test_search_follows_edits(self, store: Store, alice):
        c = store.create_conversation(alice.id, "original title", "m")
        m = store.add_message(c.id, alice.id, "assistant", "first draft")
        store.update_message(m.id, alice.id, content="final version", status="complete")
        assert contents(store, alice.id, "draft") == set()
        assert contents(store, alice.id, "final") == {"final version"}
        store.add_message(c.id, alice.id, "assistant", "upserted text", message_id=m.id)
        assert contents(store, alice.id, "final") == set()
        assert contents(store, alice.id, "upserted") == {"upserted text"}
        store.rename_conversation(c.id, alice.id, "renamed")
        assert titles(store, alice.id, "original") == set()
        assert titles(store, alice.id, "renamed") == {"renamed"}

    # ---- API keys (argus.keys) ----
    FLASH = "gemini-2.5-flash"
    DAY = "2025-06-01"
    T0 = 1_750_000_040.0  # 20 s into a minute (UNIX seconds)

    def test_api_keys_add_get_list_and_duplicates(self, store: Store):
        env = store.add_api_key("k-env", "gemini", "env", "…aaaa")
        app = store.add_api_key("k-app", "gemini", "app", "…bbbb", ciphertext=b"\x00sealed\xff")
        other = store.add_api_key("k-oai", "openai", "app", "…cccc", ciphertext=b"x")
        assert (env.state, env.source, env.ciphertext, env.cooldown_until, env.requests_total) == ("enabled", "env", None, 0, 0)
        assert store.get_api_key("k-app").ciphertext == b"\x00sealed\xff"
        assert store.get_api_key("k-app") == app
        assert [k.id for k in store.list_api_keys()] == ["k-env", "k-app", "k-oai"]
        assert [k.id for k in store.list_api_keys("gemini")] == ["k-env", "k-app"]
        assert store.list_api_keys("anthropic") == []
        with pytest.raises(KeyExists):
            store.add_api_key("k-app", "gemini", "app", "…bbbb", ciphertext=b"again")
        assert store.get_api_key("k-app").ciphertext == b"\x00sealed\xff"
        with pytest.raises(ValueError):
            store.add_api_key("k-x", "gemini", "file", "…dddd")
        with pytest.raises(NotFound):
            store.get_api_key("nope")
        store.delete_api_key(other.id)
        with pytest.raises(NotFound):
            store.delete_api_key(other.id)
        assert [k.id for k in store.list_api_keys()] == ["k-env", "k-app"]

    def test_acquire_takes_keys_in_turn_and_counts(self, store: Store):
        for i in range(3):
            store.add_api_key(f"k{i}", "gemini", "app", f"…000{i}", ciphertext=b"c")
        got = [
            store.acquire_api_key("gemini", self.FLASH, now=self.T0 + i, day=self.DAY).id for i in range(9)
        ]
        assert got[:3] == sorted(got[:3]) and got == got[:3] * 3  # strict round robin
        k0 = store.get_api_key("k0")
        assert k0.requests_total == 3 and k0.last_used_at == self.T0 + 6
        w = k0.windows[self.FLASH]
        assert (w.day, w.day_requests, w.requests) == (self.DAY, 3, 3)
        assert store.acquire_api_key("openai", "gpt-4o-mini", now=self.T0, day=self.DAY) is None

    def test_acquire_skips_unusable_keys(self, store: Store):
        store.add_api_key("env-mine", "gemini", "env", "…0001")
        store.add_api_key("env-other", "gemini", "env", "…0002")  # in another process's environment only
        store.add_api_key("disabled", "gemini", "app", "…0003", ciphertext=b"c")
        store.add_api_key("invalid", "gemini", "app", "…0004", ciphertext=b"c")
        store.add_api_key("cool", "gemini", "app", "…0005", ciphertext=b"c")
        store.add_api_key("excluded", "gemini", "app", "…0006", ciphertext=b"c")
        store.set_api_key_state("disabled", "disabled")
        store.set_api_key_state("invalid", "invalid", error="invalid_key")
        store.cool_down_api_key("cool", self.T0 + 30, error="rate_limited")
        take = lambda now: store.acquire_api_key(  # noqa: E731
            "gemini", self.FLASH, now=now, day=self.DAY, env_ids=["env-mine"], exclude=["excluded"]
        )
        assert {take(self.T0).id for _ in range(4)} == {"env-mine"}
        assert {take(self.T0 + 31).id for _ in range(4)} == {"env-mine", "cool"}  # the cooldown is over
        assert store.get_api_key("invalid").last_error == "invalid_key"
        assert store.get_api_key("cool").last_error == "rate_limited"

    def test_cooldown_keeps_the_later_time_and_enabling_ends_it(self, store: Store):
        store.add_api_key("k", "gemini", "app", "…0001", ciphertext=b"c")
        assert store.cool_down_api_key("k", self.T0 + 60).cooldown_until == self.T0 + 60
        assert store.cool_down_api_key("k", self.T0 + 10).cooldown_until == self.T0 + 60
        assert store.acquire_api_key("gemini", self.FLASH, now=self.T0 + 59, day=self.DAY) is None
        assert store.acquire_api_key("gemini", self.FLASH, now=self.T0 + 60, day=self.DAY).id == "k"
        store.cool_down_api_key("k", self.T0 + 999)
        back = store.set_api_key_state("k", "enabled", error="")
        assert (back.state, back.cooldown_until) == ("enabled", 0)
        with pytest.raises(ValueError):
            store.set_api_key_state("k", "broken")
        with pytest.raises(NotFound):
            store.set_api_key_state("nope", "disabled")
        with pytest.raises(NotFound):
            store.cool_down_api_key("nope", 1.0)

    def test_acquire_respects_rpm_rpd_and_tpm(self, store: Store):
        store.add_api_key("k", "gemini", "app", "…0001", ciphertext=b"c")
        take = lambda now, day=self.DAY, model=self.FLASH, **kw: store.acquire_api_key(  # noqa: E731
            "gemini", model, now=now, day=day, **kw
        )
        assert [bool(take(self.T0, rpm=3)) for _ in range(4)] == [True, True, True, False]
        assert take(self.T0, model="gemini-2.5-pro", rpm=3) is not None  # limits are per model
        assert take(self.T0 + 45, rpm=3) is None  # 5 s into the next minute: the burst still weighs 55/60 × 3
        assert take(self.T0 + 100, rpm=3) is not None  # the minute after that: the burst is out of the window
        assert take(self.T0 + 200, rpd=5) is not None  # 5th request of the day
        assert take(self.T0 + 300, rpd=5) is None
        assert take(self.T0 + 300, day="2025-06-02", rpd=5) is not None  # a new quota day
        store.record_api_usage(
            "k", "u1", self.FLASH, now=self.T0 + 400, day="2025-06-02", usage_day="2025-06-02",
            input_tokens=900, output_tokens=50,
        )
        assert take(self.T0 + 401, day="2025-06-02", tpm=1000, tokens=100) is None
        assert take(self.T0 + 401, day="2025-06-02", tpm=1000, tokens=40) is not None

    def test_usage_is_recorded_per_key_user_model_and_day(self, store: Store):
        store.add_api_key("k1", "gemini", "app", "…0001", ciphertext=b"c")
        store.add_api_key("k2", "gemini", "app", "…0002", ciphertext=b"c")

        def use(key, user, model, day, i, o):
            store.record_api_usage(key, user, model, now=self.T0, day=day, usage_day=day, input_tokens=i, output_tokens=o)

        use("k1", "u1", self.FLASH, "2025-06-01", 10, 5)
        use("k1", "u1", self.FLASH, "2025-06-01", 1, 2)
        use("k1", "u2", self.FLASH, "2025-06-01", 7, 0)
        use("k2", "u1", "gemini-2.5-pro", "2025-06-02", 100, 50)
        rows = store.list_api_usage()
        assert [(u.key_id, u.user_id, u.model, u.day, u.requests, u.input_tokens, u.output_tokens) for u in rows] == [
            ("k1", "u1", self.FLASH, "2025-06-01", 2, 11, 7),
            ("k1", "u2", self.FLASH, "2025-06-01", 1, 7, 0),
            ("k2", "u1", "gemini-2.5-pro", "2025-06-02", 1, 100, 50),
        ]
        assert [u.key_id for u in store.list_api_usage(since_day="2025-06-02")] == ["k2"]
        assert [u.user_id for u in store.list_api_usage(key_id="k1")] == ["u1", "u2"]
        assert [u.key_id for u in store.list_api_usage(user_id="u1")] == ["k1", "k2"]
        assert store.get_api_key("k1").tokens_total == 25 and store.get_api_key("k2").tokens_total == 150
        store.delete_api_key("k1")
        use("k1", "u1", self.FLASH, "2025-06-01", 1, 1)  # deleted meanwhile: the bucket still counts
        assert store.list_api_usage(key_id="k1")[0].requests == 3
        with pytest.raises(ValueError):
            use("k2", "u1", self.FLASH, "2025-06-01", -1, 0)

    def test_racing_acquires_across_instances_share_one_rotation_and_limit(self, store: Store, make_store):
        """Two server processes on one database: turns and limits are the database's, not a process's."""
        for i in range(4):
            store.add_api_key(f"k{i}", "gemini", "app", f"…000{i}", ciphertext=b"c")
        other = make_store()
        results = race(
            12, lambda i: [
                (store if i % 2 else other).acquire_api_key("gemini", self.FLASH, now=self.T0, day=self.DAY, rpm=10)
                for _ in range(5)
            ],
        )
        assert all(not isinstance(r, Exception) for r in results), results
        got = [k.id for r in results for k in r if k is not None]
        assert len(got) == 40  # 4 keys × 10 per minute, of 60 attempts
        assert {k: got.count(k) for k in set(got)} == {f"k{i}": 10 for i in range(4)}
        seqs = [k.last_seq for r in results for k in r if k is not None]
        assert len(set(seqs)) == len(seqs)  # every request got its own turn

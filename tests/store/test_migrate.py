"""``argus.store.migrate`` and ``python -m argus store migrate``: SQLite -> MongoDB (mongomock)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mongomock
import pymongo
import pytest
from tests.support.ports import free_port
from tests.support.mongo import atomic_mongomock, dump
from tests.support.store_contract import HASH

from argus.__main__ import main
from argus.store import NotFound, SQLiteStore, Store
from argus.store.migrate import COLLECTIONS, MigrationError, migrate, sqlite_attachment_keys
from argus.store.mongo import MongoStore

from tests.support.paths import REPO
DB = "argus_migrated"


def fill(store: SQLiteStore) -> dict:
    """A small but complete data set; returns the records by kind."""
    alice = store.create_user("alice@example.com", "Alice", HASH)
    bob = store.create_user("bob@example.com", "Bob", HASH)
    carol = store.create_user("carol@example.com", "Carol", HASH, role="admin")
    shared = b"\x89PNG same bytes"
    a1 = store.save_attachment(alice.id, "one.png", "image/png", shared)
    a2 = store.save_attachment(alice.id, "two.png", "image/png", shared)  # same bytes as a1
    a3 = store.save_attachment(bob.id, "bob.jpg", "image/jpeg", os.urandom(300_000))  # several GridFS chunks
    orphan = store.save_attachment(alice.id, "never-sent.png", "image/png", b"unreferenced upload")
    convs, msgs, fbs = [], [], []
    for i in range(23):
        c = store.create_conversation(alice.id, f"Alice chat {i}", "smol", metadata={"chat_settings": {"t": i / 10}})
        convs.append(c)
    big = convs[0]
    for i in range(230):  # more than one page (200) of list_messages during the copy
        msgs.append(store.add_message(big.id, alice.id, "user" if i % 2 == 0 else "assistant", f"message {i} about cats"))
    msgs.append(store.add_message(convs[1].id, alice.id, "user", "look", attachment_ids=[a1.id, a2.id]))
    answer = store.add_message(convs[1].id, alice.id, "assistant", "nice picture", status="stopped", model="smol")
    msgs.append(answer)
    fbs.append(store.set_feedback(answer.id, alice.id, 1, "great"))
    fbs.append(store.set_feedback(msgs[1].id, alice.id, 0))
    bc = store.create_conversation(bob.id, "Bob's thread", "smol", conversation_id="chainlit-thread-1")
    convs.append(bc)
    bm = store.add_message(bc.id, bob.id, "user", "photo", attachment_ids=[a3.id], message_id="step-1")
    msgs.append(bm)
    fbs.append(store.set_feedback(bm.id, bob.id, 0, None))
    return {
        "users": [alice, bob, carol],
        "files": [a1, a2, a3, orphan],
        "conversations": convs,
        "messages": msgs,
        "feedback": fbs,
    }


@pytest.fixture
def source(tmp_path):
    s = SQLiteStore(tmp_path / "data")
    records = fill(s)
    s.close()
    return tmp_path / "data", records


@pytest.fixture
def client():
    with atomic_mongomock():
        yield mongomock.MongoClient()


def all_pages(fetch) -> list:
    items, cursor = [], None
    while True:
        page = fetch(cursor)
        items += page.items
        if page.next_cursor is None:
            return items
        cursor = page.next_cursor


def assert_same(source: Store, target: Store, records: dict) -> None:
    """Every record of ``records`` reads back identically (fields, metadata, bytes) from both stores."""
    assert target.list_users() == source.list_users() == sorted(records["users"], key=lambda u: (u.created_at, u.id))
    for u in records["users"]:
        assert target.get_user(u.id) == u and target.get_user_by_email(u.email) == u
        src_convs = all_pages(lambda cur, u=u: source.list_conversations(u.id, limit=7, cursor=cur))
        dst_convs = all_pages(lambda cur, u=u: target.list_conversations(u.id, limit=7, cursor=cur))
        assert dst_convs == src_convs
        assert [c.metadata for c in dst_convs] == [c.metadata for c in src_convs]
        for c in src_convs:
            src_msgs = all_pages(lambda cur, c=c, u=u: source.list_messages(c.id, u.id, limit=50, cursor=cur))
            assert all_pages(lambda cur, c=c, u=u: target.list_messages(c.id, u.id, limit=50, cursor=cur)) == src_msgs
            assert target.list_feedback(c.id, u.id) == source.list_feedback(c.id, u.id)
    for a in records["files"]:
        assert target.get_attachment(a.id, a.owner_id) == source.get_attachment(a.id, a.owner_id)
    for m in records["messages"]:
        assert target.get_message(m.id, m.owner_id) == source.get_message(m.id, m.owner_id)
    for c in records["conversations"]:
        got = target.get_conversation(c.id, c.owner_id)
        assert got == source.get_conversation(c.id, c.owner_id) and got.metadata == c.metadata


def test_migrate_twice_copies_everything_once(source, client):
    data_dir, records = source
    lines: list[str] = []
    src = SQLiteStore(data_dir)
    dst = MongoStore(client, DB)
    try:
        counts = migrate(src, dst, sqlite_attachment_keys(data_dir), lines.append)
        expected = {name: len(records[name]) for name in COLLECTIONS}
        assert {n: (c.copied, c.present, c.updated) for n, c in counts.items()} == {
            n: (expected[n], 0, 0) for n in COLLECTIONS}
        assert lines == [f"{n}: {expected[n]} copied, 0 already present" for n in COLLECTIONS]
        assert_same(src, dst, records)

        before = dump(client, DB)
        lines.clear()
        again = migrate(src, dst, sqlite_attachment_keys(data_dir), lines.append)
        assert {n: (c.copied, c.present, c.updated) for n, c in again.items()} == {
            n: (0, expected[n], 0) for n in COLLECTIONS}
        assert lines == [f"{n}: 0 copied, {expected[n]} already present" for n in COLLECTIONS]
        assert dump(client, DB) == before  # the second run changed nothing at all
    finally:
        src.close()
        dst.close()


def test_after_migration_ownership_paging_and_new_writes_work(source, client):
    data_dir, records = source
    src = SQLiteStore(data_dir)
    dst = MongoStore(client, DB)
    try:
        migrate(src, dst, sqlite_attachment_keys(data_dir))
    finally:
        src.close()
    alice, bob, _carol = records["users"]
    big = records["conversations"][0]
    try:
        # ownership
        for call in (
            lambda: dst.get_conversation(big.id, bob.id),
            lambda: dst.list_messages(big.id, bob.id),
            lambda: dst.get_attachment(records["files"][0].id, bob.id),
            lambda: dst.get_message(records["messages"][0].id, bob.id),
            lambda: dst.add_message(big.id, bob.id, "user", "hi"),
        ):
            with pytest.raises(NotFound):
                call()
        assert dst.search_messages(bob.id, "cats") == []
        # paging, newest first, complete
        msgs = all_pages(lambda cur: dst.list_messages(big.id, alice.id, limit=40, cursor=cur))
        assert len(msgs) == 230 and [m.content for m in msgs] == [f"message {i} about cats" for i in reversed(range(230))]
        assert len(all_pages(lambda cur: dst.list_conversations(alice.id, limit=5, cursor=cur))) == 23
        assert {c.id for c in dst.list_conversations(alice.id, search="about CATS").items} == {big.id}
        # new writes continue after the copied data
        latest = max(m.created_at for m in records["messages"] if m.conversation_id == big.id)
        new = dst.add_message(big.id, alice.id, "user", "after the move")
        assert new.created_at > latest
        assert dst.list_messages(big.id, alice.id, limit=1).items == [new]
        assert dst.list_conversations(alice.id, limit=1).items[0].id == big.id
        assert dst.create_user("dave@example.com", "Dave", HASH).role == "user"  # the first user already exists
        assert dst.add_message("chainlit-thread-1", bob.id, "user", "edited", message_id="step-1").content == "edited"
    finally:
        dst.close()


def test_changed_source_records_are_updated(source, client):
    data_dir, records = source
    src = SQLiteStore(data_dir)
    dst = MongoStore(client, DB)
    try:
        migrate(src, dst, sqlite_attachment_keys(data_dir))
        alice = records["users"][0]
        m = records["messages"][0]
        src.update_message(m.id, alice.id, content="edited later", status="complete")
        src.rename_conversation(records["conversations"][2].id, alice.id, "renamed later")
        time.sleep(0.01)
        fresh = src.add_message(records["conversations"][3].id, alice.id, "user", "written later")
        counts = migrate(src, dst, sqlite_attachment_keys(data_dir))
        assert (counts["messages"].copied, counts["messages"].updated) == (1, 1)
        # the new message bumped its conversation's updated_at: that conversation is updated too
        assert (counts["conversations"].copied, counts["conversations"].updated) == (0, 2)
        assert dst.get_message(m.id, alice.id).content == "edited later"
        assert dst.get_message(fresh.id, alice.id) == fresh
        assert dst.get_conversation(records["conversations"][2].id, alice.id).title == "renamed later"
    finally:
        src.close()
        dst.close()


def test_email_clash_stops_before_writing(source, client):
    data_dir, _records = source
    dst = MongoStore(client, DB)
    other = dst.create_user("Bob@example.com", "Another Bob", HASH)
    before = dump(client, DB)
    src = SQLiteStore(data_dir)
    try:
        with pytest.raises(MigrationError, match=r"nothing was copied: bob@example.com \(id "):
            migrate(src, dst, sqlite_attachment_keys(data_dir))
        assert dump(client, DB) == before
        assert dst.get_user_by_email("bob@example.com") == other
    finally:
        src.close()
        dst.close()


def test_id_owned_by_someone_else_stops_the_copy(source, client):
    data_dir, _records = source
    dst = MongoStore(client, DB)
    intruder = dst.create_user("mallory@example.com", "M", HASH)
    dst.create_conversation(intruder.id, "squatting", "m", conversation_id="chainlit-thread-1")
    src = SQLiteStore(data_dir)
    try:
        with pytest.raises(MigrationError, match="chainlit-thread-1.*another owner"):
            migrate(src, dst, sqlite_attachment_keys(data_dir))
        assert dst.get_conversation("chainlit-thread-1", intruder.id).title == "squatting"
    finally:
        src.close()
        dst.close()


# ---- the command line ----------------------------------------------------------
@pytest.fixture
def cli_env(source, monkeypatch, tmp_path):
    data_dir, _records = source
    for var in ("MONGO_URI", "MONGO_DB"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ARGUS_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)  # no stray .env
    return data_dir


def test_cli_migrate_twice(cli_env, source, capsys, monkeypatch):
    _data_dir, records = source
    shared = mongomock.MongoClient()
    seen = []

    def client(uri, **kwargs):
        seen.append(uri)
        return shared

    monkeypatch.setattr(pymongo, "MongoClient", client)
    with atomic_mongomock():
        assert main(["store", "migrate", "--to", "mongodb://user:hunter2@127.0.0.1:27017/argus_cli"]) == 0
        out = capsys.readouterr().out
        assert "hunter2" not in out and "'argus_cli'" in out and "127.0.0.1:27017" in out
        for name in COLLECTIONS:
            assert f"\n{name}: {len(records[name])} copied, 0 already present\n" in out
        assert main(["store", "migrate", "--to", "mongodb://127.0.0.1:27017/argus_cli"]) == 0
        out = capsys.readouterr().out
        for name in COLLECTIONS:
            assert f"\n{name}: 0 copied, {len(records[name])} already present\n" in out
        # MONGO_URI / MONGO_DB are the defaults, as for the server
        monkeypatch.setenv("MONGO_URI", "mongodb://127.0.0.1:27017/argus_cli")
        monkeypatch.setenv("MONGO_DB", "argus_env")
        assert main(["store", "migrate"]) == 0
        assert "'argus_env'" in capsys.readouterr().out
    assert shared["argus_cli"]["users"].count_documents({}) == 3
    assert shared["argus_env"]["messages"].count_documents({}) == len(records["messages"])


def test_cli_errors(cli_env, tmp_path, capsys, monkeypatch):
    assert main(["store", "migrate"]) == 2
    assert "No MongoDB to copy to" in capsys.readouterr().err
    assert main(["store", "migrate", "--to", "mongodb://u:hunter2@"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --to is not a usable MongoDB URI") and "hunter2" not in err
    empty = tmp_path / "nothing-here"
    assert main(["store", "migrate", "--from", str(empty), "--to", "mongodb://127.0.0.1:1/x"]) == 2
    assert "No SQLite database at" in capsys.readouterr().err
    assert not empty.exists()  # not created by the attempt


@pytest.mark.e2e
def test_cli_unreachable_server_subprocess(cli_env):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONGO_")}
    env.update(PYTHONPATH=str(REPO), ARGUS_DATA_DIR=str(cli_env))
    r = subprocess.run(
        [sys.executable, "-m", "argus", "store", "migrate", "--to",
         f"mongodb://127.0.0.1:{port}/argus?serverSelectionTimeoutMS=500"],
        capture_output=True, text=True, env=env, cwd=cli_env.parent, timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: storage unavailable: cannot reach MongoDB at 127.0.0.1:{port}")
    assert "Traceback" not in r.stderr

"""MongoStore: the shared store contract against mongomock, and against a real MongoDB.

* ``TestMongoStore`` runs ``StoreContract`` (tests/support/store_contract.py) plus MongoDB-specific
  checks on ``mongomock`` (in-process, always).
* ``TestMongoStoreRealServer`` runs the same contract plus checks only a server can answer
  (index use, reconnection after an outage) against ``ARGUS_TEST_MONGO_URI``, e.g.
  ``docker compose up -d mongo`` then ``ARGUS_TEST_MONGO_URI=mongodb://127.0.0.1:27017 make test``.
  Without that variable they are reported as "not run: ARGUS_TEST_MONGO_URI unset".
* Unreachable-server behaviour is tested with real pymongo against a closed local port, and
  deferred start-up (index creation failing, then succeeding) with mongomock behind a driver
  whose ``create_indexes`` drops the connection a given number of times.

mongomock executes each call in Python without the server's per-operation atomicity, so the
mongomock fixtures serialise its collection operations with one lock: that emulates what
the server guarantees (one ``insert_one``/``find_one_and_update`` is atomic) and nothing more,
so the race tests still exercise MongoStore's own logic (unique index, counters).
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
import uuid

import mongomock
import mongomock.gridfs
import pymongo
import pytest
from pymongo.errors import AutoReconnect

pytest.register_assert_rewrite("store_contract")
from tests.support.ports import free_port  # noqa: E402
from tests.support.mongo import atomic_mongomock, dump  # noqa: E402
from tests.support.store_contract import HASH, StoreContract, race  # noqa: E402

from argus.config import ConfigError, Settings  # noqa: E402
from argus.store import SQLiteStore, StoreUnavailable, UserExists, check_store, open_store  # noqa: E402
from argus.store.mongo import BLOB_BUCKET, INDEXES, SCHEMA_VERSION, MongoStore, MongoUnreachable  # noqa: E402

mongomock.gridfs.enable_gridfs_integration()  # lets pymongo's gridfs accept mongomock databases

REAL_URI = os.environ.get("ARGUS_TEST_MONGO_URI", "").strip()
NOT_RUN = "not run: ARGUS_TEST_MONGO_URI unset"

@pytest.fixture
def mock_client():
    """A fresh in-memory MongoDB (mongomock) with atomic operations."""
    with atomic_mongomock():
        yield mongomock.MongoClient()


# ---- the contract on mongomock ----------------------------------------------
class TestMongoStore(StoreContract):
    @pytest.fixture
    def store(self, mock_client):
        s = MongoStore(mock_client, "argus_test")
        yield s
        s.close()

    @pytest.fixture
    def make_store(self, mock_client, store):
        opened: list[MongoStore] = []

        def make() -> MongoStore:
            opened.append(MongoStore(mock_client, "argus_test"))
            return opened[-1]

        yield make
        for s in opened:
            s.close()

    def test_indexes_are_declared_and_created(self, store: MongoStore):
        assert store._db["users"].index_information() == {}  # construction does no I/O
        assert store.count_users() == 0  # the first operation prepares the database
        for coll, models in INDEXES.items():
            info = store._db[coll].index_information()
            for model in models:
                doc = model.document
                assert doc["name"] in info, (coll, doc["name"])
                assert list(dict(info[doc["name"]]["key"]).keys()) == list(doc["key"].keys())
                assert bool(info[doc["name"]].get("unique")) == bool(doc.get("unique")), doc["name"]
        assert list(dict(store.users.index_information()["email_unique"]["key"])) == ["email"]
        assert list(dict(store.conversations.index_information()["owner_updated"]["key"])) == ["owner_id", "updated_at", "_id"]
        assert list(dict(store.messages.index_information()["conversation_created"]["key"])) == [
            "conversation_id", "created_at", "_id"]
        assert list(dict(store.feedback.index_information()["message_owner_unique"]["key"])) == ["message_id", "owner_id"]
        again = MongoStore(store._client, "argus_test")
        again.ensure_ready()  # creating them again is a no-op
        again.close()

    def test_users_stored_before_token_versions_read_as_version_zero(self, store: MongoStore):
        u = store.create_user("old@example.com", "Old", HASH)
        store.users.update_one({"_id": u.id}, {"$unset": {"token_version": ""}})  # a document from before
        assert store.get_user(u.id).token_version == 0
        assert store.bump_token_version(u.id) == 1
        assert store.get_user_by_email("old@example.com").token_version == 1

    def test_document_shapes(self, store: MongoStore):
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "t", "m", metadata={"a.b": 1, "$x": [1, 2]})
        a = store.save_attachment(u.id, "x.png", "image/png", b"bytes")
        m = store.add_message(c.id, u.id, "user", "hi", attachment_ids=[a.id])
        for i in range(3):
            store.add_message(c.id, u.id, "assistant", f"reply {i}")
        f = store.set_feedback(m.id, u.id, 1, "ok")
        assert store.users.find_one({"_id": u.id}) == {
            "_id": u.id, "email": "a@example.com", "name": "A", "role": "admin", "password_hash": HASH,
            "created_at": u.created_at, "token_version": 0}
        conv = store.conversations.find_one({"_id": c.id})
        assert set(conv) == {"_id", "owner_id", "title", "model", "created_at", "updated_at", "metadata", "last_message_at"}
        assert not any(isinstance(v, list) for v in conv.values())  # messages are never embedded
        assert store.get_conversation(c.id, u.id).metadata == {"a.b": 1, "$x": [1, 2]}  # awkward keys survive
        assert store.messages.count_documents({"conversation_id": c.id}) == 4
        assert store.messages.find_one({"_id": m.id}) == {
            "_id": m.id, "conversation_id": c.id, "owner_id": u.id, "role": "user", "content": "hi",
            "status": "complete", "model": "", "created_at": m.created_at, "attachment_ids": [a.id]}
        assert store.files.find_one({"_id": a.id}) == {
            "_id": a.id, "owner_id": u.id, "name": "x.png", "mime": "image/png", "size": 5, "sha256": a.sha256,
            "created_at": a.created_at}
        blob = store._db[f"{BLOB_BUCKET}.files"].find_one({"_id": a.id})
        assert blob["length"] == 5 and blob["metadata"] == {"owner_id": u.id, "sha256": a.sha256}
        assert store._db[f"{BLOB_BUCKET}.chunks"].count_documents({"files_id": a.id}) == 1
        assert store.feedback.find_one({"_id": f.id}) == {
            "_id": f.id, "message_id": m.id, "conversation_id": c.id, "owner_id": u.id, "value": 1, "comment": "ok",
            "created_at": f.created_at}

    def test_gridfs_bytes_are_chunked_and_deleted(self, store: MongoStore):
        u = store.create_user("a@example.com", "A", HASH)
        data = os.urandom(600 * 1024)  # > 2 GridFS chunks of 255 KiB
        a = store.save_attachment(u.id, "big.png", "image/png", data)
        assert store._db[f"{BLOB_BUCKET}.chunks"].count_documents({"files_id": a.id}) == 3
        assert store.get_attachment(a.id, u.id)[1] == data
        store.delete_attachment(a.id, u.id)
        assert store._db[f"{BLOB_BUCKET}.files"].count_documents({}) == 0
        assert store._db[f"{BLOB_BUCKET}.chunks"].count_documents({}) == 0

    def test_missing_or_damaged_bytes_are_unavailable(self, store: MongoStore):
        u = store.create_user("a@example.com", "A", HASH)
        a = store.save_attachment(u.id, "x.png", "image/png", b"original")
        store._db[f"{BLOB_BUCKET}.chunks"].update_one({"files_id": a.id}, {"$set": {"data": b"tampered"}})
        with pytest.raises(StoreUnavailable, match="damaged"):
            store.get_attachment(a.id, u.id)
        store._fs.delete(a.id)
        with pytest.raises(StoreUnavailable, match="missing"):
            store.get_attachment(a.id, u.id)

    def test_equal_timestamps_page_and_order_correctly(self, mock_client):
        s = MongoStore(mock_client, "argus_test", clock=lambda: 1_700_000_000.0)
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
        page = s.list_messages(c.id, u.id, limit=2)
        assert [m.content for m in page.items] == ["m4", "m3"]
        assert [m.content for m in s.list_messages(c.id, u.id, cursor=page.next_cursor).items] == ["m2", "m1", "m0"]

    def test_many_threads_get_distinct_increasing_times(self, store: MongoStore):
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "t", "m")
        results = race(16, lambda i: store.add_message(c.id, u.id, "user", f"m{i}"))
        assert all(not isinstance(r, Exception) for r in results), results
        items = store.list_messages(c.id, u.id, limit=100).items
        assert len(items) == 16 and len({m.created_at for m in items}) == 16
        assert store.get_conversation(c.id, u.id).updated_at == max(m.created_at for m in items)

    def test_racing_feedback_upserts_make_one_record(self, store: MongoStore):
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "t", "m")
        m = store.add_message(c.id, u.id, "assistant", "answer")
        results = race(8, lambda i: store.set_feedback(m.id, u.id, i % 2))
        assert all(not isinstance(r, Exception) for r in results), results
        assert len({r.id for r in results}) == 1 and len(store.list_feedback(c.id, u.id)) == 1

    def test_first_user_bookkeeping_survives_users_added_by_others(self, mock_client):
        """Users that exist before the store starts (another tool, a restore) are counted at start-up."""
        mock_client["argus_test"]["users"].insert_one(
            {"_id": "x", "email": "old@example.com", "name": "Old", "role": "admin", "password_hash": HASH, "created_at": 1.0})
        s = MongoStore(mock_client, "argus_test")
        assert s.create_user("new@example.com", "New", HASH).role == "user"
        assert s.count_users() == 2

    def test_newer_schema_is_refused(self, mock_client):
        first = MongoStore(mock_client, "argus_test")
        first.ensure_ready()
        first.close()
        mock_client["argus_test"]["meta"].update_one({"_id": "schema"}, {"$set": {"version": SCHEMA_VERSION + 1}})
        s = MongoStore(mock_client, "argus_test")  # constructing never fails: the operations do
        for call in (s.count_users, lambda: s.create_user("a@example.com", "A", HASH), s.ensure_ready):
            with pytest.raises(StoreUnavailable, match="newer") as err:
                call()
            assert not isinstance(err.value, MongoUnreachable)
        assert mock_client["argus_test"]["users"].count_documents({}) == 0  # nothing was written
        assert check_store(s).startswith("MongoDB at localhost:27017 is not usable; the chat will answer")
        mock_client["argus_test"]["meta"].update_one({"_id": "schema"}, {"$set": {"version": SCHEMA_VERSION}})
        assert s.count_users() == 0  # checked again on each operation until it passes

    def test_closed_store_is_unavailable(self, store: MongoStore):
        store.close()
        store.close()
        with pytest.raises(StoreUnavailable, match="closed"):
            store.count_users()

    def test_lost_connection_is_unavailable_then_recovers(self, store: MongoStore, monkeypatch):
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "t", "m")
        real = mongomock.collection.Collection.find_one_and_update

        def down(*args, **kwargs):
            raise AutoReconnect("connection closed")

        monkeypatch.setattr(mongomock.collection.Collection, "find_one_and_update", down)
        with pytest.raises(StoreUnavailable, match=r"^storage unavailable: lost the connection to MongoDB at localhost:27017"):
            store.add_message(c.id, u.id, "user", "hi")
        monkeypatch.setattr(mongomock.collection.Collection, "find_one_and_update", real)
        assert store.add_message(c.id, u.id, "user", "hi").content == "hi"

    def test_search_uses_literal_regex(self, store: MongoStore):
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "t", "m")
        store.add_message(c.id, u.id, "user", "nul\x00byte and (.*) and $where")
        assert len(store.search_messages(u.id, "\x00b")) == 1
        assert len(store.search_messages(u.id, "(.*)")) == 1
        assert store.search_messages(u.id, ".*x") == []
        assert len(store.search_messages(u.id, "$WHERE")) == 1


# ---- deferred start-up: index creation fails, then succeeds ---------------------
@contextlib.contextmanager
def dropping_create_indexes(failures: int):
    """Wrap the driver (mongomock's ``Collection.create_indexes``) so that its first
    ``failures`` calls raise AutoReconnect, as pymongo does when the connection drops."""
    real = mongomock.collection.Collection.create_indexes
    calls = {"n": 0, "failed": 0}

    def create_indexes(self, *args, **kwargs):
        calls["n"] += 1
        if calls["failed"] < failures:
            calls["failed"] += 1
            raise AutoReconnect("connection closed")
        return real(self, *args, **kwargs)

    mongomock.collection.Collection.create_indexes = create_indexes
    try:
        yield calls
    finally:
        mongomock.collection.Collection.create_indexes = real


def test_readiness_is_deferred_until_the_server_answers(mock_client):
    mock_client["argus_test"]["users"].insert_one(  # a user from before, to be counted
        {"_id": "x", "email": "old@example.com", "name": "Old", "role": "admin", "password_hash": HASH, "created_at": 1.0})
    with dropping_create_indexes(3) as calls:
        s = MongoStore(mock_client, "argus_test")
        assert calls["n"] == 0  # construction does no I/O
        attempts = [lambda: s.create_user("new@example.com", "New", HASH), s.count_users, s.list_users]
        for call in attempts:
            with pytest.raises(MongoUnreachable, match="^storage unavailable: lost the connection to MongoDB at localhost:27017"):
                call()
        assert calls["failed"] == 3
        users = mock_client["argus_test"]["users"]
        assert users.count_documents({}) == 1  # the failed create_user wrote nothing
        assert "email_unique" not in users.index_information()
        u = s.create_user("new@example.com", "New", HASH)  # the driver works again: ready, then the call
    assert u.role == "user"  # the user count was reconciled with the existing user first
    for coll, models in INDEXES.items():
        info = mock_client["argus_test"][coll].index_information()
        assert {m.document["name"] for m in models} <= set(info), coll
    assert mock_client["argus_test"]["meta"].find_one({"_id": "schema"})["version"] == SCHEMA_VERSION
    with pytest.raises(UserExists):  # the unique index now decides
        s.create_user("NEW@example.com", "Dup", HASH)
    n = calls["n"]
    s.count_users()
    assert calls["n"] == n  # prepared once: later operations do not repeat it
    assert check_store(s) is None


def test_waiting_callers_share_a_failed_readiness_attempt(mock_client):
    """While one thread's attempt is failing, callers queued behind it raise its error at
    once instead of each trying (and timing out) in turn."""
    entered, release = threading.Event(), threading.Event()
    real = mongomock.collection.Collection.create_indexes
    tries = []

    def slow_then_fail(self, *args, **kwargs):
        tries.append(1)
        entered.set()
        release.wait(10)
        raise AutoReconnect("connection closed")

    mongomock.collection.Collection.create_indexes = slow_then_fail
    try:
        s = MongoStore(mock_client, "argus_test")
        results = []

        def call():
            try:
                s.count_users()
            except StoreUnavailable as exc:
                results.append(exc)

        first = threading.Thread(target=call)
        first.start()
        assert entered.wait(10)
        waiters = [threading.Thread(target=call) for _ in range(4)]
        for t in waiters:
            t.start()
        time.sleep(0.5)  # let them queue on the lock
        release.set()
        for t in [first, *waiters]:
            t.join(10)
        assert len(results) == 5 and all(isinstance(e, MongoUnreachable) for e in results)
        assert len(tries) == 1  # one attempt for the whole burst
    finally:
        mongomock.collection.Collection.create_indexes = real
    assert s.count_users() == 0  # the next call tries again, and works


# ---- unreachable server (real pymongo, nothing listening) ---------------------
def test_unreachable_server_constructs_at_once_and_each_call_fails_quickly():
    port = free_port()  # freed again: nothing listens there
    start = time.monotonic()
    s = MongoStore.from_uri(f"mongodb://user:hunter2@127.0.0.1:{port}/argus_test", serverSelectionTimeoutMS=300)
    try:
        assert isinstance(s._client, pymongo.MongoClient)
        assert time.monotonic() - start < 0.5  # no server needed to construct
        calls = [s.count_users, lambda: s.get_user_by_email("a@example.com"),
                 lambda: s.create_user("a@example.com", "A", HASH), s.ensure_ready]
        for call in calls:
            start = time.monotonic()
            with pytest.raises(StoreUnavailable) as err:
                call()
            assert time.monotonic() - start < 3  # about serverSelectionTimeoutMS, never more than one wait
            text = str(err.value)
            assert isinstance(err.value, MongoUnreachable)
            assert text.startswith(f"storage unavailable: cannot reach MongoDB at 127.0.0.1:{port}")
            assert "Topology Description" not in text and "hunter2" not in text
        warning = check_store(s)
        assert warning.startswith(
            f"MongoDB at 127.0.0.1:{port} is unreachable; the chat will answer 'storage unavailable' until it comes back"
        )
        assert "hunter2" not in warning
        # a burst of callers during the outage: each fails within about one timeout
        durations: list[float] = []

        def timed():
            t0 = time.monotonic()
            with contextlib.suppress(StoreUnavailable):
                s.get_user("x")
            durations.append(time.monotonic() - t0)

        threads = [threading.Thread(target=timed) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(durations) == 6 and max(durations) < 3, durations
    finally:
        s.close()


def test_srv_uri_defers_the_dns_lookup(monkeypatch):
    seen = {}

    class Client(mongomock.MongoClient):
        def __init__(self, uri, **kwargs):
            seen.update(kwargs, uri=uri)
            super().__init__()

    monkeypatch.setattr(pymongo, "MongoClient", Client)
    with atomic_mongomock():
        s = MongoStore.from_uri("mongodb+srv://user:pw@cluster0.example.net/mydb")
        assert s.where == "cluster0.example.net" and s.db_name == "mydb"
        s.close()
    assert seen["connect"] is False


def test_uri_options_win_over_defaults(monkeypatch):
    seen = {}

    class Client(mongomock.MongoClient):
        def __init__(self, uri, **kwargs):
            seen.update(kwargs, uri=uri)
            super().__init__()

    monkeypatch.setattr(pymongo, "MongoClient", Client)
    with atomic_mongomock():
        MongoStore.from_uri("mongodb://db.example:27017/?serverSelectionTimeoutMS=9000").close()
    assert "serverSelectionTimeoutMS" not in seen and seen["connectTimeoutMS"] == 3000
    with atomic_mongomock():
        MongoStore.from_uri("mongodb://db.example:27017/").close()
    assert seen["serverSelectionTimeoutMS"] == 3000


def test_bad_uri_never_shows_the_password():
    with pytest.raises(ValueError) as err:
        MongoStore.from_uri("mongodb://user:hunter2@host:27017/db?unknownOption=1&w=bogus&journal=maybe")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ValueError) as err:
        MongoStore.from_uri("mongodb://user:hunter2@")
    assert "hunter2" not in str(err.value)


# ---- open_store chooses the backend -------------------------------------------
@pytest.fixture
def settings(tmp_path, monkeypatch):
    for var in ("MONGO_URI", "MONGO_DB"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ARGUS_DATA_DIR", str(tmp_path / "data"))
    return Settings.from_env(dotenv=False)


def test_open_store_without_mongo_uri_is_sqlite(settings):
    s = open_store(settings)
    try:
        assert isinstance(s, SQLiteStore)
    finally:
        s.close()


@pytest.mark.parametrize(
    "uri, db_env, expected",
    [
        ("mongodb://db.example:27017", None, "argus"),
        ("mongodb://db.example:27017/from_path", None, "from_path"),
        ("mongodb://db.example:27017/from_path?authSource=admin", "from_env", "from_env"),
    ],
)
def test_open_store_with_mongo_uri(settings, monkeypatch, uri, db_env, expected):
    monkeypatch.setattr(pymongo, "MongoClient", lambda *a, **k: mongomock.MongoClient())
    monkeypatch.setenv("MONGO_URI", uri)
    if db_env:
        monkeypatch.setenv("MONGO_DB", db_env)
    with atomic_mongomock():
        s = open_store(settings)
        try:
            assert isinstance(s, MongoStore) and s.db_name == expected
            assert s.where == "db.example:27017"
        finally:
            s.close()
    assert not (settings.data_dir / "argus.db").exists()


def test_open_store_bad_or_unreachable_mongo_uri(settings, monkeypatch):
    monkeypatch.setenv("MONGO_URI", "mongodb://user:hunter2@")
    with pytest.raises(ConfigError, match="^MONGO_URI is not a usable MongoDB URI") as err:
        open_store(settings)
    assert "hunter2" not in str(err.value)
    port = free_port()
    monkeypatch.setenv("MONGO_URI", f"mongodb://user:hunter2@127.0.0.1:{port}/x?serverSelectionTimeoutMS=300")
    s = open_store(settings)  # an unreachable server is an outage, not a configuration error
    try:
        with pytest.raises(StoreUnavailable, match=f"cannot reach MongoDB at 127.0.0.1:{port}") as err:
            s.count_users()
        assert "hunter2" not in str(err.value)
    finally:
        s.close()


# ---- the contract on a real server ---------------------------------------------
class _Proxy:
    """A TCP relay 127.0.0.1:port -> target that can be cut and restored (a server outage)."""

    def __init__(self, target: tuple[str, int], port: int):
        self.target, self.port = target, port
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def start(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(16)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            self._listener.close()
            self._listener = None
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_real_mongodb():
    """Reports TestMongoStoreRealServer as not run (one summary line) when there is no server;
    with one, checks that ARGUS_TEST_MONGO_URI is usable before the class runs."""
    if not REAL_URI:
        pytest.skip(f"{NOT_RUN} (TestMongoStoreRealServer: the store contract, index use and outage recovery)")
    s = MongoStore.from_uri(REAL_URI, "argus_test_ping")
    try:
        s.ensure_ready()  # construction alone does not touch the server
    finally:
        s.close()


class TestMongoStoreRealServer(StoreContract):
    __test__ = bool(REAL_URI)  # not collected at all without a server (test_real_mongodb reports it)

    @pytest.fixture
    def db_name(self):
        return f"argus_test_{uuid.uuid4().hex[:12]}"

    @pytest.fixture
    def store(self, db_name):
        s = MongoStore.from_uri(REAL_URI, db_name)
        yield s
        with contextlib.suppress(Exception):
            s._client.drop_database(db_name)
        s.close()

    @pytest.fixture
    def make_store(self, store, db_name):
        opened: list[MongoStore] = []

        def make() -> MongoStore:
            opened.append(MongoStore.from_uri(REAL_URI, db_name))
            return opened[-1]

        yield make
        for s in opened:
            s.close()

    def test_listing_and_paging_use_the_indexes(self, store: MongoStore):
        u = store.create_user("a@example.com", "A", HASH)
        c = store.create_conversation(u.id, "t", "m")
        store.add_message(c.id, u.id, "user", "hi")
        plan = str(store.conversations.find({"owner_id": u.id}).sort(
            [("updated_at", -1), ("_id", -1)]).limit(21).explain()["queryPlanner"]["winningPlan"])
        assert "owner_updated" in plan and "SORT" not in plan.replace("SORT_KEY", "")
        plan = str(store.messages.find({"conversation_id": c.id, "owner_id": u.id}).sort(
            [("created_at", -1), ("_id", -1)]).limit(51).explain()["queryPlanner"]["winningPlan"])
        assert "IXSCAN" in plan and "SORT" not in plan.replace("SORT_KEY", "")  # no in-memory sort
        info = store.users.index_information()
        assert info["email_unique"]["unique"] is True

    def test_server_outage_then_recovery(self, db_name):
        from pymongo import uri_parser

        target = uri_parser.parse_uri(REAL_URI)["nodelist"][0]
        proxy = _Proxy(target, free_port())
        proxy.start()
        uri = re.sub(r"^mongodb://([^@/]*@)?[^/?]*", lambda m: f"mongodb://{m.group(1) or ''}127.0.0.1:{proxy.port}", REAL_URI)
        s = MongoStore.from_uri(uri, db_name, directConnection=True, serverSelectionTimeoutMS=1000)
        try:
            u = s.create_user("a@example.com", "A", HASH)
            c = s.create_conversation(u.id, "t", "m")
            proxy.stop()  # the server goes away: open connections drop, new ones are refused
            for call in (lambda: s.add_message(c.id, u.id, "user", "lost"), lambda: s.count_users()):
                with pytest.raises(StoreUnavailable, match="^storage unavailable: "):
                    call()
            proxy.start()  # back on the same address: pymongo reconnects by itself
            deadline = time.monotonic() + 30
            while True:
                try:
                    m = s.add_message(c.id, u.id, "user", "back")
                    break
                except StoreUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert s.get_message(m.id, u.id).content == "back"
            assert s.count_users() == 1
        finally:
            proxy.stop()
            with contextlib.suppress(Exception):
                MongoStore.from_uri(REAL_URI, db_name)._client.drop_database(db_name)
            s.close()

    def test_server_down_at_start_then_up(self, db_name):
        """Started while the server is unreachable: each call fails fast; once it is up the
        next call prepares the database (indexes) and succeeds."""
        from pymongo import uri_parser

        target = uri_parser.parse_uri(REAL_URI)["nodelist"][0]
        proxy = _Proxy(target, free_port())  # not started: the port is closed
        uri = re.sub(r"^mongodb://([^@/]*@)?[^/?]*", lambda m: f"mongodb://{m.group(1) or ''}127.0.0.1:{proxy.port}", REAL_URI)
        s = MongoStore.from_uri(uri, db_name, directConnection=True, serverSelectionTimeoutMS=500)
        try:
            with pytest.raises(MongoUnreachable):
                s.create_user("a@example.com", "A", HASH)
            proxy.start()
            deadline = time.monotonic() + 30
            while True:
                try:
                    u = s.create_user("a@example.com", "A", HASH)
                    break
                except StoreUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert u.role == "admin" and s.count_users() == 1
            assert "email_unique" in s.users.index_information()
        finally:
            proxy.stop()
            with contextlib.suppress(Exception):
                MongoStore.from_uri(REAL_URI, db_name)._client.drop_database(db_name)
            s.close()

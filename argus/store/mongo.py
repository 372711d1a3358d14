"""MongoDB implementation of :class:`argus.store.base.Store` (pymongo, the official driver).

Collections (one document per record, ``_id`` = the record's id; see docs/STORAGE.md)::

    users          {_id, email, name, role, password_hash, created_at, token_version}
                   (token_version: absent in documents written before it existed, read as 0)
    conversations  {_id, owner_id, title, model, created_at, updated_at, metadata, last_message_at}
    messages       {_id, conversation_id, owner_id, role, content, status, model, created_at, attachment_ids}
    files          {_id, owner_id, name, mime, size, sha256, created_at}   one per attachment
    blobs.files / blobs.chunks                                              GridFS: the bytes, _id = attachment id
    feedback       {_id, message_id, conversation_id, owner_id, value, comment, created_at}
    api_keys       {_id, provider, source, fingerprint, state, created_at, ciphertext, cooldown_until,
                    last_used_at, last_seq, requests_total, tokens_total, last_error, windows, v}
    api_usage      {_id: "<key>|<user>|<model>|<day>", key_id, user_id, model, day, requests,
                    input_tokens, output_tokens}
    meta           {_id: "schema", version}, {_id: "user_count", n} and {_id: "key_seq", n}

Messages are separate documents linked by ``conversation_id`` (never an array inside the
conversation): a conversation grows without bound, MongoDB documents may not (16 MiB), and
paging needs an index over messages.

Atomicity without transactions (a standalone server has none):

* Sign-up races: the unique index on ``users.email`` decides; the loser gets UserExists.
* First user is admin: every successful insert increments ``meta.user_count`` with one
  ``find_one_and_update``; the insert that takes the count from 0 to 1 is the first user
  and is promoted to admin (when no role was given). The count is reconciled before the first
  operation (``$max`` with the real number of users), so a database filled by other means is safe.
* API-key rotation (``acquire_api_key``): ``meta.key_seq`` hands out rotation numbers with
  ``$inc``; the chosen key is then claimed with one ``find_one_and_update`` conditional on the
  version ``v`` it was read at (and on still being enabled and not cooling down), which also
  counts the request. A process that loses the race re-reads and picks again, so limits are
  checked against the counters the update replaces and no request is counted twice.
* Message times: one pipeline ``find_one_and_update`` on the conversation reserves
  ``created_at = max(now, last_message_at + 1 µs)`` and bumps ``updated_at``, so
  ``created_at`` is strictly increasing within a conversation even with a coarse clock.

Paging uses keyset cursors: base64url of ``"<timestamp>|<id>"``, matched with
``$or: [{ts < t}, {ts == t, _id < id}]`` on the compound indexes below.

Search is a case-insensitive substring match: ``$regex`` on ``re.escape``-d text with the
``i`` option, restricted to the owner's documents by index. MongoDB's ``$text`` is
word-based (tokens, stemming, stop words) and cannot answer substrings, so the text
indexes below are declared for a future word-search mode but not used by queries.

Errors: pymongo's ConnectionFailure family (ServerSelectionTimeoutError, AutoReconnect,
NetworkTimeout...) and any other server error become :class:`StoreUnavailable`
("storage unavailable: ..."); pymongo reconnects by itself once the server is back.

Start-up needs no server: constructing a :class:`MongoStore` does no I/O (pymongo connects
in the background). The schema check, index creation and user-count reconciliation run in
``_ensure_ready`` before the first operation, under a lock, and again before each later
operation until they have succeeded once; while the server is down every operation raises
StoreUnavailable within about one ``serverSelectionTimeoutMS`` (callers waiting for the
same attempt share its failure instead of queueing for their own).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import gridfs
import pymongo
from pymongo import ASCENDING, DESCENDING, TEXT, IndexModel, ReturnDocument
from pymongo.errors import ConnectionFailure, DuplicateKeyError, OperationFailure, PyMongoError

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
    StoreError,
    StoreUnavailable,
    User,
    UserExists,
)

DEFAULT_DB = "argus"
#: Client options used unless the URI sets them (URI options win; see ``MongoStore.from_uri``).
DEFAULT_CLIENT_OPTIONS: dict[str, Any] = {
    "serverSelectionTimeoutMS": 3000,  # fail fast when the server is down, at start and later
    "connectTimeoutMS": 3000,
    "socketTimeoutMS": 30000,  # a hung server surfaces as NetworkTimeout -> StoreUnavailable
    "appname": "jarvis-argus",
}
SCHEMA_VERSION = 1
BLOB_BUCKET = "blobs"  # GridFS prefix: collections blobs.files and blobs.chunks

#: The indexes of each collection, created (idempotently) before the first operation. Declared beside the
#: document shapes in the module docstring; docs/STORAGE.md explains each one.
INDEXES: dict[str, list[IndexModel]] = {
    "users": [
        IndexModel([("email", ASCENDING)], name="email_unique", unique=True),  # decides sign-up races
        IndexModel([("created_at", ASCENDING), ("_id", ASCENDING)], name="created"),  # list_users
    ],
    "conversations": [
        # list_conversations: equality on owner, keyset range on (updated_at, _id)
        IndexModel([("owner_id", ASCENDING), ("updated_at", ASCENDING), ("_id", ASCENDING)], name="owner_updated"),
        IndexModel([("title", TEXT)], name="title_text", default_language="none"),  # see module docstring
    ],
    "messages": [
        # list_messages: equality on conversation, keyset range on (created_at, _id)
        IndexModel(
            [("conversation_id", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)], name="conversation_created"
        ),
        # search_messages / search in list_conversations: the owner's messages, newest first
        IndexModel([("owner_id", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)], name="owner_created"),
        # delete_conversation: is an attachment referenced by another conversation? (multikey)
        IndexModel([("attachment_ids", ASCENDING)], name="attachment_ids"),
        IndexModel([("content", TEXT)], name="content_text", default_language="none"),  # see module docstring
    ],
    "files": [
        IndexModel([("owner_id", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)], name="owner_created"),
    ],
    "api_keys": [
        IndexModel([("provider", ASCENDING), ("last_seq", ASCENDING), ("_id", ASCENDING)], name="provider_seq"),
    ],
    "api_usage": [
        IndexModel([("day", ASCENDING), ("key_id", ASCENDING)], name="day_key"),
    ],
    "feedback": [
        IndexModel([("message_id", ASCENDING), ("owner_id", ASCENDING)], name="message_owner_unique", unique=True),
        IndexModel(
            [("conversation_id", ASCENDING), ("owner_id", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)],
            name="conversation_owner_created",
        ),
    ],
}


class ImportConflict(StoreError):
    """An imported record's id (or email) already belongs to a different record or owner."""


class MongoUnreachable(StoreUnavailable):
    """StoreUnavailable because the server cannot be reached (down, network, DNS), as
    opposed to reached but refusing (credentials, schema, index build)."""


# ---- helpers ---------------------------------------------------------------




def _after_cursor(field: str, cursor: Optional[str]) -> dict:
    """The filter for rows strictly before ``cursor`` in (``field``, _id) descending order."""
    if not cursor:
        return {}
    ts, row_id = decode_cursor(cursor)
    return {"$or": [{field: {"$lt": ts}}, {field: ts, "_id": {"$lt": row_id}}]}




def _contains(text: str) -> dict:
    """A ``$regex`` matching ``text`` as a literal, case-insensitive substring."""
    pattern = re.escape(text).replace("\x00", "\\x00")  # a NUL cannot travel inside a BSON regex
    return {"$regex": pattern, "$options": "i"}




def _user(d: Mapping) -> User:
    return User(
        d["_id"], d["email"], d["name"], d["role"], d["password_hash"], d["created_at"], int(d.get("token_version", 0))
    )


def _conv(d: Mapping) -> Conversation:
    return Conversation(
        d["_id"], d["owner_id"], d["title"], d["model"], d["created_at"], d["updated_at"],
        json.loads(d.get("metadata") or "{}"),
    )


def _msg(d: Mapping) -> Message:
    return Message(
        d["_id"], d["conversation_id"], d["owner_id"], d["role"], d["content"], d["status"], d["model"],
        d["created_at"], tuple(d.get("attachment_ids") or ()),
    )


def _att(d: Mapping) -> Attachment:
    return Attachment(d["_id"], d["owner_id"], d["name"], d["mime"], d["size"], d["sha256"], d["created_at"])


def _fb(d: Mapping) -> Feedback:
    return Feedback(d["_id"], d["message_id"], d["conversation_id"], d["owner_id"], d["value"], d.get("comment"), d["created_at"])


def _key(d: Mapping) -> ApiKeyRecord:
    ct = d.get("ciphertext")
    return ApiKeyRecord(
        d["_id"], d["provider"], d["source"], d["fingerprint"], d["state"], d["created_at"],
        ciphertext=bytes(ct) if ct is not None else None, cooldown_until=d.get("cooldown_until", 0.0),
        last_used_at=d.get("last_used_at", 0.0), last_seq=d.get("last_seq", 0),
        requests_total=d.get("requests_total", 0), tokens_total=d.get("tokens_total", 0),
        last_error=d.get("last_error", ""), windows=load_windows(d.get("windows")),
    )


#: Attempts of an optimistic key update before giving up (each loses only to another process's success).
KEY_CAS_ATTEMPTS = 50


def _user_doc(u: User) -> dict:
    return {"_id": u.id, "email": u.email, "name": u.name, "role": u.role, "password_hash": u.password_hash,
            "created_at": u.created_at, "token_version": u.token_version}


def _conv_doc(c: Conversation) -> dict:
    return {"_id": c.id, "owner_id": c.owner_id, "title": c.title, "model": c.model, "created_at": c.created_at,
            "updated_at": c.updated_at, "metadata": dump_metadata(c.metadata)}


def _msg_doc(m: Message) -> dict:
    return {"_id": m.id, "conversation_id": m.conversation_id, "owner_id": m.owner_id, "role": m.role,
            "content": m.content, "status": m.status, "model": m.model, "created_at": m.created_at,
            "attachment_ids": list(m.attachment_ids)}


def _att_doc(a: Attachment) -> dict:
    return {"_id": a.id, "owner_id": a.owner_id, "name": a.name, "mime": a.mime, "size": a.size,
            "sha256": a.sha256, "created_at": a.created_at}


def _fb_doc(f: Feedback) -> dict:
    return {"_id": f.id, "message_id": f.message_id, "conversation_id": f.conversation_id, "owner_id": f.owner_id,
            "value": f.value, "comment": f.comment, "created_at": f.created_at}


def _describe_hosts(client: Any) -> str:
    """``host:port[, ...]`` of the client's seeds, never its credentials."""
    with contextlib.suppress(Exception):
        hosts = [f"{h}:{p}" for h, p in client.topology_description.server_descriptions()]
        if hosts:
            return ", ".join(sorted(hosts))
    with contextlib.suppress(Exception):
        host, port = client.address  # mongomock
        return f"{host}:{port}"
    return "the configured server"


def _reason(exc: BaseException) -> str:
    """pymongo's message without the (long) topology description that follows it."""
    text = str(exc).split(", Timeout:")[0].split(", Topology Description:")[0].strip()
    return text or type(exc).__name__


class MongoStore(Store):
    """Store backed by a MongoDB database.

    Args:
        client: a ``pymongo.MongoClient`` (or a ``mongomock.MongoClient`` in tests).
        db_name: the database to use (created on first write).
        clock: returns the current time in UNIX seconds (injectable for tests).
        owns_client: close ``client`` in :meth:`close` (``from_uri`` sets it).
        where: how to name the server in error messages (default: the client's hosts).

    Construction does no I/O and needs no server. Before the first operation (and before
    each later one until it has worked once) the store checks the schema version, creates
    the collections' indexes (:data:`INDEXES`) and reconciles the user count; see
    :meth:`ensure_ready`.

    Raises:
        StoreUnavailable: ``db_name`` is not a valid database name (at once). Every
            operation raises it while the server cannot be reached within the client's
            ``serverSelectionTimeoutMS``, refuses us (authentication, permissions), an
            index cannot be built (e.g. duplicate emails), or the database has a newer schema.

    Thread-safe (pymongo's client is); all methods block, so callers on the event loop
    use ``asyncio.to_thread``. Call :meth:`close` once at shutdown; later calls raise
    StoreUnavailable.
    """

    def __init__(
        self,
        client: Any,
        db_name: str = DEFAULT_DB,
        *,
        clock: Callable[[], float] = time.time,
        owns_client: bool = False,
        where: Optional[str] = None,
    ):
        self._client = client
        self._owns_client = owns_client
        self._clock = clock
        self._closed = False
        self.db_name = db_name
        self.where = where or _describe_hosts(client)
        try:
            db = client[db_name]
        except (PyMongoError, TypeError, ValueError) as exc:  # InvalidName
            self._close_client()
            raise StoreUnavailable(f"storage unavailable: {db_name!r} is not a usable MongoDB database name ({exc}).") from None
        self._db = db
        self.users = db["users"]
        self.conversations = db["conversations"]
        self.messages = db["messages"]
        self.files = db["files"]
        self.feedback = db["feedback"]
        self.meta = db["meta"]
        self.api_keys = db["api_keys"]
        self.api_usage = db["api_usage"]
        self._fs = gridfs.GridFS(db, collection=BLOB_BUCKET)  # no I/O until used
        self._ready = False  # _prepare has succeeded (it never needs to run again)
        self._ready_lock = threading.Lock()
        self._ready_attempts = 0  # finished _prepare attempts (under the lock)
        self._ready_error: Optional[StoreUnavailable] = None  # why the last attempt failed

    @classmethod
    def from_uri(
        cls, uri: str, db_name: Optional[str] = None, *, clock: Callable[[], float] = time.time, **client_options: Any
    ) -> "MongoStore":
        """Connect with pymongo to ``uri`` (``mongodb://`` or ``mongodb+srv://``).

        ``db_name`` defaults to the URI's path (``mongodb://host/NAME``), else "argus".
        :data:`DEFAULT_CLIENT_OPTIONS` apply unless the URI or ``client_options`` set them,
        e.g. ``mongodb://host/?serverSelectionTimeoutMS=10000``.

        No I/O for ``mongodb://`` URIs; for ``mongodb+srv://`` the DNS lookup of the
        servers is left to the first operation too (``connect=False`` unless given).

        Raises:
            ValueError: the URI is malformed (the message never repeats the URI's password).
            StoreUnavailable: ``db_name`` is not a valid database name.
        """
        from pymongo import uri_parser
        from pymongo.errors import ConfigurationError, InvalidURI

        srv = uri.startswith("mongodb+srv://")
        try:
            parsed = None if srv else uri_parser.parse_uri(uri)  # no I/O for mongodb:// (SRV needs DNS)
            uri_opts = {k.lower() for k in (parsed["options"] if parsed else _query_keys(uri))}
            client_options = {**client_options}
            for key, value in DEFAULT_CLIENT_OPTIONS.items():
                if key.lower() not in uri_opts and key not in client_options:
                    client_options[key] = value
            if srv and "connect" not in uri_opts and "connect" not in client_options:
                client_options["connect"] = False  # the SRV/TXT lookup waits for the first operation
            client = pymongo.MongoClient(uri, **client_options)
        except (InvalidURI, ValueError, TypeError) as exc:
            raise ValueError(f"not a usable MongoDB URI: {_redact(str(exc), uri)}") from None
        except ConfigurationError as exc:
            if srv:  # the SRV/TXT lookup failed: DNS may be down, the URI may be fine
                raise StoreUnavailable(
                    f"storage unavailable: cannot look up the MongoDB servers of {_srv_host(uri)} "
                    f"({_redact(str(exc), uri)})."
                ) from None
            raise ValueError(f"not a usable MongoDB URI: {_redact(str(exc), uri)}") from None
        if parsed is not None:
            where = ", ".join(f"{h}:{p}" for h, p in parsed["nodelist"])
            name = db_name or parsed.get("database") or DEFAULT_DB
        else:  # mongodb+srv: the seed list comes from DNS
            where = _srv_host(uri)
            name = db_name or uri.split("://", 1)[-1].split("@")[-1].partition("/")[2].split("?")[0] or DEFAULT_DB
        return cls(client, name, clock=clock, owns_client=True, where=where)

    # ---- plumbing -------------------------------------------------------
    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        if isinstance(exc, pymongo.errors.ConfigurationError) and self._client_is_srv():
            return MongoUnreachable(
                f"storage unavailable: cannot look up the MongoDB servers of {self.where} ({_reason(exc)}); "
                "check DNS and MONGO_URI."
            )
        if isinstance(exc, pymongo.errors.ServerSelectionTimeoutError):
            return MongoUnreachable(
                f"storage unavailable: cannot reach MongoDB at {self.where} ({_reason(exc)}); "
                "check that the server is running and MONGO_URI is right."
            )
        if isinstance(exc, ConnectionFailure):
            return MongoUnreachable(
                f"storage unavailable: lost the connection to MongoDB at {self.where} ({_reason(exc)}); "
                "try again in a moment."
            )
        if isinstance(exc, OperationFailure) and exc.code in (13, 18):  # Unauthorized, AuthenticationFailed
            msg = f"storage unavailable: MongoDB at {self.where} refused access ({_reason(exc)}); check the credentials in MONGO_URI."
        else:
            msg = f"storage unavailable: MongoDB at {self.where} failed: {_reason(exc)}"
        return StoreUnavailable(msg)

    def _client_is_srv(self) -> bool:
        with contextlib.suppress(Exception):
            return bool(self._client._resolve_srv_info["is_srv"])
        return False

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Run an operation: first :meth:`_ensure_ready`, then the body; pymongo errors
        (other than the ones callers handle) become StoreUnavailable."""
        if self._closed:
            raise StoreUnavailable("storage unavailable: the store has been closed.")
        if not self._ready:
            self._ensure_ready()
        try:
            yield
        except (DuplicateKeyError, gridfs.errors.NoFile):
            raise  # handled by the callers
        except PyMongoError as exc:
            raise self._unavailable(exc) from exc

    def ensure_ready(self) -> None:
        """Connect and prepare the database now (schema check, indexes, user count) unless
        that has already succeeded. Every operation does this by itself; call it to find out
        early, e.g. at start-up. Raises StoreUnavailable (see the class)."""
        if self._closed:
            raise StoreUnavailable("storage unavailable: the store has been closed.")
        if not self._ready:
            self._ensure_ready()

    def _ensure_ready(self) -> None:
        """Run :meth:`_prepare` once successfully. Callers that waited for the lock while
        another thread's attempt failed raise that failure instead of trying again, so a
        burst of operations during an outage costs each about one server-selection
        timeout, not one per caller queued ahead of it."""
        seen = self._ready_attempts
        with self._ready_lock:
            if self._ready:
                return
            failed = self._ready_error
            if self._ready_attempts != seen and failed is not None:
                raise type(failed)(str(failed))  # a fresh exception: this thread's own traceback
            try:
                self._prepare()
            except PyMongoError as exc:
                self._ready_error = self._unavailable(exc)
                raise self._ready_error from exc
            except StoreUnavailable as exc:  # newer schema, an index that cannot be built
                self._ready_error = exc
                raise
            except BaseException:
                self._ready_error = None  # not an outage: let the next caller try for itself
                raise
            finally:
                self._ready_attempts += 1
            self._ready = True
            self._ready_error = None

    def _prepare(self) -> None:
        """Check the schema version, create the indexes, reconcile the user count."""
        doc = self.meta.find_one({"_id": "schema"})
        version = doc["version"] if doc else 0
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"storage unavailable: the MongoDB database {self.db_name!r} has schema version {version}, "
                f"newer than this Argus ({SCHEMA_VERSION}); upgrade Argus."
            )
        for name, indexes in INDEXES.items():
            try:
                self._db[name].create_indexes(indexes)
            except OperationFailure as exc:
                if exc.code in (13, 18):  # Unauthorized, AuthenticationFailed: the general message fits
                    raise
                raise StoreUnavailable(
                    f"storage unavailable: cannot create the indexes of {self.db_name}.{name} at {self.where} "
                    f"({_reason(exc)})."
                ) from exc
        self.meta.update_one({"_id": "schema"}, {"$max": {"version": SCHEMA_VERSION}}, upsert=True)
        self._reconcile_user_count()

    def _reconcile_user_count(self) -> None:
        """Make ``meta.user_count`` at least the number of users (never lowers it)."""
        self.meta.update_one({"_id": "user_count"}, {"$max": {"n": self.users.count_documents({})}}, upsert=True)

    def _close_client(self) -> None:
        if self._owns_client:
            with contextlib.suppress(Exception):
                self._client.close()

    def close(self) -> None:
        """Close the client (when this store opened it). Idempotent."""
        if not self._closed:
            self._closed = True
            self._close_client()

    # ---- users ----------------------------------------------------------
    def create_user(self, email: str, name: str, password_hash: str, role: Optional[str] = None) -> User:
        """Insert a user. ``email`` is normalised (stripped, lower-cased).

        ``role=None``: "admin" for the very first user, otherwise "user" (see the module
        docstring). Raises UserExists (the unique index decides races), ValueError for a
        bad role, StoreUnavailable.
        """
        if role is not None and role not in USER_ROLES:
            raise ValueError(f"role must be one of {USER_ROLES}, got {role!r}")
        email = email.strip().lower()
        user = User(uuid.uuid4().hex, email, name, role or "user", password_hash, self._clock())
        with self._errors():
            try:
                self.users.insert_one(_user_doc(user))
            except DuplicateKeyError:
                raise UserExists(f"A user with the email {email} already exists.") from None
            count = self.meta.find_one_and_update(
                {"_id": "user_count"}, {"$inc": {"n": 1}}, upsert=True, return_document=ReturnDocument.AFTER
            )["n"]
            if role is None and count == 1:
                self.users.update_one({"_id": user.id}, {"$set": {"role": "admin"}})
                user = dataclasses.replace(user, role="admin")
        return user

    def get_user_by_email(self, email: str) -> Optional[User]:
        """The user with this email (compared case-insensitively), or None."""
        with self._errors():
            doc = self.users.find_one({"email": email.strip().lower()})
        return _user(doc) if doc else None

    def get_user(self, user_id: str) -> Optional[User]:
        with self._errors():
            doc = self.users.find_one({"_id": user_id})
        return _user(doc) if doc else None

    def bump_token_version(self, user_id: str) -> int:
        """``$inc`` the user's token version (atomic on the server); the new value.
        Raises NotFound, StoreUnavailable."""
        with self._errors():
            doc = self.users.find_one_and_update(
                {"_id": user_id}, {"$inc": {"token_version": 1}},
                projection={"token_version": 1}, return_document=ReturnDocument.AFTER,
            )
        if doc is None:
            raise NotFound("No such user.")
        return int(doc["token_version"])

    def set_password_hash(self, user_id: str, password_hash: str) -> User:
        """Store a new bcrypt hash and ``$inc`` the token version in one update.
        Raises NotFound, StoreUnavailable."""
        with self._errors():
            doc = self.users.find_one_and_update(
                {"_id": user_id}, {"$set": {"password_hash": password_hash}, "$inc": {"token_version": 1}},
                return_document=ReturnDocument.AFTER,
            )
        if doc is None:
            raise NotFound("No such user.")
        return _user(doc)

    def count_users(self) -> int:
        with self._errors():
            return self.users.count_documents({})

    def list_users(self) -> list[User]:
        """All users, oldest first."""
        with self._errors():
            docs = list(self.users.find({}).sort([("created_at", ASCENDING), ("_id", ASCENDING)]))
        return [_user(d) for d in docs]

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
        """Create a conversation; its id is ``conversation_id`` when given, else a new UUID4 hex.

        Idempotent per owner: an existing ``conversation_id`` of ``owner_id`` is returned
        unchanged. Raises NotFound when ``owner_id`` is not a user or the id belongs to
        another user; ValueError for an empty ``conversation_id`` or non-JSON-safe metadata.
        """
        if conversation_id is not None and not conversation_id:
            raise ValueError("conversation_id must be a non-empty string")
        meta = dump_metadata(metadata)
        now = self._clock()
        conv = Conversation(conversation_id or uuid.uuid4().hex, owner_id, title, model, now, now, json.loads(meta))
        with self._errors():
            if self.users.find_one({"_id": owner_id}, {"_id": 1}) is None:
                raise NotFound("No such user.")
            try:
                self.conversations.insert_one(_conv_doc(conv))
            except DuplicateKeyError:
                existing = self.conversations.find_one({"_id": conv.id})
                if existing is None or existing["owner_id"] != owner_id:
                    raise NotFound("No such conversation.") from None
                return _conv(existing)
        return conv

    def get_conversation(self, conversation_id: str, owner_id: str) -> Conversation:
        """Raises NotFound if missing or not owned by ``owner_id``."""
        with self._errors():
            doc = self.conversations.find_one({"_id": conversation_id, "owner_id": owner_id})
        if doc is None:
            raise NotFound("No such conversation.")
        return _conv(doc)

    def _check_conversation(self, conversation_id: str, owner_id: str) -> None:
        if self.conversations.find_one({"_id": conversation_id, "owner_id": owner_id}, {"_id": 1}) is None:
            raise NotFound("No such conversation.")

    def list_conversations(
        self, owner_id: str, limit: int = 20, cursor: Optional[str] = None, search: Optional[str] = None
    ) -> Page[Conversation]:
        """Newest ``updated_at`` first. ``limit`` is clamped to 1..MAX_PAGE (ValueError below 1);
        a malformed ``cursor`` raises ValueError. ``search`` (None or "" = no filter): only
        conversations whose title or any of whose messages contains the text (case-insensitive
        substring; every character literal). Pass the same ``search`` with a cursor."""
        limit = page_limit(limit)
        clauses: list[dict] = [{"owner_id": owner_id}]
        after = _after_cursor("updated_at", cursor)
        if after:
            clauses.append(after)
        with self._errors():
            if search:
                pattern = _contains(search)
                in_messages = self.messages.distinct("conversation_id", {"owner_id": owner_id, "content": pattern})
                clauses.append({"$or": [{"title": pattern}, {"_id": {"$in": in_messages}}]})
            docs = list(
                self.conversations.find({"$and": clauses} if len(clauses) > 1 else clauses[0])
                .sort([("updated_at", DESCENDING), ("_id", DESCENDING)])
                .limit(limit + 1)
            )
        items = [_conv(d) for d in docs[:limit]]
        more = len(docs) > limit
        return Page(items, encode_cursor(items[-1].updated_at, items[-1].id) if more else None)

    def rename_conversation(self, conversation_id: str, owner_id: str, title: str) -> Conversation:
        """Change the title (``updated_at`` is left alone so the list order does not jump).
        Raises NotFound (missing/foreign)."""
        return self._update_conversation(conversation_id, owner_id, {"title": title})

    def update_conversation_metadata(self, conversation_id: str, owner_id: str, metadata: dict) -> Conversation:
        """Replace the metadata as a whole (``updated_at`` is left alone).
        Raises NotFound (missing/foreign), ValueError (not a JSON-safe dict)."""
        return self._update_conversation(conversation_id, owner_id, {"metadata": dump_metadata(metadata)})

    def _update_conversation(self, conversation_id: str, owner_id: str, fields: dict) -> Conversation:
        with self._errors():
            doc = self.conversations.find_one_and_update(
                {"_id": conversation_id, "owner_id": owner_id}, {"$set": fields}, return_document=ReturnDocument.AFTER
            )
        if doc is None:
            raise NotFound("No such conversation.")
        return _conv(doc)

    def delete_conversation(self, conversation_id: str, owner_id: str) -> None:
        """Delete the conversation, its messages and their feedback, and the attachments its
        messages reference unless a message of another of the owner's conversations
        references them too (their GridFS bytes included).

        Children go first and the conversation last, then a second sweep removes messages a
        concurrent ``add_message`` slipped in: an interrupted delete can be repeated.
        Raises NotFound (missing/foreign), StoreUnavailable."""
        with self._errors():
            self._check_conversation(conversation_id, owner_id)
            referenced = {
                a for a in self.messages.distinct("attachment_ids", {"conversation_id": conversation_id, "owner_id": owner_id})
                if a
            }
            if referenced:
                elsewhere = self.messages.distinct(
                    "attachment_ids",
                    {"owner_id": owner_id, "conversation_id": {"$ne": conversation_id},
                     "attachment_ids": {"$in": sorted(referenced)}},
                )
                referenced -= set(elsewhere)
            for att_id in sorted(referenced):
                self._delete_attachment(att_id, owner_id)
            self.feedback.delete_many({"conversation_id": conversation_id, "owner_id": owner_id})
            self.messages.delete_many({"conversation_id": conversation_id, "owner_id": owner_id})
            self.conversations.delete_one({"_id": conversation_id, "owner_id": owner_id})
            self.messages.delete_many({"conversation_id": conversation_id, "owner_id": owner_id})
            self.feedback.delete_many({"conversation_id": conversation_id, "owner_id": owner_id})

    # ---- messages -------------------------------------------------------
    def _reserve_time(self, conversation_id: str, owner_id: str) -> float:
        """Atomically take ``max(now, last_message_at + 1 µs)`` as the conversation's new
        ``last_message_at`` and raise ``updated_at`` to it. NotFound if missing/foreign."""
        now = float(self._clock())
        last = {"$ifNull": ["$last_message_at", float("-inf")]}
        doc = self.conversations.find_one_and_update(
            {"_id": conversation_id, "owner_id": owner_id},
            [
                {"$set": {"last_message_at": {"$cond": [{"$gt": [now, last]}, now, {"$add": [last, 1e-6]}]}}},
                {"$set": {"updated_at": {"$max": ["$updated_at", "$last_message_at"]}}},
            ],
            projection={"last_message_at": 1},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            raise NotFound("No such conversation.")
        return doc["last_message_at"]

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

        ``created_at`` is strictly increasing within a conversation. With ``message_id``
        (a Chainlit step id) the call is an upsert: if that message exists in this
        conversation, its content and status are replaced, its model and attachment_ids
        only when the new ones are non-empty; role and created_at are kept; the
        conversation's ``updated_at`` is bumped all the same.

        Raises NotFound when the conversation or any attachment is missing or not
        ``owner_id``'s, or ``message_id`` exists in another conversation; ValueError for
        an unknown role or status, or an empty ``message_id``.
        """
        if role not in MESSAGE_ROLES:
            raise ValueError(f"role must be one of {MESSAGE_ROLES}, got {role!r}")
        if status not in MESSAGE_STATUSES:
            raise ValueError(f"status must be one of {MESSAGE_STATUSES}, got {status!r}")
        if message_id is not None and not message_id:
            raise ValueError("message_id must be a non-empty string")
        att_ids = tuple(attachment_ids)
        with self._errors():
            self._check_conversation(conversation_id, owner_id)
            if att_ids:
                wanted = set(att_ids)
                found = self.files.count_documents({"_id": {"$in": sorted(wanted)}, "owner_id": owner_id})
                if found != len(wanted):
                    raise NotFound("No such attachment.")
            if message_id is not None:
                existing = self._upsert_existing(message_id, conversation_id, owner_id, content, status, model, att_ids)
                if existing is not None:
                    return existing
            ts = self._reserve_time(conversation_id, owner_id)
            msg = Message(message_id or uuid.uuid4().hex, conversation_id, owner_id, role, content, status, model, ts, att_ids)
            try:
                self.messages.insert_one(_msg_doc(msg))
            except DuplicateKeyError:  # a concurrent call with the same message_id won
                existing = self._upsert_existing(msg.id, conversation_id, owner_id, content, status, model, att_ids)
                if existing is None:  # inserted and deleted again in between
                    raise NotFound("No such message.") from None
                return existing
        return msg

    def _upsert_existing(
        self, message_id: str, conversation_id: str, owner_id: str, content: str, status: str, model: str,
        att_ids: tuple[str, ...],
    ) -> Optional[Message]:
        """Update the existing message ``message_id`` (see add_message); None when there is none."""
        doc = self.messages.find_one({"_id": message_id})
        if doc is None:
            return None
        if doc["conversation_id"] != conversation_id or doc["owner_id"] != owner_id:
            raise NotFound("No such message.")
        fields: dict = {"content": content, "status": status}
        if model:
            fields["model"] = model
        if att_ids:
            fields["attachment_ids"] = list(att_ids)
        doc = self.messages.find_one_and_update(
            {"_id": message_id, "owner_id": owner_id}, {"$set": fields}, return_document=ReturnDocument.AFTER
        )
        if doc is None:
            raise NotFound("No such message.")
        self._reserve_time(conversation_id, owner_id)  # bumps updated_at (and last_message_at)
        return _msg(doc)

    def get_message(self, message_id: str, owner_id: str) -> Message:
        """Raises NotFound if missing or not owned by ``owner_id``."""
        with self._errors():
            doc = self.messages.find_one({"_id": message_id, "owner_id": owner_id})
        if doc is None:
            raise NotFound("No such message.")
        return _msg(doc)

    def delete_message(self, message_id: str, owner_id: str) -> None:
        """Delete one message and its feedback. The attachments it references are kept;
        the conversation's ``updated_at`` is left alone. Raises NotFound (missing/foreign)."""
        with self._errors():
            if self.messages.delete_one({"_id": message_id, "owner_id": owner_id}).deleted_count == 0:
                raise NotFound("No such message.")
            self.feedback.delete_many({"message_id": message_id, "owner_id": owner_id})

    def search_messages(self, owner_id: str, text: str, limit: int = 20) -> list[Message]:
        """The owner's messages whose content contains ``text`` (case-insensitive substring,
        every character literal), newest ``created_at`` first, at most ``limit`` (clamped to
        MAX_PAGE; ValueError below 1). An empty ``text`` finds nothing."""
        limit = page_limit(limit)
        if not text:
            return []
        with self._errors():
            docs = list(
                self.messages.find({"owner_id": owner_id, "content": _contains(text)})
                .sort([("created_at", DESCENDING), ("_id", DESCENDING)])
                .limit(limit)
            )
        return [_msg(d) for d in docs]

    def update_message(self, message_id: str, owner_id: str, *, content: str, status: str) -> Message:
        """Replace a message's content and status (e.g. when streaming ends); the conversation's
        ``updated_at`` is left alone. Raises NotFound (missing/foreign), ValueError (unknown status)."""
        if status not in MESSAGE_STATUSES:
            raise ValueError(f"status must be one of {MESSAGE_STATUSES}, got {status!r}")
        with self._errors():
            doc = self.messages.find_one_and_update(
                {"_id": message_id, "owner_id": owner_id},
                {"$set": {"content": content, "status": status}},
                return_document=ReturnDocument.AFTER,
            )
        if doc is None:
            raise NotFound("No such message.")
        return _msg(doc)

    def list_messages(
        self, conversation_id: str, owner_id: str, limit: int = 50, cursor: Optional[str] = None
    ) -> Page[Message]:
        """Newest first; ``next_cursor`` pages towards older messages.
        Raises NotFound for a missing/foreign conversation, ValueError for a bad cursor/limit."""
        limit = page_limit(limit)
        query: dict = {"conversation_id": conversation_id, "owner_id": owner_id, **_after_cursor("created_at", cursor)}
        with self._errors():
            self._check_conversation(conversation_id, owner_id)
            docs = list(
                self.messages.find(query).sort([("created_at", DESCENDING), ("_id", DESCENDING)]).limit(limit + 1)
            )
        items = [_msg(d) for d in docs[:limit]]
        more = len(docs) > limit
        return Page(items, encode_cursor(items[-1].created_at, items[-1].id) if more else None)

    # ---- feedback -------------------------------------------------------
    def set_feedback(self, message_id: str, owner_id: str, value: int, comment: Optional[str] = None) -> Feedback:
        """Rate one of the owner's messages: ``value`` 1 (thumbs up) or 0 (thumbs down), with an
        optional comment. A second call for the same (message, owner) replaces value, comment
        and ``created_at`` and keeps the feedback id. Raises NotFound (message missing/foreign),
        ValueError (value not 0 or 1)."""
        if isinstance(value, bool) or value not in (0, 1):
            raise ValueError(f"feedback value must be 0 or 1, got {value!r}")
        value = int(value)
        with self._errors():
            msg = self.messages.find_one({"_id": message_id, "owner_id": owner_id}, {"conversation_id": 1})
            if msg is None:
                raise NotFound("No such message.")
            for attempt in range(2):  # two racing first ratings: the unique index lets one insert
                try:
                    doc = self.feedback.find_one_and_update(
                        {"message_id": message_id, "owner_id": owner_id},
                        {
                            "$set": {"value": value, "comment": comment, "created_at": self._clock()},
                            "$setOnInsert": {"_id": uuid.uuid4().hex, "conversation_id": msg["conversation_id"]},
                        },
                        upsert=True,
                        return_document=ReturnDocument.AFTER,
                    )
                    break
                except DuplicateKeyError:
                    if attempt:
                        raise
        return _fb(doc)

    def delete_feedback(self, feedback_id: str, owner_id: str) -> None:
        """Raises NotFound (missing/foreign)."""
        with self._errors():
            if self.feedback.delete_one({"_id": feedback_id, "owner_id": owner_id}).deleted_count == 0:
                raise NotFound("No such feedback.")

    def list_feedback(self, conversation_id: str, owner_id: str) -> list[Feedback]:
        """The owner's feedback on the conversation's messages, oldest ``created_at`` first.
        Raises NotFound for a missing/foreign conversation."""
        with self._errors():
            self._check_conversation(conversation_id, owner_id)
            docs = list(
                self.feedback.find({"conversation_id": conversation_id, "owner_id": owner_id})
                .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
            )
        return [_fb(d) for d in docs]

    # ---- attachments ----------------------------------------------------
    def save_attachment(self, owner_id: str, name: str, mime: str, data: bytes) -> Attachment:
        """Store ``data`` in GridFS (one file per attachment, ``_id`` = the attachment id) and
        then its metadata document in ``files``: a crash in between leaves an unreferenced
        blob, never a record without bytes. Raises NotFound when ``owner_id`` is not a user,
        StoreUnavailable."""
        data = bytes(data)
        att = Attachment(uuid.uuid4().hex, owner_id, name, mime, len(data), hashlib.sha256(data).hexdigest(), self._clock())
        with self._errors():
            if self.users.find_one({"_id": owner_id}, {"_id": 1}) is None:
                raise NotFound("No such user.")
            self._put_blob(att, data)
            self.files.insert_one(_att_doc(att))
        return att

    def _put_blob(self, att: Attachment, data: bytes) -> None:
        self._fs.put(data, _id=att.id, filename=att.name, metadata={"owner_id": att.owner_id, "sha256": att.sha256})

    def get_attachment(self, attachment_id: str, owner_id: str) -> tuple[Attachment, bytes]:
        """Metadata and bytes. Raises NotFound (missing/foreign), StoreUnavailable when the
        bytes are missing or do not match the recorded sha256."""
        with self._errors():
            doc = self.files.find_one({"_id": attachment_id, "owner_id": owner_id})
            if doc is None:
                raise NotFound("No such attachment.")
            att = _att(doc)
            try:
                data = self._fs.get(att.id).read()
            except gridfs.errors.NoFile:
                raise StoreUnavailable(
                    f"storage unavailable: the bytes of attachment {att.id} are missing from GridFS ({BLOB_BUCKET})."
                ) from None
        if hashlib.sha256(data).hexdigest() != att.sha256:
            raise StoreUnavailable(f"storage unavailable: the bytes of attachment {att.id} are damaged (checksum mismatch).")
        return att, data

    def delete_attachment(self, attachment_id: str, owner_id: str) -> None:
        """Delete the attachment's record, then its GridFS bytes (each attachment has its own).
        Messages that list its id keep the id; ``get_attachment`` then raises NotFound.
        Raises NotFound (missing/foreign), StoreUnavailable."""
        with self._errors():
            if not self._delete_attachment(attachment_id, owner_id):
                raise NotFound("No such attachment.")

    def _delete_attachment(self, attachment_id: str, owner_id: str) -> bool:
        if self.files.delete_one({"_id": attachment_id, "owner_id": owner_id}).deleted_count == 0:
            return False
        self._fs.delete(attachment_id)
        return True

    # ---- API keys ---------------------------------------------------------
    def add_api_key(
        self, key_id: str, provider: str, source: str, fingerprint: str, ciphertext: Optional[bytes] = None
    ) -> ApiKeyRecord:
        """Store a new enabled key. Raises KeyExists, ValueError (see Store.add_api_key)."""
        check_api_key_fields(provider, source, fingerprint, key_id)
        rec = ApiKeyRecord(key_id, provider, source, fingerprint, "enabled", self._clock(), ciphertext=ciphertext)
        doc = {
            "_id": rec.id, "provider": provider, "source": source, "fingerprint": fingerprint, "state": rec.state,
            "created_at": rec.created_at, "ciphertext": ciphertext, "cooldown_until": 0.0, "last_used_at": 0.0,
            "last_seq": 0, "requests_total": 0, "tokens_total": 0, "last_error": "", "windows": "{}", "v": 0,
        }
        with self._errors():
            try:
                self.api_keys.insert_one(doc)
            except DuplicateKeyError:
                raise KeyExists("This key is already in the pool.") from None
        return rec

    def get_api_key(self, key_id: str) -> ApiKeyRecord:
        with self._errors():
            doc = self.api_keys.find_one({"_id": key_id})
        if doc is None:
            raise NotFound("No such key.")
        return _key(doc)

    def list_api_keys(self, provider: Optional[str] = None) -> list[ApiKeyRecord]:
        query = {} if provider is None else {"provider": provider}
        with self._errors():
            docs = list(self.api_keys.find(query).sort([("created_at", ASCENDING), ("_id", ASCENDING)]))
        return [_key(d) for d in docs]

    def _update_key(self, key_id: str, update: dict) -> ApiKeyRecord:
        with self._errors():
            doc = self.api_keys.find_one_and_update(
                {"_id": key_id}, {**update, "$inc": {"v": 1}}, return_document=ReturnDocument.AFTER
            )
        if doc is None:
            raise NotFound("No such key.")
        return _key(doc)

    def set_api_key_state(self, key_id: str, state: str, *, error: Optional[str] = None) -> ApiKeyRecord:
        if state not in KEY_STATES:
            raise ValueError(f"state must be one of {KEY_STATES}, got {state!r}")
        fields: dict = {"state": state}
        if state == "enabled":
            fields["cooldown_until"] = 0.0
        if error is not None:
            fields["last_error"] = error
        return self._update_key(key_id, {"$set": fields})

    def cool_down_api_key(self, key_id: str, until: float, *, error: str = "") -> ApiKeyRecord:
        return self._update_key(key_id, {"$max": {"cooldown_until": float(until)}, "$set": {"last_error": error}})

    def delete_api_key(self, key_id: str) -> None:
        with self._errors():
            if self.api_keys.delete_one({"_id": key_id}).deleted_count == 0:
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
        """See Store.acquire_api_key and the module docstring (rotation number, then a claim
        conditional on the version read). Raises StoreUnavailable, also when other processes
        win :data:`KEY_CAS_ATTEMPTS` races in a row."""
        with self._errors():
            seq = self.meta.find_one_and_update(
                {"_id": "key_seq"}, {"$inc": {"n": 1}}, upsert=True, return_document=ReturnDocument.AFTER
            )["n"]
            for _ in range(KEY_CAS_ATTEMPTS):
                docs = list(self.api_keys.find({"provider": provider, "state": "enabled", "cooldown_until": {"$lte": now}}))
                versions = {d["_id"]: d.get("v", 0) for d in docs}
                ranked = pick_api_key(
                    [_key(d) for d in docs], model, now=now, day=day, rpm=rpm, tpm=tpm, rpd=rpd, tokens=tokens,
                    env_ids=env_ids, exclude=exclude,
                )
                if not ranked:
                    return None
                best = ranked[0]
                windows = {**best.windows, model: best.windows.get(model, KeyWindow()).add(now, day, requests=1)}
                doc = self.api_keys.find_one_and_update(
                    {"_id": best.id, "v": versions[best.id], "state": "enabled", "cooldown_until": {"$lte": now}},
                    {
                        "$set": {"last_seq": seq, "last_used_at": now, "windows": dump_windows(windows)},
                        "$inc": {"v": 1, "requests_total": 1},
                    },
                    return_document=ReturnDocument.AFTER,
                )
                if doc is not None:
                    return _key(doc)
        raise StoreUnavailable("storage unavailable: the API-key pool is too busy right now; try again in a moment.")

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
        with self._errors():
            for _ in range(KEY_CAS_ATTEMPTS):
                doc = self.api_keys.find_one({"_id": key_id}, {"windows": 1, "v": 1})
                if doc is None:
                    break
                windows = load_windows(doc.get("windows"))
                windows[model] = windows.get(model, KeyWindow()).add(now, day, tokens=tokens)
                done = self.api_keys.update_one(
                    {"_id": key_id, "v": doc.get("v", 0)},
                    {"$set": {"windows": dump_windows(windows), "last_error": ""}, "$inc": {"v": 1, "tokens_total": tokens}},
                )
                if done.matched_count:
                    break
            self.api_usage.update_one(
                {"_id": f"{key_id}|{user_id}|{model}|{usage_day}"},
                {
                    "$setOnInsert": {"key_id": key_id, "user_id": user_id, "model": model, "day": usage_day},
                    "$inc": {"requests": 1, "input_tokens": input_tokens, "output_tokens": output_tokens},
                },
                upsert=True,
            )

    def list_api_usage(
        self, *, since_day: str = "", key_id: Optional[str] = None, user_id: Optional[str] = None
    ) -> list[UsageBucket]:
        query: dict = {"day": {"$gte": since_day}}
        if key_id is not None:
            query["key_id"] = key_id
        if user_id is not None:
            query["user_id"] = user_id
        with self._errors():
            docs = list(self.api_usage.find(query))
        rows = [
            UsageBucket(d["key_id"], d["user_id"], d["model"], d["day"], d["requests"], d["input_tokens"], d["output_tokens"])
            for d in docs
        ]
        return sorted(rows, key=lambda u: (u.day, u.key_id, u.user_id, u.model))

    # ---- bulk import (argus.store.migrate) ------------------------------
    # Each ``import_*`` writes one record with its id and timestamps preserved and returns
    # "copied" (it was missing), "present" (an identical one exists) or "updated" (it
    # existed with different fields, now overwritten). ImportConflict: the id (or email)
    # belongs to another owner or record.
    def _import(self, coll: Any, doc: dict, same_owner: Callable[[Mapping], bool], equal: Callable[[Mapping], bool]) -> str:
        existing = coll.find_one({"_id": doc["_id"]})
        if existing is None:
            try:
                coll.insert_one(doc)
                return "copied"
            except DuplicateKeyError:
                existing = coll.find_one({"_id": doc["_id"]})
                if existing is None:
                    raise ImportConflict(f"{coll.name} {doc['_id']}: conflicts with another record (unique index).") from None
        if not same_owner(existing):
            raise ImportConflict(f"{coll.name} {doc['_id']}: the id already belongs to another owner in MongoDB.")
        if equal(existing):
            return "present"
        fields = {k: v for k, v in doc.items() if k != "_id"}
        try:
            coll.update_one({"_id": doc["_id"]}, {"$set": fields})
        except DuplicateKeyError:
            raise ImportConflict(f"{coll.name} {doc['_id']}: conflicts with another record (unique index).") from None
        return "updated"

    def import_user(self, user: User) -> str:
        with self._errors():
            other = self.users.find_one({"email": user.email, "_id": {"$ne": user.id}}, {"_id": 1})
            if other is not None:
                raise ImportConflict(f"users: {user.email} already exists in MongoDB with another id ({other['_id']}).")
            result = self._import(self.users, _user_doc(user), lambda d: True, lambda d: _user(d) == user)
            if result == "copied":
                self.meta.update_one({"_id": "user_count"}, {"$inc": {"n": 1}}, upsert=True)
        return result

    def import_conversation(self, conv: Conversation) -> str:
        with self._errors():
            return self._import(
                self.conversations, _conv_doc(conv), lambda d: d["owner_id"] == conv.owner_id,
                lambda d: _conv(d) == conv and _conv(d).metadata == conv.metadata,
            )

    def import_message(self, msg: Message) -> str:
        with self._errors():
            result = self._import(
                self.messages, _msg_doc(msg),
                lambda d: d["owner_id"] == msg.owner_id and d["conversation_id"] == msg.conversation_id,
                lambda d: _msg(d) == msg,
            )
            # later add_message calls must get later times than every imported message
            self.conversations.update_one({"_id": msg.conversation_id}, {"$max": {"last_message_at": msg.created_at}})
        return result

    def import_attachment(self, att: Attachment, data: bytes) -> str:
        """Also (re)writes the GridFS bytes when they are missing or differ."""
        if hashlib.sha256(data).hexdigest() != att.sha256 or len(data) != att.size:
            raise ValueError(f"attachment {att.id}: the bytes do not match its size/sha256")
        with self._errors():
            blob = self._db[f"{BLOB_BUCKET}.files"].find_one({"_id": att.id})
            blob_ok = blob is not None and blob.get("length") == att.size and (blob.get("metadata") or {}).get("sha256") == att.sha256
            existing = self.files.find_one({"_id": att.id})
            if existing is not None and existing["owner_id"] != att.owner_id:
                raise ImportConflict(f"files {att.id}: the id already belongs to another owner in MongoDB.")
            if not blob_ok:
                self._fs.delete(att.id)  # a partial or different upload under this id
                self._put_blob(att, data)
            result = self._import(self.files, _att_doc(att), lambda d: True, lambda d: _att(d) == att)
        return "updated" if result == "present" and not blob_ok else result

    def import_feedback(self, fb: Feedback) -> str:
        with self._errors():
            other = self.feedback.find_one(
                {"message_id": fb.message_id, "owner_id": fb.owner_id, "_id": {"$ne": fb.id}}, {"_id": 1}
            )
            if other is not None:
                raise ImportConflict(
                    f"feedback {fb.id}: message {fb.message_id} already has other feedback ({other['_id']}) in MongoDB."
                )
            return self._import(self.feedback, _fb_doc(fb), lambda d: d["owner_id"] == fb.owner_id, lambda d: _fb(d) == fb)

    def finish_import(self) -> None:
        """Call after importing: brings the first-user bookkeeping up to date."""
        with self._errors():
            self._reconcile_user_count()


def _srv_host(uri: str) -> str:
    """The host of a ``mongodb+srv://[user:pass@]host/...`` URI."""
    return uri.split("://", 1)[-1].split("/")[0].split("?")[0].rpartition("@")[2]


def _query_keys(uri: str) -> list[str]:
    """The option names in a URI's query string."""
    from urllib.parse import parse_qsl

    return [k for k, _ in parse_qsl(uri.partition("?")[2], keep_blank_values=True)]


def _redact(text: str, uri: str) -> str:
    """``text`` with the URI's password (escaped or not, alone or as ``user:password``) blanked out."""
    from urllib.parse import unquote

    rest = uri.split("://", 1)[-1]
    userinfo = rest.split("/", 1)[0].rpartition("@")[0]
    password = userinfo.partition(":")[2]
    parts = {userinfo, password} if password else set()
    for secret in sorted(filter(None, parts | {unquote(p) for p in parts}), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text

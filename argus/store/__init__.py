"""Persistence for Jarvis Argus: the :class:`Store` interface and :func:`open_store`.

Use ``open_store(settings)`` once at start-up; everything else talks to the
returned :class:`Store` (see ``argus.store.base`` for the contract).

Backend choice (environment, read here rather than in ``Settings``):

* ``MONGO_URI`` set: MongoDB (``argus.store.mongo.MongoStore``, pymongo). The database
  is ``MONGO_DB`` if set, else the URI's path (``mongodb://host:27017/NAME``), else "argus".
* unset: SQLite under ``settings.data_dir``.

A MongoDB server that is down does not stop the start: ``open_store`` does no I/O for
MongoDB, :func:`check_store` says (for one log line) whether the store works right now,
and while it does not every store call raises :class:`StoreUnavailable` quickly, until
the server is back (pymongo reconnects by itself).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from .base import (
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
from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from argus.config import Settings

__all__ = [
    "Attachment",
    "Conversation",
    "Feedback",
    "Message",
    "NotFound",
    "Page",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "User",
    "UserExists",
    "check_store",
    "mongo_settings",
    "open_store",
]


def mongo_settings(environ: Optional[dict] = None) -> Optional[tuple[str, Optional[str]]]:
    """``(MONGO_URI, MONGO_DB or None)`` when ``MONGO_URI`` is set (non-blank), else None."""
    env = os.environ if environ is None else environ
    uri = env.get("MONGO_URI", "").strip()
    if not uri:
        return None
    return uri, env.get("MONGO_DB", "").strip() or None


def open_store(settings: "Settings") -> Store:
    """Open the configured store: MongoDB when ``MONGO_URI`` is set, else SQLite at
    ``<settings.data_dir>/argus.db``.

    MongoDB is opened without contacting the server (see :func:`check_store`).

    Raises:
        ConfigError: ``MONGO_URI`` is not a usable MongoDB URI (the message never
            contains the URI's password).
        StoreUnavailable: SQLite: the database cannot be opened or migrated.
            MongoDB: ``MONGO_DB`` (or the URI's path) is not a valid database name.
    """
    mongo = mongo_settings()
    if mongo is not None:
        from argus.config import ConfigError

        from .mongo import MongoStore

        uri, db_name = mongo
        try:
            return MongoStore.from_uri(uri, db_name)
        except ValueError as exc:
            raise ConfigError(f"MONGO_URI is {exc}") from None
    return SQLiteStore(settings.data_dir)


def check_store(store: Store) -> Optional[str]:
    """Try the store now (MongoDB: connect, check the schema, create the indexes; this
    waits up to the client's ``serverSelectionTimeoutMS``). None when it works, else one
    sentence for the log, without secrets. Never raises StoreUnavailable: the caller
    serves anyway and each store call reports the outage until the server is back.
    """
    ensure_ready = getattr(store, "ensure_ready", None)  # SQLite is ready once opened
    if ensure_ready is None:
        return None
    try:
        ensure_ready()
    except StoreUnavailable as exc:
        from .mongo import MongoUnreachable

        where = getattr(store, "where", "the configured server")
        if isinstance(exc, MongoUnreachable):
            return (f"MongoDB at {where} is unreachable; the chat will answer 'storage unavailable' "
                    f"until it comes back ({exc})")
        return (f"MongoDB at {where} is not usable; the chat will answer 'storage unavailable' "
                f"until this is fixed ({exc})")
    return None

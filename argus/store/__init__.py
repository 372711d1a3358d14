"""Persistence for Jarvis Argus: the :class:`Store` interface and :func:`open_store`.

Use ``open_store(settings)`` once at start-up; everything else talks to the
returned :class:`Store` (see ``argus.store.base`` for the contract).

Backend choice (environment, read here rather than in ``Settings``):

* ``MONGO_URI`` set: MongoDB (``argus.store.mongo.MongoStore``, pymongo). The database
  is ``MONGO_DB`` if set, else the URI's path (``mongodb://host:27017/NAME``), else "argus".
* unset: SQLite under ``settings.data_dir``.
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

    Raises:
        ConfigError: ``MONGO_URI`` is not a usable MongoDB URI (the message never
            contains the URI's password).
        StoreUnavailable: the database cannot be reached, opened or migrated.
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

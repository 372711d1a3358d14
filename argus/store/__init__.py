"""Persistence for Jarvis Argus: the :class:`Store` interface and :func:`open_store`.

Use ``open_store(settings)`` once at start-up; everything else talks to the
returned :class:`Store` (see ``argus.store.base`` for the contract).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    Attachment,
    Conversation,
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
    "Message",
    "NotFound",
    "Page",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "User",
    "UserExists",
    "open_store",
]


def open_store(settings: "Settings") -> Store:
    """Open the configured store.

    Today this is always SQLite at ``<settings.data_dir>/argus.db``.

    Raises:
        StoreUnavailable: the database cannot be opened or migrated.
    """
    # The single place to choose a backend: when MONGO_URI support lands, add
    #     if settings.mongo_uri:
    #         from .mongo import MongoStore
    #         return MongoStore(settings.mongo_uri, settings.data_dir)
    # here, and nowhere else.
    return SQLiteStore(settings.data_dir)

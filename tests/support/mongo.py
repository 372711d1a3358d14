"""mongomock as a MongoDB server would behave for the store tests: each collection operation
atomic (a server applies one operation at a time per document; mongomock does not lock), and a
dump of every collection for before/after comparisons."""
from __future__ import annotations

import contextlib
import functools
import threading

import mongomock

# ---- mongomock with per-operation atomicity ---------------------------------
_MOCK_LOCK = threading.RLock()
_ATOMIC = (
    "insert_one", "insert_many", "update_one", "update_many", "replace_one", "delete_one", "delete_many",
    "find_one", "find_one_and_update", "find_one_and_replace", "find_one_and_delete", "count_documents",
    "estimated_document_count", "distinct", "create_index", "create_indexes", "bulk_write", "aggregate",
)


def _locked(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _MOCK_LOCK:
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def atomic_mongomock():
    """Make each mongomock collection operation (and cursor evaluation) atomic, as on a server."""
    saved = [(mongomock.collection.Collection, name, getattr(mongomock.collection.Collection, name)) for name in _ATOMIC]
    saved.append((mongomock.collection.Cursor, "_compute_results", mongomock.collection.Cursor._compute_results))
    for owner, name, fn in saved:
        setattr(owner, name, _locked(fn))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def dump(client, db_name: str) -> dict:
    """Every document of every collection, for before/after comparisons."""
    db = client[db_name]
    return {name: sorted(db[name].find(), key=lambda d: str(d["_id"])) for name in sorted(db.list_collection_names())}

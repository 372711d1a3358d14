"""Copy everything from the SQLite store to MongoDB (``python -m argus store migrate --to URI``).

Users, attachments (bytes included), conversations (metadata included), messages and
feedback are copied with their ids and timestamps. Each record is upserted by id, so the
copy is idempotent: a second run copies nothing and changes nothing; a run after an
interruption copies what is missing. A record that exists in MongoDB with different
fields is overwritten from SQLite (counted as "updated"); one whose id or email belongs to
another owner there stops the run (:class:`MigrationError`) — users are checked before
anything is written. Stop the server first: records written while the copy runs may be
missed (run it again to pick them up).

Reading goes through the :class:`~argus.store.base.Store` API (users, conversations page
by page, their messages and feedback), except the list of attachment ids: the ABC has no
"every attachment" call, so it is read from ``argus.db`` directly over a read-only
connection (unreferenced uploads are copied too); their bytes come from
``get_attachment`` (checksum-verified).
"""
from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from .base import Conversation, Store, StoreError
from .mongo import ImportConflict, MongoStore
from .sqlite import DB_NAME, SQLiteStore

#: Reported in this order (also the order of copying, parents before children).
COLLECTIONS = ("users", "files", "conversations", "messages", "feedback")
PAGE = 200


class MigrationError(StoreError):
    """The copy cannot start or go on (no source database, conflicting records)."""


@dataclass
class Counts:
    copied: int = 0
    present: int = 0
    updated: int = 0

    def add(self, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)

    def __str__(self) -> str:
        text = f"{self.copied} copied, {self.present} already present"
        return text + (f", {self.updated} updated" if self.updated else "")


def _conversations(store: Store, owner_id: str) -> Iterator[Conversation]:
    cursor = None
    while True:
        page = store.list_conversations(owner_id, limit=PAGE, cursor=cursor)
        yield from page.items
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def _messages(store: Store, conversation_id: str, owner_id: str):
    cursor = None
    while True:
        page = store.list_messages(conversation_id, owner_id, limit=PAGE, cursor=cursor)
        yield from page.items
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def sqlite_attachment_keys(data_dir: Path) -> list[tuple[str, str]]:
    """``(attachment id, owner id)`` of every attachment in ``<data_dir>/argus.db``, oldest
    first, read over a read-only connection."""
    db = Path(data_dir) / DB_NAME
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT id, owner_id FROM attachments ORDER BY created_at, id").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise MigrationError(f"Cannot read the attachments of {db}: {exc}") from exc


def migrate(
    source: Store,
    target: MongoStore,
    attachment_keys: Iterable[tuple[str, str]],
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, Counts]:
    """Copy every record of ``source`` into ``target``; returns the counts per collection.

    ``attachment_keys``: (id, owner id) of every attachment to copy (see
    :func:`sqlite_attachment_keys`). ``progress`` gets one line per finished collection.

    Raises:
        MigrationError: a source user's email belongs to another user id in the target
            (nothing has been written then), or a record's id belongs to another owner.
        StoreUnavailable: either store fails.
    """
    counts = {name: Counts() for name in COLLECTIONS}
    say = progress or (lambda line: None)
    users = source.list_users()
    clashes = [
        f"{u.email} (id {u.id} in SQLite, {other.id} in MongoDB)"
        for u in users
        if (other := target.get_user_by_email(u.email)) is not None and other.id != u.id
    ]
    if clashes:
        raise MigrationError(
            "MongoDB already has different users with these emails; nothing was copied: " + "; ".join(clashes)
        )
    try:
        for user in users:
            counts["users"].add(target.import_user(user))
        say(f"users: {counts['users']}")
        for att_id, owner_id in attachment_keys:
            att, data = source.get_attachment(att_id, owner_id)
            counts["files"].add(target.import_attachment(att, data))
        say(f"files: {counts['files']}")
        for user in users:
            for conv in _conversations(source, user.id):
                counts["conversations"].add(target.import_conversation(conv))
                for msg in _messages(source, conv.id, user.id):
                    counts["messages"].add(target.import_message(msg))
                for fb in source.list_feedback(conv.id, user.id):
                    counts["feedback"].add(target.import_feedback(fb))
        say(f"conversations: {counts['conversations']}")
        say(f"messages: {counts['messages']}")
        say(f"feedback: {counts['feedback']}")
    except ImportConflict as exc:
        with contextlib.suppress(StoreError):
            target.finish_import()
        raise MigrationError(f"{exc} Copied so far: {_summary(counts)}.") from exc
    except BaseException:
        with contextlib.suppress(StoreError):
            target.finish_import()
        raise
    target.finish_import()
    return counts


def _summary(counts: dict[str, Counts]) -> str:
    return "; ".join(f"{name}: {c}" for name, c in counts.items())


def migrate_sqlite_to_mongo(
    data_dir: Path | str,
    uri: str,
    db_name: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, Counts]:
    """Open ``<data_dir>/argus.db`` and the MongoDB at ``uri`` and :func:`migrate` between them.

    Raises:
        MigrationError: there is no SQLite database at ``data_dir`` (none is created), or
            the copy meets a conflict.
        ValueError: ``uri`` is not a usable MongoDB URI.
        StoreUnavailable: either database cannot be used.
    """
    data_dir = Path(data_dir)
    if not (data_dir / DB_NAME).is_file():
        raise MigrationError(f"No SQLite database at {data_dir / DB_NAME} (set ARGUS_DATA_DIR or pass --from).")
    source = SQLiteStore(data_dir)
    try:
        keys = sqlite_attachment_keys(data_dir)
        target = MongoStore.from_uri(uri, db_name)
        try:
            if progress:
                progress(f"Copying {data_dir / DB_NAME} to MongoDB at {target.where}, database {target.db_name!r}")
            return migrate(source, target, keys, progress)
        finally:
            target.close()
    finally:
        source.close()

"""The store interface: users, conversations and messages.

Every store (SQLite now, MongoDB later) implements :class:`Store`. Records are
small frozen dataclasses whose fields map one-to-one onto MongoDB documents:
messages live in their own table/collection, linked by ``conversation_id`` and
``owner_id`` (never an unbounded array inside the conversation).

Times are UNIX seconds (float). Ids are opaque strings (UUID4 hex).
Ownership is enforced *inside* the store: every read or write of a
conversation takes the caller's ``owner_id`` and raises :class:`NotFound`
when the conversation is someone else's, so no route can forget the check.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Generic, Optional, Sequence, TypeVar

T = TypeVar("T")


class StoreError(Exception):
    """Base class of store errors."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or written (disk full, server down)."""


class NotFound(StoreError):
    """No such record, or it belongs to another user (indistinguishable on purpose)."""


class UserExists(StoreError):
    """A user with this email already exists (emails compare case-insensitively)."""


@dataclass(frozen=True)
class User:
    id: str
    email: str  # normalised: stripped, lower-case
    name: str
    role: str  # "admin" | "user"
    password_hash: str  # bcrypt hash (ASCII), never the password
    created_at: float


@dataclass(frozen=True)
class Attachment:
    """A file stored with a message (an uploaded image)."""

    id: str
    owner_id: str
    name: str
    mime: str  # detected by decoding (Pillow), not the browser's claim
    size: int  # bytes
    sha256: str  # hex digest of the bytes
    created_at: float


@dataclass(frozen=True)
class Conversation:
    id: str
    owner_id: str
    title: str
    model: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Message:
    id: str
    conversation_id: str
    owner_id: str
    role: str  # "user" | "assistant" | "system"
    content: str
    status: str  # "complete" | "stopped" | "error"
    model: str
    created_at: float
    attachment_ids: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing. ``next_cursor`` is None on the last page."""

    items: list[T]
    next_cursor: Optional[str]


class Store(ABC):
    """Persistence for Jarvis Argus. All methods are blocking; callers on the
    event loop wrap them in ``asyncio.to_thread``. Implementations must be
    safe to call from several threads at once.

    Raises :class:`StoreUnavailable` on I/O failure, :class:`NotFound` for a
    missing or foreign record, :class:`UserExists` on a duplicate email.
    """

    # users
    @abstractmethod
    def create_user(self, email: str, name: str, password_hash: str, role: Optional[str] = None) -> User:
        """Create a user. ``role=None`` means: "admin" if this is the first user, else "user"
        (decided atomically, so two racing first sign-ups yield exactly one admin)."""

    @abstractmethod
    def get_user_by_email(self, email: str) -> Optional[User]: ...

    @abstractmethod
    def get_user(self, user_id: str) -> Optional[User]: ...

    @abstractmethod
    def count_users(self) -> int: ...

    @abstractmethod
    def list_users(self) -> list[User]:
        """All users, oldest first (an admin listing; small by nature)."""

    # conversations
    @abstractmethod
    def create_conversation(self, owner_id: str, title: str, model: str) -> Conversation: ...

    @abstractmethod
    def get_conversation(self, conversation_id: str, owner_id: str) -> Conversation:
        """Raises NotFound if missing or not owned by ``owner_id``."""

    @abstractmethod
    def list_conversations(self, owner_id: str, limit: int = 20, cursor: Optional[str] = None) -> Page[Conversation]:
        """Newest ``updated_at`` first."""

    @abstractmethod
    def rename_conversation(self, conversation_id: str, owner_id: str, title: str) -> Conversation: ...

    # messages
    @abstractmethod
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
    ) -> Message:
        """Append a message and bump the conversation's ``updated_at``."""

    @abstractmethod
    def update_message(self, message_id: str, owner_id: str, *, content: str, status: str) -> Message: ...

    @abstractmethod
    def list_messages(
        self, conversation_id: str, owner_id: str, limit: int = 50, cursor: Optional[str] = None
    ) -> Page[Message]:
        """Newest first: the first page holds the most recent ``limit`` messages;
        ``next_cursor`` pages towards older ones."""

    # attachments
    @abstractmethod
    def save_attachment(self, owner_id: str, name: str, mime: str, data: bytes) -> Attachment: ...

    @abstractmethod
    def get_attachment(self, attachment_id: str, owner_id: str) -> tuple[Attachment, bytes]:
        """Raises NotFound if missing or not owned by ``owner_id``."""

    @abstractmethod
    def close(self) -> None: ...

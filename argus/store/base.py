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
import base64
import binascii
import json
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


#: The values the stores accept; anything else is a ValueError (a caller's bug, not user input).
USER_ROLES = ("admin", "user")
MESSAGE_ROLES = ("user", "assistant", "system")
MESSAGE_STATUSES = ("complete", "stopped", "error")
MAX_PAGE = 200  # larger ``limit`` values are clamped to this


def page_limit(limit: int) -> int:
    """``limit`` clamped to 1..MAX_PAGE. Raises ValueError below 1."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return min(limit, MAX_PAGE)


def encode_cursor(ts: float, row_id: str) -> str:
    """An opaque paging cursor for the position (timestamp, id): unpadded base64url of ``ts|id``."""
    raw = f"{ts!r}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Inverse of :func:`encode_cursor`. Raises ValueError("invalid paging cursor") on anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, row_id = raw.split("|", 1)
        return float(ts), row_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError("invalid paging cursor") from None


def dump_metadata(metadata: Optional[dict]) -> str:
    """Conversation metadata as compact JSON text, the form both stores keep it in (as a string:
    Chainlit's keys may hold '.' or start with '$', which MongoDB field names handle badly).

    Raises ValueError unless it is a dict that survives a JSON round trip unchanged (string keys;
    str, int, float, bool, None, lists and dicts inside).
    """
    if metadata is None:
        return "{}"
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-safe: {exc}") from None
    if json.loads(text) != metadata:
        raise ValueError("metadata must be JSON-safe (string keys, no tuples)")
    return text


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
    """A conversation; its id is also the Chainlit thread id."""

    id: str
    owner_id: str
    title: str
    model: str
    created_at: float
    updated_at: float
    # JSON-safe, never secret: what Chainlit keeps per thread (chat settings, chat profile).
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


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
class Feedback:
    """A user's rating of one assistant message (Chainlit's thumbs up/down + comment).

    At most one per (message, owner): setting it again replaces it.
    """

    id: str
    message_id: str
    conversation_id: str
    owner_id: str
    value: int  # 1 = thumbs up, 0 = thumbs down
    comment: Optional[str]
    created_at: float


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
    def create_conversation(
        self,
        owner_id: str,
        title: str,
        model: str,
        *,
        conversation_id: Optional[str] = None,
        metadata: Optional[dict] = None,
    ) -> Conversation:
        """Create a conversation (id generated unless ``conversation_id`` — a Chainlit
        thread id — is given). Idempotent for an existing id of the same owner
        (returns it unchanged: title, model and metadata are not touched); NotFound
        if that id belongs to another user or ``owner_id`` is not a user.
        ValueError for an empty ``conversation_id`` or metadata that is not a
        JSON-safe dict (string keys; str/int/float/bool/None, lists, dicts)."""

    @abstractmethod
    def get_conversation(self, conversation_id: str, owner_id: str) -> Conversation:
        """Raises NotFound if missing or not owned by ``owner_id``."""

    @abstractmethod
    def list_conversations(
        self, owner_id: str, limit: int = 20, cursor: Optional[str] = None, search: Optional[str] = None
    ) -> Page[Conversation]:
        """Newest ``updated_at`` first. ``search``: only conversations whose title or any
        of their messages contains the text as a substring, case-insensitively; every
        character is literal (no wildcards or query syntax); None or "" = no filter.
        ``next_cursor`` pages on with the same ``search``. ValueError for a bad
        cursor or ``limit`` < 1 (larger limits are clamped)."""

    @abstractmethod
    def rename_conversation(self, conversation_id: str, owner_id: str, title: str) -> Conversation: ...

    @abstractmethod
    def update_conversation_metadata(self, conversation_id: str, owner_id: str, metadata: dict) -> Conversation:
        """Replace the conversation's metadata as a whole (JSON-safe dict; callers strip
        secrets); ``updated_at`` is left alone. NotFound if missing or foreign, ValueError
        if not JSON-safe."""

    @abstractmethod
    def delete_conversation(self, conversation_id: str, owner_id: str) -> None:
        """Delete the conversation with its messages, feedback and the attachments its
        messages reference (files included, as in :meth:`delete_attachment`) — except
        attachments a message of another of the owner's conversations references too.
        NotFound if missing or foreign."""

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
        message_id: Optional[str] = None,
    ) -> Message:
        """Append a message and bump the conversation's ``updated_at``.

        ``message_id`` (a Chainlit step id) makes the call idempotent: if a message
        with that id exists in this conversation, it is updated instead (the chat
        handler and the Chainlit data layer may both write the same step): content
        and status are replaced; model and attachment_ids only when the new ones are
        non-empty; role and created_at are kept; the conversation's ``updated_at`` is
        bumped as for a new message. NotFound if the id exists in another
        conversation or belongs to another user, if the conversation or an
        attachment is missing or foreign. ValueError for an unknown role or status
        or an empty ``message_id``.
        """

    @abstractmethod
    def get_message(self, message_id: str, owner_id: str) -> Message:
        """Raises NotFound if missing or not owned by ``owner_id``."""

    @abstractmethod
    def delete_message(self, message_id: str, owner_id: str) -> None:
        """Delete the message and its feedback; its attachments and the conversation's
        ``updated_at`` are left alone. NotFound if missing or foreign."""

    @abstractmethod
    def search_messages(self, owner_id: str, text: str, limit: int = 20) -> list[Message]:
        """The owner's messages whose content contains ``text`` (substring,
        case-insensitive, every character literal), newest ``created_at`` first, at
        most ``limit`` (ValueError below 1; clamped above). "" finds nothing."""

    @abstractmethod
    def update_message(self, message_id: str, owner_id: str, *, content: str, status: str) -> Message: ...

    @abstractmethod
    def list_messages(
        self, conversation_id: str, owner_id: str, limit: int = 50, cursor: Optional[str] = None
    ) -> Page[Message]:
        """Newest first: the first page holds the most recent ``limit`` messages;
        ``next_cursor`` pages towards older ones."""

    # feedback
    @abstractmethod
    def set_feedback(self, message_id: str, owner_id: str, value: int, comment: Optional[str] = None) -> Feedback:
        """Rate one of the owner's messages (value 0 or 1); replaces an earlier rating
        of the same (message, owner) — value, comment and created_at — keeping its id.
        NotFound if the message is missing or foreign; ValueError for another value."""

    @abstractmethod
    def delete_feedback(self, feedback_id: str, owner_id: str) -> None:
        """NotFound if missing or foreign."""

    @abstractmethod
    def list_feedback(self, conversation_id: str, owner_id: str) -> list[Feedback]:
        """The owner's feedback on the conversation's messages, oldest first.
        NotFound if the conversation is missing or foreign."""

    # attachments
    @abstractmethod
    def save_attachment(self, owner_id: str, name: str, mime: str, data: bytes) -> Attachment: ...

    @abstractmethod
    def get_attachment(self, attachment_id: str, owner_id: str) -> tuple[Attachment, bytes]:
        """Raises NotFound if missing or not owned by ``owner_id``."""

    @abstractmethod
    def delete_attachment(self, attachment_id: str, owner_id: str) -> None:
        """Remove the record, and its bytes once no other attachment of the owner shares
        them (same sha256). Messages listing its id keep it (``get_attachment`` then
        raises NotFound). NotFound if missing or foreign."""

    @abstractmethod
    def close(self) -> None: ...

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


class KeyExists(StoreError):
    """An API key with this id (the same key of the same provider) is already stored."""


#: The values the stores accept; anything else is a ValueError (a caller's bug, not user input).
USER_ROLES = ("admin", "user")
MESSAGE_ROLES = ("user", "assistant", "system")
MESSAGE_STATUSES = ("complete", "stopped", "error")
MAX_PAGE = 200  # larger ``limit`` values are clamped to this
KEY_STATES = ("enabled", "disabled", "invalid")
KEY_SOURCES = ("env", "app")  # from the environment (never stored) or added in the app (stored encrypted)


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
    #: Sign-in sessions carry the version they were issued under; raising it
    #: (:meth:`Store.bump_token_version`: sign-out, password change) ends every older one.
    token_version: int = 0


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
class KeyWindow:
    """One API key's recent use of one model: the counters its rate limits are checked against.

    Minutes are UNIX minutes (``int(now // 60)``); requests per minute are estimated over a
    sliding 60 s window from the current and the previous minute's counts (the previous
    minute weighted by the part of it still inside the window), so a key is not offered a
    full minute's quota again the instant a minute boundary passes. ``day`` is the quota day
    ("YYYY-MM-DD" in the provider's reset time zone, chosen by the caller); counts of another
    day read as zero. Tokens are input + output tokens reported by the provider.
    """

    minute: int = 0
    requests: int = 0
    tokens: int = 0
    prev_requests: int = 0
    prev_tokens: int = 0
    day: str = ""
    day_requests: int = 0
    day_tokens: int = 0

    def at(self, now: float, day: str) -> "KeyWindow":
        """These counters as seen at ``now`` (UNIX seconds) on quota day ``day``."""
        minute = int(now // 60)
        if minute == self.minute:
            cur, prev = (self.requests, self.tokens), (self.prev_requests, self.prev_tokens)
        elif minute == self.minute + 1:
            cur, prev = (0, 0), (self.requests, self.tokens)
        else:
            cur, prev = (0, 0), (0, 0)
        same_day = day == self.day
        return KeyWindow(
            minute, cur[0], cur[1], prev[0], prev[1], day,
            self.day_requests if same_day else 0, self.day_tokens if same_day else 0,
        )

    def per_minute(self, now: float) -> tuple[float, float]:
        """(requests, tokens) in the 60 s before ``now`` (sliding estimate; call on :meth:`at`'s result)."""
        weight = 1.0 - (now % 60) / 60.0
        return self.requests + self.prev_requests * weight, self.tokens + self.prev_tokens * weight

    def fits(
        self, now: float, day: str, *, rpm: Optional[int], tpm: Optional[int], rpd: Optional[int], tokens: int = 0
    ) -> bool:
        """Whether one more request (of about ``tokens`` input tokens) stays within the limits
        (None = no limit). An idle key always takes a request, however large."""
        w = self.at(now, day)
        req_min, tok_min = w.per_minute(now)
        if rpm is not None and req_min + 1 > rpm:
            return False
        if rpd is not None and w.day_requests + 1 > rpd:
            return False
        if tpm is not None and tok_min > 0 and tok_min + tokens > tpm:
            return False
        return True

    def add(self, now: float, day: str, *, requests: int = 0, tokens: int = 0) -> "KeyWindow":
        """The counters after ``requests`` requests and ``tokens`` tokens at ``now``."""
        w = self.at(now, day)
        return KeyWindow(
            w.minute, w.requests + requests, w.tokens + tokens, w.prev_requests, w.prev_tokens, w.day,
            w.day_requests + requests, w.day_tokens + tokens,
        )


def dump_windows(windows: dict) -> str:
    """``{model: KeyWindow}`` as compact JSON (both stores keep it as text: model ids hold '.')."""
    return json.dumps({m: list(vars(w).values()) for m, w in sorted(windows.items())}, separators=(",", ":"))


def load_windows(text: Optional[str]) -> dict:
    """Inverse of :func:`dump_windows` (an empty or unreadable value gives ``{}``)."""
    try:
        raw = json.loads(text or "{}")
        return {str(m): KeyWindow(*v) for m, v in raw.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key of a remote model provider, as the key pool keeps it.

    The key itself is never stored in clear: keys added in the app are kept as
    ``ciphertext`` (AES-256-GCM, ``argus.keys.secretbox``); keys from the environment
    have no ciphertext (each server process reads them from its own environment) and
    are stored only for their state and counters.

    Attributes:
        id: derived from the key by the pool (a keyed digest), so a key is stored once.
        provider: ``"gemini"``, ``"openai"``, ``"anthropic"``.
        source: ``"env"`` or ``"app"`` (:data:`KEY_SOURCES`).
        fingerprint: how the key is shown (never the key).
        state: ``"enabled"``, ``"disabled"`` (by an admin) or ``"invalid"`` (rejected by
            the provider) (:data:`KEY_STATES`).
        created_at: UNIX seconds.
        ciphertext: app keys only.
        cooldown_until: UNIX seconds before which the key is not offered (0: none).
        last_used_at: UNIX seconds of the last request (0: never).
        last_seq: rotation order: the pool's sequence number of its last request; the key
            with the lowest number goes next.
        requests_total, tokens_total: over the key's life.
        last_error: the kind of the last failure ("" after a success).
        windows: ``{model id: KeyWindow}``, the rate-limit counters.
    """

    id: str
    provider: str
    source: str
    fingerprint: str
    state: str
    created_at: float
    ciphertext: Optional[bytes] = field(default=None, repr=False)
    cooldown_until: float = 0.0
    last_used_at: float = 0.0
    last_seq: int = 0
    requests_total: int = 0
    tokens_total: int = 0
    last_error: str = ""
    windows: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class UsageBucket:
    """Requests and tokens of one key, for one user and one model, on one (UTC) day."""

    key_id: str
    user_id: str
    model: str
    day: str  # "YYYY-MM-DD"
    requests: int
    input_tokens: int
    output_tokens: int


def pick_api_key(
    candidates: Sequence[ApiKeyRecord],
    model: str,
    *,
    now: float,
    day: str,
    rpm: Optional[int],
    tpm: Optional[int],
    rpd: Optional[int],
    tokens: int,
    env_ids: Sequence[str],
    exclude: Sequence[str],
) -> list[ApiKeyRecord]:
    """The keys that may take one more request now, best first (lowest ``last_seq``, then id).

    Shared by the stores' :meth:`Store.acquire_api_key`: enabled, not cooling down, not in
    ``exclude``, an app key or an environment key this process has (``env_ids``), and within
    the limits for ``model``.
    """
    env, skip = set(env_ids), set(exclude)
    ok = [
        k for k in candidates
        if k.state == "enabled" and k.cooldown_until <= now and k.id not in skip
        and (k.source == "app" or k.id in env)
        and k.windows.get(model, KeyWindow()).fits(now, day, rpm=rpm, tpm=tpm, rpd=rpd, tokens=tokens)
    ]
    return sorted(ok, key=lambda k: (k.last_seq, k.id))


def check_api_key_fields(provider: str, source: str, fingerprint: str, key_id: str) -> None:
    """ValueError unless the fields of a new key record are usable."""
    if source not in KEY_SOURCES:
        raise ValueError(f"source must be one of {KEY_SOURCES}, got {source!r}")
    if not (key_id and provider and fingerprint):
        raise ValueError("key_id, provider and fingerprint must not be empty")


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
    def bump_token_version(self, user_id: str) -> int:
        """Raise the user's :attr:`User.token_version` by one (atomically: two racing bumps
        give two distinct versions) and return the new value, so that every session token
        issued before is refused. Raises NotFound for an unknown user."""

    @abstractmethod
    def set_password_hash(self, user_id: str, password_hash: str) -> User:
        """Replace the user's bcrypt hash and, in the same write, bump their token version
        (a password change signs out every session). Returns the updated user. Raises
        NotFound for an unknown user."""

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

    # API keys of remote providers (argus.keys) and their usage
    @abstractmethod
    def add_api_key(
        self, key_id: str, provider: str, source: str, fingerprint: str, ciphertext: Optional[bytes] = None
    ) -> ApiKeyRecord:
        """Store a new key, enabled, with zero counters. KeyExists if ``key_id`` is stored;
        ValueError for an unknown source or empty fields."""

    @abstractmethod
    def get_api_key(self, key_id: str) -> ApiKeyRecord:
        """NotFound if missing."""

    @abstractmethod
    def list_api_keys(self, provider: Optional[str] = None) -> list[ApiKeyRecord]:
        """All keys (of ``provider`` when given), oldest first (an admin listing; small by nature)."""

    @abstractmethod
    def set_api_key_state(self, key_id: str, state: str, *, error: Optional[str] = None) -> ApiKeyRecord:
        """Set the state (:data:`KEY_STATES`); ``error`` replaces ``last_error`` when given.
        Enabling also ends any cooldown. NotFound if missing, ValueError for another state."""

    @abstractmethod
    def cool_down_api_key(self, key_id: str, until: float, *, error: str = "") -> ApiKeyRecord:
        """Keep the key out of rotation until ``until`` (UNIX seconds; an existing later
        cooldown is kept) and record ``error`` as ``last_error``. NotFound if missing."""

    @abstractmethod
    def delete_api_key(self, key_id: str) -> None:
        """Delete the key with its counters (its usage buckets stay). NotFound if missing."""

    @abstractmethod
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
        """Take the next key of ``provider`` for one request to ``model``, atomically over every
        process sharing the database: the first of :func:`pick_api_key`'s order gets the next
        rotation number (so keys take turns), ``last_used_at = now``, one more request in its
        counters for ``model`` (``day``: the quota day) and in ``requests_total``. Returns that
        record, or None when no key qualifies. ``tokens``: the request's estimated input tokens."""

    @abstractmethod
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
        """Count one answered request: tokens into the key's counters for ``model`` (quota day
        ``day``) and ``tokens_total``, ``last_error`` cleared, and one request with its tokens
        into the (key, user, model, ``usage_day``) bucket. A key deleted meanwhile only gets
        the bucket. ValueError for negative counts."""

    @abstractmethod
    def list_api_usage(
        self, *, since_day: str = "", key_id: Optional[str] = None, user_id: Optional[str] = None
    ) -> list[UsageBucket]:
        """Usage buckets with ``day >= since_day`` (and of ``key_id`` / ``user_id`` when given),
        ordered by day, key, user, model."""

    @abstractmethod
    def close(self) -> None: ...

"""Chainlit's data layer over our :class:`~argus.store.base.Store`: the history sidebar,
resuming a conversation, rename, delete, thumbs up/down with comments, images after resume.

Register it with ``@cl.data_layer`` (``app.py`` returns ``argus.data_layer``).

Ids: a conversation id IS the Chainlit thread id, and a message id IS the
Chainlit step id. The chat handler (``argus.chat``) stores every chat
message itself, with those ids, so what Chainlit's sidebar, feedback and
resume refer to are our rows.

Who writes what
---------------
* User messages and model answers are written by the chat handler only: it
  decides what is a chat message (slash commands, refused, too long and
  rate-limited messages are not), stores the uploaded images with them, and
  keeps the answer's status (``complete``/``stopped``/``error``). Chainlit
  also calls :meth:`ArgusDataLayer.create_step`/``update_step`` for those
  steps; this layer leaves them alone (same id, same row: nothing to add,
  and rewriting the row from the step would clobber its status and
  attachments).
* Every ``cl.Message`` the app sends carries ``metadata["argus"]``, its kind:
  :data:`KIND_ANSWER` (a model answer, stored by the chat handler),
  :data:`KIND_COMMAND` (a slash command's reply: never stored),
  :data:`KIND_NOTICE` (a note for the user: rate limits, upload problems,
  errors: never stored) or :data:`KIND_CHAT` (an assistant message that is
  part of the conversation, stored by *this* layer; only for ids registered
  with :meth:`ArgusDataLayer.expect_chat_step`, so a browser cannot inject
  one). Steps without a kind (Chainlit's own "Task manually stopped.", error
  messages, run/tool steps) are never stored: the model's memory holds the
  conversation only.
* A :data:`KIND_CHAT` step for a thread that has no conversation yet (e.g. a
  greeting sent in ``on_chat_start``) waits in memory, per thread, and is
  written when the chat handler creates the conversation
  (:meth:`ArgusDataLayer.conversation_created`), before the first user
  message; threads that never get a conversation drop theirs after
  :data:`PENDING_TTL_S`. Chainlit's ``update_thread`` never creates a
  conversation (its first call comes with any first interaction, slash
  commands included).

Who is asking
-------------
Chainlit calls the data layer without saying for whom. This layer finds out:

* in an HTTP request (the sidebar's ``/project/...`` API, ``/feedback``):
  from the request's own session token (the ``access_token`` cookie or a
  ``Bearer`` header), which :class:`CallerMiddleware` hands over through a
  context variable, never from the request body;
* in a socket event: from the Chainlit session's signed-in user.

Either way the email is looked up in the store (:meth:`ArgusDataLayer.caller`),
and every read and write goes to the store with that user's id, so the store's
ownership checks apply: another user's thread is indistinguishable from a
missing one (``get_thread`` → None, ``get_thread_author`` → ``""`` which
Chainlit answers with 404). ``list_threads`` lists the caller's threads only,
and answers an empty page if Chainlit's ``filters.userId`` is anyone else.
Without a known caller nothing is read or written.

Metadata: only ``chat_settings``, ``chat_profile`` and ``client_type`` are
kept (see :func:`sanitize_metadata`), with anything named like a key, token,
secret or password removed, on the way in and on the way out.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional

from chainlit.data.base import BaseDataLayer
from chainlit.types import Feedback, PageInfo, PaginatedResponse, Pagination, ThreadDict, ThreadFilter
from chainlit.user import PersistedUser

from argus.commands.base import one_line
from argus.network_choice import drop_conversation_session
from argus.store.base import Conversation, Message, NotFound, Store, User

if TYPE_CHECKING:
    from chainlit.element import Element, ElementDict
    from chainlit.step import StepDict
    from chainlit.user import User as ChainlitUser

log = logging.getLogger(__name__)

#: Key of a message's kind in ``cl.Message.metadata``.
KIND_KEY = "argus"
KIND_ANSWER = "answer"
KIND_COMMAND = "command"
KIND_NOTICE = "notice"
KIND_CHAT = "chat"

#: How a stopped answer, an empty one and a failed one are shown (live and after resume).
STOPPED_MARK = "_(stopped)_"
EMPTY_ANSWER = "_(The model gave an empty answer.)_"
GENERATION_FAILED = "Something went wrong while generating the answer; please try again."

#: URL path of a stored attachment, under Chainlit's root path (see ``argus.files_route``).
FILES_PATH = "/argus/files/"
#: Most messages a resumed thread shows (the newest ones).
MAX_THREAD_STEPS = 2000
#: Largest page of threads one ``list_threads`` call returns.
MAX_THREADS_PAGE = 100
#: Store pages scanned for one page of a feedback-filtered thread list.
FEEDBACK_SCAN_PAGES = 10
#: Longest rename title and feedback comment kept, in characters.
MAX_TITLE_CHARS = 200
MAX_COMMENT_CHARS = 2000
#: Longest search text passed to the store.
MAX_SEARCH_CHARS = 200
#: Queued steps of threads without a conversation: kept this long, this many.
PENDING_TTL_S = 3600.0
MAX_PENDING_THREADS = 1000
MAX_PENDING_STEPS = 50
#: Seconds a looked-up user stays cached (sign-in state changes rarely).
USER_CACHE_TTL_S = 30.0

#: Metadata keys kept on a conversation (Chainlit's per-thread session state).
METADATA_KEYS = ("chat_settings", "chat_profile", "client_type")
#: Names of values removed from metadata wherever they appear.
_SECRET_NAME = re.compile(r"key|token|secret|passw|pwd|auth|cookie|credential|session|env|jwt|bearer", re.I)
MAX_METADATA_BYTES = 16 * 1024
_MAX_DEPTH = 6
_MAX_STRING = 2000

_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")


# ---------------------------------------------------------------------------
# Who is asking: the HTTP request's own token, or the socket session's user.
# ---------------------------------------------------------------------------
#: The session token of the HTTP request being handled ("" = a request without one);
#: None outside HTTP requests (socket events, background tasks).
_request_token: ContextVar[Optional[str]] = ContextVar("argus_request_token", default=None)


@contextlib.contextmanager
def request_token(token: Optional[str]) -> Iterator[None]:
    """Act as an HTTP request carrying ``token`` ("" or None: a request without one)."""
    reset = _request_token.set(token or "")
    try:
        yield
    finally:
        _request_token.reset(reset)


def token_from_scope(scope: dict) -> str:
    """The session token of an HTTP request: Chainlit's auth cookie, else a ``Bearer`` header."""
    from chainlit.auth.cookie import get_token_from_cookies
    from starlette.requests import Request

    request = Request(scope)
    token = get_token_from_cookies(request.cookies)
    if not token:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
    return token or ""


class CallerMiddleware:
    """ASGI middleware: makes each HTTP request's token visible to the data layer.

    Socket.io traffic (``/ws/socket.io``) is left out: socket events carry
    their user in the Chainlit session.
    """

    _argus_caller = True  # marks the class across module reloads

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or "/ws/socket.io" in scope.get("path", ""):
            return await self.app(scope, receive, send)
        reset = _request_token.set(token_from_scope(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            _request_token.reset(reset)


def install_caller_middleware(app=None) -> None:
    """Put :class:`CallerMiddleware` in front of Chainlit's app (idempotent; before the server
    starts), right inside :class:`argus.sessions.SessionGuard` when that is installed, so
    it only ever sees tokens the guard let through (ended sessions are already removed)."""
    from starlette.middleware import Middleware

    if app is None:
        from chainlit.server import app
    stack = [m for m in app.user_middleware if not getattr(m.cls, "_argus_caller", False)]
    guards = [i for i, m in enumerate(stack) if getattr(m.cls, "_argus_session_guard", False)]
    stack.insert(guards[-1] + 1 if guards else 0, Middleware(CallerMiddleware))
    app.user_middleware[:] = stack
    app.middleware_stack = None  # built on the first request


@dataclass(frozen=True)
class Caller:
    """The signed-in user a data-layer call is made for."""

    user_id: str
    identifier: str  # the email: Chainlit's user identifier
    name: str
    via: str  # "http" (a request of the REST API) or "socket" (a socket event)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def iso(ts: float) -> str:
    """UNIX seconds → Chainlit's timestamp format (``2025-01-31T14:05:00.123456Z``)."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def message_kind(step: Any) -> Optional[str]:
    """The ``metadata["argus"]`` kind of a step dict, or None."""
    meta = step.get("metadata") if isinstance(step, dict) else None
    kind = meta.get(KIND_KEY) if isinstance(meta, dict) else None
    return kind if isinstance(kind, str) else None


def _scrub(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of ``value`` without secret-looking keys; None to drop it."""
    if depth > _MAX_DEPTH:
        return None
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, str):
        return value[:_MAX_STRING]
    if isinstance(value, (list, tuple)):
        return [_scrub(v, depth + 1) for v in list(value)[:200]]
    if isinstance(value, dict):
        out = {}
        for k, v in list(value.items())[:200]:
            if not isinstance(k, str) or _SECRET_NAME.search(k):
                continue
            out[k] = _scrub(v, depth + 1)
        return out
    return None  # anything else (objects) is not metadata


def sanitize_metadata(metadata: Any) -> dict:
    """What we keep of a thread's metadata: :data:`METADATA_KEYS` only, scrubbed of
    anything named like a key/token/secret/password, at most :data:`MAX_METADATA_BYTES`."""
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError:
            return {}
    if not isinstance(metadata, dict):
        return {}
    out = {}
    for key in METADATA_KEYS:
        if key in metadata:
            value = _scrub(metadata[key])
            if value is not None:
                out[key] = value
    if len(json.dumps(out, ensure_ascii=False).encode("utf-8")) > MAX_METADATA_BYTES:
        return {}
    return out


def display_text(m: Message) -> str:
    """How a stored message is shown in the chat (as it was shown live)."""
    text = m.content or ""
    if m.role != "assistant":
        return text
    if m.status == "stopped":
        return f"{text}\n\n{STOPPED_MARK}" if text.strip() else STOPPED_MARK
    if m.status == "error":
        return text if text.strip() else GENERATION_FAILED
    return text if text.strip() else EMPTY_ANSWER


def file_url(attachment_id: str, root_path: Optional[str] = None) -> str:
    """The URL of a stored attachment (the authenticated route of ``argus.files_route``)."""
    if root_path is None:
        from chainlit.config import config

        root_path = config.run.root_path or ""
    return f"{root_path}{FILES_PATH}{attachment_id}"


@dataclass
class _Pending:
    """Steps of a thread that has no conversation yet."""

    owner_id: str
    since: float
    steps: "OrderedDict[str, dict]" = field(default_factory=OrderedDict)


class _TTLCache:
    """A small thread-safe map whose entries expire (and which never grows past ``max_items``)."""

    def __init__(self, ttl: float, max_items: int, clock: Callable[[], float]):
        self.ttl, self.max_items, self.clock = ttl, max_items, clock
        self._items: "OrderedDict[str, tuple[float, Any]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[bool, Any]:
        with self._lock:
            hit = self._items.get(key)
            if hit is None or hit[0] < self.clock():
                self._items.pop(key, None)
                return False, None
            return True, hit[1]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = (self.clock() + self.ttl, value)
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)


# ---------------------------------------------------------------------------
# The data layer
# ---------------------------------------------------------------------------
class ArgusDataLayer(BaseDataLayer):
    """Chainlit's :class:`BaseDataLayer` over a :class:`Store` (see the module docstring).

    Args:
        store: the store (shared with the chat handler; this layer never closes it).
        clock: monotonic seconds, for the expiry of queued steps and cached users.
        assistant_name: the author shown on assistant messages (default: Chainlit's UI name).
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.monotonic,
        assistant_name: Optional[str] = None,
    ):
        self.store = store
        self.clock = clock
        self._assistant_name = assistant_name
        self._users = _TTLCache(USER_CACHE_TTL_S, 10_000, clock)
        self._attachments = _TTLCache(24 * 3600.0, 5_000, clock)  # id → (name, mime); immutable records
        self._pending: "OrderedDict[str, _Pending]" = OrderedDict()
        self._chat_steps = _TTLCache(PENDING_TTL_S, 10_000, clock)  # ids registered by expect_chat_step
        #: The chat server's services (``JarvisArgus.services``: "daemon", "network_choice"), for
        #: dropping a deleted conversation's network session; empty: nothing to drop.
        self.services: dict[str, Any] = {}

    # ---- plumbing ----------------------------------------------------------------
    async def _call(self, fn: Callable, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    @property
    def assistant_name(self) -> str:
        if self._assistant_name:
            return self._assistant_name
        from chainlit.config import config

        return config.ui.name

    async def user_for_identifier(self, identifier: str) -> Optional[User]:
        """Our user with this email (cached for :data:`USER_CACHE_TTL_S`), or None."""
        if not isinstance(identifier, str) or not identifier:
            return None
        key = identifier.strip().lower()
        hit, user = self._users.get(key)
        if not hit:
            user = await self._call(self.store.get_user_by_email, key)
            self._users.put(key, user)
        return user

    async def caller_from_token(self, token: Optional[str], via: str = "http") -> Optional[Caller]:
        """The user a Chainlit session token (JWT) was issued to, if it is valid and they exist."""
        if not token:
            return None
        from chainlit.auth.jwt import decode_jwt

        try:
            user = decode_jwt(token)
        except Exception:  # expired, forged, or no secret configured
            return None
        return await self._caller_for(user.identifier, via)

    async def _caller_for(self, identifier: str, via: str) -> Optional[Caller]:
        user = await self.user_for_identifier(identifier)
        if user is None:
            return None
        return Caller(user_id=user.id, identifier=user.email, name=user.name, via=via)

    async def caller(self) -> Optional[Caller]:
        """Who this call is for: the HTTP request's token, else the socket session's user."""
        token = _request_token.get()
        if token is not None:  # an HTTP request: its own token decides, nothing else
            return await self.caller_from_token(token, "http")
        from chainlit.context import context_var

        try:
            session = context_var.get().session
        except LookupError:
            return None
        user = getattr(session, "user", None)
        identifier = getattr(user, "identifier", None)
        if not identifier:
            return None
        return await self._caller_for(identifier, "socket")

    async def _conversation(self, thread_id: Any, caller: Caller) -> Optional[Conversation]:
        if not isinstance(thread_id, str) or not _ID.fullmatch(thread_id):
            return None
        try:
            return await self._call(self.store.get_conversation, thread_id, caller.user_id)
        except NotFound:
            return None

    # ---- users ---------------------------------------------------------------------
    @staticmethod
    def _persisted(user: User) -> PersistedUser:
        return PersistedUser(
            id=user.id,
            createdAt=iso(user.created_at),
            identifier=user.email,
            display_name=user.name,
            metadata={"user_id": user.id, "role": user.role, "provider": "credentials"},
        )

    async def get_user(self, identifier: str) -> Optional[PersistedUser]:
        """Our user with this email as Chainlit's PersistedUser (id = our user id), or None."""
        user = await self.user_for_identifier(identifier)
        return self._persisted(user) if user is not None else None

    async def create_user(self, user: "ChainlitUser") -> Optional[PersistedUser]:
        """Never creates anyone (accounts come from sign-up, with a password hash):
        the existing user with that email, or None.

        Chainlit calls this with the ``cl.User`` it is about to sign into a session token
        (``chainlit.server._authenticate_user``): the user's session claims (id, token
        version, sign-in time: :func:`argus.sessions.stamp`) are added to its metadata
        here, read fresh from the store, so :class:`argus.sessions.SessionGuard` can
        refuse the token once the version moves on (sign-out, password change)."""
        from argus.sessions import stamp

        identifier = getattr(user, "identifier", None)
        if not isinstance(identifier, str) or not identifier:
            return None
        key = identifier.strip().lower()
        stored = await self._call(self.store.get_user_by_email, key)
        self._users.put(key, stored)
        if stored is None:
            return None
        if isinstance(getattr(user, "metadata", None), dict):
            stamp(user.metadata, stored)
        return self._persisted(stored)

    # ---- threads -------------------------------------------------------------------
    def _thread_dict(self, conv: Conversation, caller: Caller, *, created: Optional[float] = None) -> dict:
        return {
            "id": conv.id,
            "createdAt": iso(conv.created_at if created is None else created),
            "name": conv.title,
            "userId": caller.user_id,
            "userIdentifier": caller.identifier,
            "tags": [],
            "metadata": sanitize_metadata(conv.metadata),
            "steps": [],
            "elements": [],
        }

    async def list_threads(self, pagination: Pagination, filters: ThreadFilter) -> PaginatedResponse[ThreadDict]:
        """The caller's conversations, most recently updated first (``createdAt`` carries the
        last update, as in Chainlit's own data layer, so the sidebar groups them by it).

        ``filters.search``: only conversations whose title or messages contain the text;
        ``filters.feedback`` (0/1): only conversations with such a rating;
        ``pagination.cursor``: the previous page's ``endCursor``.
        """
        empty = PaginatedResponse(pageInfo=PageInfo(hasNextPage=False, startCursor=None, endCursor=None), data=[])
        caller = await self.caller()
        if caller is None:
            return empty
        if filters.userId is not None and filters.userId != caller.user_id:
            log.warning("list_threads for user %s refused to %s", filters.userId, caller.user_id)
            return empty
        first = max(1, min(int(pagination.first or 20), MAX_THREADS_PAGE))
        search = (filters.search or "").strip()[:MAX_SEARCH_CHARS] or None
        cursor = pagination.cursor or None
        convs: list[Conversation] = []
        try:
            if filters.feedback is None:
                page = await self._call(self.store.list_conversations, caller.user_id, first, cursor, search)
                convs, cursor = page.items, page.next_cursor
            else:
                for _ in range(FEEDBACK_SCAN_PAGES):
                    page = await self._call(self.store.list_conversations, caller.user_id, first, cursor, search)
                    for conv in page.items:
                        rated = await self._call(self.store.list_feedback, conv.id, caller.user_id)
                        if any(f.value == filters.feedback for f in rated):
                            convs.append(conv)
                    cursor = page.next_cursor
                    if convs or cursor is None:
                        break
        except ValueError:  # a cursor that is not one of ours
            return empty
        data = [self._thread_dict(c, caller, created=c.updated_at) for c in convs]
        return PaginatedResponse(
            pageInfo=PageInfo(
                hasNextPage=cursor is not None,
                startCursor=data[0]["id"] if data else None,
                endCursor=cursor,
            ),
            data=data,
        )

    async def _messages(self, conv: Conversation, caller: Caller) -> list[Message]:
        """The conversation's messages, oldest first (at most the newest MAX_THREAD_STEPS)."""
        items: list[Message] = []
        cursor = None
        while len(items) < MAX_THREAD_STEPS:
            page = await self._call(self.store.list_messages, conv.id, caller.user_id, 200, cursor)
            items.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
        return list(reversed(items[:MAX_THREAD_STEPS]))

    async def _attachment_info(self, attachment_id: str, owner_id: str) -> Optional[tuple[str, str]]:
        hit, info = self._attachments.get(f"{owner_id}/{attachment_id}")
        if hit:
            return info
        try:
            att, _ = await self._call(self.store.get_attachment, attachment_id, owner_id)
        except NotFound:
            return None
        info = (att.name, att.mime)
        self._attachments.put(f"{owner_id}/{attachment_id}", info)
        return info

    def _element(self, attachment_id: str, name: str, mime: str, message: Message) -> dict:
        return {
            "id": attachment_id,
            "threadId": message.conversation_id,
            "type": "image" if mime.startswith("image/") else "video" if mime.startswith("video/") else "file",
            "url": file_url(attachment_id),
            "chainlitKey": None,
            "objectKey": None,
            "name": name,
            "display": "inline",
            "size": "medium" if mime.startswith("image/") else None,
            "forId": message.id,
            "mime": mime,
        }

    def _step(self, m: Message, caller: Caller, feedback: Optional[dict]) -> dict:
        created = iso(m.created_at)
        user = m.role == "user"
        step = {
            "id": m.id,
            "threadId": m.conversation_id,
            "parentId": None,
            "name": (caller.name or caller.identifier) if user else self.assistant_name,
            "type": "user_message" if user else "assistant_message",
            "input": "",
            "output": display_text(m),
            "createdAt": created,
            "start": created,
            "end": created,
            "streaming": False,
            "isError": False,
            "waitForAnswer": False,
            "metadata": {},
            "tags": None,
            "language": None,
            "command": None,
        }
        if feedback is not None:
            step["feedback"] = feedback
        return step

    async def get_thread(self, thread_id: str) -> Optional[ThreadDict]:
        """The caller's conversation as a Chainlit thread (messages as steps, with their
        feedback; images as elements served by the authenticated file route), or None
        when it is missing or someone else's."""
        caller = await self.caller()
        if caller is None:
            return None
        conv = await self._conversation(thread_id, caller)
        if conv is None:
            return None
        try:
            messages = await self._messages(conv, caller)
            rated = await self._call(self.store.list_feedback, conv.id, caller.user_id)
        except NotFound:  # deleted meanwhile
            return None
        feedback = {
            f.message_id: {"id": f.id, "forId": f.message_id, "value": f.value, "comment": f.comment} for f in rated
        }
        thread = self._thread_dict(conv, caller)
        thread["steps"] = [self._step(m, caller, feedback.get(m.id)) for m in messages]
        elements = []
        for m in messages:
            for att_id in m.attachment_ids:
                info = await self._attachment_info(att_id, caller.user_id)
                if info is not None:
                    elements.append(self._element(att_id, info[0], info[1], m))
        thread["elements"] = elements
        return thread  # type: ignore[return-value]

    async def get_thread_author(self, thread_id: str) -> str:
        """The caller's identifier if the thread is theirs, else ``""`` (Chainlit: 404)."""
        caller = await self.caller()
        if caller is None:
            return ""
        return caller.identifier if await self._conversation(thread_id, caller) is not None else ""

    async def update_thread(
        self,
        thread_id: str,
        name: Optional[str] = None,
        user_id: Optional[str] = None,
        metadata: Optional[Dict] = None,
        tags: Optional[List[str]] = None,
    ):
        """Rename (a ``name`` from the sidebar's HTTP API) and keep the thread's metadata.

        Never creates a conversation, never moves one to another user, ignores tags;
        names from socket events (Chainlit's first-interaction bookkeeping) are ignored:
        titles come from the chat handler or an explicit rename.
        """
        caller = await self.caller()
        if caller is None:
            return
        if user_id is not None and user_id != caller.user_id:
            log.warning("update_thread(%s) with user %s refused to %s", thread_id, user_id, caller.user_id)
            return
        conv = await self._conversation(thread_id, caller)
        if conv is None:
            return
        try:
            if name is not None and caller.via == "http":
                title = one_line(name, MAX_TITLE_CHARS)
                if title:
                    await self._call(self.store.rename_conversation, conv.id, caller.user_id, title)
            if metadata is not None:
                clean = sanitize_metadata(metadata)
                if clean != sanitize_metadata(conv.metadata):
                    await self._call(self.store.update_conversation_metadata, conv.id, caller.user_id, clean)
        except NotFound:
            return

    async def delete_thread(self, thread_id: str):
        """Delete the caller's conversation with its messages, feedback and files, and drop its
        session on the worker network in use (``argus.network_choice.drop_conversation_session``:
        best effort; a daemon that is down does not fail the delete)."""
        caller = await self.caller()
        if caller is None:
            return
        p = self._pending.get(thread_id)
        if p is not None and p.owner_id == caller.user_id:
            del self._pending[thread_id]
        if not isinstance(thread_id, str) or not _ID.fullmatch(thread_id):
            return
        try:
            await self._call(self.store.delete_conversation, thread_id, caller.user_id)
        except NotFound:
            return  # someone else's, or gone already: nothing of the caller's to forget
        # its KV-cache session on the worker network holds the conversation too (as /delete does)
        await drop_conversation_session(self.services, thread_id)

    # ---- feedback ------------------------------------------------------------------
    async def upsert_feedback(self, feedback: Feedback) -> str:
        """Store the caller's rating of one of their messages; returns the feedback id.

        Raises:
            LookupError: the message is missing or someone else's (Chainlit answers 500).
        """
        caller = await self.caller()
        if caller is None:
            raise LookupError("No signed-in user.")
        comment = feedback.comment[:MAX_COMMENT_CHARS] if isinstance(feedback.comment, str) else None
        try:
            fb = await self._call(self.store.set_feedback, feedback.forId, caller.user_id, int(feedback.value), comment)
        except NotFound:
            raise LookupError("No such message.") from None
        return fb.id

    async def delete_feedback(self, feedback_id: str) -> bool:
        caller = await self.caller()
        if caller is None:
            return False
        try:
            await self._call(self.store.delete_feedback, feedback_id, caller.user_id)
        except NotFound:
            return False
        return True

    # ---- steps -----------------------------------------------------------------------
    def expect_chat_step(self, step_id: str) -> None:
        """Register a server-made :data:`KIND_CHAT` message id: only those are stored by this layer."""
        self._chat_steps.put(step_id, True)

    def _storable(self, step_dict: "StepDict") -> bool:
        return (
            step_dict.get("type") == "assistant_message"
            and message_kind(step_dict) == KIND_CHAT
            and not step_dict.get("isError")
            and isinstance(step_dict.get("id"), str)
            and self._chat_steps.get(step_dict["id"])[0]
        )

    def _purge_pending(self) -> None:
        now = self.clock()
        for tid in [t for t, p in self._pending.items() if now - p.since > PENDING_TTL_S]:
            del self._pending[tid]
        while len(self._pending) > MAX_PENDING_THREADS:
            self._pending.popitem(last=False)

    def pending_steps(self, thread_id: str) -> list[dict]:
        """Steps waiting for ``thread_id``'s conversation (for tests and diagnostics)."""
        self._purge_pending()
        p = self._pending.get(thread_id)
        return list(p.steps.values()) if p else []

    def _queue(self, thread_id: str, owner_id: str, step_dict: dict) -> None:
        self._purge_pending()
        p = self._pending.get(thread_id)
        if p is None or p.owner_id != owner_id:
            p = self._pending[thread_id] = _Pending(owner_id=owner_id, since=self.clock())
        if step_dict["id"] in p.steps or len(p.steps) < MAX_PENDING_STEPS:
            p.steps[step_dict["id"]] = dict(step_dict)

    async def _write_chat_step(self, conv: Conversation, owner_id: str, step_dict: dict) -> None:
        await self._call(
            self.store.add_message, conv.id, owner_id, "assistant", str(step_dict.get("output") or ""),
            status="complete", message_id=step_dict["id"],
        )

    async def conversation_created(self, conv: Conversation) -> None:
        """The chat handler created ``conv``: write the steps queued for its thread (oldest first)."""
        self._purge_pending()
        p = self._pending.pop(conv.id, None)
        if p is None or p.owner_id != conv.owner_id:
            return
        for step_dict in p.steps.values():
            try:
                await self._write_chat_step(conv, conv.owner_id, step_dict)
            except NotFound:
                log.warning("queued step %s could not be written to %s", step_dict.get("id"), conv.id)

    async def create_step(self, step_dict: "StepDict"):
        """Store a :data:`KIND_CHAT` step (queued until its thread has a conversation).
        Every other step is left alone (see the module docstring)."""
        if not self._storable(step_dict):
            return
        caller = await self.caller()
        thread_id = step_dict.get("threadId")
        if caller is None or not isinstance(thread_id, str) or not _ID.fullmatch(thread_id):
            return
        conv = await self._conversation(thread_id, caller)
        if conv is None:
            self._queue(thread_id, caller.user_id, dict(step_dict))
            return
        try:
            await self._write_chat_step(conv, caller.user_id, dict(step_dict))
        except NotFound:  # the id is another conversation's message
            log.warning("step %s not stored: its id is taken", step_dict.get("id"))

    async def update_step(self, step_dict: "StepDict"):
        await self.create_step(step_dict)  # the same upsert (or queue entry), by id

    async def delete_step(self, step_id: str):
        """Forget a queued step, or delete a :data:`KIND_CHAT` message this layer wrote.
        Rows of the chat handler are never deleted through Chainlit."""
        for p in self._pending.values():
            p.steps.pop(step_id, None)
        if not self._chat_steps.get(step_id)[0]:
            return
        caller = await self.caller()
        if caller is None:
            return
        with contextlib.suppress(NotFound):
            await self._call(self.store.delete_message, step_id, caller.user_id)

    # ---- elements --------------------------------------------------------------------
    async def create_element(self, element: "Element"):
        """Nothing to do: uploaded images are stored by the chat handler with their
        message; files the app sends (e.g. ``/export``) are command replies."""
        return None

    async def get_element(self, thread_id: str, element_id: str) -> Optional["ElementDict"]:
        """One image of the caller's thread, or None."""
        thread = await self.get_thread(thread_id)
        if thread is None:
            return None
        for element in thread.get("elements") or []:
            if element["id"] == element_id:
                return element  # type: ignore[return-value]
        return None

    async def delete_element(self, element_id: str, thread_id: Optional[str] = None):
        return None

    # ---- the rest of Chainlit's interface ----------------------------------------------------
    async def build_debug_url(self) -> str:
        return ""

    async def get_favorite_steps(self, user_id: str) -> List["StepDict"]:
        return []  # favorites are off (.chainlit/config.toml)

    async def close(self) -> None:
        """Nothing to close: the store belongs to the chat handler."""
        return None


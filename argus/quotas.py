"""Upload quotas: how many files, and how many bytes, a chat session and a user may upload.

Chainlit 2.12 keeps every upload (``POST /project/file?session_id=…``) in
``<app root>/.files/<session id>/<file id>.<ext>`` and lists it in the session's
``files``; it removes that directory when the session is cleared (the "New chat"
button sends ``clear_session``), ``session_timeout`` seconds (``.chainlit/config.toml``:
3600) after a disconnect that no reconnect followed, and all of ``.files`` when the
server stops cleanly. Nothing limited how many files one session or one user sent.

Here:

* **Limits** (:class:`QuotaLimits`, from ``ARGUS_UPLOAD_*``): per chat session, files
  and bytes over the session's life; per user, files and bytes over the last
  :data:`WINDOW_S` (24 hours), all sessions together.
* **The upload route** (:class:`UploadQuotaMiddleware`, installed by
  :func:`install_upload_quota` in front of Chainlit): a ``POST /project/file`` from the
  session's own signed-in user reserves one file and its ``Content-Length`` bytes
  *before* a byte of the body is read; over a limit it answers ``429`` with
  ``{"detail": "<one sentence>"}`` (what Chainlit's upload box shows) and the file
  never lands. A body without ``Content-Length`` reserves the largest upload. A 200
  answer commits the reservation with the stored file's real size; anything else
  releases it. Requests of anyone else (no token, another user's session, no such
  session) pass untouched: Chainlit refuses them itself, and they cost nobody quota.
* **The message intake** (``argus.chat.intake``) asks :meth:`UploadQuota.admit` for
  each file of a message: a file the route admitted passes; any other (a file that
  reached the session some other way) is charged now, or refused with the sentence.
* **Session end** (:func:`session_ended`, Chainlit's ``on_chat_end``, called on every
  disconnect): when the session has not reconnected after ``ARGUS_UPLOAD_KEEP_S``
  seconds, its upload directory is removed (the uploads that reached a message are in
  the store already); once Chainlit has dropped the session, its usage is forgotten.
  :func:`install_upload_quota` also removes directories of sessions that no longer
  exist (left by a server that was killed).

Every sentence a user reads about quotas is made here (:class:`QuotaExceeded`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Optional
from urllib.parse import parse_qs

from argus.config import env_int
from argus.datalayer import token_from_scope
from argus.sessions import decode_token

log = logging.getLogger(__name__)

MB = 1024 * 1024
#: The per-user window, in seconds.
WINDOW_S = 24 * 3600.0

#: Settings (environment variable → default).
SESSION_FILES_VAR, SESSION_MB_VAR = "ARGUS_UPLOAD_SESSION_FILES", "ARGUS_UPLOAD_SESSION_MB"
USER_FILES_VAR, USER_MB_VAR = "ARGUS_UPLOAD_USER_FILES", "ARGUS_UPLOAD_USER_MB"
KEEP_S_VAR = "ARGUS_UPLOAD_KEEP_S"
DEFAULT_SESSION_FILES, DEFAULT_SESSION_MB = 20, 100
DEFAULT_USER_FILES, DEFAULT_USER_MB = 100, 500
DEFAULT_KEEP_S = 120

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
_MARK = "_argus_upload_quota"  # marks the middleware class across module reloads


class QuotaExceeded(Exception):
    """An upload over a quota; ``str(e)`` is one sentence for the user.

    Attributes:
        retry_after_s: seconds until the upload would fit (per-user window), or None
            (a session limit: only a new chat helps).
    """

    def __init__(self, sentence: str, retry_after_s: Optional[float] = None):
        super().__init__(sentence)
        self.retry_after_s = retry_after_s


def _size(n_bytes: int) -> str:
    if n_bytes < 1024:
        return f"{n_bytes} bytes"
    if n_bytes < MB:
        return f"{n_bytes / 1024:.1f} KB"
    if n_bytes < 1024 * MB:
        return f"{n_bytes / MB:.1f} MB".replace(".0 MB", " MB")
    return f"{n_bytes / (1024 * MB):.1f} GB"


def _wait(seconds: float) -> str:
    """A wait in words, rounded up: "1 minute", "45 minutes", "3 hours"."""
    minutes = max(1, math.ceil(seconds / 60))
    if minutes < 90:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours = math.ceil(minutes / 60)
    return f"{hours} hours"


def session_files_sentence(limit: int) -> str:
    """A chat session has uploaded its ``limit`` files."""
    return (f"This chat has already received {limit} files, the most one chat may upload; "
            "start a new chat to upload more.")


def session_bytes_sentence(what: str, size: int, used: int, limit: int) -> str:
    """``what`` (``size`` bytes) would take a chat session over its ``limit`` bytes."""
    return (f"{what} ({_size(size)}) would take this chat over its upload limit of {_size(limit)} "
            f"({_size(used)} used); start a new chat to upload more.")


def user_files_sentence(limit: int, retry_after_s: float) -> str:
    """A user has uploaded ``limit`` files within the window."""
    return (f"You have uploaded {limit} files in the last 24 hours, the most allowed; "
            f"you can upload again in {_wait(retry_after_s)}.")


def user_bytes_sentence(what: str, size: int, used: int, limit: int, retry_after_s: Optional[float]) -> str:
    """``what`` would take a user's uploads of the window over ``limit`` bytes."""
    when = f"you can upload it in {_wait(retry_after_s)}" if retry_after_s is not None else "it cannot be uploaded"
    return (f"{what} ({_size(size)}) would take your uploads of the last 24 hours over {_size(limit)} "
            f"({_size(used)} used); {when}.")


@dataclass(frozen=True)
class QuotaLimits:
    """The upload limits. Bytes in bytes, ``keep_s`` in seconds.

    Attributes:
        session_files, session_bytes: what one chat session may upload over its life.
        user_files, user_bytes: what one user may upload in :data:`WINDOW_S`, all sessions together.
        keep_s: how long a disconnected session's uploads stay for it to reconnect.
    """

    session_files: int = DEFAULT_SESSION_FILES
    session_bytes: int = DEFAULT_SESSION_MB * MB
    user_files: int = DEFAULT_USER_FILES
    user_bytes: int = DEFAULT_USER_MB * MB
    keep_s: float = DEFAULT_KEEP_S

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "QuotaLimits":
        """Read ``ARGUS_UPLOAD_SESSION_FILES`` (default 20), ``ARGUS_UPLOAD_SESSION_MB`` (100),
        ``ARGUS_UPLOAD_USER_FILES`` (100 per 24 h), ``ARGUS_UPLOAD_USER_MB`` (500 per 24 h) and
        ``ARGUS_UPLOAD_KEEP_S`` (120); empty or unset: the default.

        Raises:
            ConfigError: a value that is not a whole number in its range (files and MB
                1 to 1,000,000; seconds 0 to 86,400), naming the variable.
        """
        env = os.environ if environ is None else environ

        def whole(name: str, default: int, low: int, high: int) -> int:
            return env_int(name, default, low, high, environ=env)

        return cls(
            session_files=whole(SESSION_FILES_VAR, DEFAULT_SESSION_FILES, 1, 1_000_000),
            session_bytes=whole(SESSION_MB_VAR, DEFAULT_SESSION_MB, 1, 1_000_000) * MB,
            user_files=whole(USER_FILES_VAR, DEFAULT_USER_FILES, 1, 1_000_000),
            user_bytes=whole(USER_MB_VAR, DEFAULT_USER_MB, 1, 1_000_000) * MB,
            keep_s=whole(KEEP_S_VAR, DEFAULT_KEEP_S, 0, 86_400),
        )


@dataclass
class _SessionUse:
    files: int = 0
    bytes: int = 0
    admitted: set[str] = field(default_factory=set)


@dataclass(eq=False)
class Reservation:
    """One file being uploaded: counted until :meth:`UploadQuota.commit` or :meth:`UploadQuota.release`.

    Attributes:
        session_id, user_key: whose quotas it is counted in.
        size: bytes counted for it now.
        at: when (the quota's clock, seconds).
    """

    session_id: str
    user_key: str
    size: int
    at: float
    done: bool = False


class UploadQuota:
    """Per-session and per-user upload counts (thread-safe; in memory, per process).

    Args:
        limits: the limits.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, limits: QuotaLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, _SessionUse] = {}
        self._users: dict[str, deque[Reservation]] = {}

    def _recent(self, user_key: str, now: float) -> deque[Reservation]:
        entries = self._users.setdefault(user_key, deque())
        while entries and entries[0].at <= now - WINDOW_S:
            entries.popleft()
        return entries

    def reserve(self, session_id: str, user_key: str, size: int, what: str = "This file") -> Reservation:
        """Count one file of ``size`` bytes for the session and the user.

        Raises:
            QuotaExceeded: the session or the user is at a limit (nothing is counted).
        """
        lim = self.limits
        size = max(0, int(size))
        with self._lock:
            now = self._clock()
            use = self._sessions.setdefault(session_id, _SessionUse())
            if use.files + 1 > lim.session_files:
                raise QuotaExceeded(session_files_sentence(lim.session_files))
            if use.bytes + size > lim.session_bytes:
                raise QuotaExceeded(session_bytes_sentence(what, size, use.bytes, lim.session_bytes))
            recent = self._recent(user_key, now)
            if len(recent) + 1 > lim.user_files:
                wait = recent[len(recent) - lim.user_files].at + WINDOW_S - now
                raise QuotaExceeded(user_files_sentence(lim.user_files, wait), wait)
            used = sum(r.size for r in recent)
            if used + size > lim.user_bytes:
                wait = None
                freed = 0
                for r in recent:  # oldest first: when enough has left the window
                    freed += r.size
                    if used - freed + size <= lim.user_bytes:
                        wait = r.at + WINDOW_S - now
                        break
                raise QuotaExceeded(user_bytes_sentence(what, size, used, lim.user_bytes, wait), wait)
            res = Reservation(session_id, user_key, size, now)
            use.files += 1
            use.bytes += size
            recent.append(res)
            return res

    def commit(self, res: Reservation, file_id: Optional[str], size: Optional[int] = None) -> None:
        """The file was stored (as ``file_id``, ``size`` bytes): keep it counted, at its real size."""
        with self._lock:
            if res.done:
                return
            res.done = True
            use = self._sessions.setdefault(res.session_id, _SessionUse())
            if size is not None:
                use.bytes += int(size) - res.size
                res.size = int(size)
            if file_id:
                use.admitted.add(file_id)

    def release(self, res: Reservation) -> None:
        """The file was not stored: it no longer counts."""
        with self._lock:
            if res.done:
                return
            res.done = True
            use = self._sessions.get(res.session_id)
            if use is not None:
                use.files -= 1
                use.bytes -= res.size
            entries = self._users.get(res.user_key)
            if entries is not None:
                try:
                    entries.remove(res)
                except ValueError:
                    pass

    def admitted(self, session_id: str, file_id: str) -> bool:
        """Did the upload route admit (and count) ``file_id`` for this session?"""
        with self._lock:
            use = self._sessions.get(session_id)
            return use is not None and file_id in use.admitted

    def admit(self, session_id: str, user_key: str, file_id: Optional[str], size: int, what: str) -> None:
        """A file reaching a message: fine when the route counted it, else counted now.

        Raises:
            QuotaExceeded: it was not counted and is over a limit.
        """
        if file_id and self.admitted(session_id, file_id):
            return
        res = self.reserve(session_id, user_key, size, what)
        self.commit(res, file_id, size)

    def usage(self, session_id: str) -> tuple[int, int]:
        """(files, bytes) counted for the session."""
        with self._lock:
            use = self._sessions.get(session_id)
            return (use.files, use.bytes) if use is not None else (0, 0)

    def forget_session(self, session_id: str) -> None:
        """The session is gone: drop its counts (the user's window keeps its files)."""
        with self._lock:
            self._sessions.pop(session_id, None)


# ---- one book per process -----------------------------------------------------------------
_shared: Optional[UploadQuota] = None
_shared_lock = threading.Lock()


def shared_quota() -> UploadQuota:
    """The process's quota book, made from the environment on first use.

    Raises:
        ConfigError: a bad ``ARGUS_UPLOAD_*`` value (see :meth:`QuotaLimits.from_env`).
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = UploadQuota(QuotaLimits.from_env())
        return _shared


# ---- the upload route ---------------------------------------------------------------------
def _header(scope: Scope, name: bytes) -> Optional[bytes]:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value
    return None


def _caller(scope: Scope) -> Optional[tuple[str, str]]:
    """(session id, user key) of an upload by the session's own signed-in user, else None."""
    try:
        from chainlit.session import WebsocketSession
    except ImportError:  # pragma: no cover - another Chainlit version
        return None
    query = parse_qs((scope.get("query_string") or b"").decode("latin-1"))
    session_id = (query.get("session_id") or [""])[0]
    session = WebsocketSession.get_by_id(session_id) if session_id else None
    if session is None:
        return None
    payload = decode_token(token_from_scope(scope))
    identifier = payload.get("identifier") if payload else None
    owner = getattr(getattr(session, "user", None), "identifier", None)
    if not isinstance(identifier, str) or identifier != owner:
        return None
    metadata = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    user_key = metadata.get("user_id") if isinstance(metadata.get("user_id"), str) else identifier
    return session_id, user_key


async def _refuse(send: Send, exc: QuotaExceeded) -> None:
    payload = json.dumps({"detail": str(exc)}).encode("utf-8")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode("ascii")),
        (b"connection", b"close"),
    ]
    if exc.retry_after_s is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after_s))).encode("ascii")))
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class UploadQuotaMiddleware:
    """ASGI middleware: ``POST <path>`` (Chainlit's upload route) within the quotas.

    Args:
        app: the wrapped ASGI app.
        quota: the counts (or a callable returning them).
        path: the upload route (``<root path>/project/file``).
        max_upload_bytes: bytes reserved for a body without ``Content-Length``.
    """

    _argus_upload_quota = True  # see _MARK

    def __init__(self, app: ASGIApp, quota: UploadQuota, path: str, max_upload_bytes: int):
        self.app, self.quota, self.path, self.max_upload_bytes = app, quota, path.rstrip("/"), max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or scope.get("path", "").rstrip("/") != self.path):
            return await self.app(scope, receive, send)
        caller = _caller(scope)
        if caller is None:
            return await self.app(scope, receive, send)
        session_id, user_key = caller
        declared = _header(scope, b"content-length")
        try:
            size = int(declared) if declared is not None else self.max_upload_bytes
        except ValueError:
            size = self.max_upload_bytes
        try:
            res = self.quota.reserve(session_id, user_key, size)
        except QuotaExceeded as exc:
            log.info("upload to session %s refused: %s", session_id, exc)
            return await _refuse(send, exc)

        status = 0
        body = b""

        async def watching_send(message: dict) -> None:
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = message.get("status", 0)
            elif message["type"] == "http.response.body" and status == 200 and len(body) < 4096:
                body += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        finally:
            file_id = None
            if status == 200:
                try:
                    file_id = json.loads(body).get("id")
                except (ValueError, AttributeError):
                    file_id = None
            if isinstance(file_id, str):
                self.quota.commit(res, file_id, _stored_size(session_id, file_id))
            else:
                self.quota.release(res)


def _stored_size(session_id: str, file_id: str) -> Optional[int]:
    """The size Chainlit recorded for an upload, or None."""
    from chainlit.session import WebsocketSession

    session = WebsocketSession.get_by_id(session_id)
    entry = (getattr(session, "files", None) or {}).get(file_id) if session is not None else None
    size = entry.get("size") if isinstance(entry, dict) else None
    return size if isinstance(size, int) else None


# ---- session files ------------------------------------------------------------------------
def remove_session_files(session: Any) -> None:
    """Remove what Chainlit keeps on disk for ``session`` (its ``.files/<id>/``) and forget the list."""
    files_dir = getattr(session, "files_dir", None)
    if files_dir is not None:
        shutil.rmtree(files_dir, ignore_errors=True)
    files = getattr(session, "files", None)
    if isinstance(files, dict):
        files.clear()


def remove_upload(session: Any, file_id: Optional[str]) -> None:
    """Remove one upload of ``session`` (a refused file) from disk and from its list."""
    files = getattr(session, "files", None)
    entry = files.pop(file_id, None) if isinstance(files, dict) and file_id else None
    path = entry.get("path") if isinstance(entry, dict) else None
    if path:
        try:
            Path(path).unlink()
        except OSError:
            pass


def remove_orphan_session_dirs(files_directory: Optional[Path] = None) -> list[str]:
    """Remove ``.files/<id>`` directories of sessions that do not exist (a killed server's).

    Returns the removed directory names."""
    from chainlit.config import FILES_DIRECTORY
    from chainlit.session import ws_sessions_id

    root = Path(files_directory or FILES_DIRECTORY)
    removed = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if entry.is_dir() and entry.name not in ws_sessions_id:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


async def _after_disconnect(session: Any, socket_id: Optional[str], quota: UploadQuota, keep_s: float) -> None:
    from chainlit.session import ws_sessions_id

    await asyncio.sleep(keep_s)
    live = ws_sessions_id.get(session.id)
    if live is None:  # Chainlit cleared it (and its directory): forget its counts
        remove_session_files(session)
        quota.forget_session(session.id)
    elif live is session and session.socket_id == socket_id:  # not reconnected
        remove_session_files(session)
        log.info("removed the uploads of disconnected session %s", session.id)


_cleanups: set[asyncio.Task] = set()


async def session_ended(quota: Optional[UploadQuota] = None) -> None:
    """Chainlit's ``on_chat_end`` (a disconnect): remove this session's uploads after
    ``keep_s`` seconds unless it reconnected meanwhile (returns at once)."""
    from chainlit.context import context

    quota = quota or shared_quota()
    try:
        session = context.session
    except Exception:  # no Chainlit context
        return
    if session is None or not hasattr(session, "files_dir"):
        return
    task = asyncio.ensure_future(
        _after_disconnect(session, getattr(session, "socket_id", None), quota, quota.limits.keep_s)
    )
    _cleanups.add(task)
    task.add_done_callback(_cleanups.discard)


def install_upload_quota(max_upload_bytes: int, quota: Optional[UploadQuota] = None, app=None) -> UploadQuota:
    """Put :class:`UploadQuotaMiddleware` in Chainlit's middleware stack (idempotent; after
    the body limits, so an oversized body is refused by them first) and remove the upload
    directories of sessions that no longer exist. Call before the server starts.

    Args:
        max_upload_bytes: the largest upload, in bytes (reserved for bodies without a length).
        quota: default :func:`shared_quota`.
        app: the FastAPI app; default ``chainlit.server.app``.
    Raises:
        ConfigError: a bad ``ARGUS_UPLOAD_*`` value.
    """
    from chainlit.config import config
    from starlette.middleware import Middleware

    quota = quota or shared_quota()
    if app is None:
        from chainlit.server import app
    stack = [m for m in app.user_middleware if not getattr(m.cls, _MARK, False)]
    path = (config.run.root_path or "") + "/project/file"
    stack.append(Middleware(UploadQuotaMiddleware, quota=quota, path=path, max_upload_bytes=max_upload_bytes))
    app.user_middleware[:] = stack
    app.middleware_stack = None
    removed = remove_orphan_session_dirs()
    if removed:
        log.info("removed the upload directories of %d ended sessions", len(removed))
    return quota

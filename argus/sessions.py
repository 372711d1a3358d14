"""Sign-in sessions that end: on sign-out, on a password change, and after a bounded lifetime.

Chainlit 2.12 signs a JWT (``chainlit.auth.jwt.create_jwt``) holding the ``cl.User``
the password callback returned (identifier, display name, ``metadata``), valid for
``config.project.user_session_timeout`` seconds, and accepts it from the
``access_token`` cookie or a ``Bearer`` header on every REST call, on the socket.io
connect (cookie only) and on ``POST /auth/jwt`` (which re-issues it with a new expiry).
``POST /logout`` only deletes the cookie: a copied token kept working for 15 days.

Here:

* **Claims.** When a token is issued, Chainlit calls the data layer's ``create_user``
  with the very ``cl.User`` it then signs; :meth:`argus.datalayer.ArgusDataLayer.create_user`
  puts ``metadata["argus_session"] = {"uid": <user id>, "v": <token version>, "at":
  <UNIX seconds of the sign-in>}`` into it (:func:`stamp`), read fresh from the store.
  Claims already present (a token re-issued by ``/auth/jwt``) are kept, so ``at``
  still dates the password check.
* **Check on every request.** :class:`SessionGuard` (ASGI, HTTP and websocket, socket.io
  included) decodes the request's token and asks :class:`SessionBook` whether it is
  current: the user still exists with that id, the version equals the stored
  :attr:`argus.store.base.User.token_version`, and ``at`` is less than the lifetime
  ago. A token that is not is *removed from the request* (cookie and ``Authorization``
  header), so Chainlit sees an anonymous request: ``401`` on ``/project/*``,
  "authentication failed" on the socket.io connect. Tokens without the claims
  (issued before this module existed) are refused the same way.
* **Sign-out.** ``POST /logout`` carrying a current token bumps the user's version
  (``Store.bump_token_version``) before the answer is sent, when Chainlit answers it
  with 2xx (a cross-site post refused with 403 by ``argus.origins`` ends nothing), and
  closes the user's open socket.io connections. A password change
  (``Authenticator.change_password`` → ``Store.set_password_hash``) bumps it too.
* **Lifetime.** ``ARGUS_SESSION_HOURS`` (default 24; 0.1 to 360) replaces Chainlit's
  ``user_session_timeout`` (token expiry and cookie max-age) when the guard is installed.

Versions are cached per email for :data:`VERSION_CACHE_TTL_S` (a bump in this process
drops the entry at once; a bump by another process, e.g. a second server on the same
MongoDB, takes effect within that time). While the store cannot be read (a database
outage), the last version this process saw for the user decides, and a user it has not
seen yet keeps a token whose claims are well-formed and within the lifetime: signed-in
users are told "nothing was saved" rather than signed out by an outage (one WARNING line
per outage). Tokens without claims are refused even then.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from typing import Any, Awaitable, Callable, Mapping, Optional

from argus.config import ConfigError
from argus.store.base import NotFound, Store, StoreError, User

log = logging.getLogger(__name__)

#: Key, in ``cl.User.metadata`` (and so in the JWT), of the session claims.
CLAIMS_KEY = "argus_session"
#: Environment variable: session lifetime in hours.
SESSION_HOURS_VAR = "ARGUS_SESSION_HOURS"
DEFAULT_SESSION_HOURS = 24.0
MIN_SESSION_HOURS = 0.1
MAX_SESSION_HOURS = 360.0  # Chainlit's own default, 15 days
#: Seconds a looked-up token version is trusted without asking the store again.
VERSION_CACHE_TTL_S = 5.0
_MAX_CACHED = 10_000
_MARK = "_argus_session_guard"  # marks the middleware class across module reloads

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def session_lifetime_s(environ: Mapping[str, str] = os.environ) -> int:
    """Seconds a sign-in lasts: ``ARGUS_SESSION_HOURS`` (hours, decimals allowed) or 24 h.

    Raises:
        ConfigError: not a number, or outside 0.1..360 hours.
    """
    raw = environ.get(SESSION_HOURS_VAR, "").strip()
    if not raw:
        return int(DEFAULT_SESSION_HOURS * 3600)
    try:
        hours = float(raw)
    except ValueError:
        raise ConfigError(f"{SESSION_HOURS_VAR} must be a number of hours, got {raw!r}.") from None
    if not (MIN_SESSION_HOURS <= hours <= MAX_SESSION_HOURS):  # also refuses nan
        raise ConfigError(
            f"{SESSION_HOURS_VAR} must be between {MIN_SESSION_HOURS} and {MAX_SESSION_HOURS:g} hours, got {raw}."
        )
    return math.ceil(hours * 3600)


def stamp(metadata: dict, user: User, now: Optional[float] = None) -> dict:
    """Put the session claims of ``user`` into a ``cl.User.metadata`` dict (in place; also
    returned), unless a well-formed set for the same user id is already there (a token
    being re-issued keeps its sign-in time and version).

    Args:
        now: UNIX seconds of the sign-in (default: now).
    """
    claims = metadata.get(CLAIMS_KEY)
    if not (isinstance(claims, dict) and claims.get("uid") == user.id and _well_formed(claims)):
        metadata[CLAIMS_KEY] = {"uid": user.id, "v": user.token_version, "at": time.time() if now is None else now}
    return metadata


def _well_formed(claims: Any) -> bool:
    return (
        isinstance(claims, dict)
        and isinstance(claims.get("uid"), str)
        and type(claims.get("v")) is int
        and isinstance(claims.get("at"), (int, float))
        and not isinstance(claims.get("at"), bool)
    )


class SessionBook:
    """Which session tokens are current: token versions from the store, briefly cached.

    Args:
        get_store: returns the store (called on each lookup; may be created lazily).
        lifetime_s: a sign-in older than this (claim ``at``) is refused.
        clock: monotonic seconds, for the cache.
        wall: UNIX seconds, for the sign-in age.
    """

    def __init__(
        self,
        get_store: Callable[[], Store],
        lifetime_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.get_store, self.lifetime_s, self.clock, self.wall = get_store, lifetime_s, clock, wall
        self._cache: dict[str, tuple[float, Optional[User]]] = {}
        self._lock = threading.Lock()
        self._outage = False  # a WARNING was logged for the current store outage

    async def user(self, email: str) -> Optional[User]:
        """The stored user with this email (cached for :data:`VERSION_CACHE_TTL_S`), or None.
        Raises StoreError when the store fails."""
        key = email.strip().lower()
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        user = await asyncio.to_thread(self.get_store().get_user_by_email, key)
        with self._lock:
            if len(self._cache) >= _MAX_CACHED:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= _MAX_CACHED:
                    self._cache.clear()
            self._cache[key] = (now + VERSION_CACHE_TTL_S, user)
        return user

    def forget(self, email: str) -> None:
        """Drop the cached entry of ``email`` (after its version changed)."""
        with self._lock:
            self._cache.pop(email.strip().lower(), None)

    async def current_user(self, payload: Mapping[str, Any]) -> Optional[User]:
        """The user a decoded token payload belongs to, if the token is current (see the
        module docstring); None otherwise, and when the store cannot answer."""
        identifier = payload.get("identifier")
        metadata = payload.get("metadata")
        claims = metadata.get(CLAIMS_KEY) if isinstance(metadata, dict) else None
        if not isinstance(identifier, str) or not _well_formed(claims):
            return None
        if not (self.wall() - self.lifetime_s < claims["at"] <= self.wall() + 60):
            return None
        try:
            user = await self.user(identifier)
        except StoreError as exc:
            if not self._outage:
                self._outage = True
                log.warning("session tokens are checked against the last known versions until the store is back: %s", exc)
            with self._lock:
                hit = self._cache.get(identifier.strip().lower())
            if hit is not None:
                user = hit[1]
            else:  # never seen: the claims are all there is
                return User(claims["uid"], identifier.strip().lower(), "", "user", "", 0.0, claims["v"])
        else:
            self._outage = False
        if user is None or user.id != claims["uid"] or user.token_version != claims["v"]:
            return None
        return user

    async def end(self, user: User) -> Optional[int]:
        """End every session of ``user`` (bump the version); the new version, or None when
        the store failed (logged) or the user is gone."""
        try:
            version = await asyncio.to_thread(self.get_store().bump_token_version, user.id)
        except (NotFound, StoreError) as exc:
            log.warning("sign-out could not end the sessions of user %s: %s", user.id, exc)
            return None
        finally:
            self.forget(user.email)
        return version


def decode_token(token: str) -> Optional[dict]:
    """The payload of a Chainlit session token with a valid signature and expiry, else None."""
    import jwt as pyjwt
    from chainlit.auth.jwt import get_jwt_secret

    secret = get_jwt_secret()
    if not token or not secret:
        return None
    try:
        payload = pyjwt.decode(token, secret, algorithms=["HS256"], options={"verify_signature": True})
    except Exception:  # expired, forged, malformed
        return None
    return payload if isinstance(payload, dict) else None


def auth_cookie_name() -> str:
    """Chainlit's session cookie name (``CHAINLIT_AUTH_COOKIE_NAME``, default ``access_token``);
    long tokens are split over ``<name>_0``, ``<name>_1``..."""
    try:
        from chainlit.auth.cookie import _auth_cookie_name

        return _auth_cookie_name
    except ImportError:  # pragma: no cover - another Chainlit version
        return os.environ.get("CHAINLIT_AUTH_COOKIE_NAME", "access_token")


def _is_auth_cookie(name: str, cookie: str) -> bool:
    return name == cookie or (name.startswith(cookie + "_") and name[len(cookie) + 1:].isdigit())


def token_and_stripped_headers(headers: list) -> tuple[str, list]:
    """From raw ASGI headers: the session token (the auth cookie, whole or in chunks, else a
    ``Bearer`` header; "" when none) and the headers without any of it."""
    from chainlit.auth.cookie import get_token_from_cookies
    from starlette.requests import cookie_parser

    cookie = auth_cookie_name()
    cookies: dict[str, str] = {}
    stripped = []
    bearer = ""
    for name, value in headers:
        lname = name.lower()
        if lname == b"cookie":
            text = value.decode("latin-1")
            cookies.update(cookie_parser(text))
            kept = [p for p in text.split(";") if p.strip() and not _is_auth_cookie(p.split("=", 1)[0].strip(), cookie)]
            if kept:
                stripped.append((name, ";".join(kept).strip().encode("latin-1")))
            continue
        if lname == b"authorization":
            scheme, _, rest = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                bearer = bearer or rest.strip()
                continue
        stripped.append((name, value))
    return get_token_from_cookies(cookies) or bearer, stripped


class SessionGuard:
    """ASGI middleware: only current session tokens reach Chainlit, and sign-out ends them.

    Args:
        app: the wrapped ASGI app.
        book: decides which tokens are current.
        logout_path: the path of Chainlit's sign-out route (``<root>/logout``).
    """

    _argus_session_guard = True  # marks the class across module reloads (see install_session_guard)

    def __init__(self, app: ASGIApp, book: SessionBook, logout_path: str = "/logout"):
        self.app, self.book, self.logout_path = app, book, logout_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        token, stripped = token_and_stripped_headers(list(scope.get("headers") or ()))
        if not token:
            return await self.app(scope, receive, send)
        payload = decode_token(token)
        user = await self.book.current_user(payload) if payload is not None else None
        if user is None:  # expired, forged, ended or too old: the request goes on without it
            return await self.app(dict(scope, headers=stripped), receive, send)
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") == self.logout_path:
            return await self._logout(scope, receive, send, user)
        return await self.app(scope, receive, send)

    async def _logout(self, scope: Scope, receive: Receive, send: Send, user: User) -> None:
        async def send_after_ending(message: dict) -> None:
            if message["type"] == "http.response.start" and 200 <= message.get("status", 500) < 300:
                if await self.book.end(user) is not None:
                    await _disconnect_sockets(user.email)
            await send(message)

        await self.app(scope, receive, send_after_ending)


async def _disconnect_sockets(email: str) -> None:
    """Close the open socket.io connections of the user with this email (their tabs sign out)."""
    try:
        from chainlit.server import sio
        from chainlit.session import ws_sessions_sid
    except ImportError:  # pragma: no cover - another Chainlit version
        return
    for sid, session in list(ws_sessions_sid.items()):
        identifier = getattr(getattr(session, "user", None), "identifier", None)
        if isinstance(identifier, str) and identifier.strip().lower() == email:
            try:
                await sio.disconnect(sid)
            except Exception as exc:  # a socket that is already closing
                log.debug("could not close socket %s: %s", sid, exc)


def install_session_guard(get_store: Callable[[], Store], app=None, *, lifetime_s: Optional[int] = None) -> SessionBook:
    """Put :class:`SessionGuard` outermost in Chainlit's middleware stack and set the
    session lifetime (idempotent: a guard from an earlier call is replaced). Call before
    the server starts (Starlette builds the stack on the first request).

    Args:
        get_store: returns the store holding the users.
        app: the FastAPI app; default ``chainlit.server.app``.
        lifetime_s: seconds; default :func:`session_lifetime_s` (``ARGUS_SESSION_HOURS``).
    Returns:
        the :class:`SessionBook` the guard uses.
    Raises:
        ConfigError: a bad ``ARGUS_SESSION_HOURS``.
    """
    from chainlit.config import config
    from starlette.middleware import Middleware

    if app is None:
        from chainlit.server import app
    lifetime = session_lifetime_s() if lifetime_s is None else lifetime_s
    config.project.user_session_timeout = lifetime  # token expiry and cookie max-age
    book = SessionBook(get_store, lifetime)
    root = config.run.root_path or ""
    stack = [m for m in app.user_middleware if not getattr(m.cls, _MARK, False)]
    stack.insert(0, Middleware(SessionGuard, book=book, logout_path=f"{root}/logout"))
    app.user_middleware[:] = stack
    app.middleware_stack = None
    return book

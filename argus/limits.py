"""Request body limits on every path, enforced before Chainlit or FastAPI read a byte.

Chainlit reads request bodies whole into memory, before authentication
(``POST /set-session-cookie`` and ``POST /project/threads`` parse JSON of any
size; ``POST /project/file`` reads the whole upload before it checks the
size). :class:`BodyLimitMiddleware` answers ``413`` instead:

* at once, from ``Content-Length``, when it announces more than the limit;
* for bodies without ``Content-Length`` (chunked), by counting the bytes as
  they arrive and stopping the request as soon as the count passes the limit.

The limits (:func:`body_limits`): the upload limit (``ARGUS_MAX_UPLOAD_MB``)
plus multipart overhead on ``/project/file`` only; 16 KiB on ``/login`` and
``/signup``; ``ARGUS_MAX_BODY_KB`` (default 1024 KiB) on every other path,
socket.io's polling posts included (engine.io's own limit is 1,000,000 bytes).
Websocket messages are not HTTP bodies: engine.io limits those.

:func:`install_body_limits` puts it in front of Chainlit's app (idempotent,
also across Chainlit's ``-w`` reload) and makes ``ARGUS_MAX_UPLOAD_MB`` the
single source of Chainlit's ``spontaneous_file_upload.max_size_mb`` too.
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Mapping, Optional

from argus.config import env_int

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Room for the multipart envelope (boundaries, part headers, other fields), in bytes.
MULTIPART_OVERHEAD = 64 * 1024
#: Largest ``/login`` or ``/signup`` body, in bytes.
FORM_LIMIT = 16 * 1024
#: Largest body on any other path, in bytes, unless ``ARGUS_MAX_BODY_KB`` says otherwise.
DEFAULT_BODY_LIMIT = 1024 * 1024
#: The setting: largest request body on paths without their own limit, in KiB.
MAX_BODY_VAR = "ARGUS_MAX_BODY_KB"
_MARK = "_argus_body_limit"  # attribute marking our middleware class (survives module reloads)


class _TooLarge(Exception):
    """Raised into the app from ``receive`` once the body passed the limit."""


class BodyLimitMiddleware:
    """ASGI middleware: per-path limits on the request body size.

    Args:
        app: the wrapped ASGI app.
        limits: exact path (after ``rstrip("/")``) → ``(max body bytes,
            JSON-serialisable 413 response body)``.
        default: the same pair for every other HTTP path; None: other paths
            pass untouched.

    A refused request gets ``413`` with the given JSON and ``Connection:
    close``. When the app had already started its response before the limit
    was passed, that response is left alone (it cannot be replaced).
    """

    _argus_body_limit = True  # see _MARK

    def __init__(self, app: ASGIApp, limits: Mapping[str, tuple[int, Any]], default: Optional[tuple[int, Any]] = None):
        self.app = app
        self.limits = {path.rstrip("/"): limit for path, limit in limits.items()}
        self.default = default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.get(scope.get("path", "").rstrip("/"), self.default) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        max_bytes, body = limit
        declared = _content_length(scope)
        if declared is not None and declared > max_bytes:
            return await _reject(send, body)

        received = 0
        over = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, over
            if over:
                raise _TooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    over = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to the aborted body (400/500) is replaced by our 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:  # the app may wrap _TooLarge (FastAPI: "error parsing the body")
            if not over or started:
                raise
        if over and not started:
            await _reject(send, body)


def _content_length(scope: Scope) -> Optional[int]:
    for key, value in scope.get("headers", ()):
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects malformed lengths itself
    return None


async def _reject(send: Send, body: Any) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send({
        "type": "http.response.start",
        "status": 413,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode("ascii")),
            (b"connection", b"close"),
        ],
    })
    await send({"type": "http.response.body", "body": payload})


def body_limits(max_upload_bytes: int, root_path: str = "") -> dict[str, tuple[int, Any]]:
    """The limits we enforce: ``/project/file`` (upload limit + multipart
    overhead), ``/login`` and ``/signup`` (:data:`FORM_LIMIT`), under Chainlit's
    ``root_path``. ``max_upload_bytes`` is in bytes."""
    mb = f"{max_upload_bytes / 1024**2:g} MB"
    form = f"The form is larger than the {FORM_LIMIT // 1024} KB limit."
    return {
        root_path + "/project/file": (max_upload_bytes + MULTIPART_OVERHEAD, {"detail": f"The file is larger than the {mb} limit."}),
        root_path + "/login": (FORM_LIMIT, {"detail": form}),
        root_path + "/signup": (FORM_LIMIT, {"ok": False, "error": form}),
    }


def max_body_bytes(environ: Optional[Mapping[str, str]] = None) -> int:
    """The limit on paths without their own, in bytes: ``ARGUS_MAX_BODY_KB`` × 1024
    (empty or unset: :data:`DEFAULT_BODY_LIMIT`).

    Raises:
        ConfigError: not a whole number of KiB between 16 and 1048576 (1 GiB).
    """
    kib = env_int(MAX_BODY_VAR, DEFAULT_BODY_LIMIT // 1024, 16, 1024 * 1024, unit="KiB", environ=environ)
    return kib * 1024


def default_limit(max_bytes: int) -> tuple[int, Any]:
    """The ``default`` of :class:`BodyLimitMiddleware` for ``max_bytes`` (bytes)."""
    return max_bytes, {"detail": f"The request body is larger than the {max_bytes / 1024:g} KB limit."}


def install_body_limits(max_upload_bytes: int, app=None) -> None:
    """Install :class:`BodyLimitMiddleware` as the outermost user middleware of
    Chainlit's app, and set Chainlit's ``spontaneous_file_upload.max_size_mb``
    (what the browser enforces) from ``max_upload_bytes`` (bytes; rounded up
    to whole MB). Call from the Chainlit app module, before the server starts
    (idempotent; on a ``-w`` reload the middleware stack is rebuilt). Every
    other path gets :func:`max_body_bytes` (``ARGUS_MAX_BODY_KB``).

    Args:
        max_upload_bytes: largest accepted image, in bytes (``settings.max_upload_bytes``).
        app: the FastAPI app; default ``chainlit.server.app``.

    Raises:
        ConfigError: a bad ``ARGUS_MAX_BODY_KB``.
    """
    from chainlit.config import config
    from starlette.middleware import Middleware

    default = default_limit(max_body_bytes())
    if app is None:
        from chainlit.server import app
    upload = config.features.spontaneous_file_upload
    if upload is not None:
        upload.max_size_mb = -(-max_upload_bytes // 1024**2)
    stack = [m for m in app.user_middleware if not getattr(m.cls, _MARK, False)]
    limits = body_limits(max_upload_bytes, config.run.root_path or "")
    stack.insert(0, Middleware(BodyLimitMiddleware, limits=limits, default=default))
    app.user_middleware[:] = stack
    app.middleware_stack = None  # built on the first request (or rebuilt after a reload)

"""Request body limits, enforced before Chainlit or FastAPI read a byte.

Chainlit's ``POST /project/file`` reads the whole upload into memory before
it checks the size (and FastAPI parses the form before authentication), and
``POST /login`` / ``POST /signup`` would accept bodies of any size.
:class:`BodyLimitMiddleware` answers ``413`` instead:

* at once, from ``Content-Length``, when it announces more than the limit;
* for bodies without ``Content-Length`` (chunked), by counting the bytes as
  they arrive and stopping the request as soon as the count passes the limit.

:func:`install_body_limits` puts it in front of Chainlit's app (idempotent,
also across Chainlit's ``-w`` reload) and makes ``ARGUS_MAX_UPLOAD_MB`` the
single source of Chainlit's ``spontaneous_file_upload.max_size_mb`` too.
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Mapping, Optional

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Room for the multipart envelope (boundaries, part headers, other fields), in bytes.
MULTIPART_OVERHEAD = 64 * 1024
#: Largest ``/login`` or ``/signup`` body, in bytes.
FORM_LIMIT = 16 * 1024
_MARK = "_argus_body_limit"  # attribute marking our middleware class (survives module reloads)


class _TooLarge(Exception):
    """Raised into the app from ``receive`` once the body passed the limit."""


class BodyLimitMiddleware:
    """ASGI middleware: per-path limits on the request body size.

    Args:
        app: the wrapped ASGI app.
        limits: exact path (after ``rstrip("/")``) → ``(max body bytes,
            JSON-serialisable 413 response body)``. Other paths pass untouched.

    A refused request gets ``413`` with the given JSON and ``Connection:
    close``. When the app had already started its response before the limit
    was passed, that response is left alone (it cannot be replaced).
    """

    _argus_body_limit = True  # see _MARK

    def __init__(self, app: ASGIApp, limits: Mapping[str, tuple[int, Any]]):
        self.app = app
        self.limits = {path.rstrip("/"): limit for path, limit in limits.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.get(scope.get("path", "").rstrip("/")) if scope["type"] == "http" else None
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


def install_body_limits(max_upload_bytes: int, app=None) -> None:
    """Install :class:`BodyLimitMiddleware` as the outermost user middleware of
    Chainlit's app, and set Chainlit's ``spontaneous_file_upload.max_size_mb``
    (what the browser enforces) from ``max_upload_bytes`` (bytes; rounded up
    to whole MB). Call from the Chainlit app module, before the server starts
    (idempotent; on a ``-w`` reload the middleware stack is rebuilt).

    Args:
        max_upload_bytes: largest accepted image, in bytes (``settings.max_upload_bytes``).
        app: the FastAPI app; default ``chainlit.server.app``.
    """
    from chainlit.config import config
    from starlette.middleware import Middleware

    if app is None:
        from chainlit.server import app
    upload = config.features.spontaneous_file_upload
    if upload is not None:
        upload.max_size_mb = -(-max_upload_bytes // 1024**2)
    stack = [m for m in app.user_middleware if not getattr(m.cls, _MARK, False)]
    stack.insert(0, Middleware(BodyLimitMiddleware, limits=body_limits(max_upload_bytes, config.run.root_path or "")))
    app.user_middleware[:] = stack
    app.middleware_stack = None  # built on the first request (or rebuilt after a reload)

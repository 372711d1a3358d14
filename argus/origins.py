"""Which web origins may talk to the server with the user's cookies.

Chainlit 2.12 installs Starlette's ``CORSMiddleware`` with
``allow_credentials=True`` and ``allow_origins=config.project.allow_origins``
(``["*"]`` by default), so any web page could read credentialed answers; and
its socket.io server is created with ``cors_allowed_origins=[]``, which turns
engine.io's origin check off entirely. :func:`restrict_origins` narrows both,
before the first request (Starlette builds the middleware stack lazily, on the
first request or the lifespan start-up, so the stored arguments can still be
changed when the app module is imported):

* HTTP (CORS): only :func:`allowed_origins` get ``Access-Control-Allow-*``;
  same-origin requests never need them.
* socket.io: a connection carrying an ``Origin`` header is accepted only from
  :func:`allowed_origins` or from the origin the browser addressed (``Origin``
  naming the ``Host`` header), as engine.io does by default; clients sending
  no ``Origin`` (non-browser) are unaffected.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional
from urllib.parse import urlsplit

from argus.config import ConfigError

log = logging.getLogger(__name__)

_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(scheme: str, host: str, port: Optional[int]) -> str:
    host = host.lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def allowed_origins(public_url: Optional[str], host: str, port: int, scheme: str = "http") -> list[str]:
    """The origins allowed cross-origin access.

    Args:
        public_url: ``CHAINLIT_URL`` (e.g. ``https://chat.example.com/``); when
            set, its origin is the only one.
        host, port: where the server listens; used when ``public_url`` is
            empty: ``<scheme>://127.0.0.1:<port>``, ``<scheme>://localhost:<port>``
            and, unless it is a wildcard address, ``<scheme>://<host>:<port>``.
        scheme: ``"https"`` when the server terminates TLS itself.

    Raises:
        ConfigError: ``public_url`` is not an ``http(s)://host`` URL.
    """
    if public_url and public_url.strip():
        parts = urlsplit(public_url.strip())
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ConfigError(f"CHAINLIT_URL must look like https://chat.example.com, got {public_url!r}")
        return [_origin(parts.scheme, parts.hostname, parts.port)]
    origins = [_origin(scheme, "127.0.0.1", port), _origin(scheme, "localhost", port)]
    if host.strip().lower() not in _WILDCARD_HOSTS:
        own = _origin(scheme, host.strip().strip("[]"), port)
        if own not in origins:
            origins.append(own)
    return origins


class SocketOriginCheck:
    """engine.io ``cors_allowed_origins`` callable: ``origin`` is in ``origins``
    or names the host the request was sent to (the ``Host`` header)."""

    def __init__(self, origins: list[str]):
        self.origins = frozenset(origins)

    def __call__(self, origin: Optional[str], environ: Optional[dict[str, Any]] = None) -> bool:
        if not origin or origin == "null":
            return False
        if origin in self.origins:
            return True
        host = (environ or {}).get("HTTP_HOST", "").lower()
        return bool(host) and urlsplit(origin).netloc.lower() == host


def restrict_origins(app=None, sio=None) -> list[str]:
    """Limit Chainlit's CORS and socket.io origins to :func:`allowed_origins`
    (from ``CHAINLIT_URL``, or the host/port Chainlit runs on). Call from the
    Chainlit app module, before the server starts; idempotent.

    Args:
        app, sio: Chainlit's FastAPI app and socket.io server; default
            ``chainlit.server.app`` / ``chainlit.server.sio``.

    Returns:
        The allowed origins.

    Raises:
        ConfigError: ``CHAINLIT_URL`` is not an http(s) URL.
        RuntimeError: Chainlit's CORS middleware was not found (a Chainlit
            upgrade changed how it is installed: this function needs updating).
    """
    from chainlit.config import config
    from starlette.middleware.cors import CORSMiddleware

    if app is None or sio is None:
        from chainlit import server

        app = app if app is not None else server.app
        sio = sio if sio is not None else server.sio
    scheme = "https" if config.run.ssl_cert else "http"
    origins = allowed_origins(os.environ.get("CHAINLIT_URL"), config.run.host, int(config.run.port), scheme)
    cors = [m for m in app.user_middleware if m.cls is CORSMiddleware]
    if not cors:
        raise RuntimeError("Chainlit's CORS middleware was not found; cannot restrict the allowed origins.")
    for m in cors:
        m.kwargs["allow_origins"] = list(origins)
    config.project.allow_origins = list(origins)
    app.middleware_stack = None  # built on the first request (or rebuilt after a reload)
    sio.eio.cors_allowed_origins = SocketOriginCheck(origins)
    log.debug("allowed origins: %s", ", ".join(origins))
    return origins

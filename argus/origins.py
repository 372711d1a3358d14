"""Which hosts and web origins may talk to the server with the user's cookies.

Three checks, all from one allow-list (:class:`OriginPolicy`), never from the
request's own ``Host`` header (a DNS-rebinding page controls both ``Host`` and
``Origin``: ``Host: evil.example:8000`` + ``Origin: http://evil.example:8000``):

* ``Host`` (DNS rebinding): Starlette's ``TrustedHostMiddleware`` answers
  ``400 Invalid host header`` unless the ``Host`` names one of
  :func:`allowed_hosts` (HTTP and websocket, socket.io included).
* Cross-site posts (CSRF): ``POST /login`` and ``POST /logout`` from a page of
  another origin (``Origin`` not in :attr:`OriginPolicy.origins`, or
  ``Sec-Fetch-Site: cross-site``/``same-site``) get ``403``
  (:class:`CrossSiteGuard`); ``POST /signup`` checks the same in its route
  (``argus.signup``). Clients that send neither header (curl, tests, scripts)
  are not browsers and cannot be forged by a web page.
* CORS and socket.io: Chainlit 2.12 installs Starlette's ``CORSMiddleware``
  with ``allow_credentials=True`` and ``allow_origins=["*"]`` by default, and
  creates its socket.io server with ``cors_allowed_origins=[]``, which turns
  engine.io's origin check off. :func:`restrict_origins` narrows CORS to
  :func:`allowed_origins` and makes engine.io accept a browser connection only
  from :attr:`OriginPolicy.origins` (clients without ``Origin`` are unaffected).

:func:`restrict_origins` installs all of it before the first request (Starlette
builds the middleware stack lazily, so the stored arguments can still be
changed when the app module is imported). Settings (environment):

* ``CHAINLIT_URL``: the public URL behind a reverse proxy; its host and origin
  are the allowed ones (plus loopback, below).
* ``ARGUS_ALLOWED_HOSTS``: more host names or addresses the server is reached
  by, comma-separated (e.g. ``chat.lan,192.168.1.9`` for LAN access to a server
  bound to ``0.0.0.0``). Each also allows the origin ``<scheme>://<name>:<port>``.

Loopback names (``127.0.0.1``, ``localhost``, ``[::1]``) are always allowed as
``Host`` and as origins on the server's own port: a page served under such a
name is this machine's, never a rebinding attacker's, and health checks and
reverse proxies that do not forward ``Host`` keep working.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional
from urllib.parse import urlsplit

from starlette.middleware.trustedhost import TrustedHostMiddleware

from argus.config import ConfigError

log = logging.getLogger(__name__)

_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}
_DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
#: The setting naming extra host names the server is reached by (comma-separated).
ALLOWED_HOSTS_VAR = "ARGUS_ALLOWED_HOSTS"
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_MARK = "_argus_origin_guard"  # attribute marking our middleware classes (survives module reloads)
#: ``Sec-Fetch-Site`` values of a request a page of this origin (or the user) made.
_SAME_SITE_FETCH = {"same-origin", "none"}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _host_literal(host: str) -> str:
    """``host`` lower-cased, an IPv6 literal in brackets (as in ``Host`` and ``Origin``)."""
    host = host.strip().lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return host


def _origin(scheme: str, host: str, port: Optional[int]) -> str:
    host = _host_literal(host)
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _public_url(public_url: Optional[str]):
    if not (public_url and public_url.strip()):
        return None
    parts = urlsplit(public_url.strip())
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(f"CHAINLIT_URL must look like https://chat.example.com, got {public_url!r}")
    return parts


def allowed_origins(public_url: Optional[str], host: str, port: int, scheme: str = "http") -> list[str]:
    """The origins allowed cross-origin access (CORS).

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
    parts = _public_url(public_url)
    if parts is not None:
        return [_origin(parts.scheme, parts.hostname, parts.port)]
    origins = [_origin(scheme, "127.0.0.1", port), _origin(scheme, "localhost", port)]
    if host.strip().lower() not in _WILDCARD_HOSTS:
        own = _origin(scheme, host.strip().strip("[]"), port)
        if own not in origins:
            origins.append(own)
    return origins


def parse_extra_hosts(value: Optional[str]) -> list[str]:
    """``ARGUS_ALLOWED_HOSTS`` as a list of host literals (lower case, IPv6 in brackets).

    Args:
        value: comma-separated host names or IP addresses, without scheme or port;
            empty or None: none.

    Raises:
        ConfigError: an entry is not a host name or IP address (``*`` is refused:
            allowing any host is what DNS rebinding needs).
    """
    hosts: list[str] = []
    for raw in (value or "").split(","):
        name = raw.strip().lower()
        if not name:
            continue
        bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
        try:
            literal = _host_literal(str(ipaddress.ip_address(bare)))
        except ValueError:
            if not _HOST_NAME.match(bare):
                raise ConfigError(
                    f"{ALLOWED_HOSTS_VAR} must list host names or IP addresses without scheme or port "
                    f"(e.g. chat.lan,192.168.1.9), got {raw.strip()!r}"
                ) from None
            literal = bare
        if literal not in hosts:
            hosts.append(literal)
    return hosts


def allowed_hosts(public_url: Optional[str], host: str, extra: Iterable[str] = ()) -> list[str]:
    """The names a request's ``Host`` header may carry (port not compared).

    ``CHAINLIT_URL``'s host when set, else the host the server is bound to
    unless it is a wildcard address; then ``extra`` (``ARGUS_ALLOWED_HOSTS``)
    and always the loopback names :data:`LOOPBACK_HOSTS`.

    Raises:
        ConfigError: ``public_url`` is not an ``http(s)://host`` URL.
    """
    parts = _public_url(public_url)
    hosts: list[str] = []
    if parts is not None:
        hosts.append(_host_literal(parts.hostname))
    elif host.strip().lower() not in _WILDCARD_HOSTS:
        hosts.append(_host_literal(host.strip().strip("[]")))
    for name in (*extra, *LOOPBACK_HOSTS):
        if name not in hosts:
            hosts.append(name)
    return hosts


@dataclass(frozen=True)
class OriginPolicy:
    """Who may talk to this server.

    Attributes:
        hosts: accepted ``Host`` names (:func:`allowed_hosts`).
        cors: origins given credentialed CORS access (:func:`allowed_origins`).
        origins: origins whose pages may post forms, sign up and open socket.io
            connections: ``cors``, plus each extra host and each loopback name
            on the server's port.
    """

    hosts: tuple[str, ...]
    cors: tuple[str, ...]
    origins: frozenset[str]

    @classmethod
    def build(cls, public_url: Optional[str], host: str, port: int, scheme: str = "http",
              extra_hosts: Iterable[str] = ()) -> "OriginPolicy":
        """The policy for a server on ``host:port``.

        Raises:
            ConfigError: bad ``public_url``.
        """
        extra = list(extra_hosts)
        cors = allowed_origins(public_url, host, port, scheme)
        origins = set(cors)
        origins.update(_origin(scheme, name.strip("[]"), port) for name in (*extra, *LOOPBACK_HOSTS))
        return cls(tuple(allowed_hosts(public_url, host, extra)), tuple(cors), frozenset(origins))

    @classmethod
    def from_chainlit(cls, environ: Optional[Mapping[str, str]] = None) -> "OriginPolicy":
        """The policy from Chainlit's run config (host, port, TLS) and the environment
        (``CHAINLIT_URL``, ``ARGUS_ALLOWED_HOSTS``).

        Raises:
            ConfigError: bad ``CHAINLIT_URL`` or ``ARGUS_ALLOWED_HOSTS``.
        """
        from chainlit.config import config

        env = os.environ if environ is None else environ
        scheme = "https" if config.run.ssl_cert else "http"
        return cls.build(env.get("CHAINLIT_URL"), config.run.host, int(config.run.port), scheme,
                         parse_extra_hosts(env.get(ALLOWED_HOSTS_VAR)))

    def origin_allowed(self, origin: Optional[str]) -> bool:
        """``origin`` (an ``Origin`` header value) is one of :attr:`origins`."""
        if not origin or origin.strip().lower() == "null":
            return False
        parts = urlsplit(origin.strip().lower())
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            return False
        try:
            port = parts.port
        except ValueError:
            return False
        return _origin(parts.scheme, parts.hostname, port) in self.origins

    def same_origin(self, headers: Mapping[str, str]) -> Optional[bool]:
        """Whether a request with these (lower-case named) headers came from one of our pages.

        Returns:
            True: ``Origin`` is ours (or absent and ``Sec-Fetch-Site`` says same-origin/none);
            False: ``Origin`` is foreign or ``null``, or ``Sec-Fetch-Site`` is cross-site/same-site;
            None: neither header: not a browser (a web page cannot make a browser omit both
            on a POST).
        """
        origin = headers.get("origin")
        if origin is not None:
            return self.origin_allowed(origin)
        fetch_site = headers.get("sec-fetch-site")
        if fetch_site is not None:
            return fetch_site.strip().lower() in _SAME_SITE_FETCH
        return None


_policy: Optional[OriginPolicy] = None


def current_policy() -> OriginPolicy:
    """The policy :func:`restrict_origins` installed, else one built from Chainlit's
    config and the environment (:meth:`OriginPolicy.from_chainlit`)."""
    return _policy if _policy is not None else OriginPolicy.from_chainlit()


class SocketOriginCheck:
    """engine.io ``cors_allowed_origins`` callable: ``origin`` is one of the
    policy's origins (``Host`` is not consulted: a rebinding page controls it)."""

    def __init__(self, origins: Iterable[str] | OriginPolicy):
        if isinstance(origins, OriginPolicy):
            self.policy = origins
        else:
            origins = list(origins)
            self.policy = OriginPolicy((), tuple(origins), frozenset(o.lower() for o in origins))

    @property
    def origins(self) -> frozenset[str]:
        return self.policy.origins

    def __call__(self, origin: Optional[str], environ: Optional[dict[str, Any]] = None) -> bool:
        return self.policy.origin_allowed(origin)


class CrossSiteGuard:
    """ASGI middleware: ``403`` for a ``POST`` to one of ``paths`` sent by a page of
    another site (:meth:`OriginPolicy.same_origin` is False), before the body is read.

    Args:
        app: the wrapped app.
        paths: exact paths (compared after ``rstrip("/")``), e.g. ``/login``, ``/logout``.
        policy: returns the policy to apply (called per request).
    """

    _argus_origin_guard = True  # see _MARK

    def __init__(self, app: ASGIApp, paths: Iterable[str], policy: Callable[[], OriginPolicy] = current_policy):
        self.app = app
        self.paths = frozenset(p.rstrip("/") for p in paths)
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope.get("method") == "POST"
            and scope.get("path", "").rstrip("/") in self.paths
        ):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
            if self.policy().same_origin(headers) is False:
                log.info("refused a cross-site POST %s (Origin %r)", scope.get("path"), headers.get("origin"))
                body = json.dumps({"detail": "This request came from another site; sign in from this site's own page."}).encode()
                await send({"type": "http.response.start", "status": 403, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class ArgusTrustedHost(TrustedHostMiddleware):
    """Starlette's ``TrustedHostMiddleware`` (``400 Invalid host header`` for a ``Host``
    not in ``allowed_hosts``), marked as ours so :func:`restrict_origins` can replace it."""

    _argus_origin_guard = True  # see _MARK


def restrict_origins(app=None, sio=None) -> list[str]:
    """Install the host allow-list (``TrustedHostMiddleware``), the cross-site guard of
    ``/login`` and ``/logout`` (:class:`CrossSiteGuard`), and limit Chainlit's CORS and
    socket.io origins, all from :meth:`OriginPolicy.from_chainlit`. Call from the Chainlit
    app module, before the server starts; idempotent (also across Chainlit's ``-w`` reload).

    Args:
        app, sio: Chainlit's FastAPI app and socket.io server; default
            ``chainlit.server.app`` / ``chainlit.server.sio``.

    Returns:
        The origins allowed CORS access.

    Raises:
        ConfigError: ``CHAINLIT_URL`` is not an http(s) URL, or ``ARGUS_ALLOWED_HOSTS``
            names something other than hosts.
        RuntimeError: Chainlit's CORS middleware was not found (a Chainlit
            upgrade changed how it is installed: this function needs updating).
    """
    global _policy
    from chainlit.config import config
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    if app is None or sio is None:
        from chainlit import server

        app = app if app is not None else server.app
        sio = sio if sio is not None else server.sio
    policy = OriginPolicy.from_chainlit()
    origins = list(policy.cors)
    cors = [m for m in app.user_middleware if m.cls is CORSMiddleware]
    if not cors:
        raise RuntimeError("Chainlit's CORS middleware was not found; cannot restrict the allowed origins.")
    for m in cors:
        m.kwargs["allow_origins"] = list(origins)
    config.project.allow_origins = list(origins)

    root = config.run.root_path or ""
    stack = [m for m in app.user_middleware if not getattr(m.cls, _MARK, False)]
    stack[0:0] = [
        Middleware(ArgusTrustedHost, allowed_hosts=list(policy.hosts), www_redirect=False),
        Middleware(CrossSiteGuard, paths=[root + "/login", root + "/logout"]),
    ]
    app.user_middleware[:] = stack
    app.middleware_stack = None  # built on the first request (or rebuilt after a reload)
    sio.eio.cors_allowed_origins = SocketOriginCheck(policy)
    _policy = policy
    if config.run.host.strip().lower() in _WILDCARD_HOSTS and not os.environ.get("CHAINLIT_URL", "").strip():
        log.info("listening on all addresses; requests must name one of these hosts: %s "
                 "(others get 400: set CHAINLIT_URL or %s to add the names users type)",
                 ", ".join(policy.hosts), ALLOWED_HOSTS_VAR)
    log.debug("allowed hosts: %s; origins: %s", ", ".join(policy.hosts), ", ".join(sorted(policy.origins)))
    return origins

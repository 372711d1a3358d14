"""The sign-up page, and the sign-in throttle, on Chainlit's FastAPI app.

Chainlit has no sign-up form, and its catch-all ``GET /{full_path:path}``
serves the single-page app for every unknown path. Routes added with
``@app.get`` after Chainlit's router would never be reached, so
:func:`install_signup_routes` inserts its routes at the *front* of
``app.router.routes``. It is idempotent (Chainlit's ``-w`` reload re-imports
the app module): routes from an earlier call are replaced.

Routes (under Chainlit's root path):

- ``GET /signup``: a self-contained HTML form (no external assets).
- ``POST /signup``: JSON or form body ``email, name, password[, confirm]``;
  answers ``{"ok": true}`` (201) or ``{"ok": false, "error": "..."}``
  with 400, 403 (cross-site), 413 (too large; bodies over 16 KiB are already
  refused by ``argus.limits`` before they reach this route), 429 (throttled)
  or 503 (the store is unavailable: :data:`STORAGE_UNAVAILABLE`).
- ``POST /login`` (unless ``guard_login=False``): answers 429 with
  ``{"detail": "Too many failed sign-in attempts. Try again in 4 minutes."}``
  while the client address is throttled; otherwise waits the email's
  progressive delay (:meth:`argus.auth.Authenticator.login_delay`, 0 to 4 s after
  repeated failures for that email, from any address: ``asyncio.sleep``, the
  event loop keeps serving) and hands the request to Chainlit's own ``/login``.
  During that call :func:`current_client_ip` returns the caller's address, for the ``@cl.password_auth_callback``; when
  the callback reports the store unavailable (:func:`report_store_unavailable`)
  the answer is 503 ``{"detail": STORAGE_UNAVAILABLE}`` instead of Chainlit's
  401, so a database outage never looks like a wrong password.

:func:`install_signup_routes` also installs :class:`argus.sessions.SessionGuard`
(unless ``guard_sessions=False``): session tokens are checked against the user's
token version on every request, ``POST /logout`` ends them, and their lifetime is
``ARGUS_SESSION_HOURS`` (default 24 h).
"""
import asyncio
import contextvars
import html
import json
import logging
import math
from typing import Callable, Optional
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import OAuth2PasswordRequestForm
from starlette.exceptions import HTTPException

from argus.auth import Authenticator, LoginThrottled, SignupError, SignupThrottled
from argus.origins import current_policy
from argus.sessions import install_session_guard
from argus.store import StoreUnavailable

MAX_BODY_BYTES = 16 * 1024
#: The answer (503) of sign-in and sign-up while the store cannot be reached.
STORAGE_UNAVAILABLE = "Storage is unavailable right now; please try again in a moment."
_ROUTE_PREFIX = "argus_"
log = logging.getLogger(__name__)
_client_ip: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("argus_client_ip", default=None)
#: Set by the guarded POST /login for the length of Chainlit's call: the callback marks it.
_login_store_down: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("argus_login_store_down", default=None)


def current_client_ip() -> Optional[str]:
    """The client address of the ``POST /login`` being handled, or None outside one.

    Use it in the password auth callback::

        user = await asyncio.to_thread(auth.login, username, password, current_client_ip())

    (uvicorn already resolves ``X-Forwarded-For`` from trusted proxies,
    ``FORWARDED_ALLOW_IPS``, default 127.0.0.1.)
    """
    return _client_ip.get()


def report_store_unavailable() -> None:
    """Tell the guarded ``POST /login`` being handled that the store failed, so it answers
    503 with :data:`STORAGE_UNAVAILABLE` rather than 401 (the password callback can only
    return None). A no-op outside a guarded sign-in."""
    flag = _login_store_down.get()
    if flag is not None:
        flag.append(True)


def _client_host(request: Request) -> Optional[str]:
    return request.client.host if request.client else None


def _same_origin(request: Request) -> bool:
    """CSRF and DNS-rebinding guard of the sign-up post. ``Origin`` (browsers send it on
    every cross-site POST) must be one of this server's origins
    (:meth:`argus.origins.OriginPolicy.origin_allowed`: ``CHAINLIT_URL``, the loopback
    names, ``ARGUS_ALLOWED_HOSTS``), never compared with the ``Host`` header (a
    rebinding page controls both); ``X-Forwarded-Host`` is not trusted either. A
    ``Sec-Fetch-Site`` other than same-origin/none is refused. Without an ``Origin``
    (non-browser clients) only a JSON body is accepted, which a cross-site HTML form
    cannot send."""
    verdict = current_policy().same_origin({k.lower(): v for k, v in request.headers.items()})
    if verdict is None or (verdict and "origin" not in request.headers):
        return request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
    return verdict


async def _read_fields(request: Request) -> dict:
    """The body as a dict of strings. Raises ValueError (bad body) or OverflowError (too big)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise OverflowError
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        data = json.loads(body or b"{}")
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return {k: v for k, v in data.items() if isinstance(v, str)}
    if ctype == "application/x-www-form-urlencoded":
        return {k: v[0] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}
    raise ValueError("unsupported content type")


def _fail(status: int, error: str, retry_after_s: Optional[float] = None) -> JSONResponse:
    headers = {"Retry-After": str(math.ceil(retry_after_s))} if retry_after_s else None
    return JSONResponse({"ok": False, "error": error}, status_code=status, headers=headers)


def install_signup_routes(
    get_authenticator: Callable[[], Authenticator], *, guard_login: bool = True, guard_sessions: bool = True, app=None
) -> None:
    """Register ``GET/POST /signup`` (and the ``POST /login`` throttle) ahead of
    Chainlit's catch-all route. Call once from the Chainlit app module.

    Args:
        get_authenticator: returns the shared Authenticator; called on each
            request (so it may be created lazily).
        guard_login: also answer throttled sign-ins with 429 and a readable
            message, delay repeated failures per email, and provide
            :func:`current_client_ip` to the auth callback.
        guard_sessions: also install :func:`argus.sessions.install_session_guard`
            (token versions, sign-out, ``ARGUS_SESSION_HOURS``).
        app: the FastAPI app; default ``chainlit.server.app``.
    Raises:
        ConfigError: a bad ``ARGUS_SESSION_HOURS``.
    """
    from chainlit.config import config

    if app is None:
        from chainlit.server import app
    root = config.run.root_path or ""
    page = _PAGE.replace("{{ROOT}}", html.escape(root, quote=True)).encode("utf-8")
    router = APIRouter(prefix=root)

    async def signup_page() -> Response:
        return HTMLResponse(
            page,
            headers={
                "Cache-Control": "no-store",
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                "script-src 'unsafe-inline'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def signup_submit(request: Request) -> Response:
        if not _same_origin(request):
            return _fail(403, "This request did not come from the sign-up page. Reload it and try again.")
        try:
            fields = await _read_fields(request)
        except OverflowError:
            return _fail(413, "The form is too large.")
        except (ValueError, UnicodeDecodeError):
            return _fail(400, "Send the form as JSON or as a normal web form.")
        password = fields.get("password", "")
        if "confirm" in fields and fields["confirm"] != password:
            return _fail(400, "The two passwords do not match.")
        auth = get_authenticator()
        try:
            await asyncio.to_thread(
                auth.signup, fields.get("email", ""), fields.get("name", ""), password, _client_host(request)
            )
        except SignupThrottled as exc:
            return _fail(429, exc.message, exc.retry_after_s)
        except SignupError as exc:
            return _fail(400, exc.message)
        except StoreUnavailable as exc:
            log.warning("sign-up failed: %s", exc)
            return _fail(503, STORAGE_UNAVAILABLE)
        return JSONResponse({"ok": True}, status_code=201)

    router.add_api_route("/signup", signup_page, methods=["GET"], name=_ROUTE_PREFIX + "signup_page", include_in_schema=False)
    router.add_api_route("/signup", signup_submit, methods=["POST"], name=_ROUTE_PREFIX + "signup_submit", include_in_schema=False)

    if guard_login:
        from chainlit.server import login as chainlit_login

        async def guarded_login(
            request: Request, response: Response, form_data: OAuth2PasswordRequestForm = Depends()
        ) -> Response:
            ip = _client_host(request)
            auth = get_authenticator()
            try:
                auth.check_login_allowed(form_data.username, ip)
            except LoginThrottled as exc:
                return JSONResponse(
                    {"detail": exc.message},
                    status_code=429,
                    headers={"Retry-After": str(math.ceil(exc.retry_after_s))},
                )
            delay = auth.login_delay(form_data.username)
            if delay > 0:  # repeated failures for this email: slow down, never refuse
                await asyncio.sleep(delay)
            store_down: list = []
            token, down_token = _client_ip.set(ip), _login_store_down.set(store_down)
            try:
                answer = await chainlit_login(request=request, response=response, form_data=form_data)
            except HTTPException:
                if not store_down:
                    raise
                answer = None
            finally:
                _login_store_down.reset(down_token)
                _client_ip.reset(token)
            if store_down:
                return JSONResponse({"detail": STORAGE_UNAVAILABLE}, status_code=503)
            return answer

        router.add_api_route("/login", guarded_login, methods=["POST"], name=_ROUTE_PREFIX + "login", include_in_schema=False)

    routes = app.router.routes
    routes[:] = [r for r in routes if not str(getattr(r, "name", "")).startswith(_ROUTE_PREFIX)]
    routes[0:0] = router.routes
    if guard_sessions:
        install_session_guard(lambda: get_authenticator().store, app=app)


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign up</title>
<style>
  :root { color-scheme: light dark; --fg: #111; --bg: #fafafa; --muted: #666; --line: #ccc; --accent: #2563eb; --err: #b91c1c; }
  @media (prefers-color-scheme: dark) { :root { --fg: #eee; --bg: #16171a; --muted: #aaa; --line: #444; --accent: #60a5fa; --err: #f87171; } }
  * { box-sizing: border-box; }
  body { margin: 0; min-height: 100vh; display: grid; place-items: center; background: var(--bg); color: var(--fg);
         font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Tahoma, "Noto Sans", "Noto Sans Arabic", sans-serif; }
  main { inline-size: min(22rem, 100% - 2rem); }
  h1 { font-size: 1.5rem; text-align: center; margin-block: 0 1.5rem; }
  label { display: block; font-size: .9rem; font-weight: 600; margin-block: 1rem .25rem; }
  input { inline-size: 100%; padding: .6rem .75rem; font: inherit; color: inherit; background: transparent;
          border: 1px solid var(--line); border-radius: .5rem; text-align: start; }
  input:focus { outline: 2px solid var(--accent); outline-offset: 1px; }
  button { inline-size: 100%; margin-block-start: 1.5rem; padding: .65rem; font: inherit; font-weight: 600;
           color: #fff; background: var(--accent); border: 0; border-radius: .5rem; cursor: pointer; }
  button:disabled { opacity: .6; cursor: progress; }
  .hint { font-size: .8rem; color: var(--muted); margin: .25rem 0 0; }
  #error { color: var(--err); min-block-size: 1.5rem; margin-block: 1rem 0; }
  p.alt { text-align: center; font-size: .9rem; }
  a { color: var(--accent); }
</style>
</head>
<body>
<main>
  <h1>Create your account</h1>
  <form id="signup" method="post" action="{{ROOT}}/signup" novalidate>
    <label for="name">Name</label>
    <input id="name" name="name" dir="auto" autocomplete="name" required maxlength="80" autofocus>
    <label for="email">Email</label>
    <input id="email" name="email" type="email" dir="auto" autocomplete="email" required maxlength="254">
    <label for="password">Password</label>
    <input id="password" name="password" type="password" dir="auto" autocomplete="new-password" required minlength="8">
    <p class="hint">At least 8 characters.</p>
    <label for="confirm">Confirm password</label>
    <input id="confirm" name="confirm" type="password" dir="auto" autocomplete="new-password" required minlength="8">
    <p id="error" role="alert" aria-live="polite"></p>
    <button type="submit">Sign up</button>
  </form>
  <p class="alt">Already have an account? <a href="{{ROOT}}/login">Sign in</a></p>
</main>
<script>
(function () {
  var form = document.getElementById("signup"), error = document.getElementById("error");
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var data = {};
    new FormData(form).forEach(function (value, key) { data[key] = value; });
    if (data.password.length < 8) { error.textContent = "Password must be at least 8 characters long."; return; }
    if (data.password !== data.confirm) { error.textContent = "The two passwords do not match."; return; }
    var button = form.querySelector("button");
    button.disabled = true;
    error.textContent = "";
    fetch(form.getAttribute("action"), {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(data)
    }).then(function (r) { return r.json(); }).then(function (body) {
      if (body.ok) { window.location.assign("{{ROOT}}/login"); return; }
      error.textContent = body.error || "Sign-up failed. Try again.";
      button.disabled = false;
    }).catch(function () {
      error.textContent = "The server could not be reached. Try again.";
      button.disabled = false;
    });
  });
})();
</script>
</body>
</html>
"""

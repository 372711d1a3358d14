"""Issue 13 (findings 1, 2, 3, 7), in-process: the middlewares and policies that refuse the
attacks, called through ASGI (httpx's ASGITransport) with real Starlette components, and the
key pool through its public API. The same attacks against a running server are in
``test_hardening_http.py``.
"""
from __future__ import annotations

import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route

from argus.catalogue import load_catalogue
from argus.config import ConfigError
from argus.keys import KeyPool, KeyPoolError, SecretBox
from argus.limits import DEFAULT_BODY_LIMIT, BodyLimitMiddleware, default_limit, max_body_bytes
from argus.origins import (
    ArgusTrustedHost,
    CrossSiteGuard,
    OriginPolicy,
    SocketOriginCheck,
    allowed_hosts,
    parse_extra_hosts,
)

MB = 1024 * 1024
EVIL = "http://evil.example:8000"
LOCAL = OriginPolicy.build("", "127.0.0.1", 8000)


# ---- 1. a body limit on every path ---------------------------------------------------
async def _reading_app(scope, receive, send):
    """Reads the whole body (like Chainlit's ``await request.json()``) and answers its size."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def _limited(default_bytes: int = 1000) -> BodyLimitMiddleware:
    return BodyLimitMiddleware(_reading_app, {"/project/file": (5000, {"detail": "file"})}, default=default_limit(default_bytes))


async def test_every_path_has_the_default_limit_and_only_the_upload_route_more():
    async def chunks(n):
        for _ in range(n):
            yield b"x" * 300

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_limited()), base_url="http://t") as client:
        for path in ("/set-session-cookie", "/project/threads", "/anything/else"):
            r = await client.post(path, content=b"x" * 1001)
            assert (r.status_code, r.json()) == (413, {"detail": "The request body is larger than the 0.976562 KB limit."})
            r = await client.post(path, content=chunks(4))  # chunked: 1200 bytes counted as they arrive
            assert r.status_code == 413
            r = await client.post(path, content=b"x" * 1000)
            assert (r.status_code, r.text) == (200, "1000")
        r = await client.post("/project/file", content=b"x" * 4000)  # the upload route: its own, larger limit
        assert (r.status_code, r.text) == (200, "4000")
        r = await client.post("/project/file", content=b"x" * 5001)
        assert (r.status_code, r.json()) == (413, {"detail": "file"})


async def test_declared_oversized_body_is_refused_before_the_app_runs():
    called = []

    async def app(scope, receive, send):
        called.append(scope["path"])
        await _reading_app(scope, receive, send)

    limited = BodyLimitMiddleware(app, {}, default=default_limit(1000))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=limited), base_url="http://t") as client:
        r = await client.post("/project/threads", content=b"x" * 2000)
    assert r.status_code == 413 and r.headers["connection"] == "close" and called == []


@pytest.mark.parametrize("raw, expected", [("", DEFAULT_BODY_LIMIT), ("  ", DEFAULT_BODY_LIMIT), ("64", 64 * 1024), ("4096", 4 * MB)])
def test_max_body_setting(raw, expected):
    assert max_body_bytes({"ARGUS_MAX_BODY_KB": raw}) == expected
    assert max_body_bytes({}) == DEFAULT_BODY_LIMIT == MB


@pytest.mark.parametrize("raw", ["1MB", "-5", "0", "15", "2000000"])
def test_bad_max_body_setting_is_a_config_error(raw):
    with pytest.raises(ConfigError, match="^ARGUS_MAX_BODY_KB must"):
        max_body_bytes({"ARGUS_MAX_BODY_KB": raw})


# ---- 2. DNS rebinding: hosts and origins from an allow-list, never from Host ------------------
@pytest.mark.parametrize(
    "public_url, host, extra, expected",
    [
        ("", "127.0.0.1", [], ["127.0.0.1", "localhost", "[::1]"]),
        ("", "0.0.0.0", [], ["127.0.0.1", "localhost", "[::1]"]),
        ("", "::", [], ["127.0.0.1", "localhost", "[::1]"]),
        ("", "chat.lan", [], ["chat.lan", "127.0.0.1", "localhost", "[::1]"]),
        ("", "::1", [], ["[::1]", "127.0.0.1", "localhost"]),
        ("", "0.0.0.0", ["192.168.1.9", "chat.lan"], ["192.168.1.9", "chat.lan", "127.0.0.1", "localhost", "[::1]"]),
        ("https://Chat.Example.com/argus/", "0.0.0.0", [], ["chat.example.com", "127.0.0.1", "localhost", "[::1]"]),
    ],
)
def test_allowed_hosts(public_url, host, extra, expected):
    assert allowed_hosts(public_url, host, extra) == expected


def test_extra_hosts_setting():
    assert parse_extra_hosts("") == [] and parse_extra_hosts(None) == []
    assert parse_extra_hosts(" Chat.LAN , 192.168.1.9,fe80::1,[::2],chat.lan") == ["chat.lan", "192.168.1.9", "[fe80::1]", "[::2]"]
    for bad in ("*", "*.example.com", "http://chat.lan", "chat.lan:8000", "a b", "-x.lan"):
        with pytest.raises(ConfigError, match="^ARGUS_ALLOWED_HOSTS must list host names"):
            parse_extra_hosts(bad)


def test_origin_policy_ignores_the_host_header():
    policy = OriginPolicy.build("", "0.0.0.0", 8000, extra_hosts=["192.168.1.9"])
    for ours in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "http://192.168.1.9:8000",
                 "HTTP://LocalHost:8000"):
        assert policy.origin_allowed(ours), ours
    for foreign in (EVIL, "http://evil.example", "http://127.0.0.1:9000", "https://127.0.0.1:8000", "null", "", None,
                    "http://127.0.0.1:8000.evil.example", "http://localhost:bad"):
        assert not policy.origin_allowed(foreign), foreign
    behind_proxy = OriginPolicy.build("https://chat.example.com", "0.0.0.0", 8000)
    assert behind_proxy.cors == ("https://chat.example.com",)
    assert behind_proxy.origin_allowed("https://chat.example.com")
    assert behind_proxy.origin_allowed("http://localhost:8000")  # this machine (an SSH tunnel)
    assert not behind_proxy.origin_allowed("http://chat.example.com")


def test_socket_origin_check_refuses_a_rebinding_page():
    check = SocketOriginCheck(LOCAL)
    assert check("http://127.0.0.1:8000", {"HTTP_HOST": "127.0.0.1:8000"})
    assert check("http://localhost:8000", {})
    assert not check(EVIL, {"HTTP_HOST": "evil.example:8000"})  # Origin naming Host is no longer enough
    assert not check("null", {"HTTP_HOST": "null"})
    assert SocketOriginCheck(["http://127.0.0.1:8000"])("http://127.0.0.1:8000")  # a plain list still works


def _app(policy: OriginPolicy) -> Starlette:
    async def ok(request):
        return JSONResponse({"success": True, "body": (await request.body()).decode()})

    routes = [Route(p, ok, methods=["GET", "POST"]) for p in ("/login", "/logout", "/signup", "/health")]
    return Starlette(routes=routes, middleware=[
        Middleware(ArgusTrustedHost, allowed_hosts=list(policy.hosts), www_redirect=False),
        Middleware(CrossSiteGuard, paths=["/login", "/logout"], policy=lambda: policy),
    ])


async def test_trusted_host_refuses_a_rebinding_host_header():
    app = _app(LOCAL)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as client:
        r = await client.post("/signup", headers={"Host": "evil.example:8000", "Origin": EVIL}, json={})
        assert (r.status_code, r.text) == (400, "Invalid host header")
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST"):
            assert (await client.get("/health", headers={"Host": host})).status_code == 200, host


# ---- 3. login CSRF -----------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/login", "/logout"])
async def test_cross_site_posts_to_login_and_logout_are_refused(path):
    app = _app(LOCAL)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as client:
        form = {"username": "a@example.com", "password": "x"}
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Sec-Fetch-Site": "same-site"}, {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"}):
            r = await client.post(path, data=form, headers=headers)
            assert r.status_code == 403 and "another site" in r.json()["detail"], headers
        for headers in ({"Origin": "http://127.0.0.1:8000"}, {"Origin": "http://localhost:8000", "Sec-Fetch-Site": "same-origin"},
                        {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {}):
            r = await client.post(path, data=form, headers=headers)
            assert r.status_code == 200 and r.json()["success"], headers
        r = await client.get(path, headers={"Origin": "http://evil.example"})  # only POST is guarded
        assert r.status_code == 200


# ---- 7. /keys add with swapped arguments -------------------------------------------------
@pytest.fixture
def pool(tmp_path, store):
    (tmp_path / "catalogue.json").write_text(json.dumps({
        "day_resets": {"gemini": "America/Los_Angeles"},
        "models": [{"provider": "gemini", "id": "test-flash", "label": "Test Flash", "kind": "chat",
                    "capabilities": [], "context_tokens": 1000, "limits": {"free": {"rpm": None, "tpm": None, "rpd": None}}}],
    }))
    return KeyPool(store, SecretBox("s" * 40), load_catalogue(tmp_path / "catalogue.json"))


def test_swapped_keys_add_arguments_never_echo_the_key(pool):
    key = "AIzaSyTESTsecretvalue0123456789abcdefgh"
    with pytest.raises(KeyPoolError) as info:
        pool.add(key, "gemini")  # /keys add <key> <provider>
    message = str(info.value)
    assert "provider comes first" in message
    for n in range(6, len(key) + 1):  # no fragment of the key of 6 characters or more
        assert all(key[i:i + n] not in message for i in range(len(key) - n + 1)), message
    with pytest.raises(KeyPoolError) as info:
        pool.add("sk-live-" + "q" * 30, "also-not-a-provider")
    assert "sk-live" not in str(info.value) and "qqqqqq" not in str(info.value)
    assert pool.list() == []
    assert pool.add("gemini", key).provider == "gemini"  # the right order still works


async def test_swapped_keys_add_command_reply_shows_no_part_of_the_key(pool, store):
    from argus.commands import CommandContext, SessionState, parse_command, run_command

    admin = store.create_user("admin@example.com", "Admin", "$2b$04$" + "x" * 53)
    ctx = CommandContext(store=store, user_id=admin.id, state=SessionState(), models=[], is_admin=True,
                         services={"keys": pool})
    key = "AIzaSyTESTsecretvalue0123456789abcdefgh"
    reply = await run_command(ctx, parse_command(f"/keys add {key} gemini"))
    assert "provider comes first" in reply
    assert not any(key[i:i + 6] in reply for i in range(len(key) - 5)), reply
    assert pool.list() == []
    reply = await run_command(ctx, parse_command(f"/keys add gemini {key}"))
    assert reply.startswith("Added a gemini key") and key not in reply

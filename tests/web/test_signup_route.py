"""The sign-up page and the guarded /login on the real ``chainlit run app.py`` (127.0.0.1 only).

The server is this repository's app.py (see ``chainlit_server``): real
bcrypt, real store, no model. Each test uses its own ``X-Forwarded-For``
address (uvicorn trusts it from 127.0.0.1) so the per-address limits of one
test do not leak into another.
"""
from __future__ import annotations

import itertools

import httpx
import pytest
from tests.support.chainlit_server import running_server

pytestmark = pytest.mark.e2e

PASSWORD = "password-123"
_addresses = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signup_route")
    with running_server(tmp, ARGUS_LOGIN_ATTEMPTS="3", ARGUS_LOGIN_WINDOW_S="300") as srv:
        yield {"base": srv.base, "root": srv.app_root}


@pytest.fixture
def client(server):
    # A distinct client address per test (see module docstring).
    ip = f"10.9.0.{next(_addresses)}"
    with httpx.Client(base_url=server["base"], headers={"X-Forwarded-For": ip}, timeout=10) as c:
        yield c


def _signup(client, email, password=PASSWORD, confirm=None, name="Test User", **headers):
    body = {"email": email, "name": name, "password": password, "confirm": password if confirm is None else confirm}
    return client.post("/signup", json=body, headers=headers)


def test_get_signup_is_our_form_not_the_spa(client):
    r = client.get("/signup")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert '<form id="signup"' in page and "Create your account" in page
    for field in ("name", "email", "password", "confirm"):
        assert f'id="{field}" name="{field}"' in page
    assert page.count('dir="auto"') == 4
    assert "<script src" not in page and "<link" not in page  # self-contained
    assert 'href="/login"' in page
    spa = client.get("/some/unknown/page").text  # the catch-all still serves the app elsewhere
    assert '<div id="root">' in spa and '<div id="root">' not in page


def test_login_page_loads_the_signup_link_script(client):
    assert '<script src="/public/signup-link.js"' in client.get("/login").text
    js = client.get("/public/signup-link.js")
    assert js.status_code == 200 and "No account? " in js.text and "MutationObserver" in js.text


def test_signup_then_chainlit_login(client):
    r = _signup(client, "New.User@Example.com")
    assert (r.status_code, r.json()) == (201, {"ok": True})

    r = _signup(client, "new.user@example.com")
    assert r.status_code == 400
    assert r.json() == {"ok": False, "error": "An account with this email already exists."}

    r = client.post("/login", data={"username": "new.user@example.com", "password": PASSWORD})
    assert (r.status_code, r.json()) == (200, {"success": True})
    assert "access_token" in r.cookies

    r = client.post("/login", data={"username": "new.user@example.com", "password": "wrong-password"})
    assert r.status_code == 401 and "access_token" not in r.cookies


def test_signup_validation_errors(client):
    r = _signup(client, "v@example.com", confirm="something-else")
    assert (r.status_code, r.json()["error"]) == (400, "The two passwords do not match.")
    r = _signup(client, "v@example.com", password="short")
    assert (r.status_code, r.json()["error"]) == (400, "Password must be at least 8 characters long.")
    r = _signup(client, "not-an-email")
    assert r.status_code == 400 and r.json()["error"].startswith("Enter a valid email address")
    r = client.post("/signup", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["ok"] is False


def test_signup_csrf_guard(client, server):
    r = _signup(client, "csrf@example.com", Origin="http://evil.example")
    assert r.status_code == 403 and r.json()["ok"] is False
    r = _signup(client, "csrf@example.com", Origin="http://evil.example", **{"X-Forwarded-Host": "evil.example"})
    assert r.status_code == 403  # a foreign page could set that header: not trusted
    form = {"email": "csrf@example.com", "name": "C", "password": PASSWORD}
    r = client.post("/signup", data=form)  # a form post without Origin: refused
    assert r.status_code == 403
    r = client.post("/signup", data=form, headers={"Origin": server["base"]})  # same-origin form post
    assert (r.status_code, r.json()) == (201, {"ok": True})


def test_signup_throttled_per_address(client):
    for i in range(5):
        assert _signup(client, f"bulk{i}@example.com").status_code == 201
    r = _signup(client, "bulk5@example.com")
    assert r.status_code == 429
    assert r.json()["error"].startswith("Too many sign-ups from your network. Try again in ")
    assert int(r.headers["Retry-After"]) > 0


def test_failed_logins_are_throttled_with_a_readable_message(client):
    assert _signup(client, "victim@example.com").status_code == 201
    for _ in range(3):
        r = client.post("/login", data={"username": "victim@example.com", "password": "wrong-password"})
        assert r.status_code == 401
    r = client.post("/login", data={"username": "victim@example.com", "password": PASSWORD})
    assert r.status_code == 429
    assert r.json() == {"detail": "Too many failed sign-in attempts. Try again in 5 minutes."}
    assert 0 < int(r.headers["Retry-After"]) <= 300

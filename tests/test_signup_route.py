"""The sign-up page and the guarded /login on a real ``chainlit run`` server (127.0.0.1 only).

A tiny Chainlit app is written to tmp_path (the real app.py is not needed):
it wires Authenticator + install_signup_routes exactly as the product does.
Each test uses its own ``X-Forwarded-For`` address (uvicorn trusts it from
127.0.0.1) so the per-address limits of one test do not leak into another.
"""
from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "password-123"
_addresses = itertools.count(1)

APP = '''
import asyncio

import chainlit as cl

from argus.auth import Authenticator, LoginThrottled, ensure_auth_secret
from argus.config import Settings
from argus.signup import current_client_ip, install_signup_routes
from argus.store import open_store

settings = Settings.from_env(dotenv=False)
ensure_auth_secret(settings)
auth = Authenticator(open_store(settings), settings, bcrypt_rounds=4)
install_signup_routes(lambda: auth)


@cl.password_auth_callback
async def password_auth(username: str, password: str):
    try:
        user = await asyncio.to_thread(auth.login, username, password, current_client_ip())
    except LoginThrottled:
        return None
    if user is None:
        return None
    return cl.User(identifier=user.email, display_name=user.name, metadata={"id": user.id, "role": user.role})


@cl.on_message
async def on_message(message: cl.Message):
    await cl.Message(content="ok").send()
'''

CONFIG = '''
[meta]
generated_by = "2.12.0"

[project]

[features]

[UI]
name = "Argus test"
custom_js = "/public/signup-link.js"
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("chainlit_app")
    (root / "app.py").write_text(APP, encoding="utf-8")
    (root / ".chainlit").mkdir()
    (root / ".chainlit" / "config.toml").write_text(CONFIG, encoding="utf-8")
    (root / "public").mkdir()
    shutil.copy(REPO / "public" / "signup-link.js", root / "public" / "signup-link.js")
    port = _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "CI" and not k.startswith(("CHAINLIT_", "ARGUS_", "JWT_", "LITERAL_", "FORWARDED_"))
    }  # Chainlit's CLI reads CI=true as its own --ci flag
    env.update(
        ARGUS_DATA_DIR=str(root / "data"),
        ARGUS_LOGIN_ATTEMPTS="3",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "chainlit", "run", "app.py", "--headless", "--host", "127.0.0.1", "--port", str(port)],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )

    def stop():
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()

    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"chainlit exited with {proc.returncode}:\n{(root / 'server.log').read_text(errors='replace')}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"chainlit did not start:\n{(root / 'server.log').read_text(errors='replace')}")
            time.sleep(0.25)
        yield {"base": base, "root": root}
    finally:
        stop()


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

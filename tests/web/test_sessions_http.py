"""Issue 13, findings 4 and 5, as an attacker does them, against a real ``chainlit run app.py``
on 127.0.0.1 (real bcrypt, real store, no model).

4. Account lockout by anyone: wrong passwords for someone's email, from one address or from
   many, must not stop the right password from another address; they only slow the email
   down (a progressive delay, waited without blocking the server).
5. Sign-out ends the session: a copied session token (cookie or ``Bearer``) is refused
   after ``/logout`` on the REST API, on the socket.io connect and by ``/auth/jwt``; a
   password change ends it too; tokens last 24 h, not 15 days.

Client addresses are simulated with ``X-Forwarded-For``: uvicorn trusts it from 127.0.0.1
(its ``FORWARDED_ALLOW_IPS`` default), exactly as behind a reverse proxy on the same host.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid

import httpx
import jwt as pyjwt
import pytest
import socketio
from tests.support.chainlit_server import running_server

from argus.auth import hash_password
from argus.store import SQLiteStore

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery"
ATTEMPTS = 5  # ARGUS_LOGIN_ATTEMPTS of this server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("sessions_http"), ARGUS_LOGIN_ATTEMPTS=str(ATTEMPTS)) as srv:
        yield srv


def _sign_up(server, email: str) -> None:
    address = f"10.60.{sum(email.encode()) % 250}.{len(email) % 250 + 1}"  # sign-ups are limited per address
    r = httpx.post(server.base + "/signup", json={"email": email, "name": "N", "password": PASSWORD},
                   headers={"X-Forwarded-For": address}, timeout=30)
    assert r.status_code == 201, r.text


def _sign_in(server, email: str, address: str, password: str = PASSWORD) -> httpx.Response:
    return httpx.post(server.base + "/login", data={"username": email, "password": password},
                      headers={"X-Forwarded-For": address}, timeout=60)


def _threads(server, token: str, bearer: bool = False) -> int:
    headers = {"Authorization": f"Bearer {token}"} if bearer else {"Cookie": f"access_token={token}"}
    r = httpx.post(server.base + "/project/threads", json={"pagination": {"first": 20}, "filter": {}},
                   headers=headers, timeout=30)
    return r.status_code


async def _socket(server, token: str) -> socketio.AsyncClient:
    """A socket.io connection as the browser opens it (raises socketio ConnectionError if refused)."""
    sio = socketio.AsyncClient(reconnection=False)
    auth = {"clientType": "webapp", "sessionId": str(uuid.uuid4()), "threadId": "", "userEnv": "{}", "chatProfile": ""}
    await sio.connect(server.base, socketio_path="/ws/socket.io", transports=["websocket"], wait_timeout=10,
                      auth=auth, headers={"Cookie": f"access_token={token}"})
    return sio


def _secret(server) -> str:
    return (server.data_dir / "auth_secret").read_text().strip()


# ---- 5. sign-out ends the session ------------------------------------------------------------
async def test_logout_ends_every_copy_of_the_token(server):
    _sign_up(server, "leaver@example.com")
    token = _sign_in(server, "leaver@example.com", "10.61.0.1").cookies["access_token"]
    laptop = _sign_in(server, "leaver@example.com", "10.61.0.2").cookies["access_token"]  # another device
    assert _threads(server, token) == 200 and _threads(server, token, bearer=True) == 200
    live = await _socket(server, token)
    assert live.connected

    r = httpx.post(server.base + "/logout", headers={"Cookie": f"access_token={token}", "Origin": server.base})
    assert r.status_code == 200 and r.json() == {"success": True}

    # The copied cookie, as a cookie and as a Bearer header, and the other device's token: all refused.
    for t in (token, laptop):
        assert _threads(server, t) == 401
        assert _threads(server, t, bearer=True) == 401
        with pytest.raises(socketio.exceptions.ConnectionError):
            await _socket(server, t)
        r = httpx.post(server.base + "/auth/jwt", headers={"Authorization": f"Bearer {t}"})  # no refresh either
        assert r.status_code == 401 and "access_token" not in r.cookies
    for _ in range(50):  # the socket that was open is closed by the server
        if not live.connected:
            break
        await asyncio.sleep(0.1)
    assert not live.connected
    await live.disconnect()

    # Signing in again gives a working session.
    fresh = _sign_in(server, "leaver@example.com", "10.61.0.1").cookies["access_token"]
    assert _threads(server, fresh) == 200
    sio = await _socket(server, fresh)
    assert sio.connected
    await sio.disconnect()


def test_cross_site_logout_ends_nothing(server):
    _sign_up(server, "stays@example.com")
    token = _sign_in(server, "stays@example.com", "10.62.0.1").cookies["access_token"]
    r = httpx.post(server.base + "/logout", headers={"Cookie": f"access_token={token}", "Origin": "https://evil.example"})
    assert r.status_code == 403
    assert _threads(server, token) == 200


def test_password_change_ends_the_sessions(server):
    """The password is changed by another process (the admin CLI, a second server): the
    running server refuses the old token within its short version cache (5 s)."""
    _sign_up(server, "changer@example.com")
    token = _sign_in(server, "changer@example.com", "10.63.0.1").cookies["access_token"]
    assert _threads(server, token) == 200
    store = SQLiteStore(server.data_dir)
    try:
        user = store.get_user_by_email("changer@example.com")
        store.set_password_hash(user.id, hash_password("a new password", rounds=4))
    finally:
        store.close()
    deadline = time.monotonic() + 10
    while _threads(server, token) == 200:
        assert time.monotonic() < deadline, "the old session still works after the password change"
        time.sleep(0.5)
    assert _threads(server, token) == 401
    assert _sign_in(server, "changer@example.com", "10.63.0.1").status_code == 401  # the old password is gone
    assert _threads(server, _sign_in(server, "changer@example.com", "10.63.0.1", "a new password").cookies["access_token"]) == 200


def test_sessions_last_24_hours_and_unversioned_tokens_are_refused(server):
    _sign_up(server, "timer@example.com")
    r = _sign_in(server, "timer@example.com", "10.64.0.1")
    token = r.cookies["access_token"]
    claims = pyjwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 24 * 3600
    assert "max-age=86400" in r.headers["set-cookie"].lower()
    # A correctly signed token without a session version (as issued before this fix) is refused.
    legacy = {k: v for k, v in claims.items() if k != "metadata"} | {
        "metadata": {k: v for k, v in claims["metadata"].items() if k != "argus_session"}}
    old = pyjwt.encode(legacy, _secret(server), algorithm="HS256")
    assert _threads(server, token) == 200 and _threads(server, old) == 401
    # And one signed in longer ago than the lifetime, even with a later expiry.
    stale = dict(claims, metadata=dict(claims["metadata"], argus_session=dict(
        claims["metadata"]["argus_session"], at=time.time() - 25 * 3600)))
    assert _threads(server, pyjwt.encode(stale, _secret(server), algorithm="HS256")) == 401


# ---- 4. no lockout by anyone -----------------------------------------------------------------
def test_wrong_passwords_from_one_address_do_not_lock_the_account(server):
    _sign_up(server, "target@example.com")
    for _ in range(ATTEMPTS):  # the attacker's address uses up its own quota
        assert _sign_in(server, "target@example.com", "10.65.0.66", "wrong password").status_code == 401
    r = _sign_in(server, "target@example.com", "10.65.0.66")
    assert r.status_code == 429  # that address is refused, even with the right password
    assert r.json()["detail"].startswith("Too many failed sign-in attempts. Try again in")

    start = time.monotonic()
    r = _sign_in(server, "target@example.com", "10.65.0.7")  # the owner, elsewhere
    took = time.monotonic() - start
    assert r.status_code == 200 and "access_token" in r.cookies, r.text
    assert 0.9 <= took < 10, took  # slowed down (5 failures: 1 s), not refused
    assert _sign_in(server, "target@example.com", "10.65.0.7").status_code == 200


def test_wrong_passwords_from_many_addresses_only_slow_the_account_down(server):
    """What a botnet (or every client behind a proxy without FORWARDED_ALLOW_IPS) does."""
    _sign_up(server, "popular@example.com")
    for i in range(8):  # delays 0, 0, 0, 0.25, 0.5, 1, 2, 4 s: the next one is at the ceiling
        assert _sign_in(server, "popular@example.com", f"10.66.1.{i}", "wrong password").status_code == 401

    result: dict = {}

    def owner():
        start = time.monotonic()
        result["status"] = _sign_in(server, "popular@example.com", "10.66.2.1").status_code
        result["took"] = time.monotonic() - start

    thread = threading.Thread(target=owner)
    thread.start()
    time.sleep(0.5)  # the owner's sign-in is waiting its delay now: the server keeps serving
    start = time.monotonic()
    assert httpx.get(server.base + "/health", timeout=5).status_code == 200
    assert time.monotonic() - start < 1.0
    thread.join(30)
    assert result["status"] == 200
    assert 3.5 <= result["took"] < 15, result  # the delay's ceiling (4 s), never a refusal

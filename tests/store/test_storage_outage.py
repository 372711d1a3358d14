"""MongoDB unreachable: the real ``chainlit run app.py`` starts, says so once, and degrades.

The server's ``MONGO_URI`` points at a closed port on 127.0.0.1 (a port that was free a
moment ago; nothing listens there), so every store call fails with StoreUnavailable after
``serverSelectionTimeoutMS`` (1 s here, to keep the test short). Checked, over real HTTP
and socket.io:

* the server serves (``/`` answers 200) and its log has one WARNING line naming the server;
* ``POST /login`` answers 503 with "Storage is unavailable right now; please try again in
  a moment." (not 401: a wrong password and an outage must not look alike), and failed
  attempts during the outage do not count towards the sign-in throttle;
* ``POST /signup`` answers 503 with the same sentence;
* a signed-in user (a session token from before the outage) who sends a chat message gets
  the "nothing was saved" sentence, and the server keeps running.

Recovery when the server comes back is covered in tests/store/test_store_mongo.py (mongomock with
a driver that fails, then works; and a real server behind a TCP relay when
ARGUS_TEST_MONGO_URI is set).
"""
from __future__ import annotations

import re
import secrets
import time

import httpx
import jwt
import pytest
from tests.support.chainlit_server import running_server
from tests.support.ports import free_port
from tests.support.live_server import Chat, said

from argus.chat.sentences import STORE_DOWN
from argus.signup import STORAGE_UNAVAILABLE

pytestmark = pytest.mark.e2e

SECRET = secrets.token_urlsafe(36)  # 48 characters
PASSWORD = "password-123"
SELECTION_TIMEOUT_MS = 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()  # freed again at once: a closed port
    tmp = tmp_path_factory.mktemp("storage_outage")
    with running_server(
        tmp,
        MONGO_URI=f"mongodb://argus:hunter2@127.0.0.1:{port}/argus?serverSelectionTimeoutMS={SELECTION_TIMEOUT_MS}",
        MONGO_DB="",
        JWT_SECRET_KEY=SECRET,
        ARGUS_LOGIN_ATTEMPTS="2",
    ) as srv:
        srv.mongo_port = port
        yield srv


def test_server_starts_and_logs_one_clear_warning(server):
    r = httpx.get(server.base + "/", timeout=10)
    assert r.status_code == 200
    assert httpx.get(server.base + "/login", timeout=10).status_code == 200
    log = server.log_path.read_text(errors="replace")
    expected = (
        f"MongoDB at 127.0.0.1:{server.mongo_port} is unreachable; "
        "the chat will answer 'storage unavailable' until it comes back"
    )
    lines = [line for line in log.splitlines() if expected in line]
    assert len(lines) == 1, log[-4000:]
    assert "WARNING" in lines[0]
    assert "cannot start" not in log
    assert "hunter2" not in log


def test_sign_in_answers_503_not_401(server):
    with httpx.Client(base_url=server.base, headers={"X-Forwarded-For": "10.66.0.1"}, timeout=30) as http:
        for _ in range(4):  # more than ARGUS_LOGIN_ATTEMPTS: an outage never locks anyone out
            start = time.monotonic()
            r = http.post("/login", data={"username": "someone@example.com", "password": PASSWORD})
            assert (r.status_code, r.json()) == (503, {"detail": STORAGE_UNAVAILABLE})
            assert "access_token" not in r.cookies
            assert time.monotonic() - start < 10 * SELECTION_TIMEOUT_MS / 1000
    assert STORAGE_UNAVAILABLE == "Storage is unavailable right now; please try again in a moment."


def test_login_page_script_shows_the_503_sentence(server):
    js = httpx.get(server.base + "/public/signup-link.js", timeout=10).text
    assert re.search(r"response\.status === 503", js)


def test_sign_up_answers_503(server):
    body = {"email": "new@example.com", "name": "New", "password": PASSWORD, "confirm": PASSWORD}
    r = httpx.post(server.base + "/signup", json=body, headers={"X-Forwarded-For": "10.66.0.2"}, timeout=30)
    assert (r.status_code, r.json()) == (503, {"ok": False, "error": STORAGE_UNAVAILABLE})


def _session_token(email: str, user_id: str) -> str:
    """A session token as Chainlit issues it at sign-in (signed with JWT_SECRET_KEY): the
    user signed in before the database went away."""
    now = int(time.time())
    claims = {
        "identifier": email,
        "display_name": "Alice",
        "metadata": {"user_id": user_id, "role": "user", "provider": "credentials",
                     "argus_session": {"uid": user_id, "v": 0, "at": now}},  # argus.sessions claims
        "iat": now,
        "exp": now + 3600,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


async def test_signed_in_user_is_told_the_message_was_not_saved(server):
    token = _session_token("alice@example.com", "a" * 32)
    async with Chat(server, token) as chat:
        events, _ = await chat.turn("Hello, is anyone there?")
    texts = [m["output"] for m in said(events)]
    assert texts == [STORE_DOWN], events
    assert "nothing was saved" in STORE_DOWN
    assert server.proc.poll() is None
    assert httpx.get(server.base + "/", timeout=10).status_code == 200
    log = server.log_path.read_text(errors="replace")
    assert "not saved: storage unavailable: cannot reach MongoDB" in log

"""The upload route's quota check (``argus.quotas.UploadQuotaMiddleware``) in process: a real
Chainlit session token, a session registered like Chainlit's, and an app standing in for
Chainlit's ``POST /project/file`` that records whether it was reached and how much it read.
(The same against a running server: tests/e2e/test_upload_quota_e2e.py.)"""
from __future__ import annotations

import json
import types

import chainlit as cl
import httpx
import pytest
from chainlit.auth.jwt import create_jwt
from chainlit.session import ws_sessions_id

from argus.quotas import QuotaLimits, UploadQuota, UploadQuotaMiddleware, session_files_sentence

MB = 1024 * 1024


class FakeUploadRoute:
    """Reads the whole body like Chainlit, stores it in the session, answers ``{"id": …}``."""

    def __init__(self):
        self.calls = 0
        self.read = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.read += len(body)
        session = ws_sessions_id.get(scope["query_string"].decode().split("=", 1)[1])
        if session is None:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        file_id = f"f{self.calls}"
        session.files[file_id] = {"id": file_id, "size": len(body) - 200}
        payload = json.dumps({"id": file_id}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})


@pytest.fixture
def route(monkeypatch):
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", "s" * 48)
    session = types.SimpleNamespace(id="sess-1", user=types.SimpleNamespace(identifier="ann@example.com"), files={})
    monkeypatch.setitem(ws_sessions_id, "sess-1", session)
    inner = FakeUploadRoute()
    quota = UploadQuota(QuotaLimits(session_files=2))
    app = UploadQuotaMiddleware(inner, quota, "/project/file", 10 * MB)
    return app, inner, quota, session


def _token(identifier: str, user_id: str) -> str:
    return create_jwt(cl.User(identifier=identifier, metadata={"user_id": user_id}))


async def _post(app, token, data: bytes = b"x" * 1000, session_id: str = "sess-1") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        headers = {"Cookie": f"access_token={token}"} if token else {}
        return await http.post("/project/file", params={"session_id": session_id}, headers=headers,
                               files={"file": ("a.png", data, "image/png")})


async def test_uploads_past_the_session_cap_are_refused_before_the_body_is_read(route):
    app, inner, quota, session = route
    token = _token("ann@example.com", "u-ann")
    for _ in range(2):
        assert (await _post(app, token)).status_code == 200
    read = inner.read
    r = await _post(app, token, b"y" * MB)
    assert r.status_code == 429
    assert r.json() == {"detail": session_files_sentence(2)}
    assert r.headers["connection"] == "close"
    assert (inner.calls, inner.read) == (2, read)  # Chainlit never saw the third upload
    assert sorted(session.files) == ["f1", "f2"]
    assert quota.usage("sess-1")[0] == 2 and quota.admitted("sess-1", "f1")


async def test_requests_chainlit_refuses_cost_nobody_quota(route):
    app, inner, quota, _ = route
    for token in ("", _token("eve@example.com", "u-eve"), "forged.token.value"):
        await _post(app, token)  # no token, another user's session, a forged token: passed to Chainlit
    await _post(app, _token("ann@example.com", "u-ann"), session_id="no-such-session")
    assert inner.calls == 4
    assert quota.usage("sess-1") == (0, 0)


async def test_a_failed_upload_is_released(route, monkeypatch):
    app, inner, quota, _ = route

    async def refusing(scope, receive, send):
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app.app = refusing
    assert (await _post(app, _token("ann@example.com", "u-ann"))).status_code == 400
    assert quota.usage("sess-1") == (0, 0)

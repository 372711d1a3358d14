"""Issue 13, findings 1-3, as an attacker does them: real HTTP requests (raw sockets where a
client library would refuse to send them) to a real ``chainlit run app.py`` on 127.0.0.1, on
an empty database. Each attack is refused, the server neither crashes nor grows, and the
legitimate use next to it keeps working.

1. Memory exhaustion before authentication: 64 MiB bodies (declared and chunked) to
   ``/set-session-cookie`` and ``/project/threads``.
2. DNS rebinding: ``Host: evil.example:PORT`` with the matching ``Origin`` (what a page on a
   name resolving to 127.0.0.1 sends) signing up the first account (= admin), and opening
   socket.io.
3. Login CSRF: a cross-site form post to ``/login`` and ``/logout``.
"""
from __future__ import annotations

import re
import socket
import threading
import time
import uuid

import httpx
import psutil
import pytest
import socketio
from tests.support.chainlit_server import running_server

pytestmark = pytest.mark.e2e

MB = 1024 * 1024
PASSWORD = "correct horse battery"
ATTACK_BYTES = 64 * MB


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("hardening_http"), ARGUS_LOGIN_ATTEMPTS="50") as srv:
        yield srv


def _raw(port: int, head: str, chunks=(), timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` then ``chunks`` (from a thread, stopping when the server closes) and read the
    answer meanwhile; returns (status, lower-case headers, body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send_all():
        try:
            sock.sendall(head.encode("latin-1"))
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:  # the server answered and closed: what we expect
            pass

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
        header, _, body = data.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            more = sock.recv(65536)
            if not more:
                break
            body += more
    finally:
        sock.close()
        sender.join(timeout)
    return int(lines[0].split(" ", 2)[1]), headers, body


def _declared(port: int, path: str, length: int, **headers: str) -> str:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n")


def _chunked_json(total: int, block: int = 256 * 1024):
    yield b"1\r\n{\r\n"
    filler = b'"' + b"a" * (block - 2) + b'"'
    for _ in range(total // block):
        yield b"%x\r\n%s\r\n" % (len(filler), filler)
    yield b"0\r\n\r\n"


def _sign_up(server, email: str, origin: str | None = None, host: str | None = None) -> httpx.Response:
    headers = {}
    if origin:
        headers["Origin"] = origin
    if host:
        headers["Host"] = host
    return httpx.post(server.base + "/signup", json={"email": email, "name": "N", "password": PASSWORD},
                      headers=headers, timeout=30)


def _sign_in(server, email: str, **headers: str) -> httpx.Response:
    return httpx.post(server.base + "/login", data={"username": email, "password": PASSWORD}, headers=headers, timeout=30)


# ---- 2. DNS rebinding (first: the database is still empty, the first account would be admin) --------
def test_rebinding_page_cannot_sign_up_the_first_account(server):
    rebound = f"evil.example:{server.port}"
    r = _sign_up(server, "attacker@example.com", origin=f"http://{rebound}", host=rebound)
    assert r.status_code in (400, 403), (r.status_code, r.text)
    r = _sign_up(server, "attacker@example.com", origin=f"http://{rebound}")  # right Host, foreign Origin
    assert r.status_code == 403 and r.json()["ok"] is False
    assert _sign_in(server, "attacker@example.com").status_code == 401  # no such account was made

    # The real owner, on the server's own page, still signs up (and is the first user).
    local = f"http://localhost:{server.port}"
    r = _sign_up(server, "owner@example.com", origin=local, host=f"localhost:{server.port}")
    assert (r.status_code, r.json()) == (201, {"ok": True})
    r = _sign_in(server, "owner@example.com", Origin=local, Host=f"localhost:{server.port}")
    assert r.status_code == 200 and "access_token" in r.cookies


def test_rebinding_page_cannot_open_socketio(server):
    url = server.base + "/ws/socket.io/?EIO=4&transport=polling"
    rebound = f"evil.example:{server.port}"
    r = httpx.get(url, headers={"Host": rebound, "Origin": f"http://{rebound}"})
    assert r.status_code == 400 and not r.text.startswith("0{")
    r = httpx.get(url, headers={"Origin": f"http://{rebound}"})  # even past the Host check: Origin is not ours
    assert r.status_code == 400 and "not an accepted origin" in r.text
    for headers in ({"Origin": server.base}, {"Origin": f"http://localhost:{server.port}"}, {}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 200 and r.text.startswith("0{"), headers


async def test_rebinding_page_cannot_open_the_chat_websocket(server):
    token = _sign_in(server, "owner@example.com").cookies["access_token"]
    auth = {"clientType": "webapp", "sessionId": str(uuid.uuid4()), "threadId": "", "userEnv": "{}", "chatProfile": ""}
    rebound = f"evil.example:{server.port}"
    sio = socketio.AsyncClient(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sio.connect(server.base, socketio_path="/ws/socket.io", transports=["websocket"], wait_timeout=10, auth=auth,
                          headers={"Cookie": f"access_token={token}", "Host": rebound, "Origin": f"http://{rebound}"})
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(server.base, socketio_path="/ws/socket.io", transports=["websocket"], wait_timeout=10, auth=auth,
                      headers={"Cookie": f"access_token={token}", "Origin": server.base})
    assert sio.connected
    await sio.disconnect()


# ---- 3. login CSRF -------------------------------------------------------------------------
def test_cross_site_login_form_is_refused(server):
    assert _sign_up(server, "victim@example.com").status_code == 201
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        r = _sign_in(server, "victim@example.com", **headers)  # an auto-submitting form on another site
        assert r.status_code == 403 and "access_token" not in r.cookies, (headers, r.status_code, r.text)
        assert "set-cookie" not in r.headers
    r = _sign_in(server, "victim@example.com", Origin=server.base, **{"Sec-Fetch-Site": "same-origin"})  # the real page
    assert r.status_code == 200 and "access_token" in r.cookies


def test_cross_site_logout_is_refused(server):
    token = _sign_in(server, "victim@example.com").cookies["access_token"]
    cookies = {"access_token": token}
    r = httpx.post(server.base + "/logout", cookies=cookies, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = httpx.post(server.base + "/logout", cookies=cookies, headers={"Origin": server.base})
    assert r.status_code == 200 and r.json() == {"success": True}


# ---- 1. body limits on every path ----------------------------------------------------------------
def _rss(server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


@pytest.mark.parametrize("path", ["/set-session-cookie", "/project/threads"])
def test_declared_64_mib_body_is_refused_before_it_is_read(server, path):
    _raw(server.port, _declared(server.port, path, 100), [b"{" + b" " * 98 + b"}"])  # warm the path up
    before = _rss(server)
    start = time.monotonic()
    status, headers, body = _raw(server.port, _declared(server.port, path, ATTACK_BYTES))  # no body sent yet
    assert time.monotonic() - start < 5
    assert (status, body) == (413, b'{"detail": "The request body is larger than the 1024 KB limit."}')
    assert headers["connection"] == "close"
    # The same, sending the 64 MiB as an attacker would.
    status, _, _ = _raw(server.port, _declared(server.port, path, ATTACK_BYTES), iter([b"x" * MB] * 64))
    assert status == 413
    assert _rss(server) - before < 4 * MB, "the server buffered the refused body"
    assert httpx.get(server.base + "/health").status_code == 200


@pytest.mark.parametrize("path", ["/set-session-cookie", "/project/threads"])
def test_chunked_64_mib_body_is_cut_off_as_it_arrives(server, path):
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    _raw(server.port, head, _chunked_json(512 * 1024))  # warm up, under the limit
    before = _rss(server)
    status, _, body = _raw(server.port, head, _chunked_json(ATTACK_BYTES))
    assert (status, body) == (413, b'{"detail": "The request body is larger than the 1024 KB limit."}')
    assert _rss(server) - before < 4 * MB, "the server buffered the refused body"
    assert httpx.get(server.base + "/health").status_code == 200


def test_legitimate_requests_still_work_after_the_attacks(server):
    token = _sign_in(server, "owner@example.com").cookies["access_token"]
    r = httpx.post(server.base + "/project/threads", cookies={"access_token": token},
                   json={"pagination": {"first": 20, "cursor": None}, "filter": {}}, timeout=30)
    assert r.status_code == 200 and r.json()["data"] == []
    # A 2 MiB image is over the default limit but under the upload route's 10 MB: it reaches Chainlit
    # (which answers 401/404 for a missing session, not 413).
    r = httpx.post(server.base + "/project/file", params={"session_id": "none"}, cookies={"access_token": token},
                   files={"file": ("a.png", b"\0" * (2 * MB), "image/png")}, timeout=30)
    assert r.status_code != 413, r.text
    r = httpx.post(server.base + "/project/file", params={"session_id": "none"},
                   files={"file": ("a.png", b"\0" * (11 * MB), "image/png")}, timeout=30)
    assert r.status_code == 413
    assert server.proc.poll() is None
    assert not re.search(r"Traceback|Exception in ASGI", server.log()), server.log()


# ---- the settings: ARGUS_ALLOWED_HOSTS and ARGUS_MAX_BODY_KB ------------------------------------------
def test_extra_host_and_smaller_body_limit_settings(tmp_path):
    with running_server(tmp_path, ARGUS_ALLOWED_HOSTS="chat.lan", ARGUS_MAX_BODY_KB="64") as srv:
        lan = f"chat.lan:{srv.port}"
        r = _sign_up(srv, "lan@example.com", origin=f"http://{lan}", host=lan)  # a LAN name the admin listed
        assert (r.status_code, r.json()) == (201, {"ok": True})
        r = _sign_up(srv, "other@example.com", origin=f"http://other.lan:{srv.port}", host=f"other.lan:{srv.port}")
        assert r.status_code == 400
        status, _, body = _raw(srv.port, _declared(srv.port, "/project/threads", 65 * 1024))
        assert (status, body) == (413, b'{"detail": "The request body is larger than the 64 KB limit."}')
        query = b'{"pagination": {"first": 20, "cursor": null}, "filter": {}}'
        padded = query + b" " * (60 * 1024 - len(query))
        status, _, _ = _raw(srv.port, _declared(srv.port, "/project/threads", len(padded)), [padded])
        assert status == 401  # under the limit: reaches Chainlit, which wants a signed-in user


@pytest.mark.parametrize("env, line", [
    ({"ARGUS_ALLOWED_HOSTS": "*"}, "Jarvis Argus cannot start: ARGUS_ALLOWED_HOSTS must list host names"),
    ({"ARGUS_MAX_BODY_KB": "1MB"}, "Jarvis Argus cannot start: ARGUS_MAX_BODY_KB must be a whole number of KiB"),
])
def test_bad_security_setting_stops_the_server_with_one_line(tmp_path, env, line):
    from tests.support.chainlit_server import launch, stop
    from tests.support.ports import free_port

    proc, log_path = launch(tmp_path, free_port(), **env)
    try:
        proc.wait(90)
    finally:
        stop(proc)
    out = log_path.read_text(errors="replace")
    assert proc.returncode != 0 and line in out and "Traceback" not in out, out

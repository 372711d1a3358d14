"""Security of the real ``chainlit run app.py`` (127.0.0.1 only): allowed origins,
request body limits, file permissions, and start-up errors.

The server's ``config.toml`` is the repository's, edited to the most
permissive values (``allow_origins = ["*"]``, ``max_size_mb = 500``) to show
that app.py, not the file, decides.
"""
from __future__ import annotations

import io
import itertools
import re
import socket
import stat
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import socketio
from tests.support.chainlit_server import launch, running_server, stop
from tests.support.ports import free_port
from PIL import Image

from argus.config import ConfigError
from argus.limits import BodyLimitMiddleware
from argus.origins import SocketOriginCheck, allowed_origins

pytestmark = pytest.mark.e2e

MB = 1024 * 1024
EVIL = "http://evil.example"
PASSWORD = "correct horse battery"
_users = itertools.count(1)


def _permissive(config: str) -> str:
    config, n1 = re.subn(r"(?m)^allow_origins = .*$", 'allow_origins = ["*"]', config)
    config, n2 = re.subn(r"(?m)^(\s*)max_size_mb = .*$", r"\1max_size_mb = 500", config)
    assert (n1, n2) == (1, 1), "config.toml layout changed"
    return config


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("app_security"), edit_config=_permissive) as srv:
        yield srv


@pytest.fixture(scope="module")
def account(server):
    """A signed-up user and their session cookie (e2e style: no Origin header)."""
    email = f"sec{next(_users)}@example.com"
    with httpx.Client(base_url=server.base, timeout=30) as http:
        r = http.post("/signup", json={"email": email, "name": "Sec", "password": PASSWORD})
        assert r.status_code == 201, r.text
        r = http.post("/login", data={"username": email, "password": PASSWORD})
        assert (r.status_code, r.json()) == (200, {"success": True})
        return {"email": email, "token": r.cookies["access_token"]}


def _cors(r: httpx.Response) -> dict:
    return {k: v for k, v in r.headers.items() if k.startswith("access-control-allow-origin")}


# ---- 1. origins ------------------------------------------------------------------
def test_foreign_origin_gets_no_credentialed_cors(server):
    r = httpx.get(server.base + "/auth/config", headers={"Origin": EVIL})
    assert r.status_code == 200 and _cors(r) == {}
    r = httpx.options(server.base + "/login", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 400 and _cors(r) == {}


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_own_origins_are_allowed(server, host):
    origin = f"http://{host}:{server.port}"
    r = httpx.get(server.base + "/auth/config", headers={"Origin": origin})
    assert r.headers["access-control-allow-origin"] == origin
    r = httpx.options(server.base + "/login", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin


def test_socketio_refuses_foreign_origins(server):
    url = server.base + "/ws/socket.io/?EIO=4&transport=polling"
    r = httpx.get(url, headers={"Origin": EVIL})
    assert r.status_code == 400 and "not an accepted origin" in r.text
    for headers in ({"Origin": server.base}, {}):  # the page's own origin; a non-browser client
        r = httpx.get(url, headers=headers)
        assert r.status_code == 200 and r.text.startswith("0{")


async def _connect(server, token: str, session_id: str, **headers: str) -> socketio.AsyncClient:
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(
        server.base,
        socketio_path="/ws/socket.io",
        headers={"Cookie": f"access_token={token}", **headers},
        auth={"clientType": "webapp", "sessionId": session_id, "threadId": "", "userEnv": "{}", "chatProfile": ""},
        transports=["websocket"],
        wait_timeout=10,
    )
    return sio


async def test_login_and_chat_socket_still_work(server, account):
    with httpx.Client(base_url=server.base, timeout=30) as http:  # a browser's same-origin login
        r = http.post("/login", data={"username": account["email"], "password": PASSWORD}, headers={"Origin": server.base})
        assert r.status_code == 200 and "access_token" in r.cookies
        assert r.headers["access-control-allow-origin"] == server.base
    for headers in ({}, {"Origin": server.base}):
        sio = await _connect(server, account["token"], str(uuid.uuid4()), **headers)
        assert sio.connected
        await sio.disconnect()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await _connect(server, account["token"], str(uuid.uuid4()), Origin=EVIL)


@pytest.mark.parametrize(
    "public_url, host, expected",
    [
        ("", "127.0.0.1", ["http://127.0.0.1:8000", "http://localhost:8000"]),
        ("", "0.0.0.0", ["http://127.0.0.1:8000", "http://localhost:8000"]),
        ("", "chat.lan", ["http://127.0.0.1:8000", "http://localhost:8000", "http://chat.lan:8000"]),
        ("", "::1", ["http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"]),
        ("https://Chat.Example.com/argus/", "0.0.0.0", ["https://chat.example.com"]),
        ("https://chat.example.com:443", "0.0.0.0", ["https://chat.example.com"]),
        ("http://10.0.0.5:8080", "0.0.0.0", ["http://10.0.0.5:8080"]),
    ],
)
def test_allowed_origins(public_url, host, expected):
    assert allowed_origins(public_url, host, 8000) == expected


def test_bad_chainlit_url_is_a_config_error():
    with pytest.raises(ConfigError, match="^CHAINLIT_URL must look like https://chat.example.com"):
        allowed_origins("chat.example.com", "127.0.0.1", 8000)


def test_socket_origin_check():
    check = SocketOriginCheck(["http://127.0.0.1:8000"])
    assert check("http://127.0.0.1:8000", {"HTTP_HOST": "127.0.0.1:8000"})
    # Origin naming the Host header is not enough (DNS rebinding controls both): ARGUS_ALLOWED_HOSTS is.
    assert not check("http://192.168.1.9:8000", {"HTTP_HOST": "192.168.1.9:8000"})
    assert not check(EVIL, {"HTTP_HOST": "127.0.0.1:8000"})
    assert not check("null", {"HTTP_HOST": "null"})
    assert not check(EVIL, {})


# ---- 2. body limits -------------------------------------------------------------
async def _swallowing_app(scope, receive, send):
    """Reads the body and, like FastAPI's form parsing, turns any error into a 400."""
    status, size = 200, 0
    try:
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
    except Exception:
        status = 400
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


async def test_body_limit_middleware_counts_streamed_bytes():
    app = BodyLimitMiddleware(_swallowing_app, {"/up": (1000, {"detail": "too big"})})

    async def body(n_chunks):
        for _ in range(n_chunks):
            yield b"x" * 300

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        r = await client.post("/up", content=body(4))  # no Content-Length: 1200 bytes streamed
        assert (r.status_code, r.json(), r.headers["connection"]) == (413, {"detail": "too big"}, "close")
        r = await client.post("/up", content=body(3))
        assert (r.status_code, r.text) == (200, "900")
        r = await client.post("/up/", content=b"x" * 1001)  # trailing slash: same path
        assert r.status_code == 413
        r = await client.post("/other", content=body(10))
        assert (r.status_code, r.text) == (200, "3000")


# ---- 2. body limits on the server ---------------------------------------------------
def _raw_request(port: int, head: str, chunks=(), timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``head`` and then ``chunks`` (stopping when the server closes); return (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode("latin-1"))
        try:
            for chunk in chunks:
                s.sendall(chunk)
        except OSError:  # the server answered and closed: fine
            pass
        data = b""
        while b"\r\n\r\n" not in data:
            more = s.recv(65536)
            if not more:
                break
            data += more
        header, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?im)^content-length: *(\d+)", header).group(1))
        while len(body) < length:
            more = s.recv(65536)
            if not more:
                break
            body += more
    return int(header.split(b" ", 2)[1]), body


def _upload_head(port: int, length_header: str) -> str:
    return (
        f"POST /project/file?session_id=x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary=XX\r\n{length_header}\r\n\r\n"
    )


def test_oversized_upload_refused_from_content_length_before_the_body(server):
    start = time.monotonic()
    status, body = _raw_request(server.port, _upload_head(server.port, f"Content-Length: {12 * MB}"))  # no body sent
    assert time.monotonic() - start < 5
    assert (status, body) == (413, b'{"detail": "The file is larger than the 10 MB limit."}')


def test_chunked_oversized_upload_refused_without_buffering_it(server):
    part = b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    block = b"\x01" * 65536

    def chunks():
        yield b"%x\r\n%s\r\n" % (len(part), part)
        for _ in range(12 * MB // len(block)):
            yield b"%x\r\n%s\r\n" % (len(block), block)

    proc = psutil.Process(server.proc.pid)
    rss = proc.memory_info().rss
    status, body = _raw_request(server.port, _upload_head(server.port, "Transfer-Encoding: chunked"), chunks())
    assert status == 413 and body == b'{"detail": "The file is larger than the 10 MB limit."}'
    assert proc.memory_info().rss - rss < 8 * MB


def test_12_mb_upload_with_httpx(server):
    files = {"file": ("big.png", b"\0" * (12 * MB), "image/png")}
    r = httpx.post(server.base + "/project/file", params={"session_id": "x"}, files=files, timeout=30)
    assert r.status_code == 413 and r.json() == {"detail": "The file is larger than the 10 MB limit."}
    r = httpx.post(server.base + "/project/file", params={"session_id": "x"}, files={"file": ("a.png", b"abc", "image/png")})
    assert r.status_code == 401  # a small body reaches Chainlit (which wants a signed-in user)


def test_oversized_login_and_signup_bodies(server):
    r = httpx.post(server.base + "/login", data={"username": "a@example.com", "password": "x" * (20 * 1024)})
    assert r.status_code == 413 and r.json() == {"detail": "The form is larger than the 16 KB limit."}
    r = httpx.post(server.base + "/signup", json={"email": "a@example.com", "name": "A", "password": "x" * (20 * 1024)})
    assert r.status_code == 413 and r.json() == {"ok": False, "error": "The form is larger than the 16 KB limit."}
    status, _ = _raw_request(
        server.port,
        f"POST /login HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {1024 * MB}\r\n\r\n",
    )
    assert status == 413


def test_chainlit_upload_limit_comes_from_argus_max_upload_mb(server, account):
    r = httpx.get(server.base + "/project/settings", cookies={"access_token": account["token"]})
    assert r.status_code == 200
    assert r.json()["features"]["spontaneous_file_upload"]["max_size_mb"] == 10  # not config.toml's 500


# ---- 5. file permissions ----------------------------------------------------------
def _umask(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    pytest.skip("this kernel does not report the umask")


async def test_uploads_and_data_files_are_owner_only(server, account):
    assert _umask(server.proc.pid) == 0o077
    session_id = str(uuid.uuid4())
    sio = await _connect(server, account["token"], session_id)
    try:
        png = io.BytesIO()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(png, format="PNG")
        async with httpx.AsyncClient(base_url=server.base, cookies={"access_token": account["token"]}) as http:
            r = await http.post(
                "/project/file", params={"session_id": session_id}, files={"file": ("dot.png", png.getvalue(), "image/png")}
            )
        assert r.status_code == 200, r.text
        stored = [p for p in (server.app_root / ".files").rglob("*") if p.is_file()]
        assert stored, "the upload was not written under .files/"
    finally:
        await sio.disconnect()
    paths = stored + [p.parent for p in stored] + [server.app_root / ".files"]
    paths += [p for p in server.data_dir.rglob("*") if p.name != "server.log"]
    loose = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths if p.exists() and p.stat().st_mode & 0o077}
    assert loose == {}


def test_store_makes_an_existing_database_private(tmp_path):
    from argus.store import SQLiteStore

    SQLiteStore(tmp_path).close()
    files = [tmp_path / "argus.db", tmp_path / "argus.db-wal", tmp_path / "argus.db-shm"]
    for path in files:
        path.touch()
        path.chmod(0o644)  # e.g. copied from a backup with a lax umask
    store = SQLiteStore(tmp_path)
    try:
        assert store.count_users() == 0
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files if p.exists()} == {
            p.name: "0o600" for p in files if p.exists()
        }
        assert (tmp_path / "argus.db").exists()
    finally:
        store.close()


# ---- 6/8. start-up errors ---------------------------------------------------------
def _failed_start(tmp: Path, **env: str) -> str:
    proc, log_path = launch(tmp, free_port(), **env)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(f"the server started instead of refusing:\n{log_path.read_text(errors='replace')}")
    out = log_path.read_text(errors="replace")
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    return out


def test_bad_setting_stops_the_server_with_one_clear_line(tmp_path):
    out = _failed_start(tmp_path, ARGUS_TOP_P="5")
    assert "Jarvis Argus cannot start: ARGUS_TOP_P must be at most 1, got 5" in out


def test_weak_jwt_secret_stops_the_server_without_printing_it(tmp_path):
    out = _failed_start(tmp_path, JWT_SECRET_KEY="short-but-secret-value")
    assert "JWT_SECRET_KEY must be at least 32 characters" in out
    assert "short-but-secret-value" not in out

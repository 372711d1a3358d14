"""A real ``chainlit run app.py`` for the history and ownership tests, and clients for it.

* :func:`serve` starts the server on a free loopback port with a given data
  directory and environment (built once by :func:`history_env`: every
  ``ARGUS_*`` variable explicit, a 48-character ``JWT_SECRET_KEY``, ``CI``
  removed, a private Chainlit app root), so a test can stop it and start it
  again on the same data.
* :class:`Api` is Chainlit's REST API as the browser uses it (the
  ``access_token`` cookie): the thread list, one thread, rename, delete,
  feedback, and our ``/argus/files/<id>``.
* :class:`Chat` speaks Chainlit's socket.io protocol like the browser,
  including resuming a thread (``threadId`` in the connection's auth, then
  ``connection_successful``: the server answers ``first_interaction`` and
  ``resume_thread``, or ``resume_thread_error``).
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import secrets
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import socketio
from PIL import Image

from tests.support.chainlit_server import make_app_root
from tests.support.ports import free_port
from tests.support.paths import REPO
from tests.support.server_env import server_env, wait_until_up as _wait_until_up

PASSWORD = "correct horse battery"
REPLY_TIMEOUT = 300.0  # includes the model's load; the 2 cores are shared


def history_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The server environment (fixed for the life of a test, restarts included)."""
    app_root = make_app_root(tmp / "app_root")
    return server_env(
        tmp / "data",
        JWT_SECRET_KEY=secrets.token_urlsafe(36),  # 48 characters
        CHAINLIT_APP_ROOT=str(app_root),  # Chainlit removes <app root>/.files when it stops
        ARGUS_MESSAGES_PER_MINUTE="30",
        ARGUS_LOGIN_ATTEMPTS="20",
        **extra,
    )


@dataclass
class Server:
    base: str
    data_dir: Path
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


@contextlib.contextmanager
def serve(tmp: Path, env: dict[str, str], name: str = "server") -> Iterator[Server]:
    """Run the server until the block ends (its log: ``tmp/<name>.log``)."""
    port = free_port()
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chainlit", "run", "app.py", "--headless", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(base, proc, log_path)
        yield Server(base, Path(env["ARGUS_DATA_DIR"]), proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client_ip(email: str) -> str:
    """A stable client address per user (uvicorn trusts X-Forwarded-For from 127.0.0.1),
    so per-address sign-up and sign-in limits never mix users."""
    return f"10.77.{sum(email.encode()) % 250}.{len(email) % 250 + 1}"


def sign_up(srv: Server, email: str, name: str) -> None:
    r = httpx.post(
        srv.base + "/signup", json={"email": email, "name": name, "password": PASSWORD},
        headers={"X-Forwarded-For": client_ip(email)}, timeout=30,
    )
    assert r.status_code == 201, (r.status_code, r.text)


def sign_in(srv: Server, email: str) -> str:
    """The session token (``access_token`` cookie) of ``email``."""
    r = httpx.post(
        srv.base + "/login", data={"username": email, "password": PASSWORD},
        headers={"X-Forwarded-For": client_ip(email)}, timeout=30,
    )
    assert r.status_code == 200, (r.status_code, r.text)
    return r.cookies["access_token"]


def png(color=(200, 10, 10), size=(24, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


class Api:
    """Chainlit's REST API with one user's cookie (or none)."""

    def __init__(self, srv: Server, token: Optional[str]):
        headers = {"Cookie": f"access_token={token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=srv.base, headers=headers, timeout=60)

    async def __aenter__(self) -> "Api":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def threads(self, *, first: int = 20, cursor: Optional[str] = None, **filters: Any) -> httpx.Response:
        return await self.http.post("/project/threads", json={"pagination": {"first": first, "cursor": cursor}, "filter": filters})

    async def thread(self, thread_id: str) -> httpx.Response:
        return await self.http.get(f"/project/thread/{thread_id}")

    async def element(self, thread_id: str, element_id: str) -> httpx.Response:
        return await self.http.get(f"/project/thread/{thread_id}/element/{element_id}")

    async def rename(self, thread_id: str, name: str) -> httpx.Response:
        return await self.http.put("/project/thread", json={"threadId": thread_id, "name": name})

    async def share(self, thread_id: str) -> httpx.Response:
        return await self.http.put("/project/thread/share", json={"threadId": thread_id, "isShared": True})

    async def shared(self, thread_id: str) -> httpx.Response:
        return await self.http.get(f"/project/share/{thread_id}")

    async def delete(self, thread_id: str) -> httpx.Response:
        return await self.http.request("DELETE", "/project/thread", json={"threadId": thread_id})

    async def rate(self, step_id: str, value: int, comment: Optional[str] = None) -> httpx.Response:
        feedback = {"forId": step_id, "value": value, "comment": comment}
        return await self.http.put("/feedback", json={"feedback": feedback, "sessionId": str(uuid.uuid4())})

    async def unrate(self, feedback_id: str) -> httpx.Response:
        return await self.http.request("DELETE", "/feedback", json={"feedbackId": feedback_id})

    async def file(self, url: str) -> httpx.Response:
        return await self.http.get(url)


@dataclass
class Chat:
    """One browser tab of a signed-in user over socket.io (``thread_id``: resume that thread)."""

    srv: Server
    token: str
    thread_id: str = ""
    name: str = "User"
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    events: list = field(default_factory=list)

    def __post_init__(self):
        self.sio = socketio.AsyncClient(reconnection=False)
        self._changed = asyncio.Event()

        async def on_any(event, *args):
            self.events.append((event, args[0] if args else None))
            self._changed.set()

        self.sio.on("*", on_any)

    async def __aenter__(self) -> "Chat":
        await self.connect()
        return self

    async def connect(self) -> None:
        """Connect and start the chat like the browser (raises socketio ConnectionError if refused)."""
        await self.sio.connect(
            self.srv.base,
            socketio_path="/ws/socket.io",
            headers={"Cookie": f"access_token={self.token}"},
            auth={"clientType": "webapp", "sessionId": self.session_id, "threadId": self.thread_id,
                  "userEnv": "{}", "chatProfile": ""},
            transports=["websocket"],
            wait_timeout=10,
        )
        await self.sio.emit("connection_successful")
        if self.thread_id:  # resumed (on_chat_resume), or not found (then on_chat_start)
            await self.wait_for(lambda e: e[0] in ("resume_thread", "resume_thread_error"), 0, 60)
        i = await self.wait_index(lambda e: e[0] == "set_commands", 0, 60)
        await self.wait_index(lambda e: e[0] == "task_end", i, 60)

    async def __aexit__(self, *exc) -> None:
        await self.sio.disconnect()

    async def wait_index(self, pred, start: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        i = start
        while True:
            while i < len(self.events):
                if pred(self.events[i]):
                    return i
                i += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; events since {start}: {self.events[start:]!r}\n{self.srv.log()}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def wait_for(self, pred, start: int, timeout: float):
        return self.events[await self.wait_index(pred, start, timeout)]

    async def upload(self, name: str, data: bytes, mime: str) -> dict:
        async with httpx.AsyncClient(base_url=self.srv.base, timeout=30) as http:
            r = await http.post(
                "/project/file", params={"session_id": self.session_id}, files={"file": (name, data, mime)},
                headers={"Cookie": f"access_token={self.token}"},
            )
        assert r.status_code == 200, r.text
        return r.json()

    async def send(self, text: str, files: Optional[list] = None, command: Optional[str] = None) -> tuple[int, str]:
        """Send a message like the browser; returns (event index before it, its step id)."""
        mark, step_id = len(self.events), str(uuid.uuid4())
        message = {
            "threadId": self.thread_id, "id": step_id, "name": self.name, "type": "user_message", "output": text,
            "createdAt": datetime.now(timezone.utc).isoformat(), "metadata": {},
        }
        if command:
            message["command"] = command
        await self.sio.emit("client_message", {"message": message, "fileReferences": files or []})
        return mark, step_id

    async def turn(self, text: str, files: Optional[list] = None, command: Optional[str] = None):
        """Send and wait for the end of the server's task; returns (its events, the message's step id)."""
        mark, step_id = await self.send(text, files, command)
        i = await self.wait_index(lambda e: e[0] == "task_start", mark, REPLY_TIMEOUT)
        j = await self.wait_index(lambda e: e[0] == "task_end", i, REPLY_TIMEOUT)
        return self.events[mark : j + 1], step_id


def said(events) -> list[dict]:
    """The assistant messages (final versions) among ``events``."""
    return [d for ev, d in events if ev == "new_message" and d.get("type") == "assistant_message"]


def thread_of(events) -> Optional[str]:
    """The thread id the server announced (``first_interaction``), if any."""
    ids = [d["thread_id"] for ev, d in events if ev == "first_interaction"]
    return ids[-1] if ids else None

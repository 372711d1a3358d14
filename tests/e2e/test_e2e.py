"""End to end: the real Chainlit server (``chainlit run app.py``) with the real model.

One server per module, on a free loopback port, with its own data dir. Users
sign up over HTTP (``POST /signup``), sign in over HTTP (``POST /login`` →
``access_token`` cookie) and chat over socket.io exactly like the browser:

* connect to ``/ws/socket.io`` with the cookie header and the auth dict the
  frontend sends (``clientType``, ``sessionId``, ``threadId``, ``userEnv``,
  ``chatProfile``);
* emit ``connection_successful`` (starts ``on_chat_start``);
* emit ``client_message`` with ``{"message": <step dict>, "fileReferences": []}``
  for each message (``command`` set when picked from the command menu);
* the server answers with ``task_start``, ``stream_start`` (first piece),
  ``stream_token`` (the rest), ``new_message`` (the final message), ``task_end``;
  ``stop`` interrupts the running answer.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import httpx
import pytest
import socketio
from PIL import Image

from argus.chat.sentences import MAX_MESSAGE_CHARS, too_long_message, without_token_limit_mark
from argus.store import SQLiteStore
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

from tests.support.paths import REPO
from tests.support.server_env import server_env, wait_until_up as _wait_until_up

PASSWORD = "correct horse battery"
USERS = {
    "alice": "alice@example.com",  # chats, /convs
    "bob": "bob@example.com",  # tries to /select alice's conversation
    "carol": "carol@example.com",  # hits the message rate limit
    "dave": "dave@example.com",  # presses stop
    "erin": "erin@example.com",  # sends a message that is too long
    "frank": "frank@example.com",  # presses stop with a second message queued
}
MESSAGES_PER_MINUTE = 3
REPLY_TIMEOUT = 240.0  # includes waiting for the model to finish loading; the 2 cores are shared


class Server:
    def __init__(self, base: str, data_dir: Path, proc: subprocess.Popen, log_path: Path):
        self.base, self.data_dir, self.proc, self.log_path = base, data_dir, proc, log_path
        self.tokens: dict[str, str] = {}
        self.user_ids: dict[str, str] = {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def store(self) -> SQLiteStore:
        return SQLiteStore(self.data_dir)


@contextlib.contextmanager
def running_server(tmp_path_factory, users: dict[str, str], **extra_env: str):
    """Start ``chainlit run app.py`` on a free port with its own data dir; sign
    ``users`` up and in; yield a :class:`Server`; stop the process afterwards."""
    data_dir = tmp_path_factory.mktemp("argus-e2e-data")
    log_path = data_dir / "server.log"
    port = free_port()
    env = server_env(data_dir, **extra_env)
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
    srv = Server(base, data_dir, proc, log_path)
    try:
        _wait_until_up(base, proc, log_path)
        with httpx.Client(base_url=base, timeout=30) as http:
            for n, (name, email) in enumerate(users.items(), 1):
                # each user from its own address (uvicorn trusts X-Forwarded-For from
                # 127.0.0.1), so per-address sign-up limits never interfere
                headers = {"X-Forwarded-For": f"10.20.0.{n}"}
                r = http.post("/signup", json={"email": email, "name": name.title(), "password": PASSWORD}, headers=headers)
                assert r.status_code == 201, (r.status_code, r.text)
                r = http.post("/login", data={"username": email, "password": PASSWORD}, headers=headers)
                assert r.status_code == 200, (r.status_code, r.text)
                srv.tokens[name] = r.cookies["access_token"]
        store = srv.store()
        try:
            for name, email in users.items():
                srv.user_ids[name] = store.get_user_by_email(email).id
        finally:
            store.close()
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory, USERS) as srv:
        yield srv


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory):
    """A server whose model file does not exist."""
    with running_server(tmp_path_factory, {"alice": USERS["alice"]}, ARGUS_MODEL_PATH="/nonexistent/model.gguf") as srv:
        yield srv


class ChatClient:
    """A socket.io client speaking Chainlit's browser protocol; records every event."""

    def __init__(self, server: Server, user: str):
        self.server, self.user = server, user
        self.session_id = str(uuid.uuid4())
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, Any]] = []
        self._changed = asyncio.Event()

        async def on_any(event, *args):
            self.events.append((event, args[0] if args else None))
            self._changed.set()

        self.sio.on("*", on_any)

    async def __aenter__(self) -> "ChatClient":
        await self.sio.connect(
            self.server.base,
            socketio_path="/ws/socket.io",
            headers={"Cookie": f"access_token={self.server.tokens[self.user]}"},
            auth={
                "clientType": "webapp",
                "sessionId": self.session_id,
                "threadId": "",
                "userEnv": "{}",
                "chatProfile": "",
            },
            transports=["websocket"],
            wait_timeout=10,
        )
        await self.sio.emit("connection_successful")
        # on_chat_start runs as a task: wait for its end so turns don't mix with it
        i = await self.wait_index(lambda e: e[0] == "set_commands", 0, 30)
        await self.wait_index(lambda e: e[0] == "task_end", i, 30)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.sio.disconnect()

    async def wait_for(self, pred, start: int, timeout: float) -> tuple[str, Any]:
        """First event at index ≥ start satisfying ``pred``."""
        return self.events[await self.wait_index(pred, start, timeout)]

    async def wait_index(self, pred, start: int, timeout: float) -> int:
        """Index of the first event at index ≥ start satisfying ``pred``."""
        deadline = time.monotonic() + timeout
        i = start
        while True:
            while i < len(self.events):
                if pred(self.events[i]):
                    return i
                i += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; events since {start}: {self.events[start:]!r}\n{self.server.log()}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def upload(self, name: str, data: bytes, mime: str) -> dict:
        """Upload a file like the browser's attach button (``POST /project/file``)."""
        async with httpx.AsyncClient(base_url=self.server.base, timeout=30) as http:
            r = await http.post(
                "/project/file",
                params={"session_id": self.session_id},
                files={"file": (name, data, mime)},
                headers={"Cookie": f"access_token={self.server.tokens[self.user]}"},
            )
        assert r.status_code == 200, r.text
        return r.json()

    async def send(self, text: str, command: Optional[str] = None, files: Optional[list] = None) -> int:
        """Send a user message like the browser does; returns the event index before it."""
        mark = len(self.events)
        message = {
            "threadId": "",
            "id": str(uuid.uuid4()),
            "name": self.user.title(),
            "type": "user_message",
            "output": text,
            "createdAt": datetime.now(timezone.utc).isoformat(),
            "metadata": {},
        }
        if command:
            message["command"] = command
        await self.sio.emit("client_message", {"message": message, "fileReferences": files or []})
        return mark

    async def turn(self, text: str, command: Optional[str] = None, files: Optional[list] = None) -> list[tuple[str, Any]]:
        """Send and wait until the server ends the task; returns the events of this turn."""
        mark = await self.send(text, command, files)
        i = await self.wait_index(lambda e: e[0] == "task_start", mark, REPLY_TIMEOUT)
        j = await self.wait_index(lambda e: e[0] == "task_end", i, REPLY_TIMEOUT)
        return self.events[mark : j + 1]


def replies(events) -> list[str]:
    """Final texts of the assistant messages in ``events`` (streamed ones included)."""
    return [d["output"] for ev, d in events if ev == "new_message" and d.get("type") == "assistant_message"]


# ---- the happy path ----------------------------------------------------------------------
async def test_chat_streams_tokens_and_stores_the_conversation(server):
    async with ChatClient(server, "alice") as chat:
        events = await chat.turn("Hello! What is the capital of France?")
        starts = [d for ev, d in events if ev == "stream_start"]
        tokens = [d for ev, d in events if ev == "stream_token"]
        assert len(starts) == 1, events
        stream_id = starts[0]["id"]
        assert len(tokens) >= 3 and all(t["id"] == stream_id for t in tokens)
        final = [d for ev, d in events if ev == "new_message" and d.get("id") == stream_id]
        assert len(final) == 1
        answer = final[0]["output"]
        assert answer.strip()
        # the final message is exactly what was streamed, in order (and the note when the token limit cut it)
        assert without_token_limit_mark(answer) == starts[0]["output"] + "".join(t["token"] for t in tokens)

        # a second message continues the same conversation
        events2 = await chat.turn("Thank you. And of Italy?")
        assert [d for ev, d in events2 if ev == "stream_start"]

        store = server.store()
        try:
            uid = server.user_ids["alice"]
            convs = store.list_conversations(uid).items
            mine = [c for c in convs if c.title == "Hello! What is the capital of France?"]
            assert len(mine) == 1  # both messages went to one conversation, titled by the first
            conv = mine[0]
            msgs = list(reversed(store.list_messages(conv.id, uid).items))
            assert [(m.role, m.status) for m in msgs] == [
                ("user", "complete"), ("assistant", "complete"), ("user", "complete"), ("assistant", "complete"),
            ]
            assert msgs[0].content == "Hello! What is the capital of France?"
            assert msgs[1].content == answer
            assert msgs[2].content == "Thank you. And of Italy?"
            assert msgs[1].model and msgs[1].model != "local"  # the loaded model's id
        finally:
            store.close()

        # commands are answered directly and not stored
        events = await chat.turn("/convs")
        (listing,) = replies(events)
        assert conv.id in listing and "Hello! What is the capital of France?" in listing
        assert not [e for e in events if e[0] == "stream_start"]
        events = await chat.turn("", command="help")  # picked from the command menu
        (help_text,) = replies(events)
        assert "/select <id>" in help_text
        store = server.store()
        try:
            assert len(store.list_messages(conv.id, uid).items) == 4
        finally:
            store.close()


async def test_command_menu_is_sent(server):
    async with ChatClient(server, "bob") as chat:
        _, commands = await chat.wait_for(lambda e: e[0] == "set_commands", 0, 5)
        assert {c["id"] for c in commands} == {
            "help", "new", "convs", "select", "search", "rename", "export", "delete", "model",
            "keys", "image", "video", "network", "workers",
        }
        (reply,) = replies(await chat.turn("/model"))
        assert "Current model" in reply
        (reply,) = replies(await chat.turn("/bogus"))
        assert "/help" in reply


async def test_image_upload_is_checked_stored_and_text_answered(server):
    buf = io.BytesIO()
    Image.new("RGB", (32, 16), (10, 200, 10)).save(buf, format="PNG")
    async with ChatClient(server, "bob") as chat:
        good = await chat.upload("green.png", buf.getvalue(), "image/png")
        fake = await chat.upload("notes.png", b"this is not an image at all", "image/png")  # lies about its type
        events = await chat.turn("Describe this picture in one word.", files=[good, fake])
        texts = replies(events)
        notes = next(t for t in texts if "not an image" in t)
        assert "notes.png is not an image I can read." in notes
        assert "The local model reads text only; I stored your image and answered the text." in notes
        assert [d for ev, d in events if ev == "stream_start"], "the text part is still answered"
        # the notice is shown once per conversation
        events = await chat.turn("And this one?", files=[await chat.upload("again.png", buf.getvalue(), "image/png")])
        assert not any("reads text only" in t for t in replies(events))
    store = server.store()
    try:
        uid = server.user_ids["bob"]
        conv = next(c for c in store.list_conversations(uid).items if c.title.startswith("Describe this picture"))
        user_msgs = [m for m in reversed(store.list_messages(conv.id, uid).items) if m.role == "user"]
        assert len(user_msgs) == 2 and len(user_msgs[0].attachment_ids) == 1
        att, data = store.get_attachment(user_msgs[0].attachment_ids[0], uid)
        assert att.mime == "image/png" and att.name == "green.png" and data == buf.getvalue()
    finally:
        store.close()


# ---- bad input -----------------------------------------------------------------------------
async def test_wrong_password_is_401(server):
    async with httpx.AsyncClient(base_url=server.base, headers={"X-Forwarded-For": "10.30.0.1"}) as http:
        r = await http.post("/login", data={"username": USERS["alice"], "password": "not the password"})
        assert r.status_code == 401
        assert "access_token" not in r.cookies
        r = await http.post("/login", data={"username": "nobody@example.com", "password": PASSWORD})
        assert r.status_code == 401


async def test_socket_without_login_is_refused(server):
    sio = socketio.AsyncClient(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sio.connect(
            server.base,
            socketio_path="/ws/socket.io",
            auth={"clientType": "webapp", "sessionId": str(uuid.uuid4()), "threadId": "", "userEnv": "{}", "chatProfile": ""},
            transports=["websocket"],
            wait_timeout=10,
        )


async def test_select_someone_elses_conversation(server):
    store = server.store()
    try:
        theirs = store.create_conversation(server.user_ids["alice"], "Alice's private notes", "x")
        store.add_message(theirs.id, server.user_ids["alice"], "user", "my secret plan")
    finally:
        store.close()
    async with ChatClient(server, "bob") as chat:
        (reply,) = replies(await chat.turn(f"/select {theirs.id}"))
        assert reply == "No conversation with that id."
        (reply_missing,) = replies(await chat.turn("/select 00000000000000000000000000000000"))
        assert reply_missing == reply


async def test_message_rate_limit(server):
    async with ChatClient(server, "carol") as chat:
        for i in range(MESSAGES_PER_MINUTE + 1):
            await chat.send(f"Say hi number {i}")
        _, limited = await chat.wait_for(
            lambda e: e[0] == "new_message" and "too fast" in (e[1].get("output") or ""), 0, REPLY_TIMEOUT
        )
        text = limited["output"]
        assert f"limit: {MESSAGES_PER_MINUTE} per minute" in text
        m = re.search(r"please wait (\d+) (seconds?|minute) and try again\.$", text)
        assert m, text
        wait = int(m.group(1)) * (60 if m.group(2) == "minute" else 1)
        assert 1 <= wait <= 60
        # the allowed ones are answered, one after the other, in one conversation
        deadline = time.monotonic() + REPLY_TIMEOUT
        while time.monotonic() < deadline:
            store = server.store()
            try:
                convs = store.list_conversations(server.user_ids["carol"]).items
                msgs = store.list_messages(convs[0].id, server.user_ids["carol"]).items if convs else []
            finally:
                store.close()
            if len(msgs) >= 2 * MESSAGES_PER_MINUTE:
                break
            await asyncio.sleep(0.5)
        assert len(convs) == 1
        sent = {f"Say hi number {i}" for i in range(MESSAGES_PER_MINUTE + 1)}
        stored = [m.content for m in msgs if m.role == "user"]
        assert len(stored) == len(set(stored)) == MESSAGES_PER_MINUTE and set(stored) < sent
        assert sum(m.role == "assistant" for m in msgs) == MESSAGES_PER_MINUTE


async def test_stop_keeps_partial_answer(server):
    async with ChatClient(server, "dave") as chat:
        mark = await chat.send("Write a very long story about a dragon and a knight.")
        _, start = await chat.wait_for(lambda e: e[0] == "stream_start", mark, REPLY_TIMEOUT)
        await chat.wait_for(lambda e: e[0] == "stream_token", mark, REPLY_TIMEOUT)
        await chat.sio.emit("stop")
        await chat.wait_for(lambda e: e[0] == "task_end", mark, 30)
        _, final = await chat.wait_for(lambda e: e[0] == "new_message" and e[1].get("id") == start["id"], mark, 30)
        assert final["output"].endswith("_(stopped)_")
        shown = final["output"][: -len("_(stopped)_")].strip()
        assert shown
    store = server.store()
    try:
        uid = server.user_ids["dave"]
        (conv,) = store.list_conversations(uid).items
        answer = store.list_messages(conv.id, uid).items[0]
        assert answer.role == "assistant" and answer.status == "stopped"
        assert answer.content.strip() == shown
        assert answer.content.strip()
    finally:
        store.close()


async def test_missing_model_answers_with_the_load_error(broken_server):
    expected = "The model file /nonexistent/model.gguf does not exist."
    async with ChatClient(broken_server, "alice") as chat:
        for text in ("Hello?", "Anyone there?"):
            events = await chat.turn(text)
            texts = replies(events)
            assert len(texts) == 1 and texts[0].startswith(expected), texts
            assert not [e for e in events if e[0] == "stream_start"]
            assert not any("Traceback" in str(d) for _, d in events)
        (reply,) = replies(await chat.turn("/model"))
        assert "unavailable" in reply and expected in reply
    store = broken_server.store()
    try:
        uid = broken_server.user_ids["alice"]
        (conv,) = store.list_conversations(uid).items
        msgs = list(reversed(store.list_messages(conv.id, uid).items))
        assert [(m.role, m.status) for m in msgs] == [
            ("user", "complete"), ("assistant", "error"), ("user", "complete"), ("assistant", "error"),
        ]
    finally:
        store.close()


async def test_login_throttled_with_clear_message(server):
    # its own client address: the throttle does not touch the other tests' sign-ins
    async with httpx.AsyncClient(base_url=server.base, headers={"X-Forwarded-For": "10.30.0.2"}) as http:
        statuses = []
        for _ in range(6):
            r = await http.post("/login", data={"username": "mallory@example.com", "password": "guess-guess"})
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
        assert statuses[0] == 401 and statuses[-1] == 429, statuses
        assert r.json()["detail"].startswith("Too many failed sign-in attempts. Try again in")
        assert int(r.headers["retry-after"]) >= 1
    async with httpx.AsyncClient(base_url=server.base) as http:  # another address still signs in
        r = await http.post("/login", data={"username": USERS["alice"], "password": PASSWORD})
        assert r.status_code == 200, r.text


async def test_too_long_message_is_refused_and_nothing_is_stored(server):
    async with ChatClient(server, "erin") as chat:
        (reply,) = replies(await chat.turn("x" * (MAX_MESSAGE_CHARS + 1)))
        assert reply == too_long_message(MAX_MESSAGE_CHARS + 1)
        store = server.store()
        try:
            assert store.list_conversations(server.user_ids["erin"]).items == []
        finally:
            store.close()
        # the chat goes on normally
        events = await chat.turn("Hello there!")
        assert [d for ev, d in events if ev == "stream_start"]
    store = server.store()
    try:
        uid = server.user_ids["erin"]
        (conv,) = store.list_conversations(uid).items
        msgs = list(reversed(store.list_messages(conv.id, uid).items))
        assert [(m.role, m.status, m.content if m.role == "user" else "") for m in msgs] == [
            ("user", "complete", "Hello there!"), ("assistant", "complete", ""),
        ]
    finally:
        store.close()


async def test_stop_keeps_a_message_queued_behind_the_running_answer(server):
    uid = server.user_ids["frank"]

    def stored() -> list:
        store = server.store()
        try:
            convs = store.list_conversations(uid).items
            return list(reversed(store.list_messages(convs[0].id, uid).items)) if convs else []
        finally:
            store.close()

    async with ChatClient(server, "frank") as chat:
        mark = await chat.send("Write a very long story about a dragon and a knight.")
        _, start = await chat.wait_for(lambda e: e[0] == "stream_start", mark, REPLY_TIMEOUT)
        await chat.send("Then write one about a wizard.")  # waits behind the first answer
        deadline = time.monotonic() + 30
        while len(stored()) < 3 and time.monotonic() < deadline:  # stored at once, before its turn
            await asyncio.sleep(0.2)
        await chat.sio.emit("stop")  # Chainlit cancels the newest task: the queued one
        _, final = await chat.wait_for(lambda e: e[0] == "new_message" and e[1].get("id") == start["id"], mark, 60)
        assert final["output"].endswith("_(stopped)_")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msgs = stored()
            if len(msgs) == 4:
                break
            await asyncio.sleep(0.2)
    assert [(m.role, m.status) for m in msgs] == [
        ("user", "complete"), ("assistant", "stopped"), ("user", "complete"), ("assistant", "stopped"),
    ]
    assert msgs[0].content == "Write a very long story about a dragon and a knight."
    assert msgs[1].content.strip() and final["output"].startswith(msgs[1].content.strip())
    assert msgs[2].content == "Then write one about a wizard."
    assert msgs[3].content == ""  # stopped before its answer began

"""The Chainlit data layer (``argus.datalayer``) against a real SQLiteStore.

Calls are made the two ways Chainlit makes them: inside a socket event (a
Chainlit context whose session has the signed-in user) and inside an HTTP
request of the REST API (the request's own session token, handed over by
``CallerMiddleware``; here ``request_token``). The chat handler runs for real
(``JarvisArgus`` with the real model) with Chainlit's ``Message`` calling the
data layer, as in the server.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import os
import uuid
from typing import Any, Optional

import chainlit as cl
import pytest
from chainlit.auth.jwt import create_jwt
from chainlit.context import ChainlitContext, context_var
from chainlit.emitter import BaseChainlitEmitter
from chainlit.session import HTTPSession
from chainlit.types import Feedback, Pagination, ThreadFilter
from PIL import Image

from argus.config import Settings
from argus.chat.hooks import JarvisArgus
from argus.datalayer import (
    KIND_ANSWER,
    KIND_CHAT,
    KIND_COMMAND,
    KIND_KEY,
    KIND_NOTICE,
    PENDING_TTL_S,
    STOPPED_MARK,
    ArgusDataLayer,
    file_url,
    request_token,
    sanitize_metadata,
)
from argus.store import NotFound
from worker.engine import ModelLoadError

TIMEOUT = 240.0


# ---- fixtures ------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def layer(store, clock):
    return ArgusDataLayer(store, clock=clock, assistant_name="Jarvis Argus")


@pytest.fixture
def jwt_secret(monkeypatch):
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", "x" * 48)


def session_for(user, thread_id: Optional[str] = None) -> HTTPSession:
    return HTTPSession(
        id=str(uuid.uuid4()),
        client_type="webapp",
        thread_id=thread_id,
        user=cl.User(identifier=user.email, metadata={"user_id": user.id, "role": user.role}),
    )


@contextlib.contextmanager
def socket_event(user, thread_id: Optional[str] = None, emitter_cls=BaseChainlitEmitter):
    """Run the block like a socket event of ``user``'s chat session."""
    session = session_for(user, thread_id)
    token = context_var.set(ChainlitContext(session, emitter_cls(session)))
    try:
        yield session
    finally:
        context_var.reset(token)


def http_request(user):
    """Run the block like a REST API request carrying ``user``'s session token."""
    return request_token(create_jwt(cl.User(identifier=user.email, metadata={"user_id": user.id})))


def step(thread_id: str, kind: Optional[str], *, type: str = "assistant_message", output: str = "hi", id=None) -> dict:
    return {
        "id": id or str(uuid.uuid4()),
        "threadId": thread_id,
        "type": type,
        "output": output,
        "name": "Jarvis Argus",
        "metadata": {KIND_KEY: kind} if kind else {},
        "isError": False,
    }


def rows(store, user, conv_id):
    return [(m.id, m.role, m.status, m.content) for m in reversed(store.list_messages(conv_id, user.id).items)]


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


# ---- the chat handler and Chainlit's own step writes converge ---------------------------------
class RecordingEmitter(BaseChainlitEmitter):
    def __init__(self, session):
        super().__init__(session)
        self.events: list[tuple[str, Any]] = []

    async def send_step(self, step_dict):
        self.events.append(("send", dict(step_dict)))

    async def update_step(self, step_dict):
        self.events.append(("update", dict(step_dict)))

    async def stream_start(self, step_dict):
        self.events.append(("stream_start", dict(step_dict)))

    async def emit(self, event, data):
        self.events.append((event, data))

    async def resume_thread(self, thread_dict):
        self.events.append(("resume_thread", thread_dict))


class TrackingLayer(ArgusDataLayer):
    """The real data layer, remembering every step Chainlit handed it (to wait for its tasks)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls: list[tuple[str, dict]] = []

    async def create_step(self, step_dict):
        self.calls.append(("create", dict(step_dict)))
        await super().create_step(step_dict)

    async def update_step(self, step_dict):
        self.calls.append(("update", dict(step_dict)))
        await super().update_step(step_dict)


def make_settings(tmp_path, monkeypatch, **overrides) -> Settings:
    for key in list(os.environ):
        if key.startswith("ARGUS_") or key == "JWT_SECRET_KEY":
            monkeypatch.delenv(key)
    monkeypatch.setenv("ARGUS_DATA_DIR", str(tmp_path))
    base = Settings.from_env(dotenv=False)
    return dataclasses.replace(base, **{"max_new_tokens": 4, "temperature": 0.0, **overrides})


@pytest.fixture
def chat_argus(tmp_path, monkeypatch, store):
    """``chat_argus(loader)`` → a JarvisArgus whose data layer Chainlit's Message/Element call."""

    def make(loader) -> JarvisArgus:
        argus = JarvisArgus(make_settings(tmp_path, monkeypatch), store=store, model_loader=loader)
        argus.data_layer = TrackingLayer(store)
        monkeypatch.setattr("chainlit.message.get_data_layer", lambda: argus.data_layer)
        monkeypatch.setattr("chainlit.element.get_data_layer", lambda: argus.data_layer)
        argus.start()
        return argus

    return make


async def send_like_chainlit(argus: JarvisArgus, session, emitter, text: str) -> cl.Message:
    """What Chainlit does with a browser message: create its step, then call on_message."""

    async def go():
        context_var.set(ChainlitContext(session, emitter))
        msg = cl.Message(content=text, type="user_message", author="Alice")
        await msg._create()  # -> data_layer.create_step, in a task
        await argus.on_message(msg)
        return msg

    return await asyncio.wait_for(asyncio.create_task(go()), TIMEOUT)


async def drain() -> None:
    for _ in range(20):  # the data layer runs in tasks Chainlit created
        await asyncio.sleep(0.01)


async def test_chat_handler_and_chainlit_steps_converge_on_one_row_per_message(chat_argus, store, alice, local_model):
    argus = chat_argus(lambda: local_model)
    session = session_for(alice)
    emitter = RecordingEmitter(session)

    async def start():
        context_var.set(ChainlitContext(session, emitter))
        await argus.on_chat_start()

    await asyncio.create_task(start())
    question = await send_like_chainlit(argus, session, emitter, "What is the capital of France?")
    await send_like_chainlit(argus, session, emitter, "/help")  # a command: not stored
    await send_like_chainlit(argus, session, emitter, "x" * 20_000)  # refused: not stored
    await drain()

    (conv,) = store.list_conversations(alice.id).items
    assert conv.id == session.thread_id  # the conversation id IS the thread id
    answer = next(d for k, d in emitter.events if k == "send" and d["metadata"].get(KIND_KEY) == KIND_ANSWER)
    stored = rows(store, alice, conv.id)
    assert [(i, r) for i, r, _, _ in stored] == [(question.id, "user"), (answer["id"], "assistant")]
    assert stored[1][3] == answer["output"]
    # Chainlit handed the data layer every step (user, answer, command reply, notice) ...
    kinds = {d["metadata"].get(KIND_KEY) for _, d in argus.data_layer.calls}
    assert {KIND_ANSWER, KIND_COMMAND, KIND_NOTICE} <= kinds
    # ... and handing them over again (as update_step does) changes nothing
    for _, d in list(argus.data_layer.calls):
        await argus.data_layer.create_step(d)
        await argus.data_layer.update_step(d)
    assert rows(store, alice, conv.id) == stored


async def test_a_failed_model_answer_is_shown_under_its_stored_id(chat_argus, store, alice):
    def broken():
        raise ModelLoadError("The model file /x.gguf does not exist.")

    argus = chat_argus(broken)
    session = session_for(alice)
    emitter = RecordingEmitter(session)
    await send_like_chainlit(argus, session, emitter, "Hello?")
    await drain()
    (conv,) = store.list_conversations(alice.id).items
    shown = [d for k, d in emitter.events if k == "send" and d["type"] == "assistant_message"]
    (user_row, answer_row) = rows(store, alice, conv.id)
    assert [d["id"] for d in shown] == [answer_row[0]] and answer_row[2] == "error"
    # so a rating of the shown message finds the row
    with socket_event(alice):
        fb_id = await argus.data_layer.upsert_feedback(Feedback(forId=shown[0]["id"], value=0, comment="no model"))
    assert store.list_feedback(conv.id, alice.id)[0].id == fb_id


# ---- what is (not) stored -------------------------------------------------------------------------
async def test_commands_notices_and_unmarked_steps_are_never_stored(layer, store, alice):
    tid = str(uuid.uuid4())
    with socket_event(alice, tid):
        for kind in (KIND_COMMAND, KIND_NOTICE, KIND_ANSWER, None):
            await layer.create_step(step(tid, kind))
        await layer.create_step(step(tid, None, type="user_message", output="/help"))
        await layer.create_step(step(tid, None, type="run", output="on_message"))
        forged = step(tid, KIND_CHAT)  # a browser can mark its own message "chat": not registered, ignored
        await layer.create_step(forged)
    assert store.list_conversations(alice.id).items == []  # no orphan thread
    assert layer.pending_steps(tid) == []


async def test_chat_steps_before_the_first_message_wait_for_the_conversation(layer, store, alice, bob):
    tid = str(uuid.uuid4())
    greeting = step(tid, KIND_CHAT, output="Welcome back, Alice!")
    layer.expect_chat_step(greeting["id"])
    with socket_event(alice, tid):
        await layer.create_step(greeting)
        greeting["output"] = "Welcome back, Alice! How can I help?"
        await layer.update_step(greeting)  # updates the queued step, no second one
    assert store.list_conversations(alice.id).items == []  # queued in memory, not an orphan thread
    assert [s["output"] for s in layer.pending_steps(tid)] == ["Welcome back, Alice! How can I help?"]

    # the chat handler creates the conversation (first user message): the greeting comes first
    conv = store.create_conversation(alice.id, "Hi", "m", conversation_id=tid)
    await layer.conversation_created(conv)
    store.add_message(conv.id, alice.id, "user", "Hi")
    assert [(r[0], r[1], r[3]) for r in rows(store, alice, conv.id)] == [
        (greeting["id"], "assistant", "Welcome back, Alice! How can I help?"),
        (rows(store, alice, conv.id)[1][0], "user", "Hi"),
    ]
    assert layer.pending_steps(tid) == []

    # once the conversation exists, chat steps are written at once (upserts by id)
    later = step(tid, KIND_CHAT, output="one")
    layer.expect_chat_step(later["id"])
    with socket_event(alice, tid):
        await layer.create_step(later)
        later["output"] = "one, edited"
        await layer.update_step(later)
    assert rows(store, alice, conv.id)[-1][1:] == ("assistant", "complete", "one, edited")
    # steps queued by bob for a thread id never reach alice's conversation
    sneaky = step(tid, KIND_CHAT)
    layer.expect_chat_step(sneaky["id"])
    with socket_event(bob, tid):
        await layer.create_step(sneaky)
    await layer.conversation_created(conv)
    assert sneaky["id"] not in [r[0] for r in rows(store, alice, conv.id)]


async def test_queued_steps_of_a_thread_that_never_starts_are_dropped(layer, store, alice, clock):
    tid = str(uuid.uuid4())
    greeting = step(tid, KIND_CHAT)
    layer.expect_chat_step(greeting["id"])
    with socket_event(alice, tid):
        await layer.create_step(greeting)
    assert layer.pending_steps(tid)
    clock.now += PENDING_TTL_S + 1
    assert layer.pending_steps(tid) == []
    assert store.list_conversations(alice.id).items == []


# ---- list_threads ------------------------------------------------------------------------------
async def test_list_threads_pages_newest_first_and_searches_the_callers_own(layer, store, alice, bob, jwt_secret):
    convs = [store.create_conversation(alice.id, f"chat {i}", "m") for i in range(5)]
    store.add_message(convs[1].id, alice.id, "user", "the word zebra is in here")
    store.create_conversation(bob.id, "bob's zebra", "m")
    with http_request(alice):
        first = await layer.list_threads(Pagination(first=2), ThreadFilter(userId=alice.id))
        second = await layer.list_threads(Pagination(first=2, cursor=first.pageInfo.endCursor), ThreadFilter(userId=alice.id))
        third = await layer.list_threads(Pagination(first=2, cursor=second.pageInfo.endCursor), ThreadFilter(userId=alice.id))
        found = await layer.list_threads(Pagination(first=20), ThreadFilter(userId=alice.id, search="ZEBRA"))
        by_title = await layer.list_threads(Pagination(first=20), ThreadFilter(search="chat 3"))
        theirs = await layer.list_threads(Pagination(first=20), ThreadFilter(userId=bob.id))  # not the caller
        bad_cursor = await layer.list_threads(Pagination(first=2, cursor="not-a-cursor"), ThreadFilter())
    ids = [t["id"] for page in (first, second, third) for t in page.data]
    assert ids == [convs[1].id, convs[4].id, convs[3].id, convs[2].id, convs[0].id]  # convs[1] updated last
    assert first.pageInfo.hasNextPage and second.pageInfo.hasNextPage and not third.pageInfo.hasNextPage
    assert [t["id"] for t in found.data] == [convs[1].id]  # bob's zebra is not listed
    assert [t["name"] for t in by_title.data] == ["chat 3"]
    assert theirs.data == [] and bad_cursor.data == []
    t = first.data[0]
    assert t["userId"] == alice.id and t["userIdentifier"] == "alice@example.com" and t["steps"] == []


async def test_list_threads_filters_by_feedback(layer, store, alice, jwt_secret):
    liked = store.create_conversation(alice.id, "liked", "m")
    answer = store.add_message(liked.id, alice.id, "assistant", "good")
    store.create_conversation(alice.id, "plain", "m")
    store.set_feedback(answer.id, alice.id, 1)
    with http_request(alice):
        up = await layer.list_threads(Pagination(first=20), ThreadFilter(feedback=1))
        down = await layer.list_threads(Pagination(first=20), ThreadFilter(feedback=0))
    assert [t["name"] for t in up.data] == ["liked"] and down.data == []


async def test_without_a_known_caller_nothing_is_read(layer, store, alice):
    conv = store.create_conversation(alice.id, "private", "m")
    page = await layer.list_threads(Pagination(first=20), ThreadFilter(userId=alice.id))  # no session, no token
    assert page.data == []
    assert await layer.get_thread(conv.id) is None and await layer.get_thread_author(conv.id) == ""
    with request_token("forged.token.value"):
        assert await layer.get_thread(conv.id) is None


# ---- get_thread --------------------------------------------------------------------------------
async def test_get_thread_shape_with_feedback_images_and_sanitised_metadata(layer, store, alice, bob, jwt_secret):
    conv = store.create_conversation(
        alice.id, "Trip", "m",
        metadata={"chat_settings": {"temperature": 0.2, "api_key": "sk-secret"}, "env": {"OPENAI_API_KEY": "sk"}},
    )
    att = store.save_attachment(alice.id, "red.png", "image/png", png())
    question = store.add_message(conv.id, alice.id, "user", "Where?", attachment_ids=[att.id], message_id=str(uuid.uuid4()))
    answer = store.add_message(conv.id, alice.id, "assistant", "The Alps.", message_id=str(uuid.uuid4()))
    stopped = store.add_message(conv.id, alice.id, "assistant", "Half an ans", status="stopped")
    fb = store.set_feedback(answer.id, alice.id, 1, "great")
    with http_request(alice):
        thread = await layer.get_thread(conv.id)
        author = await layer.get_thread_author(conv.id)
    assert author == "alice@example.com"
    assert thread["id"] == conv.id and thread["name"] == "Trip"
    assert thread["userId"] == alice.id and thread["userIdentifier"] == "alice@example.com"
    assert thread["metadata"] == {"chat_settings": {"temperature": 0.2}}  # no keys, no env
    assert [(s["id"], s["type"], s["output"]) for s in thread["steps"]] == [
        (question.id, "user_message", "Where?"),
        (answer.id, "assistant_message", "The Alps."),
        (stopped.id, "assistant_message", f"Half an ans\n\n{STOPPED_MARK}"),
    ]
    assert thread["steps"][1]["feedback"] == {"id": fb.id, "forId": answer.id, "value": 1, "comment": "great"}
    assert "feedback" not in thread["steps"][0]
    assert all(s["threadId"] == conv.id for s in thread["steps"])
    (element,) = thread["elements"]
    assert element["id"] == att.id and element["forId"] == question.id and element["type"] == "image"
    assert element["url"] == file_url(att.id, "") == f"/argus/files/{att.id}" and element["name"] == "red.png"
    with http_request(alice):
        assert await layer.get_element(conv.id, att.id) == element
    with http_request(bob):  # someone else's thread looks exactly like a missing one
        assert await layer.get_thread(conv.id) is None
        assert await layer.get_thread(str(uuid.uuid4())) is None
        assert await layer.get_thread_author(conv.id) == ""
        assert await layer.get_element(conv.id, att.id) is None


async def test_the_http_token_decides_even_inside_a_socket_context(layer, store, alice, bob, jwt_secret):
    conv = store.create_conversation(alice.id, "alice's", "m")
    with socket_event(alice):
        assert await layer.get_thread_author(conv.id) == "alice@example.com"
        with http_request(bob):  # e.g. a REST route that initialised some session's context
            assert await layer.get_thread_author(conv.id) == ""
        with request_token(""):  # a request without a token is nobody
            assert await layer.get_thread_author(conv.id) == ""


# ---- rename, metadata, delete --------------------------------------------------------------------
async def test_update_thread_renames_from_the_api_and_keeps_clean_metadata(layer, store, alice, bob, jwt_secret):
    conv = store.create_conversation(alice.id, "First message", "m", conversation_id=str(uuid.uuid4()))
    with socket_event(alice, conv.id):  # Chainlit's first-interaction bookkeeping: no rename
        await layer.update_thread(conv.id, name="first message, unshortened", user_id=alice.id)
        await layer.update_thread(
            conv.id,
            metadata={"chat_settings": {"tone": "dry", "token": "t"}, "chat_profile": None, "client_type": "webapp",
                      "argus": None, "user": None, "env": {"KEY": "v"}, "is_shared": True, "id": "session-id"},
        )
    assert store.get_conversation(conv.id, alice.id).title == "First message"
    assert store.get_conversation(conv.id, alice.id).metadata == {"chat_settings": {"tone": "dry"}, "client_type": "webapp"}
    with http_request(alice):
        await layer.update_thread(conv.id, name="  Holiday\n plans  ")
    assert store.get_conversation(conv.id, alice.id).title == "Holiday plans"
    with http_request(bob):
        await layer.update_thread(conv.id, name="pwned", metadata={"chat_profile": "x"})
        await layer.update_thread(conv.id, user_id=bob.id)  # never moves a thread to another user
    assert store.get_conversation(conv.id, alice.id).title == "Holiday plans"
    # update_thread never creates a conversation (a first interaction may be a command)
    new_id = str(uuid.uuid4())
    with socket_event(alice, new_id):
        await layer.update_thread(new_id, name="/help", user_id=alice.id, metadata={"client_type": "webapp"})
    assert [c.id for c in store.list_conversations(alice.id).items] == [conv.id]


async def test_delete_thread_removes_messages_feedback_and_files(layer, store, alice, bob, jwt_secret):
    conv = store.create_conversation(alice.id, "doomed", "m")
    att = store.save_attachment(alice.id, "red.png", "image/png", png())
    store.add_message(conv.id, alice.id, "user", "look", attachment_ids=[att.id])
    answer = store.add_message(conv.id, alice.id, "assistant", "red")
    store.set_feedback(answer.id, alice.id, 0)
    with http_request(bob):
        await layer.delete_thread(conv.id)  # not bob's: nothing happens
    assert store.get_conversation(conv.id, alice.id)
    with http_request(alice):
        await layer.delete_thread(conv.id)
        assert await layer.get_thread(conv.id) is None
    with pytest.raises(NotFound):
        store.get_conversation(conv.id, alice.id)
    with pytest.raises(NotFound):
        store.get_message(answer.id, alice.id)
    with pytest.raises(NotFound):
        store.get_attachment(att.id, alice.id)


# ---- feedback -------------------------------------------------------------------------------------
async def test_feedback_is_stored_against_the_callers_own_message(layer, store, alice, bob, jwt_secret):
    conv = store.create_conversation(alice.id, "c", "m")
    answer = store.add_message(conv.id, alice.id, "assistant", "an answer", message_id=str(uuid.uuid4()))
    with http_request(alice):
        fb_id = await layer.upsert_feedback(Feedback(forId=answer.id, value=1, comment="nice"))
        again = await layer.upsert_feedback(Feedback(forId=answer.id, value=0, id=fb_id, comment=None))
    assert again == fb_id
    (fb,) = store.list_feedback(conv.id, alice.id)
    assert (fb.message_id, fb.value, fb.comment) == (answer.id, 0, None)
    with http_request(bob):
        with pytest.raises(LookupError):
            await layer.upsert_feedback(Feedback(forId=answer.id, value=1, comment="bob was here"))
        assert await layer.delete_feedback(fb_id) is False
    assert store.list_feedback(conv.id, alice.id)[0].comment is None
    with http_request(alice):
        assert await layer.delete_feedback(fb_id) is True
    assert store.list_feedback(conv.id, alice.id) == []


# ---- users ------------------------------------------------------------------------------------------
async def test_users_map_by_email_and_are_never_created_here(layer, store, alice):
    persisted = await layer.get_user("Alice@Example.com")
    assert persisted.id == alice.id and persisted.identifier == "alice@example.com"
    assert persisted.metadata["user_id"] == alice.id and persisted.display_name == "Alice"
    assert (await layer.create_user(cl.User(identifier="alice@example.com"))).id == alice.id
    assert await layer.create_user(cl.User(identifier="mallory@example.com")) is None
    assert store.get_user_by_email("mallory@example.com") is None
    assert await layer.get_user("mallory@example.com") is None


def test_sanitize_metadata_keeps_only_chat_settings_profile_and_client_type():
    assert sanitize_metadata({
        "chat_settings": {"model": "x", "nested": {"password": "p", "refresh_token": "t", "ok": [1, 2]}},
        "chat_profile": "Default", "client_type": "webapp", "env": {"A": "b"}, "user": {"id": "u"},
    }) == {"chat_settings": {"model": "x", "nested": {"ok": [1, 2]}}, "chat_profile": "Default", "client_type": "webapp"}
    assert sanitize_metadata('{"chat_profile": "p", "secret": 1}') == {"chat_profile": "p"}
    assert sanitize_metadata("not json") == {} and sanitize_metadata(None) == {}
    assert sanitize_metadata({"chat_settings": {"blob": "x" * 1999, "more": ["y" * 1999] * 20}}) == {}  # too big


# ---- a delete from the sidebar forgets the network session too (issue 13, finding 11) ----------
class RecordingDaemon:
    """The daemon's control client as the data layer sees it: records calls; ``fail`` raises."""

    def __init__(self, fail: Optional[Exception] = None):
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    async def call(self, command: str, **args):
        self.calls.append((command, args))
        if self.fail is not None:
            raise self.fail
        return {"dropped": 3}


async def test_a_sidebar_delete_drops_the_conversations_network_session(layer, store, alice, bob, jwt_secret, tmp_path):
    from argus.network_choice import NetworkChoice
    from worker.control import session_id_for

    choice = NetworkChoice(tmp_path)
    choice.use("net-1a2b3c4d")
    daemon = RecordingDaemon()
    layer.services.update({"network_choice": choice, "daemon": daemon})
    conv = store.create_conversation(alice.id, "secret plans", "m")
    with http_request(bob):
        await layer.delete_thread(conv.id)  # not bob's: nothing deleted, nothing dropped
    assert daemon.calls == []
    with http_request(alice):
        await layer.delete_thread(conv.id)
    assert daemon.calls == [("session_drop", {"network_id": "net-1a2b3c4d",
                                              "session_id": session_id_for("net-1a2b3c4d", conv.id)})]
    with pytest.raises(NotFound):
        store.get_conversation(conv.id, alice.id)


async def test_a_sidebar_delete_succeeds_when_the_daemon_is_down_and_says_so_in_the_log(
        layer, store, alice, jwt_secret, tmp_path, caplog):
    from argus.network_choice import NetworkChoice
    from worker.control import ControlClient

    choice = NetworkChoice(tmp_path)
    choice.use("net-1a2b3c4d")
    # a real client for a daemon that was never started: nothing listens, no credentials
    layer.services.update({"network_choice": choice, "daemon": ControlClient(tmp_path / "no-daemon", timeout_s=2)})
    conv = store.create_conversation(alice.id, "secret plans", "m")
    with caplog.at_level(logging.WARNING, logger="argus.network_choice"), http_request(alice):
        await layer.delete_thread(conv.id)
    with pytest.raises(NotFound):
        store.get_conversation(conv.id, alice.id)
    assert "could not be dropped now" in caplog.text and conv.id in caplog.text


async def test_without_a_network_in_use_a_sidebar_delete_asks_no_daemon(layer, store, alice, jwt_secret, tmp_path):
    from argus.network_choice import NetworkChoice

    daemon = RecordingDaemon()
    layer.services.update({"network_choice": NetworkChoice(tmp_path), "daemon": daemon})
    conv = store.create_conversation(alice.id, "local only", "m")
    with http_request(alice):
        await layer.delete_thread(conv.id)
    assert daemon.calls == []


def test_the_chat_servers_data_layer_shares_its_services(tmp_path, monkeypatch, store):
    argus = JarvisArgus(make_settings(tmp_path, monkeypatch), store=store)
    assert argus.data_layer.services is argus.services
    assert {"daemon", "network_choice"} <= set(argus.services)

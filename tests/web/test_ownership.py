"""A user can never read, resume, rename, delete, rate, export or fetch files of
another user's conversation, by any route of the real server.

Alice has a conversation (a message with an image, an answer she rated). Bob,
signed in on his own account, tries every route Chainlit and we expose:
the REST API (``/project/threads``, ``/project/thread/<id>`` GET/PUT/DELETE,
sharing, elements, ``/feedback``), the socket (connecting with her thread id
to resume it), slash commands, and the file URL. Afterwards her conversation
is exactly as it was. (The model path does not exist, so answers are the
model's load error, at once.)
"""
from __future__ import annotations

import socketio
import pytest

from argus.store import SQLiteStore
from tests.support.live_server import Api, Chat, history_env, png, said, serve, sign_in, sign_up, thread_of

pytestmark = pytest.mark.e2e

ALICE, BOB = "alice@example.com", "bob@example.com"
SECRET = "my secret plan involves the purple lighthouse"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The server; Alice's conversation (thread id, steps, image, her rating); both tokens."""
    import asyncio

    tmp = tmp_path_factory.mktemp("ownership")
    env = history_env(tmp, ARGUS_MODEL_PATH="/nonexistent/model.gguf")
    with serve(tmp, env) as srv:
        sign_up(srv, ALICE, "Alice")
        sign_up(srv, BOB, "Bob")
        tokens = {ALICE: sign_in(srv, ALICE), BOB: sign_in(srv, BOB)}

        async def alice_chats():
            async with Chat(srv, tokens[ALICE], name="Alice") as chat:
                upload = await chat.upload("lighthouse.png", png((120, 0, 200)), "image/png")
                events, question_id = await chat.turn(SECRET, files=[upload])
                answer_id = said(events)[-1]["id"]
                thread_id = thread_of(chat.events)
            async with Api(srv, tokens[ALICE]) as api:
                thread = (await api.thread(thread_id)).json()
                r = await api.rate(answer_id, 0, "alice's own comment")
                assert r.status_code == 200, r.text
            return thread_id, question_id, answer_id, thread["elements"][0], r.json()["feedbackId"]

        thread_id, question_id, answer_id, element, feedback_id = asyncio.run(alice_chats())
        yield {
            "srv": srv, "tokens": tokens, "thread_id": thread_id, "question_id": question_id,
            "answer_id": answer_id, "element": element, "feedback_id": feedback_id,
        }


def alice_state(world) -> tuple:
    """Everything about Alice's conversation that Bob must not be able to change."""
    store = SQLiteStore(world["srv"].data_dir)
    try:
        uid = store.get_user_by_email(ALICE).id
        conv = store.get_conversation(world["thread_id"], uid)
        msgs = tuple((m.id, m.role, m.content, m.status, m.attachment_ids) for m in store.list_messages(conv.id, uid).items)
        fbs = tuple((f.id, f.value, f.comment) for f in store.list_feedback(conv.id, uid))
        return conv.title, conv.metadata, msgs, fbs
    finally:
        store.close()


@pytest.fixture
def unchanged(world):
    before = alice_state(world)
    yield
    assert alice_state(world) == before


async def test_alice_herself_can_use_every_route(world):
    async with Api(world["srv"], world["tokens"][ALICE]) as api:
        assert [t["id"] for t in (await api.threads()).json()["data"]] == [world["thread_id"]]
        assert (await api.thread(world["thread_id"])).status_code == 200
        assert (await api.element(world["thread_id"], world["element"]["id"])).json()["id"] == world["element"]["id"]
        assert (await api.file(world["element"]["url"])).status_code == 200


async def test_thread_list_shows_only_the_callers_threads(world, unchanged):
    async with Api(world["srv"], world["tokens"][BOB]) as api:
        for filters in ({}, {"search": "purple lighthouse"}, {"userId": "anything"}, {"feedback": 0}):
            r = await api.threads(**filters)
            assert r.status_code == 200 and r.json()["data"] == [], (filters, r.text)


async def test_second_user_cannot_read_rename_share_or_delete_the_thread(world, unchanged):
    tid = world["thread_id"]
    async with Api(world["srv"], world["tokens"][BOB]) as api:
        r = await api.thread(tid)
        assert r.status_code == 404 and SECRET not in r.text
        assert (await api.element(tid, world["element"]["id"])).status_code == 404
        assert (await api.rename(tid, "pwned")).status_code == 404
        assert (await api.share(tid)).status_code == 404
        assert (await api.shared(tid)).status_code == 404
        assert (await api.delete(tid)).status_code == 404
    async with Api(world["srv"], None) as anonymous:
        assert (await anonymous.shared(tid)).status_code in (401, 404)
        assert (await anonymous.thread(tid)).status_code == 401


async def test_second_user_cannot_rate_or_unrate_her_messages(world, unchanged):
    async with Api(world["srv"], world["tokens"][BOB]) as api:
        for step_id in (world["answer_id"], world["question_id"]):
            r = await api.rate(step_id, 1, "bob was here")
            assert r.status_code != 200, r.text
        await api.unrate(world["feedback_id"])  # Chainlit answers success either way; nothing changes


async def test_second_user_cannot_fetch_her_files(world, unchanged):
    url = world["element"]["url"]
    async with Api(world["srv"], world["tokens"][BOB]) as api:
        r = await api.file(url)
        assert r.status_code == 404 and r.content == b"Not found."
    async with Api(world["srv"], None) as anonymous:
        assert (await anonymous.file(url)).status_code == 401
    async with Api(world["srv"], "not-a-valid-token") as forged:
        assert (await forged.file(url)).status_code == 401


async def test_second_user_cannot_resume_her_thread_over_the_socket(world, unchanged):
    chat = Chat(world["srv"], world["tokens"][BOB], thread_id=world["thread_id"], name="Bob")
    try:
        await chat.connect()
    except socketio.exceptions.ConnectionError:
        return  # refused outright: fine
    try:
        kinds = [ev for ev, _ in chat.events]
        assert "resume_thread" not in kinds and "resume_thread_error" in kinds
        assert SECRET not in repr(chat.events)
        events, _ = await chat.turn("hello from bob")
        # Bob's message went to a new thread of his own, not hers
        assert thread_of(chat.events) not in (None, world["thread_id"])
        assert SECRET not in repr(chat.events)
    finally:
        await chat.sio.disconnect()
    store = SQLiteStore(world["srv"].data_dir)
    try:
        bob_id = store.get_user_by_email(BOB).id
        convs = store.list_conversations(bob_id).items
        assert world["thread_id"] not in [c.id for c in convs]
        assert "hello from bob" in [m.content for c in convs for m in store.list_messages(c.id, bob_id).items]
    finally:
        store.close()


async def test_second_user_cannot_reach_her_conversation_with_commands(world, unchanged):
    tid = world["thread_id"]
    async with Chat(world["srv"], world["tokens"][BOB], name="Bob") as chat:
        (reply,) = said((await chat.turn(f"/select {tid}"))[0])
        assert reply["output"] == "No conversation with that id."
        assert not [e for e in chat.events if e[0] == "resume_thread"]
        (reply,) = said((await chat.turn("/search purple lighthouse"))[0])
        assert SECRET not in reply["output"] and tid not in reply["output"]
        (reply,) = said((await chat.turn("/export"))[0])
        assert "nothing to export" in reply["output"].lower()
        await chat.turn("bob's own message")  # his own conversation, then the commands act on it only
        events, _ = await chat.turn("/export json")
        files = [d for ev, d in events if ev == "element"]
        assert files and all(f["forId"] == said(events)[-1]["id"] for f in files)
        await chat.turn(f"/rename {tid}")  # the argument is a title, never a conversation id
        await chat.turn("/delete")
        (reply,) = said((await chat.turn("/delete confirm"))[0])
        assert reply["output"].startswith("Deleted **")
        assert SECRET not in repr(chat.events)

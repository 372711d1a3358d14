"""Chainlit's history over our store, end to end: the real ``chainlit run app.py`` with the real model.

Alice chats (with an image), then uses the history the way the browser does:
Chainlit's REST API lists her threads (``POST /project/threads``), opens one
(``GET /project/thread/<id>``), renames it, rates an answer (``PUT
/feedback``). The server restarts on the same data directory and everything is
still there (thread, messages, rating, image). She resumes the thread over
socket.io exactly like the browser's "resume" (``threadId`` in the connection,
then ``connection_successful``) and the conversation goes on in the same
stored conversation (the model's memory). Finally she deletes it: gone from
the list, the thread is 404, and so is its image.
"""
from __future__ import annotations

import pytest

from argus.store import NotFound, SQLiteStore
from tests.support.live_server import Api, Chat, history_env, png, said, serve, sign_in, sign_up, thread_of

pytestmark = pytest.mark.e2e

ALICE = "alice@example.com"


async def test_history_lists_renames_rates_survives_a_restart_resumes_and_deletes(tmp_path):
    env = history_env(tmp_path, ARGUS_MAX_NEW_TOKENS="8")
    image = png()

    # ---- first life of the server: chat, then the history API ----------------------------
    with serve(tmp_path, env, "first") as srv:
        sign_up(srv, ALICE, "Alice")
        token = sign_in(srv, ALICE)
        async with Chat(srv, token, name="Alice") as chat:
            upload = await chat.upload("red.png", image, "image/png")
            first_events, q1 = await chat.turn("Hello! My name is Alice and I like red.", files=[upload])
            thread_id = thread_of(chat.events)
            assert thread_id
            second_events, q2 = await chat.turn("What is my name?")
            answer_ids = [said(ev)[-1]["id"] for ev in (first_events, second_events)]
            (help_reply,) = said((await chat.turn("/help"))[0])  # commands are not history
            assert "/export [md|json]" in help_reply["output"] and "/delete" in help_reply["output"]

        async with Api(srv, token) as api:
            r = await api.threads()
            assert r.status_code == 200, r.text
            (listed,) = r.json()["data"]
            assert listed["id"] == thread_id and listed["name"] == "Hello! My name is Alice and I like red."
            assert listed["userIdentifier"] == ALICE
            assert [t["id"] for t in (await api.threads(search="MY NAME")).json()["data"]] == [thread_id]
            assert (await api.threads(search="zebra")).json()["data"] == []

            r = await api.thread(thread_id)
            assert r.status_code == 200, r.text
            thread = r.json()
            assert thread["userIdentifier"] == ALICE and thread["name"] == listed["name"]
            assert [(s["id"], s["type"]) for s in thread["steps"]] == [
                (q1, "user_message"), (answer_ids[0], "assistant_message"),
                (q2, "user_message"), (answer_ids[1], "assistant_message"),
            ]  # the browser's step ids are our message ids: no duplicates, no command steps
            (element,) = thread["elements"]
            assert element["forId"] == q1 and element["type"] == "image" and element["name"] == "red.png"
            r = await api.file(element["url"])
            assert r.status_code == 200 and r.content == image and r.headers["content-type"] == "image/png"

            assert (await api.rename(thread_id, "Alice's intro")).status_code == 200
            r = await api.rate(answer_ids[1], 1, "spot on")
            assert r.status_code == 200, r.text
            feedback_id = r.json()["feedbackId"]

    # ---- second life: same data directory -----------------------------------------------------
    with serve(tmp_path, env, "second") as srv:
        token = sign_in(srv, ALICE)
        async with Api(srv, token) as api:
            (listed,) = (await api.threads()).json()["data"]
            assert (listed["id"], listed["name"]) == (thread_id, "Alice's intro")
            thread = (await api.thread(thread_id)).json()
            steps = {s["id"]: s for s in thread["steps"]}
            assert set(steps) == {q1, q2, *answer_ids}
            assert steps[answer_ids[1]]["feedback"] == {
                "id": feedback_id, "forId": answer_ids[1], "value": 1, "comment": "spot on",
            }
            (element,) = thread["elements"]
            assert (await api.file(element["url"])).content == image

        # resume it over socket.io, as the browser does, and go on chatting
        async with Chat(srv, token, thread_id=thread_id, name="Alice") as chat:
            kinds = [ev for ev, _ in chat.events]
            assert "resume_thread_error" not in kinds
            resumed = next(d for ev, d in chat.events if ev == "resume_thread")
            assert [s["id"] for s in resumed["steps"]] == [s["id"] for s in thread["steps"]]
            assert any(d["thread_id"] == thread_id for ev, d in chat.events if ev == "first_interaction")
            events, q3 = await chat.turn("Thanks! Please say my name again.")
            assert said(events) and said(events)[-1]["output"].strip()
            assert thread_of(chat.events) == thread_id  # no new thread was started

        store = SQLiteStore(srv.data_dir)
        try:
            uid = store.get_user_by_email(ALICE).id
            (conv,) = store.list_conversations(uid).items  # the same conversation: the model's memory
            msgs = list(reversed(store.list_messages(conv.id, uid).items))
            assert conv.id == thread_id and len(msgs) == 6
            assert [m.content for m in msgs if m.role == "user"] == [
                "Hello! My name is Alice and I like red.", "What is my name?", "Thanks! Please say my name again.",
            ]
            assert msgs[4].id == q3 and msgs[5].role == "assistant"
            attachment_id = msgs[0].attachment_ids[0]
        finally:
            store.close()

        # delete: gone from the list, the thread and its image are 404
        async with Api(srv, token) as api:
            assert (await api.delete(thread_id)).status_code == 200
            assert (await api.threads()).json()["data"] == []
            assert (await api.thread(thread_id)).status_code == 404
            assert (await api.file(element["url"])).status_code == 404
        store = SQLiteStore(srv.data_dir)
        try:
            with pytest.raises(NotFound):
                store.get_conversation(thread_id, uid)
            with pytest.raises(NotFound):
                store.get_attachment(attachment_id, uid)
        finally:
            store.close()


async def test_select_resumes_a_conversation_in_the_current_chat(tmp_path):
    """``/select <id>`` moves the open chat to that thread like the sidebar does
    (``first_interaction`` + ``resume_thread``); ``/new`` starts a separate thread."""
    env = history_env(tmp_path, ARGUS_MODEL_PATH="/nonexistent/model.gguf")  # answers at once, with the load error
    with serve(tmp_path, env) as srv:
        sign_up(srv, ALICE, "Alice")
        token = sign_in(srv, ALICE)
        async with Chat(srv, token) as chat:
            await chat.turn("First conversation")
            first = thread_of(chat.events)
            (reply,) = said((await chat.turn("/new"))[0])
            assert "new conversation" in reply["output"]
            await chat.turn("Second conversation")
            second = thread_of(chat.events)
            assert second and second != first
            mark = len(chat.events)
            (reply,) = said((await chat.turn(f"/select {first}"))[0])
            assert f"(/thread/{first})" in reply["output"] and "First conversation" in reply["output"]
            resumed = next(d for ev, d in chat.events[mark:] if ev == "resume_thread")
            assert resumed["id"] == first and resumed["steps"][0]["output"] == "First conversation"
            assert thread_of(chat.events) == first
            await chat.turn("Back in the first one")
        async with Api(srv, token) as api:
            listed = {t["id"]: t["name"] for t in (await api.threads()).json()["data"]}
            assert listed == {first: "First conversation", second: "Second conversation"}
            outputs = [s["output"] for s in (await api.thread(first)).json()["steps"] if s["type"] == "user_message"]
            assert outputs == ["First conversation", "Back in the first one"]

"""JarvisArgus without a browser: the real model, a real SQLiteStore, a real Chainlit context.

The harness (``Chat``, ``RecordingEmitter``…) is ``tests/support/chat_harness.py``. The
model is the real one (``LocalModel.load()``, once per test session via
``conftest.local_model``). A slow load is modelled by a loader that waits on a
``threading.Event`` before returning that real model.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable, Optional

import pytest

from argus.chat.hooks import JarvisArgus
from argus.chat.replies import COMMANDS_PER_MINUTE
from argus.chat.sentences import MAX_MESSAGE_CHARS, STOPPED_MARK, WAITING_FOR_SLOT, token_limit_mark, too_long_message
from argus.datalayer import KIND_ANSWER, KIND_COMMAND, KIND_KEY, KIND_NOTICE
from argus.store import StoreUnavailable
from tests.support.chat_harness import TIMEOUT, Chat, make_settings, rows, settle, wait_until
from worker.engine import ModelLoadError, SamplingParams


@pytest.fixture
def make_argus(tmp_path, monkeypatch, store, local_model):
    """``make_argus(loader=None, max_generations=2, **settings)`` → a started JarvisArgus."""

    def make(loader: Optional[Callable] = None, max_generations: int = 2, **overrides) -> JarvisArgus:
        settings = make_settings(tmp_path, monkeypatch, **overrides)
        argus = JarvisArgus(
            settings, store=store, model_loader=loader or (lambda: local_model), max_generations=max_generations
        )
        argus.start()
        return argus

    return make


# ---- pure helpers -------------------------------------------------------------------
def test_sampling_params_follow_the_settings(make_argus):
    argus = make_argus(temperature=0.3, top_k=7, top_p=0.5, repetition_penalty=1.3, max_new_tokens=99)
    assert argus.sampling_params() == SamplingParams(
        temperature=0.3, top_k=7, top_p=0.5, repetition_penalty=1.3, max_tokens=99
    )


def test_rate_limit_messages(make_argus):
    argus = make_argus(messages_per_minute=3)
    assert argus.rate_limit_message(41.2) == (
        "You're sending messages too fast (limit: 3 per minute); please wait 42 seconds and try again."
    )
    assert "please wait 1 second and" in argus.rate_limit_message(0.01)
    assert "please wait 1 minute and" in argus.rate_limit_message(59.99)
    assert argus.rate_limit_message(5, commands=True) == (
        f"You're sending commands too fast (limit: {COMMANDS_PER_MINUTE} per minute); "
        "please wait 5 seconds and try again."
    )


async def test_history_oldest_first_without_errors_or_empty_rows(make_argus, store, alice):
    argus = make_argus()
    conv = store.create_conversation(alice.id, "t", "m")
    add = lambda role, text, status="complete": store.add_message(conv.id, alice.id, role, text, status=status)  # noqa: E731
    add("user", "one")
    add("assistant", "uno")
    add("user", "two")
    add("assistant", "", status="stopped")  # stopped before answering
    add("user", "three")
    add("assistant", "the model file is missing", status="error")
    add("user", "four")
    add("assistant", "quatre (partial)", status="stopped")
    assert await argus.history.messages(conv.id, alice.id) == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "uno"},
        {"role": "user", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "user", "content": "four"},
        {"role": "assistant", "content": "quatre (partial)"},
    ]


async def test_history_ends_at_the_message_being_answered(make_argus, store, alice):
    argus = make_argus()
    conv = store.create_conversation(alice.id, "t", "m")
    store.add_message(conv.id, alice.id, "user", "first")
    store.add_message(conv.id, alice.id, "assistant", "first answer")
    me = store.add_message(conv.id, alice.id, "user", "second")
    store.add_message(conv.id, alice.id, "assistant", "", status="stopped")  # my placeholder
    store.add_message(conv.id, alice.id, "user", "third, sent while second waited")
    assert await argus.history.messages(conv.id, alice.id, upto=me.id) == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second"},
    ]


# ---- the chat, with the real model ----------------------------------------------------
async def test_message_is_answered_by_the_real_model_and_stored(make_argus, store, alice, local_model):
    argus = make_argus()
    chat = Chat(argus, alice)
    await chat.start()
    assert chat.emitter.events[0][0] == "set_commands"
    await chat.turn("What is the capital of France?")
    _, start = await chat.wait_for(lambda e: e[0] == "stream_start", 1)
    tokens = [d["token"] for kind, d in chat.emitter.events if kind == "token"]
    final = [d for kind, d in chat.emitter.events if kind == "send" and d["id"] == start["id"]]
    assert len(final) == 1 and final[0]["output"] == start["output"] + "".join(tokens) + "\n\n" + token_limit_mark(6)
    (conv,) = store.list_conversations(alice.id).items
    msgs = list(reversed(store.list_messages(conv.id, alice.id).items))
    assert [(m.role, m.status) for m in msgs] == [("user", "complete"), ("assistant", "complete")]
    assert msgs[0].content == "What is the capital of France?"
    assert msgs[1].content == final[0]["output"] and msgs[1].content.strip()
    assert msgs[1].model == local_model.model_id
    assert conv.title == "What is the capital of France?"
    await wait_until(lambda: argus.slots.free == 2)  # the slot is back once the generation thread ends


async def test_too_long_message_is_refused_before_anything_is_stored(make_argus, store, alice):
    argus = make_argus(messages_per_minute=1)
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("x" * (MAX_MESSAGE_CHARS + 1))
    assert chat.said() == [too_long_message(MAX_MESSAGE_CHARS + 1)]
    assert "16,001 characters; the limit is 16,000" in chat.said()[0]
    assert store.list_conversations(alice.id).items == []
    assert argus.limiter.retry_after(alice.id) == 0.0  # the refused message used no rate-limit slot
    # exactly at the limit is accepted (a command, so the model is not needed)
    await chat.turn("/help" + " " * (MAX_MESSAGE_CHARS - len("/help")))
    assert "**Commands**" in chat.said()[-1]


async def test_commands_are_rate_limited_too(make_argus, store, alice):
    argus = make_argus()
    chat = Chat(argus, alice)
    await chat.start()
    for _ in range(COMMANDS_PER_MINUTE):
        await chat.turn("/new")
    assert all(t.startswith("Started a new conversation") for t in chat.said())
    await chat.turn("/convs")
    assert chat.said()[-1].startswith(f"You're sending commands too fast (limit: {COMMANDS_PER_MINUTE} per minute)")
    assert argus.limiter.retry_after(alice.id) == 0.0  # chat messages are counted separately


async def test_store_down_is_one_sentence(make_argus, store, alice):
    argus = make_argus()

    def down(*a, **k):
        raise StoreUnavailable("disk I/O error")

    store.create_conversation = down  # the store fails while the message is being stored
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("Hello?")
    assert chat.said() == ["I can't reach the database right now, so nothing was saved; please try again in a moment."]


async def test_stop_while_the_model_loads_keeps_the_message(make_argus, store, alice, local_model):
    release = threading.Event()

    def slow_load():  # a slow load of the real model
        assert release.wait(TIMEOUT)
        return local_model

    argus = make_argus(loader=slow_load)
    try:
        chat = Chat(argus, alice)
        await chat.start()
        task = chat.send("Remember the number 42.")
        # stop as soon as the message is stored (the model is still loading)
        await wait_until(lambda: bool(store.list_conversations(alice.id).items))
        await chat.stop()
        await settle([task])
        assert task.cancelled()
        assert rows(store, alice) == [("user", "complete", "Remember the number 42."), ("assistant", "stopped", "")]

        # a stop that lands while the message is still being stored keeps it too
        task = chat.send("Second message.")
        await asyncio.sleep(0)  # on_message has started: it is storing the message in a thread
        await chat.stop()
        await settle([task])
        assert rows(store, alice)[2:] == [("user", "complete", "Second message."), ("assistant", "stopped", "")]
    finally:
        release.set()

    # once loaded, the real model answers, with the kept messages in its history
    await chat.turn("And now?")
    msgs = list(reversed(store.list_messages(store.list_conversations(alice.id).items[0].id, alice.id).items))
    assert [(m.role, m.status) for m in msgs][4:] == [("user", "complete"), ("assistant", "complete")]
    assert msgs[5].content.strip() and msgs[5].model == local_model.model_id
    history = await argus.history.messages(msgs[0].conversation_id, alice.id, upto=msgs[4].id)
    assert [h["content"] for h in history] == ["Remember the number 42.", "Second message.", "And now?"]


async def test_stop_keeps_a_message_queued_behind_a_running_answer(make_argus, store, alice):
    argus = make_argus(max_new_tokens=200)
    chat = Chat(argus, alice)
    await chat.start()
    a = chat.send("Write a very long story about a dragon.")
    await chat.wait_for(lambda e: e[0] == "token")  # A is streaming
    b = chat.send("And one about a knight.")  # B waits for A (same session)
    await wait_until(lambda: len(rows(store, alice)) == 3)  # B is stored at once
    await chat.stop()  # Chainlit cancels B (the newest task); on_stop stops A
    await settle([a, b])
    (ua, aa, ub, ab) = rows(store, alice)
    assert ua == ("user", "complete", "Write a very long story about a dragon.")
    assert aa[:2] == ("assistant", "stopped") and aa[2].strip()  # A's partial answer, in its place
    assert ub == ("user", "complete", "And one about a knight.")
    assert ab == ("assistant", "stopped", "")  # B: stopped before answering
    shown = [t for t in chat.said() if t.endswith(STOPPED_MARK)]
    assert len(shown) == 1 and shown[0].startswith(aa[2].strip()[:10])
    await wait_until(lambda: argus.slots.free == 2)


async def test_queued_messages_are_answered_in_order(make_argus, store, alice):
    argus = make_argus(max_new_tokens=4)
    chat = Chat(argus, alice)
    await chat.start()
    a = chat.send("Hi, my name is Alice.")
    await wait_until(lambda: bool(store.list_conversations(alice.id).items))
    b = chat.send("What is my name?")
    await settle([a, b])
    assert not a.cancelled() and not b.cancelled()
    (conv,) = store.list_conversations(alice.id).items
    msgs = list(reversed(store.list_messages(conv.id, alice.id).items))
    assert [(m.role, m.status) for m in msgs] == [("user", "complete"), ("assistant", "complete")] * 2
    assert msgs[0].content == "Hi, my name is Alice." and msgs[2].content == "What is my name?"
    assert msgs[1].content.strip() and msgs[3].content.strip()
    # B's history: A's question and answer, then B (nothing stored after B)
    history = await argus.history.messages(conv.id, alice.id, upto=msgs[2].id)
    assert history == [
        {"role": "user", "content": msgs[0].content},
        {"role": "assistant", "content": msgs[1].content},
        {"role": "user", "content": msgs[2].content},
    ]
    answers = [d["output"] for kind, d in chat.emitter.events if kind == "send" and d["type"] == "assistant_message"]
    assert answers == [msgs[1].content, msgs[3].content]  # shown in order too


async def test_generation_slots_cap_parallel_answers(make_argus, store, alice, bob):
    argus = make_argus(max_generations=1, max_new_tokens=200)
    first, second = Chat(argus, alice), Chat(argus, bob)
    await first.start()
    await second.start()
    a = first.send("Write a very long story about a dragon.")
    await first.wait_for(lambda e: e[0] == "token")  # alice holds the only slot
    b = second.send("Write a poem.")
    _, note = await second.wait_for(lambda e: e[0] == "send" and e[1]["output"] == WAITING_FOR_SLOT)
    assert not [e for e in second.emitter.events if e[0] == "stream_start"]
    await second.stop()  # bob stops while waiting: his message stays, marked stopped
    await settle([b])
    assert b.cancelled()
    assert note["id"] in [d["id"] for k, d in second.emitter.events if k == "delete"]
    assert rows(store, bob) == [("user", "complete", "Write a poem."), ("assistant", "stopped", "")]
    assert not a.done()  # alice's answer goes on

    c = second.send("Write a short poem.")
    _, note = await second.wait_for(lambda e: e[0] == "send" and e[1]["output"] == WAITING_FOR_SLOT and e[1]["id"] != note["id"])
    await first.stop()  # frees the slot: bob's answer starts, the note goes away
    await settle([a])
    await second.wait_for(lambda e: e[0] == "stream_start")
    kinds = [(k, d["id"]) for k, d in second.emitter.events if isinstance(d, dict)]
    assert kinds.index(("delete", note["id"])) < [k for k, _ in kinds].index("stream_start")
    await second.stop()
    await settle([c])
    assert rows(store, bob)[2][2] == "Write a short poem." and rows(store, bob)[3][:2] == ("assistant", "stopped")
    await wait_until(lambda: argus.slots.free == 1)


async def test_a_failing_browser_socket_still_saves_the_partial_answer(make_argus, store, alice):
    argus = make_argus(max_new_tokens=200)
    chat = Chat(argus, alice)
    await chat.start()
    chat.emitter.fail_tokens_after = 2  # stream_start + 2 tokens reach the browser, then the socket dies
    await chat.turn("Write a very long story about a dragon.")
    (user, answer) = rows(store, alice)
    assert answer[:2] == ("assistant", "error")
    streamed = "".join(d["token"] for k, d in chat.emitter.events if k == "token")
    started = next(d["output"] for k, d in chat.emitter.events if k == "stream_start")
    assert answer[2].startswith(started + streamed) and len(answer[2]) > len(started + streamed)
    await wait_until(lambda: argus.slots.free == 2)


# ---- Chainlit threads: conversation id = thread id, /new, /select, resume ----------------
def no_model():
    raise ModelLoadError("The model file /nowhere.gguf does not exist.")


async def test_conversation_and_message_ids_are_chainlits_thread_and_step_ids(make_argus, store, alice):
    argus = make_argus(loader=no_model)
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("Hello")
    (conv,) = store.list_conversations(alice.id).items
    assert conv.id == chat.session.thread_id
    (answer,) = [d for k, d in chat.emitter.events if k == "send" and d["type"] == "assistant_message"]
    assert answer["metadata"] == {KIND_KEY: KIND_ANSWER}
    assert [m.id for m in store.list_messages(conv.id, alice.id).items][0] == answer["id"]


async def test_replies_and_notices_are_marked_so_the_data_layer_skips_them(make_argus, store, alice):
    argus = make_argus(loader=no_model)
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("/help")
    await chat.turn("x" * (MAX_MESSAGE_CHARS + 1))
    kinds = [d["metadata"].get(KIND_KEY) for k, d in chat.emitter.events if k == "send"]
    assert kinds == [KIND_COMMAND, KIND_NOTICE]


async def test_new_moves_the_chat_to_a_new_thread(make_argus, store, alice):
    argus = make_argus(loader=no_model)
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("First")
    first = chat.session.thread_id
    chat.session.has_first_interaction = True  # as Chainlit sets it on the first message
    await chat.turn("/new")
    assert chat.session.thread_id != first
    assert chat.session.has_first_interaction is False  # Chainlit announces the new thread with the next message
    await chat.turn("Second")
    convs = {c.id: c.title for c in store.list_conversations(alice.id).items}
    assert convs == {first: "First", chat.session.thread_id: "Second"}


async def test_select_shows_the_conversation_like_a_resume_and_continues_it(make_argus, store, alice):
    argus = make_argus(loader=no_model)
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("First")
    first = chat.session.thread_id
    await chat.turn("/new")
    await chat.turn("Second")
    mark = len(chat.emitter.events)
    await chat.turn(f"/select {first}")
    assert chat.session.thread_id == first and chat.session.has_first_interaction
    after = chat.emitter.events[mark:]
    names = [k for k, _ in after]
    assert names.index("first_interaction") < names.index("resume_thread") < names.index("send")  # reply last
    resumed = next(d for k, d in after if k == "resume_thread")
    assert resumed["id"] == first and [s["output"] for s in resumed["steps"]][0] == "First"
    await chat.turn("First, again")
    assert [r[2] for r in rows(store, alice, first) if r[0] == "user"] == ["First", "First, again"]


async def test_resume_continues_the_stored_conversation(make_argus, store, alice):
    argus = make_argus(loader=no_model)
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("Remember the number 42.")
    conv_id = chat.session.thread_id
    thread = await chat.spawn(lambda: argus.data_layer.get_thread(conv_id))

    later = Chat(argus, alice)  # another tab, another day: resumed from the history
    await later.resume(thread)
    assert later.emitter.events[0][0] == "set_commands"
    await later.turn("What was the number?")
    assert [r[2] for r in rows(store, alice, conv_id) if r[0] == "user"] == [
        "Remember the number 42.", "What was the number?",
    ]
    history = await argus.history.messages(conv_id, alice.id)
    assert history[0] == {"role": "user", "content": "Remember the number 42."}


async def test_a_thread_that_is_not_the_users_is_never_written(make_argus, store, alice, bob):
    argus = make_argus(loader=no_model)
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("Alice's secret")
    alices = chat.session.thread_id
    thread = await chat.spawn(lambda: argus.data_layer.get_thread(alices))

    intruder = Chat(argus, bob)
    await intruder.resume(thread)  # even if on_chat_resume were called with her thread
    await intruder.turn("Bob writes")
    assert intruder.session.thread_id != alices
    assert [r[2] for r in rows(store, alice, alices)] == ["Alice's secret", "The model file /nowhere.gguf does not exist."]

    # a browser asking to resume a thread it may not see: Chainlit starts a new chat with that
    # id (the resume failed); the chat gets a fresh thread instead
    other = Chat(argus, bob)
    other.session.thread_id = other.session.thread_id_to_resume = alices
    await other.start()
    assert other.session.thread_id != alices
    await other.turn("Bob again")
    assert len(rows(store, alice, alices)) == 2

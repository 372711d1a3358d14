"""What an answer tells its reader (issue 12): a note when the token limit cut it (all three
back-ends), and a notice when someone writes Persian to the local model, which cannot.

Chat-level tests run JarvisArgus with the real local model, a real SQLiteStore and the
Chainlit harness (tests/support/chat_harness.py); the network back-end is driven by a
scripted stand-in for the daemon's ``infer``; the remote providers' finish reasons are
mapped by ``hit_token_limit``.
"""
from __future__ import annotations

from typing import Optional

import pytest

from argus.catalogue import ModelSpec
from argus.chat.answering import Shown, classify, writes_persian
from argus.chat.backends import Streamed
from argus.chat.backends.local import model_messages
from argus.chat.backends.network import NETWORK_PROVIDER, NetworkBackend, network_model_id
from argus.chat.backends.remote import hit_token_limit
from argus.chat.hooks import JarvisArgus
from argus.chat.intake import Turn
from argus.chat.sentences import (
    EMPTY_ANSWER,
    STOPPED_MARK,
    token_limit_mark,
    weak_persian_notice,
    without_token_limit_mark,
)
from argus.store.base import Message
from argus.streaming import StreamResult
from tests.support.chat_harness import Chat, make_settings, rows

PERSIAN = "سلام! پایتخت فرانسه کجاست؟"
TURN = Turn(conv_id="c", user_id="u", message_id="m")


@pytest.fixture
def make_argus(tmp_path, monkeypatch, store, local_model):
    """``make_argus(**settings)`` → a started JarvisArgus with the real local model."""

    def make(**overrides) -> JarvisArgus:
        argus = JarvisArgus(make_settings(tmp_path, monkeypatch, **overrides), store=store,
                            model_loader=lambda: local_model)
        argus.start()
        return argus

    return make


# ---- the note under an answer the token limit cut -------------------------------------------
def test_the_token_limit_mark_names_the_limit_and_comes_off_again():
    mark = token_limit_mark(512)
    assert mark == "_(cut at the 512-token limit; ask me to continue)_"
    assert token_limit_mark(4096) == "_(cut at the 4,096-token limit; ask me to continue)_"
    assert without_token_limit_mark(f"Paris is\n\n{mark}") == "Paris is"
    assert without_token_limit_mark(f"I wrote {mark} myself") == f"I wrote {mark} myself"  # only a trailing note


@pytest.mark.parametrize("retryable", [False, True], ids=["local", "remote-or-network"])
def test_a_complete_answer_cut_at_the_limit_is_stored_and_shown_with_the_note(retryable):
    s = Streamed(StreamResult(text="The capital of", pieces=3), "m", cut_at=512, retryable=retryable)
    out = classify(s, TURN)
    expected = f"The capital of\n\n{token_limit_mark(512)}"
    assert (out.stored, out.shown, out.status) == (expected, expected, "complete")


@pytest.mark.parametrize("retryable", [False, True], ids=["local", "remote-or-network"])
def test_no_note_when_the_answer_ended_by_itself_was_stopped_or_is_empty(retryable):
    done = classify(Streamed(StreamResult(text="Paris.", pieces=1), "m", retryable=retryable), TURN)
    assert (done.stored, done.shown) == ("Paris.", "Paris.")
    stopped = classify(Streamed(StreamResult(text="Par", status="stopped", pieces=1), "m", cut_at=512,
                                retryable=retryable), TURN)
    assert (stopped.stored, stopped.shown) == ("Par", f"Par\n\n{STOPPED_MARK}")
    empty = classify(Streamed(StreamResult(text="", pieces=0), "m", cut_at=512, retryable=retryable), TURN)
    assert empty == Shown("", EMPTY_ANSWER, "complete")


@pytest.mark.parametrize("reason, cut", [
    ("length", True), ("max_tokens", True), ("MAX_TOKENS", True),  # OpenAI, Anthropic, Gemini
    ("stop", False), ("end_turn", False), ("STOP", False), ("SAFETY", False), (None, False),
])
def test_the_providers_finish_reasons_that_mean_the_token_limit(reason, cut):
    assert hit_token_limit(reason) is cut


def test_the_model_reads_its_earlier_answers_without_the_note():
    def row(role: str, content: str) -> Message:
        return Message(id=role + content[:3], conversation_id="c", owner_id="u", role=role, content=content,
                       status="complete", model="m", created_at=0.0)

    history = model_messages([row("user", "Tell me a story"), row("assistant", f"Once upon\n\n{token_limit_mark(6)}"),
                              row("user", "continue")])
    assert history == [{"role": "user", "content": "Tell me a story"},
                       {"role": "assistant", "content": "Once upon"}, {"role": "user", "content": "continue"}]


async def test_a_local_answer_cut_at_the_token_limit_says_so_and_keeps_the_note(make_argus, store, alice):
    argus = make_argus(max_new_tokens=6)
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("Tell me a long story about a dragon.")
    answer = chat.said()[-1]
    assert answer.endswith("\n\n" + token_limit_mark(6)) and answer[: -len(token_limit_mark(6))].strip()
    assert rows(store, alice)[-1] == ("assistant", "complete", answer)  # stored with the note, status complete


async def test_a_local_answer_that_ended_by_itself_has_no_note(make_argus, store, alice):
    argus = make_argus(max_new_tokens=48)  # greedy: "The capital of France is Paris." and the end-of-turn token
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("What is the capital of France?")
    assert "Paris" in chat.said()[-1] and "token limit" not in chat.said()[-1]
    assert "token limit" not in rows(store, alice)[-1][2]


class _Daemon:
    """The daemon's ``infer`` for the network back-end: plays ``script`` (response payloads)."""

    def __init__(self, script: list[dict]):
        self.script = script

    async def call(self, command: str, **args):
        return {"node_id": "admin", "networks": [{"network_id": "lab1", "name": "lab", "role": "admin"}]}

    async def infer(self, network_id, conversation_key, input_ids, max_length, sampling=None):
        for item in self.script:
            yield item


class _Choice:
    def current_network(self) -> Optional[str]:
        return "lab1"


def _reply(text: str, done: bool = False, finish: Optional[str] = None) -> dict:
    return {"token_id": None if done else 7, "text": text, "done": done, "finish_reason": finish,
            "usage": {"prompt_tokens": 30, "completion_tokens": 4} if done else None}


@pytest.mark.parametrize("finish, max_new, cut_at", [
    ("length", 4, 4),  # the max-new-tokens limit
    ("stop", 4, None),  # the model ended it
    ("length", 100_000, None),  # the context window's end: its own notice instead
])
async def test_the_network_reports_the_token_limit_from_its_last_response(store, local_model, finish, max_new, cut_at):
    class Settings:
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, model_path = max_new, 0.0, 0, 1.0, 1.0, None

    backend = NetworkBackend(Settings(), store, {"daemon": _Daemon([_reply("The"), _reply(" capital", True, finish)]),
                                                 "network_choice": _Choice()}, loaded_model=lambda: local_model)
    spec = ModelSpec(provider=NETWORK_PROVIDER, id=network_model_id("lab1"), label="SmolLM2 on network lab", kind="chat")
    stream = backend.stream_chat(spec, [{"role": "user", "content": "Hi"}], "conv")
    assert await stream.collect() == "The capital"
    assert stream.cut_at == cut_at
    assert (stream.notice is not None) == (finish == "length" and cut_at is None)


# ---- Persian to the local model ---------------------------------------------------------------
@pytest.mark.parametrize("text, persian", [
    (PERSIAN, True), ("مرحبا، كيف حالك؟", True),  # Persian; Arabic script
    ("What does سلام mean in English?", False),  # one word inside an English question
    ("What is the capital of France?", False), ("12 + 30 = ?", False), ("", False),
])
def test_persian_is_told_by_its_script(text, persian):
    assert writes_persian(text) is persian


def test_the_persian_notice_suggests_a_remote_model_when_there_is_one():
    assert "**Gemini 2.5 Flash**" in weak_persian_notice("Gemini 2.5 Flash")
    assert "administrator" in weak_persian_notice(None) and "**" not in weak_persian_notice(None)
    assert "Persian poorly" in weak_persian_notice(None)


async def test_persian_to_the_local_model_gets_one_notice_per_conversation(make_argus, alice):
    argus = make_argus(max_new_tokens=2)
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn(PERSIAN)
    notice = weak_persian_notice(None)
    assert chat.said().count(notice) == 1
    assert chat.said().index(notice) < len(chat.said()) - 1  # said before the answer
    await chat.turn("هوا امروز چطور است؟")
    assert chat.said().count(notice) == 1  # not again in the same conversation
    await chat.turn("/new")
    await chat.turn(PERSIAN)
    assert chat.said().count(notice) == 2  # a new conversation is told again


async def test_english_to_the_local_model_gets_no_persian_notice(make_argus, alice):
    argus = make_argus(max_new_tokens=2)
    chat = Chat(argus, alice)
    await chat.start()
    await chat.turn("What does سلام mean?")
    assert not any("Persian poorly" in t for t in chat.said())

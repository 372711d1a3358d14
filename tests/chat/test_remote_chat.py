"""The chat with remote models: JarvisArgus + the key pool + the real google-genai SDK against
the Gemini fake on 127.0.0.1 (tests/support/fakes), a real SQLiteStore, the real local model for
fallbacks, and a real Chainlit context (tests/support/chat_harness's Chat and recording emitter).

Covers: streaming with history and images, failover before the first token, invalid keys
(disabled, admins told), mid-stream failures (partial text kept, Retry), fallback to the
local model, the model picker, /keys (the key message never stored), /image and /video,
and a scan proving no key reaches a log, a transcript, a stored row or the browser.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import types
from pathlib import Path

import chainlit as cl
import pytest

from argus.commands.base import ADMIN_ONLY
from argus.chat.answering import RETRY_ACTION
from argus.chat.hooks import JarvisArgus
from argus.chat.sentences import INTERRUPTED_MARK
from argus.datalayer import KIND_KEY, KIND_NOTICE
from argus.providers import fingerprint
from tests.support.fakes.fixtures import anthropic_fake, gemini_fake, loopback_only, openai_fake  # noqa: F401
from tests.support.fakes.gemini_server import PNG_1X1, VIDEO_BYTES
from tests.support.chat_harness import TIMEOUT, Chat, RecordingEmitter, make_settings, rows, settle, wait_until

pytestmark = pytest.mark.usefixtures("loopback_only")

FLASH = "gemini-2.5-flash"
ANSWER = "Hello, world!"


class ElementEmitter(RecordingEmitter):
    """Also records the elements (images, videos, files) sent with messages."""

    async def send_element(self, element_dict):
        self._record("element", dict(element_dict))


class RemoteChat(Chat):
    def __init__(self, argus, user):
        super().__init__(argus, user)
        self.emitter = ElementEmitter(self.session)

    def send_message(self, text: str, **fields) -> tuple[asyncio.Task, list[cl.Message]]:
        """Like Chainlit's ``client_message`` with more fields (elements); returns the task and,
        once it has started, the message (made in the chat's context, as Chainlit makes it)."""
        made: list[cl.Message] = []

        async def go():
            made.append(cl.Message(content=text, type="user_message", author=self.user.name, **fields))
            await self.argus.on_message(made[0])

        task = self.spawn(go)
        self.tasks.append(task)
        return task, made

    async def call(self, make_coro):
        await asyncio.wait_for(self.spawn(make_coro), TIMEOUT)

    def events(self, kind: str) -> list[dict]:
        return [d for k, d in self.emitter.events if k == kind]


@pytest.fixture
async def remote_argus(tmp_path, monkeypatch, store, local_model, gemini_fake):
    """``make(*behaviours, **settings)`` → (a started JarvisArgus whose environment holds one
    Gemini key per behaviour, pointed at the fake; the keys)."""
    from chainlit.config import FILES_DIRECTORY

    # an in-process Chainlit app shut down by an earlier test removes this directory (server.py lifespan)
    FILES_DIRECTORY.mkdir(parents=True, exist_ok=True)
    made: list[JarvisArgus] = []

    def make(*behaviours: str, **overrides) -> tuple[JarvisArgus, list[str]]:
        keys = [gemini_fake.key_for(b) for b in behaviours]
        settings = make_settings(
            tmp_path, monkeypatch, api_keys={"gemini": tuple(keys)} if keys else {},
            base_urls={"gemini": gemini_fake.url}, provider_timeout_s=10.0, **overrides,
        )
        argus = JarvisArgus(settings, store=store, model_loader=lambda: local_model)
        argus.start()
        made.append(argus)
        return argus, keys

    yield make
    for argus in made:  # one SDK client per key: closed in the test's own event loop
        await argus.remote.aclose()


def put_first(argus: JarvisArgus, first_key: str) -> None:
    """Make the pool hand out ``first_key`` before the others (the rest take one turn first)."""
    pool = argus.remote.pool
    pool.sync_env()
    spec = argus.remote.catalogue.get(FLASH)
    first_id = pool.key_id("gemini", first_key)
    while (lease := pool.acquire(spec, exclude=[first_id])) is not None and lease.key_id != first_id:
        if all(k.last_seq > 0 for k in pool.list() if k.id != first_id):
            break


def sent_keys(fake) -> list[str]:
    return [r.key for r in fake.find(":streamGenerateContent")]


def scan_for_keys(keys, *texts) -> list[str]:
    return [k for k in keys for t in texts if k and k in t]


async def resumed_elements(chat: RemoteChat, thread_id: str) -> list[tuple]:
    """(type, message id, attachment id) of the elements Chainlit gets when the thread is resumed."""
    got: list = []

    async def resume():
        got.append(await chat.argus.data_layer.get_thread(thread_id))

    await chat.call(resume)
    return [(e["type"], e["forId"], e["id"]) for e in got[0]["elements"]]


def raw_bytes(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file())


# ---- streaming, history, images -----------------------------------------------------------
async def test_gemini_streams_into_the_chat_with_history_and_usage(remote_argus, gemini_fake, store, alice):
    argus, (key,) = remote_argus("ok")
    chat = RemoteChat(argus, alice)
    await chat.start()
    await chat.turn("Hi there")
    (start,) = chat.events("stream_start")  # Chainlit opens the stream with the first piece
    assert [start["output"], *(d["token"] for d in chat.events("token"))] == ["Hello", ", ", "world", "!"]
    assert chat.said()[-1] == ANSWER
    await chat.turn("And again?")
    assert rows(store, alice) == [
        ("user", "complete", "Hi there"), ("assistant", "complete", ANSWER),
        ("user", "complete", "And again?"), ("assistant", "complete", ANSWER),
    ]
    (conv,) = store.list_conversations(alice.id).items
    assert {m.model for m in store.list_messages(conv.id, alice.id).items if m.role == "assistant"} == {FLASH}
    first, second = gemini_fake.find(":streamGenerateContent")
    assert f"/models/{FLASH}:streamGenerateContent" in second.path and second.headers["x-goog-api-key"] == key
    assert [(c["role"], c["parts"][0]["text"]) for c in second.json["contents"]] == [
        ("user", "Hi there"), ("model", ANSWER), ("user", "And again?"),
    ]
    (usage,) = store.list_api_usage()
    assert (usage.user_id, usage.model, usage.requests, usage.input_tokens, usage.output_tokens) == (
        alice.id, FLASH, 2, 24, 10,
    )


async def test_images_go_inline_to_a_vision_model(remote_argus, gemini_fake, store, alice):
    from tests.support.live_server import png  # a real PNG made with Pillow

    argus, _ = remote_argus("ok")
    chat = RemoteChat(argus, alice)
    await chat.start()
    picture = png()
    task, _ = chat.send_message("What is in this picture?", elements=[types.SimpleNamespace(name="cat.png", content=picture)])
    await asyncio.wait_for(task, TIMEOUT)
    assert chat.said()[-1] == ANSWER  # no "reads text only" note: the model reads images
    (req,) = gemini_fake.find(":streamGenerateContent")
    parts = req.json["contents"][-1]["parts"]
    inline = [p["inlineData"] for p in parts if "inlineData" in p]
    assert [(i.get("mimeType") or i.get("mime_type"), i["data"]) for i in inline] == [
        ("image/png", base64.b64encode(picture).decode())]  # (the SDK spells the MIME field snake_case)
    assert any(p.get("text") == "What is in this picture?" for p in parts)


async def chat_with_one_provider(tmp_path, monkeypatch, store, alice, local_model, provider, fake, base_url):
    """A chat on a server whose only keys are two of ``provider``'s (the first rate limited)."""
    keys = (fake.key_for("429"), fake.key_for("ok"))
    settings = make_settings(tmp_path, monkeypatch, api_keys={provider: keys}, base_urls={provider: base_url},
                             provider_timeout_s=10.0)
    argus = JarvisArgus(settings, store=store, model_loader=lambda: local_model)
    try:
        chat = RemoteChat(argus, alice)
        await chat.start()
        await chat.turn("Hi")
        await chat.turn("Tell me more")
        return chat, keys, argus.remote.pool
    finally:
        await argus.remote.aclose()


async def test_openai_answers_through_the_same_pool(tmp_path, monkeypatch, store, alice, local_model, openai_fake):
    chat, keys, pool = await chat_with_one_provider(
        tmp_path, monkeypatch, store, alice, local_model, "openai", openai_fake, openai_fake.url + "/v1")
    assert chat.said()[-2:] == [ANSWER, ANSWER]
    calls = openai_fake.find("/chat/completions")
    assert {r.key for r in calls} == set(keys) and calls[-1].json["model"] == "gpt-4o-mini"
    assert [m["role"] for m in calls[-1].json["messages"]] == ["user", "assistant", "user"]
    assert rows(store, alice)[-1] == ("assistant", "complete", ANSWER)
    assert store.get_api_key(pool.key_id("openai", keys[0])).last_error == "rate_limited"


async def test_claude_answers_through_the_same_pool(tmp_path, monkeypatch, store, alice, local_model, anthropic_fake):
    chat, keys, pool = await chat_with_one_provider(
        tmp_path, monkeypatch, store, alice, local_model, "anthropic", anthropic_fake, anthropic_fake.url)
    assert chat.said()[-2:] == [ANSWER, ANSWER]
    calls = anthropic_fake.find("/v1/messages")
    assert {r.key for r in calls} == set(keys) and calls[-1].json["model"] == "claude-sonnet-4-6"
    assert [m["role"] for m in calls[-1].json["messages"]] == ["user", "assistant", "user"]
    assert rows(store, alice)[-1] == ("assistant", "complete", ANSWER)


# ---- failover, invalid keys, mid-stream failures, fallback --------------------------------
async def test_a_rate_limited_key_hands_the_request_to_the_next_before_any_text(remote_argus, gemini_fake, store, alice):
    argus, (limited, ok) = remote_argus("429", "ok")
    put_first(argus, limited)
    before = len(gemini_fake.requests)
    chat = RemoteChat(argus, alice)
    await chat.start()
    await chat.turn("Hello?")
    assert chat.said()[-1] == ANSWER and len(chat.events("stream_start")) == 1
    assert sent_keys(gemini_fake)[-2:] == [limited, ok] and len(gemini_fake.requests) - before == 2
    cooled = store.get_api_key(argus.remote.pool.key_id("gemini", limited))
    assert cooled.last_error == "rate_limited" and cooled.cooldown_until > argus.remote.pool.clock() + 5  # RetryInfo 7 s
    assert rows(store, alice)[-1] == ("assistant", "complete", ANSWER)


async def test_an_invalid_key_is_disabled_and_admins_are_told(remote_argus, gemini_fake, store, alice, bob, caplog):
    caplog.set_level(logging.INFO)
    argus, (bad, ok) = remote_argus("invalid", "ok")
    put_first(argus, bad)
    admin, user = RemoteChat(argus, alice), RemoteChat(argus, bob)
    await admin.start()
    await user.start()
    await user.turn("Hello?")
    assert user.said()[-1] == ANSWER
    rec = store.get_api_key(argus.remote.pool.key_id("gemini", bad))
    assert (rec.state, rec.last_error) == ("invalid", "invalid_key")
    notice = [t for t in admin.said() if "rejected as invalid" in t]
    assert len(notice) == 1 and fingerprint(bad) in notice[0]
    assert not any("rejected" in t for t in user.said())  # users are not told about keys
    assert fingerprint(bad) in caplog.text and bad not in caplog.text
    later = RemoteChat(argus, alice)  # an admin who comes later sees it at chat start
    await later.start()
    assert any(fingerprint(bad) in t and "disabled" in t for t in later.said())


async def test_a_failure_mid_stream_keeps_the_partial_answer_and_offers_a_retry(remote_argus, gemini_fake, store, alice):
    argus, (flaky, ok) = remote_argus("midstream", "ok")
    put_first(argus, flaky)
    chat = RemoteChat(argus, alice)
    await chat.start()
    await chat.turn("Tell me something")
    shown = chat.said()[-1]
    assert shown == f"Hello, \n\n{INTERRUPTED_MARK}"
    user_row, answer = rows(store, alice)
    assert answer == ("assistant", "error", shown)
    (action,) = [a for a in chat.events("action") if a["name"] == RETRY_ACTION]
    assert sent_keys(gemini_fake) == [flaky]  # text had been shown: no other key was tried
    await chat.call(lambda: argus.on_retry(cl.Action(name=RETRY_ACTION, payload=action["payload"])))
    assert chat.said()[-1] == ANSWER and sent_keys(gemini_fake)[-1] == ok
    assert [r[:2] for r in rows(store, alice)] == [("user", "complete"), ("assistant", "error"), ("assistant", "complete")]
    assert (await argus.history.messages(chat.argus.store.list_conversations(alice.id).items[0].id, alice.id))[-1] == {
        "role": "assistant", "content": ANSWER}  # the interrupted answer is not part of the memory


async def test_when_every_key_fails_the_local_model_answers_and_says_so(remote_argus, gemini_fake, store, alice, local_model):
    argus, (key,) = remote_argus("503", max_new_tokens=4)
    chat = RemoteChat(argus, alice)
    await chat.start()
    await chat.turn("Hello?")
    notes = [t for t in chat.said() if "local model answers instead" in t]
    assert len(notes) == 1 and "Gemini 2.5 Flash cannot answer right now" in notes[0]
    user_row, answer = rows(store, alice)
    assert answer[:2] == ("assistant", "complete") and answer[2].strip()
    (conv,) = store.list_conversations(alice.id).items
    assert store.list_messages(conv.id, alice.id).items[0].model == local_model.model_id
    assert sent_keys(gemini_fake) and set(sent_keys(gemini_fake)) == {key}
    assert store.get_api_key(argus.remote.pool.key_id("gemini", key)).last_error == "server_error"


async def test_stop_while_waiting_for_the_provider_records_the_stop(remote_argus, gemini_fake, store, alice):
    argus, _ = remote_argus("slow")
    gemini_fake.slow_s = 60
    chat = RemoteChat(argus, alice)
    await chat.start()
    task = chat.send("Hello?")
    await wait_until(lambda: gemini_fake.find(":streamGenerateContent"))
    await chat.stop()
    await settle([task])
    assert rows(store, alice) == [("user", "complete", "Hello?"), ("assistant", "stopped", "")]
    assert not any("local model" in t for t in chat.said())  # a stop is not a failure: no fallback


# ---- the model picker -----------------------------------------------------------------------
async def test_only_models_with_a_key_are_offered_and_the_choice_is_used(remote_argus, gemini_fake, store, alice, local_model):
    argus, _ = remote_argus()
    chat = RemoteChat(argus, alice)
    await chat.start()
    (settings,) = chat.events("chat_settings")
    assert [i["value"] for i in settings[0]["items"]] == [local_model.model_id]  # no key: the local model only
    assert chat.session.chat_settings["model"] == local_model.model_id

    argus, _ = remote_argus("ok")
    chat = RemoteChat(argus, alice)
    await chat.start()
    (settings,) = chat.events("chat_settings")
    offered = [i["value"] for i in settings[0]["items"]]
    assert offered[0] == FLASH and local_model.model_id in offered and "gemini-2.5-pro" in offered
    assert "gpt-4o-mini" not in offered and "gemini-2.5-flash-image" not in offered  # no OpenAI key; not a chat model
    await chat.turn("/model gemini-2.5-pro")
    assert "Gemini 2.5 Pro" in chat.said()[-1]
    assert chat.events("chat_settings")[-1][0]["initial"] == "gemini-2.5-pro"
    await chat.call(lambda: argus.on_settings_update({"model": "gpt-4o-mini"}))  # not offered: ignored
    await chat.turn("Hi")
    assert "/models/gemini-2.5-pro:streamGenerateContent" in gemini_fake.find(":stream")[-1].path
    await chat.call(lambda: argus.on_settings_update({"model": "gemini-2.0-flash"}))
    await chat.turn("Hi again")
    assert "/models/gemini-2.0-flash:streamGenerateContent" in gemini_fake.find(":stream")[-1].path
    assert rows(store, alice)[-1][2] == ANSWER


# ---- /keys ------------------------------------------------------------------------------------
async def test_keys_add_never_stores_or_shows_the_key(remote_argus, store, alice, bob, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    argus, _ = remote_argus()
    secret = "AIzaSyNEWKEY" + "k" * 27
    chat = RemoteChat(argus, alice)
    await chat.start()
    task, made = chat.send_message(f"/keys add gemini {secret}")
    await asyncio.wait_for(task, TIMEOUT)
    (removed,) = chat.events("delete")  # removed from the chat at once, its text blanked first
    assert removed["id"] == made[0].id and removed["output"] == ""
    reply = chat.said()[-1]
    assert fingerprint(secret) in reply and secret not in reply and "removed from the chat" in reply
    (rec,) = store.list_api_keys()
    assert (rec.provider, rec.source, rec.fingerprint) == ("gemini", "app", fingerprint(secret))
    assert store.list_conversations(alice.id).items == []  # commands are not stored

    other = RemoteChat(argus, bob)  # not an admin: refused, and the message is removed all the same
    await other.start()
    task, theirs = other.send_message("/keys add gemini AIzaSyBOBSKEY" + "b" * 27)
    await asyncio.wait_for(task, TIMEOUT)
    assert theirs[0].id in [d["id"] for d in other.events("delete")] and other.said()[-1] == ADMIN_ONLY
    assert len(store.list_api_keys()) == 1

    store.close()
    data = raw_bytes(tmp_path)
    assert secret.encode() not in data and b"AIzaSyBOBSKEY" not in data
    events = json.dumps(chat.emitter.events + other.emitter.events, default=str)
    assert scan_for_keys([secret, "AIzaSyBOBSKEY"], caplog.text, events) == []


async def test_keys_list_enable_disable_remove_and_usage(remote_argus, store, alice):
    argus, (k1, k2) = remote_argus("ok", "ok")
    chat = RemoteChat(argus, alice)
    await chat.start()
    await chat.turn("Hello?")  # one answered request
    added = "AIzaSyADDED" + "a" * 28
    await chat.turn(f"/keys add gemini {added}")
    await chat.turn("/keys list")
    listing = chat.said()[-1]
    for k in (k1, k2, added):
        assert f"`{fingerprint(k)}`" in listing and k not in listing
    assert listing.count("| environment |") == 2 and listing.count("| app |") == 1
    assert "| 1 / 17 |" in listing  # the key that answered: 1 request, 17 tokens today
    await chat.turn(f"/keys disable {fingerprint(k1)}")
    assert chat.said()[-1].endswith("is now disabled.")
    assert store.get_api_key(argus.remote.pool.key_id("gemini", k1)).state == "disabled"
    await chat.turn(f"/keys enable gemini:{fingerprint(k1)}")
    assert store.get_api_key(argus.remote.pool.key_id("gemini", k1)).state == "enabled"
    await chat.turn(f"/keys remove {fingerprint(added)}")
    assert "Removed" in chat.said()[-1] and len(store.list_api_keys()) == 2
    await chat.turn(f"/keys remove {fingerprint(k2)}")
    assert "comes from the server's environment" in chat.said()[-1]
    await chat.turn("/keys usage 3")
    usage = chat.said()[-1]
    assert "alice@example.com: 1 requests, 17 tokens" in usage and f"`{FLASH}`" in usage
    await chat.turn("/keys frobnicate")
    assert chat.said()[-1].startswith("Usage:")


# ---- /image and /video --------------------------------------------------------------------------
async def test_image_command_shows_the_image_and_keeps_it_in_the_conversation(remote_argus, gemini_fake, store, alice):
    argus, _ = remote_argus("ok")
    chat = RemoteChat(argus, alice)
    await chat.start()
    await chat.turn("/image a red square")
    assert "image of “a red square”" in chat.said()[-1]
    assert [e["type"] for e in chat.events("element")] == ["image"]
    (req,) = gemini_fake.find(":generateContent")
    assert "/models/gemini-2.5-flash-image:generateContent" in req.path
    (conv,) = store.list_conversations(alice.id).items
    request, answer = reversed(store.list_messages(conv.id, alice.id).items)
    assert (request.role, request.content) == ("user", "/image a red square")
    (att_id,) = answer.attachment_ids
    att, data = store.get_attachment(att_id, alice.id)
    assert (att.mime, data) == ("image/png", PNG_1X1)
    assert await resumed_elements(chat, conv.id) == [("image", answer.id, att_id)]  # shown again on resume


async def test_video_command_shows_progress_and_keeps_the_video(remote_argus, gemini_fake, store, alice):
    argus, _ = remote_argus("ok")
    argus.remote.video_poll_s = 0.01
    gemini_fake.video_polls = 2
    chat = RemoteChat(argus, alice)
    await chat.start()
    await chat.turn("/video a sunset over the sea")
    progress = [d for d in chat.events("send") if d["metadata"].get(KIND_KEY) == KIND_NOTICE and "Making your video" in d["output"]]
    assert len(progress) == 1
    updates = [d["output"] for d in chat.events("update") if d["id"] == progress[0]["id"]]
    assert any("% done" in u for u in updates)
    assert progress[0]["id"] in [d["id"] for d in chat.events("delete")]  # gone once the video is there
    assert "video of “a sunset over the sea”" in chat.said()[-1]
    assert [e["type"] for e in chat.events("element")] == ["video"]
    (conv,) = store.list_conversations(alice.id).items
    answer = store.list_messages(conv.id, alice.id).items[0]
    att, data = store.get_attachment(answer.attachment_ids[0], alice.id)
    assert (att.mime, data) == ("video/mp4", VIDEO_BYTES)
    assert await resumed_elements(chat, conv.id) == [("video", answer.id, att.id)]


async def test_video_failures_are_one_sentence(remote_argus, gemini_fake, store, alice):
    argus, _ = remote_argus("video_failed")
    argus.remote.video_poll_s = 0.01
    gemini_fake.video_polls = 0
    chat = RemoteChat(argus, alice)
    await chat.start()
    await chat.turn("/video anything")
    assert chat.said()[-1].startswith("No video this time: ")
    assert store.list_conversations(alice.id).items == []


# ---- no key anywhere ----------------------------------------------------------------------------
async def test_no_key_reaches_logs_transcripts_stored_rows_or_the_browser(
    remote_argus, gemini_fake, store, alice, tmp_path, caplog
):
    caplog.set_level(logging.DEBUG)
    argus, keys = remote_argus("invalid", "denied", "429", "quota", "midstream", "ok")
    chat = RemoteChat(argus, alice)
    await chat.start()
    for text in ("one", "two", "three", "/image a cat", "/keys list", "/keys usage"):
        await chat.turn(text)
    added = "AIzaSyLATEADD" + "z" * 26
    await chat.turn(f"/keys add gemini {added}")
    keys = [*keys, added]
    stored = [m.content for c in store.list_conversations(alice.id).items for m in store.list_messages(c.id, alice.id).items]
    events = json.dumps(chat.emitter.events, default=str)
    assert scan_for_keys(keys, caplog.text, events, *stored) == []
    store.close()
    data = raw_bytes(tmp_path).decode("latin-1")
    assert scan_for_keys(keys, data) == []
    assert any(k.startswith("AIza") for k in keys)  # the scan looked for real-looking keys

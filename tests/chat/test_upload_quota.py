"""Upload quotas (issue 13, finding 6) and refused uploads in the chat (issue 12, point 4).

The quota book (``argus.quotas``) on its own with a fake clock; then JarvisArgus with a real
Chainlit context (tests/support/chat_harness), a real SQLiteStore and a recording local model:
files over the session's cap are refused with one sentence, taken out of the shown message
and off the disk; a refused "image" (a text file named .png) is never shown as an image,
never stored and never reaches a model; the local model's prompt never mentions an image,
and the chat says once per conversation that it reads text only.
"""
from __future__ import annotations

import asyncio
import io
import threading
import types
from pathlib import Path

import chainlit as cl
import pytest
from PIL import Image

from argus.chat.hooks import JarvisArgus
from argus.chat.intake import MessageIntake
from argus.config import ConfigError
from argus.quotas import (
    MB,
    WINDOW_S,
    QuotaExceeded,
    QuotaLimits,
    UploadQuota,
    remove_orphan_session_dirs,
    session_files_sentence,
)
from tests.support.chat_harness import TIMEOUT, Chat, make_settings, rows

TEXT_ONLY = "The local model reads text only; I stored your image and answered the text."


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def png(color=(10, 200, 10), size=(32, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ---- settings ------------------------------------------------------------------------------
def test_limits_come_from_the_environment_with_defaults():
    assert QuotaLimits.from_env({}) == QuotaLimits(20, 100 * MB, 100, 500 * MB, 120)
    blank = {k: "" for k in ("ARGUS_UPLOAD_SESSION_FILES", "ARGUS_UPLOAD_SESSION_MB", "ARGUS_UPLOAD_USER_FILES",
                             "ARGUS_UPLOAD_USER_MB", "ARGUS_UPLOAD_KEEP_S")}
    assert QuotaLimits.from_env(blank) == QuotaLimits()
    limits = QuotaLimits.from_env({"ARGUS_UPLOAD_SESSION_FILES": "3", "ARGUS_UPLOAD_SESSION_MB": "8",
                                   "ARGUS_UPLOAD_USER_FILES": "9", "ARGUS_UPLOAD_USER_MB": "40",
                                   "ARGUS_UPLOAD_KEEP_S": "0"})
    assert limits == QuotaLimits(3, 8 * MB, 9, 40 * MB, 0)


@pytest.mark.parametrize("env, words", [
    ({"ARGUS_UPLOAD_SESSION_FILES": "0"}, "ARGUS_UPLOAD_SESSION_FILES must be between 1 and"),
    ({"ARGUS_UPLOAD_USER_MB": "lots"}, "ARGUS_UPLOAD_USER_MB must be a whole number"),
    ({"ARGUS_UPLOAD_KEEP_S": "-1"}, "ARGUS_UPLOAD_KEEP_S must be between 0 and 86400"),
])
def test_bad_limits_are_a_configuration_error_naming_the_variable(env, words):
    with pytest.raises(ConfigError, match=words):
        QuotaLimits.from_env(env)


# ---- the quota book ------------------------------------------------------------------------
def test_session_file_cap_refuses_the_next_file_with_one_sentence():
    quota = UploadQuota(QuotaLimits(session_files=2))
    for _ in range(2):
        quota.reserve("s1", "u1", MB)
    with pytest.raises(QuotaExceeded) as e:
        quota.reserve("s1", "u1", MB)
    assert str(e.value) == ("This chat has already received 2 files, the most one chat may upload; "
                            "start a new chat to upload more.")
    assert e.value.retry_after_s is None
    assert quota.usage("s1") == (2, 2 * MB)
    quota.reserve("s2", "u1", MB)  # another chat of the same user may upload


def test_session_byte_cap_counts_real_sizes_and_releases_failed_uploads():
    quota = UploadQuota(QuotaLimits(session_bytes=10 * MB))
    res = quota.reserve("s", "u", 6 * MB)  # Content-Length, envelope included
    quota.commit(res, "f1", 5 * MB)  # the stored file's size
    assert quota.admitted("s", "f1") and quota.usage("s") == (1, 5 * MB)
    failed = quota.reserve("s", "u", 4 * MB)
    quota.release(failed)  # Chainlit refused it: it no longer counts
    assert quota.usage("s") == (1, 5 * MB)
    with pytest.raises(QuotaExceeded) as e:
        quota.reserve("s", "u", 6 * MB, "big.png")
    assert str(e.value) == ("big.png (6 MB) would take this chat over its upload limit of 10 MB (5 MB used); "
                            "start a new chat to upload more.")
    quota.reserve("s", "u", 5 * MB)  # exactly the limit


def test_user_caps_span_sessions_and_say_when_to_try_again():
    clock = Clock()
    quota = UploadQuota(QuotaLimits(user_files=3, user_bytes=100 * MB), clock=clock)
    for i in range(3):
        quota.reserve(f"s{i}", "u", MB)
        clock.now += 3600
    with pytest.raises(QuotaExceeded) as e:
        quota.reserve("s9", "u", MB)
    # the oldest upload leaves the 24-hour window 21 hours from now
    assert str(e.value) == ("You have uploaded 3 files in the last 24 hours, the most allowed; "
                            "you can upload again in 21 hours.")
    assert e.value.retry_after_s == pytest.approx(WINDOW_S - 3 * 3600)
    quota.reserve("s9", "someone else", MB)
    clock.now += WINDOW_S - 3 * 3600
    quota.reserve("s9", "u", MB)  # the window moved on


def test_user_byte_cap():
    clock = Clock()
    quota = UploadQuota(QuotaLimits(user_bytes=10 * MB), clock=clock)
    quota.reserve("a", "u", 4 * MB)
    clock.now += 600
    quota.reserve("b", "u", 4 * MB)
    with pytest.raises(QuotaExceeded) as e:
        quota.reserve("c", "u", 3 * MB, "x.png")
    assert str(e.value) == ("x.png (3 MB) would take your uploads of the last 24 hours over 10 MB (8 MB used); "
                            "you can upload it in 24 hours.")
    assert e.value.retry_after_s == pytest.approx(WINDOW_S - 600)
    quota.reserve("c", "u", 2 * MB)


def test_parallel_uploads_cannot_overshoot_the_cap():
    quota = UploadQuota(QuotaLimits(session_files=5))
    ok, refused = [], []

    def upload():
        try:
            ok.append(quota.reserve("s", "u", 1000))
        except QuotaExceeded:
            refused.append(1)

    threads = [threading.Thread(target=upload) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(ok), len(refused)) == (5, 35)


def test_admit_passes_route_counted_files_and_counts_others():
    quota = UploadQuota(QuotaLimits(session_files=2))
    quota.commit(quota.reserve("s", "u", 10), "routed", 10)
    quota.admit("s", "u", "routed", 10, "a.png")  # counted once, by the route
    assert quota.usage("s") == (1, 10)
    quota.admit("s", "u", "other", 10, "b.png")
    with pytest.raises(QuotaExceeded):
        quota.admit("s", "u", "third", 10, "c.png")


def test_directories_of_sessions_that_no_longer_exist_are_removed(tmp_path):
    (tmp_path / "dead-session").mkdir()
    (tmp_path / "dead-session" / "f.png").write_bytes(b"x")
    assert remove_orphan_session_dirs(tmp_path) == ["dead-session"]
    assert list(tmp_path.iterdir()) == []


class FakeSession:
    """What the clean-up reads of a Chainlit WebsocketSession."""

    def __init__(self, id: str, socket_id: str, root: Path):
        self.id, self.socket_id, self.files_dir = id, socket_id, root / id
        self.files_dir.mkdir()
        (self.files_dir / "f.png").write_bytes(b"x")
        self.files = {"f": {"id": "f", "path": self.files_dir / "f.png"}}


async def test_a_disconnected_session_loses_its_files_unless_it_reconnected(tmp_path, monkeypatch):
    from chainlit.session import ws_sessions_id

    import argus.quotas as quotas

    quota = UploadQuota(QuotaLimits(keep_s=0))
    gone, back, dropped = (FakeSession(n, f"sock-{n}", tmp_path) for n in ("gone", "back", "dropped"))
    monkeypatch.setitem(ws_sessions_id, "gone", gone)
    monkeypatch.setitem(ws_sessions_id, "back", back)
    quota.reserve("dropped", "u", 10)
    waits = [quotas._after_disconnect(s, s.socket_id, quota, 0.05) for s in (gone, back, dropped)]
    back.socket_id = "sock-new"  # the browser reconnected to the same session
    await asyncio.gather(*waits)
    assert not gone.files_dir.exists() and gone.files == {}
    assert (back.files_dir / "f.png").exists() and back.files  # still in use
    assert not dropped.files_dir.exists() and quota.usage("dropped") == (0, 0)  # Chainlit dropped it: forgotten


# ---- in the chat ---------------------------------------------------------------------------
class RecordingModel:
    """A local model that reads text only and records every prompt it is given."""

    model_id = "recording-local"
    display_name = "Recording local model"

    def __init__(self):
        self.prompts: list[list[dict]] = []

    def chat(self, history, params, cancel_event=None):
        self.prompts.append([dict(m) for m in history])
        yield "A text answer."


class ElementChat(Chat):
    """A chat whose messages carry files the way Chainlit gives them to ``on_message``:
    ``cl.Image`` elements with the path of the upload in the session's directory, already
    shown in the user's bubble."""

    def __init__(self, argus, user):
        super().__init__(argus, user)
        self.files_dir = Path(self.session.files_dir)

    def upload(self, name: str, data: bytes, mime: str = "image/png") -> cl.Image:
        self.files_dir.mkdir(parents=True, exist_ok=True)
        file_id = f"{len(self.session.files)}-{name}"
        path = self.files_dir / file_id
        path.write_bytes(data)
        self.session.files[file_id] = {"id": file_id, "path": path, "name": name, "type": mime, "size": len(data)}
        element = cl.Image(name=name, path=str(path), mime=mime, display="inline", thread_id=self.session.thread_id)
        element.id = element.chainlit_key = file_id
        element.persisted = True  # Chainlit has sent it to the browser already
        return element

    async def say_with(self, text: str, elements: list) -> None:
        async def go():
            await self.argus.on_message(cl.Message(content=text, type="user_message", author=self.user.name,
                                                   elements=elements))

        await asyncio.wait_for(self.spawn(go), TIMEOUT)

    def removed(self) -> list[str]:
        return [d["id"] for kind, d in self.emitter.events if kind == "remove_element"]


@pytest.fixture
def chat_with(tmp_path, monkeypatch, store, alice):
    from chainlit.config import FILES_DIRECTORY

    FILES_DIRECTORY.mkdir(parents=True, exist_ok=True)  # an earlier in-process app may have removed it
    made = []

    def make(quota: UploadQuota) -> tuple[ElementChat, RecordingModel]:
        model = RecordingModel()
        argus = JarvisArgus(make_settings(tmp_path, monkeypatch), store=store, model_loader=lambda: model)
        argus.intake._quota = quota
        argus.start()
        chat = ElementChat(argus, alice)
        made.append(chat)
        return chat, model

    yield make
    import shutil

    for chat in made:
        shutil.rmtree(chat.files_dir, ignore_errors=True)


async def test_files_over_the_session_cap_are_refused_taken_out_and_deleted(chat_with, store, alice):
    chat, model = chat_with(UploadQuota(QuotaLimits(session_files=2)))
    await chat.start()
    first = [chat.upload("a.png", png()), chat.upload("b.png", png((1, 2, 3)))]
    await chat.say_with("Two pictures.", first)
    late = chat.upload("c.png", png((9, 9, 9)))
    await chat.say_with("And a third.", [late])
    refusal = f"Not accepted: c.png. {session_files_sentence(2)}"
    assert refusal in chat.said()
    assert chat.removed() == [late.id]  # out of the user's bubble
    assert not Path(late.path).exists() and late.id not in chat.session.files  # off the disk
    assert all(Path(e.path).exists() for e in first)  # the legitimate files are kept
    (conv,) = store.list_conversations(alice.id).items
    users = [m for m in reversed(store.list_messages(conv.id, alice.id).items) if m.role == "user"]
    assert [len(m.attachment_ids) for m in users] == [2, 0]
    assert [m.content for m in users] == ["Two pictures.", "And a third."]


async def test_a_refused_fake_image_is_not_shown_stored_or_given_to_the_model(chat_with, store, alice):
    chat, model = chat_with(UploadQuota(QuotaLimits()))
    await chat.start()
    good = chat.upload("green.png", png())
    fake = chat.upload("notes.png", b"this is not an image at all\n" * 10)
    await chat.say_with("Describe this picture in one word.", [good, fake])
    notes = next(t for t in chat.said() if "not an image" in t)
    assert "notes.png is not an image I can read." in notes
    assert TEXT_ONLY in notes
    assert chat.removed() == [fake.id]  # no broken image in the bubble
    assert not Path(fake.path).exists()
    (conv,) = store.list_conversations(alice.id).items
    (user_row,) = [m for m in store.list_messages(conv.id, alice.id).items if m.role == "user"]
    assert len(user_row.attachment_ids) == 1
    att, _ = store.get_attachment(user_row.attachment_ids[0], alice.id)
    assert att.name == "green.png"
    # the local model was asked the text only
    assert model.prompts == [[{"role": "user", "content": "Describe this picture in one word."}]]


async def test_a_message_of_refused_files_only_is_not_stored_and_says_why(chat_with, store, alice):
    chat, model = chat_with(UploadQuota(QuotaLimits()))
    await chat.start()
    fake = chat.upload("notes.png", b"plain text")
    await chat.say_with("", [fake])
    assert chat.said()[-1] == "notes.png is not an image I can read."
    assert chat.removed() == [fake.id]
    assert store.list_conversations(alice.id).items == []
    assert model.prompts == []


async def test_the_local_model_never_hears_of_images_and_the_notice_comes_once(chat_with, store, alice):
    chat, model = chat_with(UploadQuota(QuotaLimits()))
    await chat.start()
    await chat.say_with("What is in this photo?", [chat.upload("cat.png", png())])
    await chat.say_with("", [chat.upload("dog.png", png((5, 5, 5)))])  # an image alone: stored, not answered
    await chat.say_with("And this one?", [chat.upload("bird.png", png((7, 7, 7)))])
    said = chat.said()
    assert sum(TEXT_ONLY in t for t in said) == 1  # once per conversation for messages with text
    assert "The local model reads text only; I stored your image. Add some text to get an answer." in said
    assert len(model.prompts) == 2
    for prompt in model.prompts:
        words = " ".join(m["content"] for m in prompt).lower()
        for name in ("cat.png", "dog.png", "bird.png", "image", "attach", "picture"):
            assert name not in words, (name, prompt)
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in prompt)
    assert [m["content"] for m in model.prompts[-1] if m["role"] == "user"] == ["What is in this photo?", "And this one?"]
    assert [r[2] for r in rows(store, alice) if r[0] == "user"] == ["What is in this photo?", "", "And this one?"]


async def test_intake_uses_the_process_quota_by_default(monkeypatch):
    import argus.quotas as quotas

    monkeypatch.setattr(quotas, "_shared", None)
    monkeypatch.setenv("ARGUS_UPLOAD_SESSION_FILES", "7")
    intake = MessageIntake(types.SimpleNamespace(), None, None, MB, lambda s: "m")  # type: ignore[arg-type]
    assert intake.quota is quotas.shared_quota()
    assert intake.quota.limits.session_files == 7

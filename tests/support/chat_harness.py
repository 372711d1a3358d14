"""A chat session without a browser: JarvisArgus with a real Chainlit context.

Chainlit's ``cl.Message``/``cl.user_session`` need a context: each simulated chat
session (:class:`Chat`) gets a ``chainlit.session.HTTPSession`` and a
``ChainlitContext`` whose emitter (:class:`RecordingEmitter`) records what would go to
the browser (Chainlit's own ``BaseChainlitEmitter`` is the no-op stub it uses for
tests; ours subclasses it and records the calls). Every hook runs in its own task,
like Chainlit runs ``on_message``; "stop" is what Chainlit does: cancel the newest
message task, then call ``on_stop``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from typing import Any, Callable, Optional

import chainlit as cl
from chainlit.context import ChainlitContext, context_var
from chainlit.emitter import BaseChainlitEmitter
from chainlit.session import HTTPSession

from argus.chat.hooks import JarvisArgus
from argus.config import Settings

TIMEOUT = 240.0  # generous: other test runs share the two cores


# ---- fixtures ---------------------------------------------------------------------
def make_settings(tmp_path, monkeypatch, **overrides) -> Settings:
    """Settings from a clean environment (no developer ARGUS_* or .env), then ``overrides``."""
    for key in list(os.environ):
        if key.startswith("ARGUS_") or key == "JWT_SECRET_KEY":
            monkeypatch.delenv(key)
    monkeypatch.setenv("ARGUS_DATA_DIR", str(tmp_path))
    base = Settings.from_env(dotenv=False)
    defaults = dict(max_new_tokens=6, messages_per_minute=20, temperature=0.0)
    return dataclasses.replace(base, **{**defaults, **overrides})


class RecordingEmitter(BaseChainlitEmitter):
    """Chainlit's test stub emitter, recording what the browser would receive."""

    def __init__(self, session):
        super().__init__(session)
        self.events: list[tuple[str, Any]] = []
        self.changed = asyncio.Event()
        self.fail_tokens_after: Optional[int] = None  # simulate a dead socket
        self.tokens = 0

    def _record(self, kind: str, data: Any) -> None:
        self.events.append((kind, data))
        self.changed.set()

    async def send_step(self, step_dict):
        self._record("send", dict(step_dict))

    async def update_step(self, step_dict):
        self._record("update", dict(step_dict))

    async def delete_step(self, step_dict):
        self._record("delete", dict(step_dict))

    async def stream_start(self, step_dict):
        self._record("stream_start", dict(step_dict))

    async def send_token(self, id: str, token: str, is_sequence=False, is_input=False):
        self.tokens += 1
        if self.fail_tokens_after is not None and self.tokens > self.fail_tokens_after:
            raise ConnectionError("the socket is gone")
        self._record("token", {"id": id, "token": token})

    async def set_commands(self, commands):
        self._record("set_commands", commands)

    async def emit(self, event, data):
        self._record(event, data)

    async def resume_thread(self, thread_dict):
        self._record("resume_thread", thread_dict)


class Chat:
    """One browser session of ``user`` talking to ``argus``."""

    def __init__(self, argus: JarvisArgus, user):
        self.argus, self.user = argus, user
        self.session = HTTPSession(
            id=str(uuid.uuid4()),
            client_type="webapp",
            user=cl.User(identifier=user.email, metadata={"user_id": user.id, "role": user.role}),
        )
        self.emitter = RecordingEmitter(self.session)
        self.tasks: list[asyncio.Task] = []

    def spawn(self, make_coro) -> asyncio.Task:
        """Run ``make_coro()`` in a new task inside this session's Chainlit context."""
        async def run():
            context_var.set(ChainlitContext(self.session, self.emitter))
            return await make_coro()

        return asyncio.create_task(run())

    async def start(self) -> None:
        await self.spawn(self.argus.on_chat_start)

    async def resume(self, thread: dict) -> None:
        """Like Chainlit resuming ``thread`` (the session was opened with its id)."""
        self.session.thread_id = thread["id"]
        self.session.thread_id_to_resume = thread["id"]
        await self.spawn(lambda: self.argus.on_chat_resume(thread))

    def send(self, text: str) -> asyncio.Task:
        """Like Chainlit's ``client_message``: on_message in a new task (the session's newest)."""

        async def go():
            await self.argus.on_message(cl.Message(content=text, type="user_message", author=self.user.name))

        task = self.spawn(go)
        self.tasks.append(task)
        return task

    async def turn(self, text: str) -> None:
        await asyncio.wait_for(self.send(text), TIMEOUT)

    async def stop(self) -> None:
        """Like Chainlit's ``stop``: cancel the newest message task, then on_stop."""
        if self.tasks:
            self.tasks[-1].cancel()
        await self.spawn(self.argus.on_stop)

    async def wait_for(self, pred, timeout: float = TIMEOUT) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        i = 0
        while True:
            while i < len(self.emitter.events):
                if pred(self.emitter.events[i]):
                    return self.emitter.events[i]
                i += 1
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; events: {self.emitter.events!r}"
            self.emitter.changed.clear()
            try:
                await asyncio.wait_for(self.emitter.changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    def said(self) -> list[str]:
        """Contents of the messages sent (final streamed ones included), in order."""
        return [d["output"] for kind, d in self.emitter.events if kind == "send"]


async def wait_until(cond: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def settle(tasks) -> None:
    """Wait for message tasks to end (cancelled ones included)."""
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), TIMEOUT)


def rows(store, user, conv_id=None):
    """(role, status, content) of the user's only (or given) conversation, oldest first."""
    if conv_id is None:
        (conv,) = store.list_conversations(user.id).items
        conv_id = conv.id
    return [(m.role, m.status, m.content) for m in reversed(store.list_messages(conv_id, user.id).items)]

"""Answering: one :meth:`Answering.answer_turn` for every back-end.

slot → stream → classify → store → show → Retry: the session's chosen model picks the
back-end (the worker network, a remote provider, or the local model); the back-end
prepares the turn (a remote or network back-end that cannot start hands it to the local
model, said in the chat); a local answer waits for a generation slot; the answer streams
into the chat (the stop button keeps the partial text); :func:`classify` decides what is
stored and shown (complete, stopped and marked, cut off and marked with a Retry button,
refused with the provider's sentence, failed); the row is stored shielded from the stop
button, then the final message is sent.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

import chainlit as cl

from argus.catalogue import ModelSpec
from argus.chat.backends import (
    LOCAL_MODEL_FALLBACK_ID,
    BackendUnavailable,
    ChatBackend,
    LocalBackend,
    NetworkBackend,
    RemoteBackend,
    Streamed,
    TurnStream,
    is_network_model,
)
from argus.chat.history import History
from argus.chat.intake import MessageIntake, Turn
from argus.chat.sentences import (
    EMPTY_ANSWER,
    GENERATION_FAILED,
    INTERRUPTED_MARK,
    NOT_SAVED,
    STOPPED_MARK,
    fallback_notice,
    marked,
    token_limit_mark,
    weak_persian_notice,
)
from argus.chat.session import say
from argus.chat.shield import unstoppable
from argus.chat.slots import GenerationSlots
from argus.commands import SessionState
from argus.datalayer import KIND_ANSWER, KIND_KEY
from argus.store import StoreError
from argus.streaming import StreamHandle

log = logging.getLogger(__name__)

#: The Chainlit action that answers a message again (``app.py`` routes it to ``on_retry``).
RETRY_ACTION = "argus_retry"
#: Persian and Arabic script: Arabic (U+0600–06FF, Persian's letters included), Arabic
#: Supplement, Arabic Extended-A, and the presentation forms A and B.
PERSIAN_SCRIPT_RE = re.compile("[\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff]")
#: Local models known to write Persian poorly (``model_id`` prefixes, lower case): SmolLM2 is
#: trained on English only.
WEAK_PERSIAN_MODELS = ("smollm",)
#: Conversations remembered as already told about Persian (the oldest forgotten first).
PERSIAN_NOTICE_MEMORY = 10_000


def writes_persian(text: str, share: float = 0.3) -> bool:
    """Whether ``text`` is mostly Persian/Arabic script: at least ``share`` of its letters are
    in :data:`PERSIAN_SCRIPT_RE`'s ranges (so a Persian name in an English question is not)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    return sum(1 for c in letters if PERSIAN_SCRIPT_RE.match(c)) >= share * len(letters)


@dataclass
class Shown:
    """What :func:`classify` decided: the stored row (``stored``, ``status``), the chat message
    (``shown``, ``actions``) and a note after it (``notice``)."""

    stored: str
    shown: str
    status: str
    notice: Optional[str] = None
    actions: list = field(default_factory=list)


def retry_action(message_id: str) -> cl.Action:
    """The Retry button of an interrupted answer to the stored user message ``message_id``."""
    return cl.Action(name=RETRY_ACTION, payload={"message_id": message_id}, label="Retry", icon="refresh-cw")


def classify(s: Streamed, turn: Turn) -> Shown:
    """What to store and show for a streamed answer.

    Local model (``s.retryable`` False): a generation failure keeps the text and adds
    :data:`GENERATION_FAILED`; a prompt that did not fit the window (finish ``"context"``,
    no text) is an error whose notice is the answer. Remote and network back-ends: a
    failure after text keeps it, marks it (:data:`INTERRUPTED_MARK`) and offers Retry; a
    failure before any text that reached here is a refusal (blocked, bad request), whose
    sentence is the answer; a lost browser stores and shows :data:`GENERATION_FAILED`.
    Both: stopped → the text, marked :data:`STOPPED_MARK` when shown; complete → the text
    (:data:`EMPTY_ANSWER` shown for none), and when the max-new-tokens limit ended it
    (``s.cut_at``) the text followed by :func:`~argus.chat.sentences.token_limit_mark`,
    stored and shown (status ``"complete"``).
    """
    r, notice = s.result, s.notice
    text, status = r.text, r.status
    if not s.retryable:  # the local model
        if status == "error":
            where = "sending the answer to the browser" if r.sink_failed else "generation"
            log.error("%s failed (conversation %s)", where, turn.conv_id, exc_info=r.error)
        elif status == "complete" and s.finish == "context" and not text:
            status = "error"  # the prompt did not fit: nothing was generated
        stored = text if text or status != "error" else (notice or GENERATION_FAILED)
        if status == "stopped":
            shown = marked(text, STOPPED_MARK)
        elif status == "error" and s.finish == "context" and notice:
            shown, notice = notice, None
        elif status == "error":
            shown = marked(text, GENERATION_FAILED)
        elif text.strip() and s.cut_at:
            stored = shown = marked(text, token_limit_mark(s.cut_at))
        else:
            shown = text if text.strip() else EMPTY_ANSWER
        return Shown(stored, shown, status, notice)
    if status == "error" and r.sink_failed:
        log.error("sending the answer to the browser failed (conversation %s)", turn.conv_id, exc_info=r.error)
        stored = marked(text, GENERATION_FAILED)
        return Shown(stored, stored, status, notice)
    if status == "error" and r.pieces:  # cut off mid-stream: keep the text, offer a retry
        log.warning("%s answer cut off (conversation %s): %s", s.model_id, turn.conv_id, s.error.detail if s.error else "")
        stored = f"{text}\n\n{INTERRUPTED_MARK}"
        return Shown(stored, stored, status, notice, [retry_action(turn.message_id)])
    if status == "error":  # refused: blocked or a bad request; the provider's sentence is the answer
        return Shown(str(s.error), str(s.error), status, notice)
    if status == "stopped":
        return Shown(text, marked(text, STOPPED_MARK), status, notice)
    if text.strip() and s.cut_at:
        cut = marked(text, token_limit_mark(s.cut_at))
        return Shown(cut, cut, status, notice)
    return Shown(text, text if text.strip() else EMPTY_ANSWER, status, notice)


class Answering:
    """Answers stored turns with the session's model.

    Args:
        intake: stores the answer rows.
        history: the conversation's rows the back-ends answer from.
        slots: generation slots (taken by back-ends that compute here).
        local, remote, network: the three back-ends.
        chosen_model: the session's catalogue model or network (None: the local model).
    """

    def __init__(
        self, intake: MessageIntake, history: History, slots: GenerationSlots, *, local: LocalBackend,
        remote: RemoteBackend, network: NetworkBackend,
        chosen_model: Callable[[SessionState], Awaitable[Optional[ModelSpec]]],
    ):
        self.intake, self.history, self.slots = intake, history, slots
        self.local, self.remote, self.network = local, remote, network
        self.chosen_model = chosen_model
        #: Conversations already told that the local model writes Persian poorly (once each).
        self._told_persian: "OrderedDict[str, None]" = OrderedDict()

    def backend_for(self, spec: Optional[ModelSpec]) -> ChatBackend:
        """The back-end of the model ``spec`` (None: the local model)."""
        if spec is None:
            return self.local
        return self.network if is_network_model(spec.id) else self.remote

    async def answer_turn(self, turn: Turn, state: SessionState) -> None:
        """Wait for the session's previous answer, then answer ``turn`` with the session's
        model, falling back to the local model when a remote model or the network cannot
        start. Re-raises ``CancelledError`` after storing what was streamed (a stop)."""
        async with state.busy:  # answers of one session come one after the other, in order
            spec = await self.chosen_model(state)
            backend = self.backend_for(spec)
            rows = await self.history.rows(turn.conv_id, turn.user_id, upto=turn.message_id)
            while True:
                try:
                    turn_stream = await backend.open_turn(spec, rows, turn)
                    if backend is self.local:
                        await self._persian_notice(turn, rows)
                    streamed, msg = await self._stream(backend, turn_stream, turn, state)
                except BackendUnavailable as why:
                    if backend is not self.local:  # the local model answers instead; say so
                        await say(fallback_notice(spec, str(why)))
                        backend, spec = self.local, None
                        continue
                    await self._answer_is(turn, state, str(why))
                    return
                await self._store_and_show(turn, state, streamed, msg)
                return

    async def _persian_notice(self, turn: Turn, rows: list) -> None:
        """Once per conversation: when the message answered is Persian (or Arabic script) and the
        local model is one of :data:`WEAK_PERSIAN_MODELS`, say it writes Persian poorly and
        suggest a remote chat model that has a key (the first of the catalogue), if any."""
        if turn.conv_id in self._told_persian or not rows or rows[-1].role != "user":
            return
        if not writes_persian(rows[-1].content or ""):
            return
        model = self.local.holder.loaded()
        if model is None or not str(getattr(model, "model_id", "")).lower().startswith(WEAK_PERSIAN_MODELS):
            return
        self._told_persian[turn.conv_id] = None
        while len(self._told_persian) > PERSIAN_NOTICE_MEMORY:
            self._told_persian.popitem(last=False)
        label = None
        try:
            models = await self.remote.remote.chat_models()
            label = models[0].label if models else None
        except Exception:  # the suggestion is a courtesy: never let it stop the answer
            log.warning("could not list the remote chat models for the Persian notice", exc_info=True)
        await say(weak_persian_notice(label))

    async def _stream(
        self, backend: ChatBackend, turn_stream: TurnStream, turn: Turn, state: SessionState
    ) -> tuple[Streamed, cl.Message]:
        """Slot (when the back-end computes here), then stream into the answer's message."""
        if backend.holds_slot:
            await self.slots.take()  # a stop while waiting: the caller records "stopped before answering"
        handle = StreamHandle()
        state.stream = handle
        msg = cl.Message(content="", id=turn.step_id, metadata={KIND_KEY: KIND_ANSWER})
        streamed: Optional[Streamed] = None
        try:
            streamed = await turn_stream.stream(msg.stream_token, handle)
            return streamed, msg
        finally:
            if state.stream is handle:
                state.stream = None
            if backend.holds_slot:
                self.slots.release_after(streamed.result.producer if streamed is not None else None)

    async def _answer_is(self, turn: Turn, state: SessionState, sentence: str) -> None:
        """The local model cannot answer (it failed to load): ``sentence`` is the answer, stored as an error."""
        await say(sentence, kind=KIND_ANSWER, id=turn.step_id)
        await unstoppable(self.intake.record_answer(
            turn, state, sentence, "error", state.model_id or LOCAL_MODEL_FALLBACK_ID,
        ))

    async def _store_and_show(self, turn: Turn, state: SessionState, s: Streamed, msg: cl.Message) -> None:
        """Store (shielded: a second stop must not lose the answer), then show; re-raises
        ``CancelledError`` when stopped meanwhile."""
        out = classify(s, turn)
        notice, cancelled = out.notice, s.cancelled
        try:
            _, again = await unstoppable(self.intake.record_answer(turn, state, out.stored, out.status, s.model_id))
            cancelled = cancelled or again
        except StoreError:
            log.exception("could not store the answer")
            notice = (notice + " " if notice else "") + NOT_SAVED
        msg.content = out.shown
        msg.actions = out.actions
        try:
            await msg.send()
            if notice:
                await say(f"_{notice}_")
        except Exception:
            if not s.result.sink_failed:
                raise
            log.warning("could not show the answer either (the browser is likely gone)", exc_info=True)
        if cancelled:
            raise asyncio.CancelledError()

    async def record_stop(self, turn: Optional[Turn], state: SessionState, model_id: str) -> None:
        """A stop before ``turn``'s answer began: store its empty ``stopped`` answer (shielded)."""
        if turn is not None and not turn.answered:
            await unstoppable(self.intake.record_answer(turn, state, "", "stopped", model_id))

"""Message intake: storing a chat message (and its answer row) before anything else.

A message's files pass the upload quotas (``argus.quotas``: files the upload route
counted pass, others are counted now) and the content checks (``argus.uploads``); a
refused file is taken out of the shown message (Chainlit's ``remove_element``: no
broken image in the user's bubble) and off the disk, is never stored and never
reaches a model; the chat says which file and why.

The user's message is stored *first* (conversation, attachments, message; the
caller shields it from the stop button), before waiting for the model, for the
session's previous answer or for a generation slot; a message stored while an
earlier one of the session still waits gives that earlier one an empty ``stopped``
answer row, so stored rows keep a question → answer order. A conversation id IS
the chat's Chainlit thread id; a message id IS its Chainlit step id.
"""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from argus.chat.sentences import upload_not_accepted
from argus.chat.session import Sessions, current_session
from argus.commands import SessionState
from argus.commands.base import OutFile, one_line
from argus.datalayer import ArgusDataLayer
from argus.store import NotFound, Store
from argus.quotas import QuotaExceeded, UploadQuota, remove_upload, shared_quota
from argus.uploads import UploadCheck, check_files, display_name

log = logging.getLogger(__name__)

#: Conversation titles: the first message, shortened to this many characters.
TITLE_CHARS = 60


@dataclass(eq=False)
class Turn:
    """A stored chat message waiting for (or getting) its answer.

    Attributes:
        conv_id, user_id: where it is stored.
        message_id: the stored user message.
        step_id: the id of the answer: its stored row and the Chainlit step
            showing it (so ratings of the shown answer find the row).
        answer_id: an empty ``stopped`` assistant row stored right after the
            user message, made when a later message of the session is stored
            before this one is answered (rows then still read question,
            answer, question, answer); the answer fills it in (its id is
            ``step_id``).
        answered: the answer row was written (or attempted).
    """

    conv_id: str
    user_id: str
    message_id: str
    step_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    answer_id: Optional[str] = None
    answered: bool = False


@dataclass
class Intake:
    """What storing a chat message gave: the checked uploads, and the turn to
    answer (None when there is no text; ``stored`` False when nothing was)."""

    check: UploadCheck
    stored: bool = False
    turn: Optional[Turn] = None
    conv_id: Optional[str] = None


def _element_size(element: Any) -> int:
    """Bytes of an uploaded element: its file's size on disk, else its in-memory content's."""
    path = getattr(element, "path", None)
    if path:
        try:
            return os.stat(path).st_size
        except OSError:
            return 0
    content = getattr(element, "content", None)
    return len(content) if isinstance(content, (bytes, bytearray, str)) else 0


#: Longest wait for Chainlit to finish showing a message's files before one is taken out, in seconds.
SHOWN_WAIT_S = 2.0


async def _take_out(message_elements: list, refused: list, session: Any) -> None:
    """Take refused files out of the shown message (the browser drops the element: no broken
    image) and off the disk (Chainlit's copy in the session's upload directory).

    Chainlit sends a message's files from a task of its own; an element is removed once that
    task has shown it (``persisted``), or after :data:`SHOWN_WAIT_S`.
    """
    deadline = asyncio.get_running_loop().time() + SHOWN_WAIT_S
    while (any(not getattr(e, "persisted", True) for e in message_elements)
           and asyncio.get_running_loop().time() < deadline):
        await asyncio.sleep(0.02)
    await asyncio.sleep(0)  # the element's send_element follows its persisted flag
    for element in refused:
        remove_upload(session, getattr(element, "chainlit_key", None) or getattr(element, "id", None))
        try:
            await element.remove()
        except Exception as exc:  # the socket is gone: nothing is shown anyway
            log.debug("could not take refused file %r out of the chat: %s", getattr(element, "name", "?"), exc)


class MessageIntake:
    """Stores what a chat session sends, and the answers' rows.

    Args:
        store: where conversations, messages and attachments go.
        data_layer: told when a conversation is created (it writes what it queued for the thread).
        sessions: moves the chat to a new thread when its id is taken.
        max_upload_bytes: the largest accepted upload.
        model_id_now: the model id to record for a session's rows, without waiting.
        quota: the upload quotas (default: the process's, :func:`argus.quotas.shared_quota`).
    """

    def __init__(
        self, store: Store, data_layer: ArgusDataLayer, sessions: Sessions, max_upload_bytes: int,
        model_id_now: Callable[[SessionState], str], quota: Optional[UploadQuota] = None,
    ):
        self.store = store
        self.data_layer = data_layer
        self.sessions = sessions
        self.max_upload_bytes = max_upload_bytes
        self.model_id_now = model_id_now
        self._quota = quota

    @property
    def quota(self) -> UploadQuota:
        """The upload quotas this intake counts files in."""
        if self._quota is None:
            self._quota = shared_quota()
        return self._quota

    async def check_uploads(self, elements: list, user_id: str) -> UploadCheck:
        """The quotas, then the content checks (:func:`argus.uploads.check_files`), for the files
        of one message; every refused file is taken out of the shown message and off the disk."""
        check = UploadCheck()
        if not elements:
            return check
        session = current_session()
        session_id = getattr(session, "id", None) or f"user:{user_id}"
        allowed, over = [], {}
        for element in elements:
            file_id = getattr(element, "chainlit_key", None) or getattr(element, "id", None)
            name = display_name(getattr(element, "name", None))
            try:
                self.quota.admit(session_id, user_id, file_id, _element_size(element), name)
            except QuotaExceeded as exc:
                over.setdefault(str(exc), []).append(name)
                check.refused.append(element)
            else:
                allowed.append(element)
        if allowed:
            checked = await asyncio.to_thread(check_files, allowed, self.max_upload_bytes)
            check.images = checked.images
            check.rejections.extend(checked.rejections)
            check.refused.extend(checked.refused)
        check.rejections.extend(upload_not_accepted(names, why) for why, names in over.items())
        if check.refused:
            await _take_out(message_elements=elements, refused=check.refused, session=session)
        return check

    async def store_message(self, message: Any, text: str, user_id: str, state: SessionState) -> Intake:
        """Check the uploads of ``message`` (a ``cl.Message``: quotas, then content), take
        refused files out of it, then store conversation, attachments and message (run it
        shielded). Raises StoreError, NotFound."""
        elements = list(getattr(message, "elements", None) or [])
        check = await self.check_uploads(elements, user_id)
        if check.refused and isinstance(getattr(message, "elements", None), list):
            message.elements = [e for e in message.elements if all(e is not r for r in check.refused)]
        if not text and not check.images:
            return Intake(check)
        async with state.intake:
            model_id = self.model_id_now(state)
            conv_id = await self.ensure_conversation(state, user_id, text, check, model_id)
            # Messages of this session still waiting for their answer get their
            # (empty) answer row now, so the stored rows keep question → answer order.
            for earlier in state.turns:
                if earlier.conv_id == conv_id and earlier.answer_id is None and not earlier.answered:
                    row = await asyncio.to_thread(
                        self.store.add_message, conv_id, user_id, "assistant", "", status="stopped", model=model_id,
                        message_id=earlier.step_id,
                    )
                    earlier.answer_id = row.id
            attachment_ids = []
            for img in check.images:
                att = await asyncio.to_thread(self.store.save_attachment, user_id, img.name, img.mime, img.data)
                attachment_ids.append(att.id)
            stored = await self._add_user_message(message, conv_id, user_id, text, model_id, attachment_ids)
            turn = None
            if text:
                turn = Turn(conv_id=conv_id, user_id=user_id, message_id=stored.id)
                state.turns.append(turn)
        return Intake(check, stored=True, turn=turn, conv_id=conv_id)

    async def _add_user_message(
        self, message: Any, conv_id: str, user_id: str, text: str, model_id: str, attachment_ids: list[str]
    ):
        """Store the user's message under its Chainlit step id (so the history shows our row).

        A step id that is already a stored message (a client re-sending an old id)
        is not reused: the message is stored under a new id, never over another one.
        """
        step_id = getattr(message, "id", None)
        if isinstance(step_id, str) and step_id:
            try:
                await asyncio.to_thread(self.store.get_message, step_id, user_id)
                log.warning("message id %s is already stored; storing under a new id", step_id)
                step_id = None
            except NotFound:
                pass
        else:
            step_id = None
        add = self.store.add_message
        kwargs = dict(status="complete", model=model_id, attachment_ids=attachment_ids)
        try:
            return await asyncio.to_thread(add, conv_id, user_id, "user", text, message_id=step_id, **kwargs)
        except NotFound:
            if step_id is None:
                raise
            # the id may be someone else's message; if the conversation is gone this raises again
            return await asyncio.to_thread(add, conv_id, user_id, "user", text, **kwargs)

    async def ensure_conversation(
        self, state: SessionState, user_id: str, text: str, check: UploadCheck, model_id: str
    ) -> str:
        """The current conversation; the first message creates it, with the chat's thread id
        as its id (the data layer then writes anything queued for that thread)."""
        if state.conversation_id:
            return state.conversation_id
        title = one_line(text, TITLE_CHARS) if text else f"Image: {check.images[0].name}"
        create = self.store.create_conversation
        thread_id = self.sessions.thread_id(state)
        try:
            conv = await asyncio.to_thread(create, user_id, title, model_id, conversation_id=thread_id)
        except NotFound:  # the id is another account's conversation: never write there
            log.warning("thread id %s is taken; this chat moves to a new thread", thread_id)
            thread_id = await self.sessions.fresh_thread(state, announce=True)
            conv = await asyncio.to_thread(create, user_id, title, model_id, conversation_id=thread_id)
        state.conversation_id = conv.id
        state.thread_id = conv.id
        await self.data_layer.conversation_created(conv)
        return conv.id

    async def keep(self, state: SessionState, user_id: str, request: str, reply: str, files: Sequence[OutFile]) -> None:
        """Store a command's result in the conversation (see ``CommandContext.keep``)."""
        async with state.intake:
            model_id = self.model_id_now(state)
            if not state.conversation_id:  # after /new or /delete: the browser moves to the new thread now
                self.sessions.thread_id(state)
                await self.sessions.sync_thread(state, announce=True)
            conv_id = await self.ensure_conversation(state, user_id, request, UploadCheck(), model_id)
            att_ids = []
            for f in files:
                att = await asyncio.to_thread(self.store.save_attachment, user_id, f.name, f.mime, f.data)
                att_ids.append(att.id)
            await asyncio.to_thread(self.store.add_message, conv_id, user_id, "user", request, model=model_id)
            await asyncio.to_thread(
                self.store.add_message, conv_id, user_id, "assistant", reply, model=model_id, attachment_ids=att_ids,
            )

    async def record_answer(self, turn: Turn, state: SessionState, content: str, status: str, model_id: str) -> None:
        """Store ``turn``'s answer row (filling its placeholder row if it has one)."""
        async with state.intake:
            turn.answered = True
            if turn.answer_id is None:
                await asyncio.to_thread(
                    self.store.add_message, turn.conv_id, turn.user_id, "assistant", content,
                    status=status, model=model_id, message_id=turn.step_id,
                )
            else:
                await asyncio.to_thread(
                    self.store.update_message, turn.answer_id, turn.user_id, content=content, status=status,
                )

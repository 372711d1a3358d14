"""Session state: each chat session's :class:`SessionState`, its Chainlit thread and user.

Chainlit keeps per-session values in ``cl.user_session``; it replaces that dict when
it resumes a thread on a reconnect, so the states are also kept by Chainlit session id
(weakly: a state lives as long as its session or an in-flight answer holds it). A
conversation id IS its Chainlit thread id: moving the chat to another conversation
(``/new``, ``/select``, ``/delete``) moves the Chainlit session's thread with it.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Optional, Sequence

import chainlit as cl
from chainlit.context import ChainlitContextException

from argus.commands import SessionState
from argus.commands.base import OutFile, new_thread_id
from argus.datalayer import KIND_KEY, KIND_NOTICE, ArgusDataLayer

log = logging.getLogger(__name__)

#: Key of our :class:`SessionState` in ``cl.user_session``.
STATE_KEY = "argus"


def current_session() -> Any:
    """The Chainlit session of this call, or None outside one."""
    try:
        return cl.context.session
    except ChainlitContextException:
        return None


def current_user_id() -> Optional[str]:
    """The store id of the signed-in user of this session (from the session JWT), or None."""
    user = cl.user_session.get("user")
    meta = getattr(user, "metadata", None) or {}
    uid = meta.get("user_id")
    return uid if isinstance(uid, str) and uid else None


def element(f: OutFile) -> Any:
    """A file of a reply as Chainlit shows it: images and videos inline, anything else as a download."""
    if f.mime.startswith("image/"):
        return cl.Image(name=f.name, content=f.data, mime=f.mime, display="inline", size="large")
    if f.mime.startswith("video/"):
        return cl.Video(name=f.name, content=f.data, mime=f.mime, display="inline")
    return cl.File(name=f.name, content=f.data, mime=f.mime, display="inline")


async def say(content: str, *, kind: str = KIND_NOTICE, id: Optional[str] = None, files: Sequence[OutFile] = ()) -> None:
    """Send a message to this session; ``kind`` (``metadata["argus"]``) tells the data layer what it is."""
    elements = [element(f) for f in files]
    await cl.Message(content=content, id=id, metadata={KIND_KEY: kind}, elements=elements).send()


class Sessions:
    """The live chat sessions' states, and their Chainlit threads.

    Args:
        data_layer: reads a conversation's thread when the chat moves to it (``/select``).
    """

    def __init__(self, data_layer: ArgusDataLayer):
        self.data_layer = data_layer
        self._states: "weakref.WeakValueDictionary[str, SessionState]" = weakref.WeakValueDictionary()

    def remember(self, state: SessionState) -> SessionState:
        """Make ``state`` this session's (in ``cl.user_session`` and by session id)."""
        session = current_session()
        if session is not None:
            self._states[session.id] = state
        cl.user_session.set(STATE_KEY, state)
        return state

    def known(self) -> Optional[SessionState]:
        """The state kept for this Chainlit session id (survives a reconnect), or None."""
        session = current_session()
        return self._states.get(session.id) if session is not None else None

    def current(self) -> Optional[SessionState]:
        """This session's state from ``cl.user_session``, or None (never created)."""
        state = cl.user_session.get(STATE_KEY)
        return state if isinstance(state, SessionState) else None

    def state(self) -> SessionState:
        """This session's state, made (and remembered) on first use."""
        state = self.current()
        if state is None:
            state = self.known()
            if state is None:
                state = SessionState(thread_id=getattr(current_session(), "thread_id", None))
            self.remember(state)
        return state

    def fresh(self) -> SessionState:
        """A new state for this session, on its Chainlit thread, remembered."""
        return self.remember(SessionState(thread_id=getattr(current_session(), "thread_id", None)))

    @staticmethod
    def thread_id(state: SessionState) -> str:
        """The thread (= id of the next conversation) this chat writes to."""
        if not state.thread_id:
            state.thread_id = getattr(current_session(), "thread_id", None) or new_thread_id()
        return state.thread_id

    async def fresh_thread(self, state: SessionState, *, announce: bool = False) -> str:
        """Move the chat to a new, empty thread (its conversation is created by the next message).

        ``announce``: tell the browser now (a message is being handled in the new
        thread); otherwise Chainlit announces it with the next message.
        """
        state.conversation_id = None
        state.thread_id = new_thread_id()
        await self.sync_thread(state, announce=announce)
        return state.thread_id

    async def sync_thread(self, state: SessionState, *, announce: bool = False) -> None:
        """Bring the Chainlit session (and the browser) to ``state.thread_id``.

        An existing conversation (``/select``) is shown like the sidebar resumes a
        thread: ``first_interaction`` with its id, then ``resume_thread`` with its
        messages (the browser redraws the chat, or opens ``/thread/<id>`` when it
        was showing another resumed thread). A new thread (``/new``, ``/delete``)
        is announced by Chainlit with the next message (``has_first_interaction``
        reset), unless ``announce``.
        """
        session = current_session()
        if session is None or not state.thread_id or session.thread_id == state.thread_id:
            return
        session.thread_id = state.thread_id
        session.thread_id_to_resume = None
        emitter = cl.context.emitter
        if state.conversation_id == state.thread_id:
            session.has_first_interaction = True
            await emitter.emit("first_interaction", {"interaction": "resume", "thread_id": state.thread_id})
            thread = await self.data_layer.get_thread(state.thread_id)
            if thread is not None:
                await emitter.resume_thread(thread)
        elif announce:
            session.has_first_interaction = True
            await emitter.emit("first_interaction", {"interaction": "new", "thread_id": state.thread_id})
        else:
            session.has_first_interaction = False

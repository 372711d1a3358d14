"""The Chainlit hooks: :class:`JarvisArgus`, one object shared by all chat sessions.

``app.py`` builds one :class:`JarvisArgus` and forwards each Chainlit hook to it. It
wires the parts of ``argus.chat`` together and handles the hooks' edges:

* sign-in (``password_auth``); the client address and the 429 "too many attempts"
  answer come from ``argus.signup``'s guarded ``/login`` route;
* new and resumed chats (``on_chat_start``, ``on_chat_resume``): the session's state
  (:mod:`argus.chat.session`), the command menu, the model picker
  (:mod:`argus.chat.models`), administrators' key notices (:mod:`argus.chat.admins`);
* a message (``on_message``): a secret-bearing command leaves the chat first; the
  per-user rate limits (chat messages ``settings.messages_per_minute`` per 60 s, slash
  commands :data:`~argus.chat.replies.COMMANDS_PER_MINUTE`); messages longer than
  :data:`~argus.chat.sentences.MAX_MESSAGE_CHARS` are refused before anything is
  stored; slash commands (:mod:`argus.chat.replies`); otherwise the message is stored
  first (:mod:`argus.chat.intake`) and answered (:mod:`argus.chat.answering`);
* the stop button (``on_stop``), the Retry button (``on_retry``), the composer's model
  picker (``on_settings_update``).

Typed exceptions are caught here, at the edge, and turned into one clear sentence
for the user (:mod:`argus.chat.sentences`); details go to the server log.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable, Optional

import chainlit as cl

from argus.auth import Authenticator, LoginThrottled
from argus.chat.admins import AdminChats
from argus.chat.answering import RETRY_ACTION, Answering
from argus.chat.backends import LocalBackend, ModelHolder, NetworkBackend, RemoteBackend
from argus.chat.history import History
from argus.chat.intake import MessageIntake, Turn
from argus.chat.models import ModelChoice
from argus.chat.replies import COMMANDS_PER_MINUTE, Progress, TaskBoard, conceals
from argus.chat.sentences import (
    ACCOUNT_GONE,
    CONVERSATION_GONE,
    EMPTY_MESSAGE,
    IMAGE_NEEDS_TEXT,
    MAX_MESSAGE_CHARS,
    RETRY_GONE,
    SIGNED_OUT,
    STORE_DOWN,
    rate_limit_message,
    text_only_notice,
    too_long_message,
)
from argus.chat.session import Sessions, current_session, current_user_id, say
from argus.chat.shield import unstoppable
from argus.chat.slots import MAX_CONCURRENT_GENERATIONS, GenerationSlots, remove_quietly
from argus.commands import CommandContext, ParsedCommand, SessionState, menu, parse_command, run_command
from argus.commands.base import OutFile, new_thread_id
from argus.config import Settings, sampling_params
from argus.datalayer import KIND_COMMAND, ArgusDataLayer
from argus.network_choice import NetworkChoice
from argus.ratelimit import SlidingWindowLimiter
from argus.remote import Remote
from argus.signup import current_client_ip, report_store_unavailable
from argus.store import NotFound, Store, StoreError, StoreUnavailable, open_store
from argus.streaming import StreamHandle
from worker.control import ControlClient
from worker.engine import LocalModel, ModelLoadError, SamplingParams

log = logging.getLogger(__name__)

__all__ = ["JarvisArgus", "RETRY_ACTION"]


class JarvisArgus:
    """Everything the Chainlit hooks do, in one object shared by all sessions.

    Args:
        settings: from :meth:`Settings.from_env`.
        store: defaults to ``open_store(settings)``.
        model_loader: blocking callable returning the model; defaults to
            ``LocalModel.load(settings.model_path, settings.blocks_per_stage)``.
        authenticator: defaults to ``Authenticator(store, settings)``.
        max_generations: answers generated at once on this machine over all sessions.

    Public parts: ``store``, ``auth``, ``data_layer`` (Chainlit's data layer over the
    store), ``remote`` (catalogue, key pool, providers), ``network`` (the worker network
    back-end), ``model`` (the local model's holder), ``models`` (the models on offer and
    each session's choice), ``history`` (conversation memory), ``slots`` (generation
    slots), ``limiter``/``command_limiter`` and ``services`` (what commands use, by name).
    Call :meth:`start` once (it starts loading the model in the background).
    """

    def __init__(
        self,
        settings: Settings,
        store: Optional[Store] = None,
        *,
        model_loader: Optional[Callable[[], LocalModel]] = None,
        authenticator: Optional[Authenticator] = None,
        max_generations: int = MAX_CONCURRENT_GENERATIONS,
    ):
        self.settings = settings
        self.store = store if store is not None else open_store(settings)
        self.auth = authenticator or Authenticator(self.store, settings)
        self.limiter = SlidingWindowLimiter(settings.messages_per_minute, 60.0)
        self.command_limiter = SlidingWindowLimiter(COMMANDS_PER_MINUTE, 60.0)
        self.slots = GenerationSlots(max_generations)
        self.model = ModelHolder(
            model_loader or (lambda: LocalModel.load(settings.model_path, settings.blocks_per_stage))
        )
        self.data_layer = ArgusDataLayer(self.store)
        self.sessions = Sessions(self.data_layer)
        #: Server-wide objects commands use (CommandContext.services), by name.
        self.services: dict[str, Any] = {}
        self.data_layer.services = self.services  # a sidebar delete drops the network session too
        self.remote = Remote(settings, self.store)
        self.admins = AdminChats(self.store, self.remote)
        self.remote.on_invalid = self.admins.tell_invalid
        self.services["keys"] = self.remote.pool
        self.services["remote"] = self.remote
        #: /network and /workers: the local worker daemon, and the network the chat uses.
        self.services["daemon"] = ControlClient(settings.worker_data_dir)
        self.services["network_choice"] = NetworkChoice(settings.data_dir)
        #: /workers rebalance shows the distribution of blocks as a task list in the chat.
        self.services["task_board"] = TaskBoard
        self.network = NetworkBackend(settings, self.store, self.services, loaded_model=self.model.loaded)
        self.models = ModelChoice(self.model, self.remote, self.network)
        self.history = History(self.store)
        self.intake = MessageIntake(
            self.store, self.data_layer, self.sessions, settings.max_upload_bytes, self.models.model_id_now,
        )
        self.answering = Answering(
            self.intake, self.history, self.slots, local=LocalBackend(self.model, self.sampling_params),
            remote=RemoteBackend(self.remote), network=self.network, chosen_model=self.models.chosen,
        )

    def start(self) -> None:
        """Start loading the model in a background thread (returns at once)."""
        self.model.start()

    def sampling_params(self) -> SamplingParams:
        """Sampling settings for one answer, from the server settings (:func:`argus.config.sampling_params`)."""
        return sampling_params(self.settings)

    def rate_limit_message(self, retry_after_s: float, *, commands: bool = False) -> str:
        """One sentence: the limit and how long to wait (chat messages, or commands)."""
        if commands:
            return rate_limit_message("commands", COMMANDS_PER_MINUTE, retry_after_s)
        return rate_limit_message("messages", self.settings.messages_per_minute, retry_after_s)

    # ---- sign-in -------------------------------------------------------------
    async def password_auth(self, username: str, password: str) -> Optional[cl.User]:
        """Chainlit's password callback: a ``cl.User`` when the credentials match, else None.

        The client address comes from ``argus.signup.current_client_ip()``
        (set by its guarded ``POST /login``, which also answers 429 with the
        :class:`LoginThrottled` sentence *before* Chainlit is called, so the
        login page shows it). Chainlit turns None from this callback into 401,
        so errors are logged and None returned; a StoreUnavailable is also
        reported to that guard (``report_store_unavailable``), which then
        answers 503 "Storage is unavailable right now..." instead of 401. The
        user's store id and role travel in ``metadata`` (inside the session JWT).
        """
        ip = current_client_ip()
        try:
            user = await asyncio.to_thread(self.auth.login, username, password, ip)
        except LoginThrottled:  # crossed the limit between the guard's check and here
            log.warning("sign-in throttled for client %s", ip)
            return None
        except StoreUnavailable as exc:
            log.warning("sign-in failed: %s", exc)
            report_store_unavailable()
            return None
        except StoreError:
            log.exception("sign-in failed: store error")
            return None
        if user is None:
            return None
        return cl.User(
            identifier=user.email,
            display_name=user.name,
            metadata={"user_id": user.id, "role": user.role, "provider": "credentials"},
        )

    # ---- chat sessions -------------------------------------------------------
    async def on_chat_start(self) -> None:
        """New chat session: fresh state, the command menu; checks the account still exists.

        When the browser asked to resume a thread that could not be resumed
        (missing, deleted, or another user's: Chainlit then starts a new chat
        but keeps that id), the session gets a fresh thread id instead.
        """
        session = current_session()
        if session is not None and getattr(session, "thread_id_to_resume", None):
            log.info("thread %s could not be resumed; starting a new one", session.thread_id_to_resume)
            session.thread_id = new_thread_id()
            session.thread_id_to_resume = None
        state = self.sessions.fresh()
        await cl.context.emitter.set_commands(menu())
        self.start()
        uid = current_user_id()
        if uid is None:
            return
        try:
            if await asyncio.to_thread(self.store.get_user, uid) is None:
                await say(ACCOUNT_GONE)
                return
            await self.models.send_settings(state)
            await self.admins.track()
        except StoreUnavailable as exc:
            log.warning("chat start: %s", exc)
        except StoreError:
            log.exception("store error at chat start")

    async def on_chat_resume(self, thread: dict) -> None:
        """A conversation opened from the history (Chainlit checked it is the user's, via
        ``ArgusDataLayer.get_thread``): continue it. Its stored messages are the
        model's memory, as for any conversation; the command menu is sent again.
        """
        session = current_session()
        uid = current_user_id()
        thread_id = thread.get("id") if isinstance(thread, dict) else None
        previous = self.sessions.known()
        if previous is not None and previous.conversation_id == thread_id:
            state = self.sessions.remember(previous)  # a reconnect: keep the running answers' state
        else:
            state = self.sessions.fresh()
        await cl.context.emitter.set_commands(menu())
        self.start()
        if uid is None or not isinstance(thread_id, str):
            return
        try:
            conv = await asyncio.to_thread(self.store.get_conversation, thread_id, uid)
        except NotFound:  # not theirs after all (or deleted meanwhile): a new thread
            await self.sessions.fresh_thread(state)
            return
        except StoreUnavailable as exc:
            log.warning("chat resume: %s", exc)
            return
        except StoreError:
            log.exception("store error at chat resume")
            return
        state.conversation_id = conv.id
        state.thread_id = conv.id
        try:
            saved = (getattr(session, "chat_settings", None) or {}).get("model")  # restored from the thread
            if isinstance(saved, str) and state.model_id is None:
                await self.models.pick(state, saved)
            await self.models.send_settings(state)
            await self.admins.track()
        except StoreError as exc:
            log.warning("chat resume: %s", exc)

    async def on_settings_update(self, settings: dict) -> None:
        """The user picked a model in the chat settings: this chat uses it from now on."""
        wanted = settings.get("model") if isinstance(settings, dict) else None
        if isinstance(wanted, str):
            await self.models.pick(self.sessions.state(), wanted)

    async def on_stop(self) -> None:
        """Chainlit's stop button: stop everything this session is doing.

        Chainlit cancels only the newest message task; this also stops the
        running generation (its partial text is kept) and cancels the
        session's other message tasks (waiting for the model, for the
        previous answer or for a slot). Each keeps its stored message and
        records an empty ``stopped`` answer.
        """
        state = self.sessions.current()
        if state is None:
            return
        handle = state.stream
        if isinstance(handle, StreamHandle):
            handle.cancel()
        current = asyncio.current_task()
        for task in list(state.tasks):
            if task is not current and not task.done() and not task.cancelling():
                task.cancel()

    # ---- messages ------------------------------------------------------------
    async def on_message(self, message: cl.Message) -> None:
        """Answer one chat message: a command, or text (+ images) for the model.

        Never raises for expected failures (store down, model missing, bad
        upload, too long, too fast): each becomes one sentence in the chat.
        Re-raises ``CancelledError`` after the message (and any partial
        answer) is saved.
        """
        content = message.content or ""
        if conceals(content, getattr(message, "command", None)):
            message.content = ""  # the removal itself must not carry the secret back to the browser
            await remove_quietly(message)  # a secret (an API key) leaves the chat before anything else
        uid = current_user_id()
        if uid is None:
            await say(SIGNED_OUT)
            return
        if len(content) > MAX_MESSAGE_CHARS:
            await say(too_long_message(len(content)))
            return
        state = self.sessions.state()
        task = asyncio.current_task()
        state.tasks.add(task)
        try:
            parsed = parse_command(content, getattr(message, "command", None))
            if parsed is not None:
                if not self.command_limiter.hit(uid):
                    await say(
                        self.rate_limit_message(self.command_limiter.retry_after(uid), commands=True), kind=KIND_COMMAND
                    )
                    return
                files: list[OutFile] = []
                reply = await self.run_command(parsed, uid, state, files=files)
                await self.sessions.sync_thread(state)  # /new, /select, /delete move the chat
                await say(reply, kind=KIND_COMMAND, files=files)
                return
            if not self.limiter.hit(uid):
                await say(self.rate_limit_message(self.limiter.retry_after(uid)))
                return
            await self._chat(message, uid, state)
        except NotFound:  # the current conversation vanished meanwhile
            log.warning("conversation %s not found for user %s", state.conversation_id, uid)
            await self.sessions.fresh_thread(state)  # the next message starts a new conversation
            await say(CONVERSATION_GONE)
        except StoreUnavailable as exc:  # database down: one clear line, no traceback
            log.warning("message of user %s not saved: %s", uid, exc)
            await say(STORE_DOWN)
        except StoreError:
            log.exception("store error")
            await say(STORE_DOWN)
        finally:
            state.tasks.discard(task)

    async def run_command(
        self, parsed: ParsedCommand, user_id: str, state: SessionState, *, files: Optional[list] = None
    ) -> str:
        """Run a slash command for ``user_id`` and return its reply; files for the reply
        (``/export``) are appended to ``files``."""
        if parsed.name == "model":
            try:  # let /model show the real id once the load has finished
                await asyncio.wait_for(asyncio.shield(self.model.get()), timeout=30)
            except (ModelLoadError, asyncio.TimeoutError):
                pass
        from chainlit.config import config

        user = await asyncio.to_thread(self.store.get_user, user_id)
        progress = Progress()
        in_chat = current_session() is not None
        ctx = CommandContext(
            store=self.store, user_id=user_id, state=state, models=await self.models.offered(),
            root_path=config.run.root_path or "",
            is_admin=user is not None and user.role == "admin",
            services=self.services,
            progress=progress.show if in_chat else None,
            keep=(lambda request, reply, kept: self.intake.keep(state, user_id, request, reply, kept))
            if in_chat else None,
        )
        try:
            reply = await run_command(ctx, parsed)
        finally:
            await progress.close()
        if files is not None:
            files.extend(ctx.files)
        if parsed.name == "model" and in_chat:
            await self.models.send_settings(state)  # the picker shows the new choice
        return reply

    async def _chat(self, message: cl.Message, user_id: str, state: SessionState) -> None:
        text = (message.content or "").strip()
        # Store first, shielded: a stop (even a cancellation of this task while
        # it waits for the model or for the previous answer) keeps the message.
        intake, cancelled = await unstoppable(self.intake.store_message(message, text, user_id, state))
        turn = intake.turn
        try:
            if cancelled:
                raise asyncio.CancelledError()
            check = intake.check
            if not intake.stored:
                await say("\n".join(check.rejections) or EMPTY_MESSAGE)
                return
            notes = list(check.rejections)
            conv_id = intake.conv_id
            if check.images:
                spec = await self.models.chosen(state)
                if spec is not None and spec.vision:
                    if not text:
                        notes.append(IMAGE_NEEDS_TEXT)
                elif not text or conv_id not in state.text_only_notice:
                    state.text_only_notice.add(conv_id)
                    notes.append(text_only_notice(spec.label if spec is not None else "The local model", bool(text)))
            if notes:
                await say("\n\n".join(notes))
            if turn is None:  # an image without text: stored, nothing to answer
                return
            await self.answering.answer_turn(turn, state)
        except asyncio.CancelledError:
            try:  # stopped before the answer began
                await self.answering.record_stop(turn, state, self.models.model_id_now(state))
            except StoreError:
                log.exception("could not record the stop of message %s", turn.message_id if turn else "?")
            raise
        finally:
            if turn is not None and turn in state.turns:
                state.turns.remove(turn)

    async def on_retry(self, action: Any) -> None:
        """The Retry button of an interrupted answer: answer the same message again (a new
        answer row; the interrupted one stays, marked)."""
        uid = current_user_id()
        payload = getattr(action, "payload", None) or {}
        message_id = payload.get("message_id") if isinstance(payload, dict) else None
        if uid is None or not isinstance(message_id, str):
            return
        state = self.sessions.state()
        task = asyncio.current_task()
        state.tasks.add(task)
        turn: Optional[Turn] = None
        try:
            try:
                m = await asyncio.to_thread(self.store.get_message, message_id, uid)
            except NotFound:
                m = None
            if m is None or m.role != "user" or m.conversation_id != state.conversation_id:
                await say(RETRY_GONE)
                return
            if not self.limiter.hit(uid):
                await say(self.rate_limit_message(self.limiter.retry_after(uid)))
                return
            with contextlib.suppress(Exception):
                await action.remove()
            turn = Turn(conv_id=m.conversation_id, user_id=uid, message_id=m.id)
            state.turns.append(turn)
            await self.answering.answer_turn(turn, state)
        except asyncio.CancelledError:
            with contextlib.suppress(StoreError):
                await self.answering.record_stop(turn, state, self.models.model_id_now(state))
            raise
        except StoreError as exc:
            log.warning("retry of message %s failed: %s", message_id, exc)
            await say(STORE_DOWN)
        finally:
            state.tasks.discard(task)
            if turn is not None and turn in state.turns:
                state.turns.remove(turn)

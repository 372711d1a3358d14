"""The chat logic behind the Chainlit hooks: :class:`JarvisArgus`.

``app.py`` builds one :class:`JarvisArgus` and forwards each Chainlit hook to
it. This module owns:

* the shared local model, loaded once in a background thread at start-up; if
  loading fails, the :class:`~worker.engine.ModelLoadError` sentence is kept
  and every chat is answered with it (no traceback reaches the user);
* the per-user message rate limit (``settings.messages_per_minute`` per 60 s);
* slash commands (``argus.commands``), answered directly, never sent to the
  model nor stored;
* image uploads (``argus.uploads``): checked, stored, acknowledged;
* conversation memory: the stored messages of the current conversation are
  the model's history (the engine trims the oldest to fit its window);
* streaming the answer to the browser (``argus.streaming``) and storing it as
  ``complete``, ``stopped`` (partial text kept) or ``error``;
* sign-in (``password_auth``); the client address and the 429 "too many
  attempts" answer come from ``argus.signup``'s guarded ``/login`` route.

Typed exceptions are caught here, at the edge, and turned into one clear
sentence for the user; details go to the server log.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
from typing import Callable, Optional

import chainlit as cl

from argus.auth import Authenticator, LoginThrottled
from argus.commands import (
    CommandContext,
    ModelInfo,
    ParsedCommand,
    SessionState,
    menu,
    parse_command,
    run_command,
)
from argus.commands.base import one_line
from argus.config import Settings
from argus.ratelimit import SlidingWindowLimiter
from argus.signup import current_client_ip
from argus.store import NotFound, Store, StoreError, StoreUnavailable, open_store
from argus.streaming import StreamHandle, StreamResult, stream_pieces
from argus.uploads import UploadCheck, check_files
from worker.engine import LocalModel, ModelLoadError, SamplingParams

log = logging.getLogger(__name__)

#: Key of our :class:`SessionState` in ``cl.user_session``.
STATE_KEY = "argus"
#: Stored messages fed to the model as history (the engine trims further).
HISTORY_LIMIT = 50
#: Conversation titles: the first message, shortened to this many characters.
TITLE_CHARS = 60
#: Id/name used for the local model while it is loading or when it failed.
LOCAL_MODEL_FALLBACK_ID = "local"

TEXT_ONLY_NOTICE = "The local model reads text only; I stored your image and answered the text."
TEXT_ONLY_NOTICE_NO_TEXT = "The local model reads text only; I stored your image. Add some text to get an answer."
STORE_DOWN = "I can't reach the database right now, so nothing was saved; please try again in a moment."
GENERATION_FAILED = "Something went wrong while generating the answer; please try again."
SIGNED_OUT = "Your session has no signed-in user; please sign in again."
ACCOUNT_GONE = "Your account no longer exists; please sign in again."
CONVERSATION_GONE = "That conversation is no longer available; send your message again to start a new one."
EMPTY_MESSAGE = "Send some text (or an image) and I'll answer."
STOPPED_MARK = "_(stopped)_"


# ---------------------------------------------------------------------------
# The model, loaded once in the background.
# ---------------------------------------------------------------------------
class ModelHolder:
    """Loads the model once in a daemon thread and hands it out.

    Args:
        loader: blocking callable returning the model; raises ModelLoadError
            (any other exception is wrapped in one, details logged).
    """

    def __init__(self, loader: Callable[[], LocalModel]):
        self._loader = loader
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        """Begin loading (idempotent; returns at once)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            # RUNNING futures cannot be cancelled: a cancelled waiter (stop
            # button during the load) must not cancel the load for everyone.
            self._future.set_running_or_notify_cancel()
        threading.Thread(target=self._load, name="argus-model-load", daemon=True).start()

    def _load(self) -> None:
        try:
            model = self._loader()
        except ModelLoadError as e:
            log.error("model load failed: %s", e)
            self._future.set_exception(e)
        except BaseException as e:  # a bug or MemoryError: keep the server up, say so
            log.exception("model load crashed")
            self._future.set_exception(ModelLoadError(f"The local model could not be loaded ({type(e).__name__}: {e})."))
        else:
            log.info("model loaded: %s", getattr(model, "model_id", "?"))
            self._future.set_result(model)

    async def get(self) -> LocalModel:
        """The model, waiting for the load to finish without blocking the loop.

        Raises:
            ModelLoadError: loading failed (the same error every time).
        """
        self.start()
        return await asyncio.wrap_future(self._future)

    def info(self) -> ModelInfo:
        """What ``/model`` shows, without waiting."""
        if not self._future.done():
            return ModelInfo(id=LOCAL_MODEL_FALLBACK_ID, name="Local model", loading=True)
        err = self._future.exception()
        if err is not None:
            return ModelInfo(id=LOCAL_MODEL_FALLBACK_ID, name="Local model", problem=str(err))
        m = self._future.result()
        return ModelInfo(id=m.model_id, name=m.display_name)


# ---------------------------------------------------------------------------
# The chat logic.
# ---------------------------------------------------------------------------
class JarvisArgus:
    """Everything the Chainlit hooks do, in one object shared by all sessions.

    Args:
        settings: from :meth:`Settings.from_env`.
        store: defaults to ``open_store(settings)``.
        model_loader: blocking callable returning the model; defaults to
            ``LocalModel.load(settings.model_path, settings.blocks_per_stage)``.
        authenticator: defaults to ``Authenticator(store, settings)``.

    Call :meth:`start` once (it starts loading the model in the background).
    """

    def __init__(
        self,
        settings: Settings,
        store: Optional[Store] = None,
        *,
        model_loader: Optional[Callable[[], LocalModel]] = None,
        authenticator: Optional[Authenticator] = None,
    ):
        self.settings = settings
        self.store = store if store is not None else open_store(settings)
        self.auth = authenticator or Authenticator(self.store, settings)
        self.limiter = SlidingWindowLimiter(settings.messages_per_minute, 60.0)
        self.model = ModelHolder(
            model_loader or (lambda: LocalModel.load(settings.model_path, settings.blocks_per_stage))
        )

    def start(self) -> None:
        """Start loading the model in a background thread (returns at once)."""
        self.model.start()

    # ---- sign-in -------------------------------------------------------------
    async def password_auth(self, username: str, password: str) -> Optional[cl.User]:
        """Chainlit's password callback: a ``cl.User`` when the credentials match, else None.

        The client address comes from ``argus.signup.current_client_ip()``
        (set by its guarded ``POST /login``, which also answers 429 with the
        :class:`LoginThrottled` sentence *before* Chainlit is called, so the
        login page shows it). Chainlit turns any exception or None from this
        callback into 401, so errors are logged and None returned. The user's
        store id and role travel in ``metadata`` (inside the session JWT).
        """
        ip = current_client_ip()
        try:
            user = await asyncio.to_thread(self.auth.login, username, password, ip)
        except LoginThrottled:  # crossed the limit between the guard's check and here
            log.warning("sign-in throttled for client %s", ip)
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

    # ---- session helpers -----------------------------------------------------
    @staticmethod
    def _state() -> SessionState:
        state = cl.user_session.get(STATE_KEY)
        if not isinstance(state, SessionState):
            state = SessionState()
            cl.user_session.set(STATE_KEY, state)
        return state

    @staticmethod
    def _user_id() -> Optional[str]:
        user = cl.user_session.get("user")
        meta = getattr(user, "metadata", None) or {}
        uid = meta.get("user_id")
        return uid if isinstance(uid, str) and uid else None

    @staticmethod
    async def _say(content: str) -> None:
        await cl.Message(content=content).send()

    def _models(self) -> list[ModelInfo]:
        return [self.model.info()]

    # ---- hooks ---------------------------------------------------------------
    async def on_chat_start(self) -> None:
        """New chat session: fresh state, the command menu; checks the account still exists."""
        state = SessionState()
        cl.user_session.set(STATE_KEY, state)
        await cl.context.emitter.set_commands(menu())
        self.start()
        uid = self._user_id()
        if uid is None:
            return
        try:
            if await asyncio.to_thread(self.store.get_user, uid) is None:
                await self._say(ACCOUNT_GONE)
        except StoreError:
            log.exception("store error at chat start")

    async def on_stop(self) -> None:
        """Chainlit's stop button: stop the running generation (its partial text is kept)."""
        state = cl.user_session.get(STATE_KEY)
        handle = getattr(state, "stream", None)
        if isinstance(handle, StreamHandle):
            handle.cancel()

    async def on_message(self, message: cl.Message) -> None:
        """Answer one chat message: a command, or text (+ images) for the model.

        Never raises for expected failures (store down, model missing, bad
        upload): each becomes one sentence in the chat. Re-raises
        ``CancelledError`` after the partial answer is saved.
        """
        uid = self._user_id()
        if uid is None:
            await self._say(SIGNED_OUT)
            return
        state = self._state()
        try:
            parsed = parse_command(message.content, getattr(message, "command", None))
            if parsed is not None:
                await self._say(await self.run_command(parsed, uid, state))
                return
            if not self.limiter.hit(uid):
                await self._say(self.rate_limit_message(self.limiter.retry_after(uid)))
                return
            async with state.busy:
                await self._chat(message, uid, state)
        except StoreUnavailable:
            log.exception("store unavailable")
            await self._say(STORE_DOWN)
        except NotFound:  # the current conversation vanished meanwhile
            log.warning("conversation %s not found for user %s", state.conversation_id, uid)
            state.conversation_id = None
            await self._say(CONVERSATION_GONE)
        except StoreError:
            log.exception("store error")
            await self._say(STORE_DOWN)

    def rate_limit_message(self, retry_after_s: float) -> str:
        """One sentence: the limit and how many seconds to wait."""
        wait = max(1, math.ceil(retry_after_s))
        per = self.settings.messages_per_minute
        return (
            f"You're sending messages too fast (limit: {per} per minute); "
            f"please wait {wait} second{'s' if wait != 1 else ''} and try again."
        )

    async def run_command(self, parsed: ParsedCommand, user_id: str, state: SessionState) -> str:
        """Run a slash command for ``user_id`` and return its reply."""
        if parsed.name == "model":
            try:  # let /model show the real id once the load has finished
                await asyncio.wait_for(asyncio.shield(self.model.get()), timeout=30)
            except (ModelLoadError, asyncio.TimeoutError):
                pass
        ctx = CommandContext(store=self.store, user_id=user_id, state=state, models=self._models())
        return await run_command(ctx, parsed)

    # ---- chat ----------------------------------------------------------------
    async def _chat(self, message: cl.Message, user_id: str, state: SessionState) -> None:
        text = (message.content or "").strip()
        elements = list(getattr(message, "elements", None) or [])
        check = UploadCheck()
        if elements:
            check = await asyncio.to_thread(check_files, elements, self.settings.max_upload_bytes)
        if not text and not check.images:
            await self._say("\n".join(check.rejections) or EMPTY_MESSAGE)
            return

        model: Optional[LocalModel] = None
        model_error: Optional[str] = None
        try:
            model = await self.model.get()
        except ModelLoadError as e:
            model_error = str(e)
        model_id = model.model_id if model is not None else (state.model_id or LOCAL_MODEL_FALLBACK_ID)

        conv_id = await self._ensure_conversation(state, user_id, text, check, model_id)
        attachment_ids = []
        for img in check.images:
            att = await asyncio.to_thread(self.store.save_attachment, user_id, img.name, img.mime, img.data)
            attachment_ids.append(att.id)
        await asyncio.to_thread(
            self.store.add_message, conv_id, user_id, "user", text,
            status="complete", model=model_id, attachment_ids=attachment_ids,
        )

        notes = list(check.rejections)
        if check.images and (not text or conv_id not in state.text_only_notice):
            state.text_only_notice.add(conv_id)
            notes.append(TEXT_ONLY_NOTICE if text else TEXT_ONLY_NOTICE_NO_TEXT)
        if notes:
            await self._say("\n\n".join(notes))
        if not text:
            return

        if model is None:
            await self._say(model_error or GENERATION_FAILED)
            await asyncio.to_thread(
                self.store.add_message, conv_id, user_id, "assistant", model_error or "",
                status="error", model=model_id,
            )
            return

        history = await self._history(conv_id, user_id)
        await self._answer(model, history, conv_id, user_id, model_id, state)

    async def _ensure_conversation(
        self, state: SessionState, user_id: str, text: str, check: UploadCheck, model_id: str
    ) -> str:
        if state.conversation_id:
            return state.conversation_id
        title = one_line(text, TITLE_CHARS) if text else f"Image: {check.images[0].name}"
        conv = await asyncio.to_thread(self.store.create_conversation, user_id, title, model_id)
        state.conversation_id = conv.id
        return conv.id

    async def _history(self, conv_id: str, user_id: str) -> list[dict]:
        """The conversation's recent messages, oldest first, as model messages."""
        page = await asyncio.to_thread(self.store.list_messages, conv_id, user_id, HISTORY_LIMIT)
        out = []
        for m in reversed(page.items):
            if m.role not in ("user", "assistant") or m.status == "error" or not m.content.strip():
                continue
            out.append({"role": m.role, "content": m.content})
        return out

    def sampling_params(self) -> SamplingParams:
        """Sampling settings for one answer, from the server settings."""
        s = self.settings
        return SamplingParams(
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
            max_tokens=s.max_new_tokens,
        )

    async def _answer(
        self,
        model: LocalModel,
        history: list[dict],
        conv_id: str,
        user_id: str,
        model_id: str,
        state: SessionState,
    ) -> None:
        params = self.sampling_params()
        handle = StreamHandle()
        state.stream = handle
        msg = cl.Message(content="")
        try:
            result: StreamResult = await stream_pieces(
                lambda: model.chat(history, params, handle.cancel_event),
                msg.stream_token,
                handle,
                thread_name="argus-generate",
            )
        finally:
            if state.stream is handle:
                state.stream = None

        gen = result.source
        finish = getattr(gen, "finish_reason", None)
        notice = getattr(gen, "notice", None)
        status = result.status
        text = result.text
        if status == "error":
            log.error("generation failed", exc_info=result.error)
        elif status == "complete" and finish == "context" and not text:
            status = "error"  # the prompt did not fit: nothing was generated

        stored = text if text or status != "error" else (notice or GENERATION_FAILED)
        # Save first, shielded: a second stop must not lose the answer.
        save = asyncio.ensure_future(asyncio.to_thread(
            self.store.add_message, conv_id, user_id, "assistant", stored, status=status, model=model_id,
        ))
        try:
            await asyncio.shield(save)
        except StoreError:
            log.exception("could not store the answer")
            notice = (notice + " " if notice else "") + "The answer could not be saved."

        if status == "stopped":
            shown = f"{text}\n\n{STOPPED_MARK}" if text.strip() else STOPPED_MARK
        elif status == "error":
            if finish == "context" and notice:
                shown, notice = notice, None
            else:
                shown = f"{text}\n\n{GENERATION_FAILED}" if text.strip() else GENERATION_FAILED
        else:
            shown = text if text.strip() else "_(The model gave an empty answer.)_"
        msg.content = shown
        await msg.send()
        if notice:
            await self._say(f"_{notice}_")
        if result.task_cancelled:
            raise asyncio.CancelledError()

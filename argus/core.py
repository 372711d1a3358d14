"""The chat logic behind the Chainlit hooks: :class:`JarvisArgus`.

``app.py`` builds one :class:`JarvisArgus` and forwards each Chainlit hook to
it. This module owns:

* the shared local model, loaded once in a background thread at start-up; if
  loading fails, the :class:`~worker.engine.ModelLoadError` sentence is kept
  and every chat is answered with it (no traceback reaches the user);
* the per-user rate limits: chat messages (``settings.messages_per_minute``
  per 60 s) and slash commands (:data:`COMMANDS_PER_MINUTE`); messages longer
  than :data:`MAX_MESSAGE_CHARS` are refused before anything is stored;
* slash commands (``argus.commands``), answered directly, never sent to the
  model nor stored;
* image uploads (``argus.uploads``): checked, stored, acknowledged;
* storing the user's message *first* (conversation, attachments, message;
  shielded from the stop button), before waiting for the model, for the
  session's previous answer or for a generation slot; a stop while waiting
  keeps the message and records an empty ``stopped`` answer;
* conversation memory: the stored messages of the current conversation up to
  the message being answered are the model's history (the engine trims the
  oldest to fit its window);
* Chainlit's history (``argus.datalayer``): a conversation id IS the Chainlit
  thread id and a message id IS the step id, so the sidebar, feedback and
  resume see our rows; the messages this handler sends carry their kind in
  ``metadata["argus"]`` (answer, command reply, notice) so the data layer
  stores none of them twice and never stores replies or notices;
  ``on_chat_resume`` continues a conversation from the sidebar, and commands
  that move the chat to another conversation (``/new``, ``/select``,
  ``/delete``) move the Chainlit session's thread with it;
* at most :data:`MAX_CONCURRENT_GENERATIONS` answers generated at once over all
  users (each holds a KV cache); others wait for a slot, with a short note;
* streaming the answer to the browser (``argus.streaming``) and storing it as
  ``complete``, ``stopped`` (partial text kept) or ``error``;
* remote models (``argus.remote``): the session's model (``/model``, the
  composer's settings; the default is ``ARGUS_DEFAULT_MODEL`` or the first
  catalogue model with a usable API key, else the local model) answers through
  the key pool (``argus.keys``): failover before the first piece of text, an
  interrupted answer kept and marked with a Retry button, the local model as
  the fallback when no key can answer (said in the chat); administrators' chats
  are told when a provider rejects a key; a command whose arguments hold a
  secret (``/keys add``) is removed from the chat before anything else;
* the worker network (``argus.providers.cluster``): while a network is chosen
  with ``/network use`` it is the default model ("SmolLM2 on network <name>"),
  one session per conversation on the workers, streamed like a remote model,
  the local model answering instead (said in the chat) when it cannot start;
* sign-in (``password_auth``); the client address and the 429 "too many
  attempts" answer come from ``argus.signup``'s guarded ``/login`` route.

Typed exceptions are caught here, at the edge, and turned into one clear
sentence for the user; details go to the server log.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Sequence, TypeVar

import chainlit as cl
from chainlit.context import ChainlitContextException

from argus.auth import Authenticator, LoginThrottled
from worker.protocol.units import format_wait as humanize_wait
from argus.cluster_state import NetworkChoice
from argus.commands import (
    CommandContext,
    ModelInfo,
    ParsedCommand,
    SessionState,
    menu,
    parse_command,
    run_command,
)
from argus.commands.base import OutFile, new_thread_id, one_line
from argus.config import Settings
from argus.datalayer import (
    EMPTY_ANSWER,
    GENERATION_FAILED,
    KIND_ANSWER,
    KIND_COMMAND,
    KIND_KEY,
    KIND_NOTICE,
    STOPPED_MARK,
    ArgusDataLayer,
)
from argus.ratelimit import SlidingWindowLimiter
from argus.signup import current_client_ip, report_store_unavailable
from argus.store import NotFound, Store, StoreError, StoreUnavailable, open_store
from argus.streaming import StreamHandle, StreamResult, stream_async_pieces, stream_pieces
from argus.catalogue import ModelSpec
from argus.keys import Failover, Lease
from argus.providers import ProviderError
from argus.providers.cluster import ClusterProvider, is_cluster_model
from argus.remote import Remote, estimate_tokens
from argus.uploads import UploadCheck, check_files
from worker.control import ControlClient
from worker.engine import LocalModel, ModelLoadError, SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Key of our :class:`SessionState` in ``cl.user_session``.
STATE_KEY = "argus"
#: Stored messages fed to the model as history (the engine trims further).
HISTORY_LIMIT = 50
#: Conversation titles: the first message, shortened to this many characters.
TITLE_CHARS = 60
#: Id/name used for the local model while it is loading or when it failed.
LOCAL_MODEL_FALLBACK_ID = "local"
#: Extra stored rows read when looking for the message being answered (rows of
#: messages queued after it, which its history leaves out).
HISTORY_SLACK = 20
#: Longest chat message accepted, in characters (Chainlit itself takes ~1 MB).
MAX_MESSAGE_CHARS = 16_000
#: Answers generated at the same time over all users; each can hold a KV cache
#: of hundreds of MB at full context, and a small server has few cores.
MAX_CONCURRENT_GENERATIONS = 2
#: Slash commands a user may run per minute (cheap, but each hits the store).
COMMANDS_PER_MINUTE = 60

TEXT_ONLY_NOTICE = "The local model reads text only; I stored your image and answered the text."
TEXT_ONLY_NOTICE_NO_TEXT = "The local model reads text only; I stored your image. Add some text to get an answer."
IMAGE_NEEDS_TEXT = "I stored your image; send a question about it to get an answer."
#: How an answer cut off by a provider failure is marked (live and stored); the user can retry.
INTERRUPTED_MARK = "_(interrupted: the connection to the model failed; press Retry or send your message again)_"
#: The Chainlit action that answers a message again (``app.py`` routes it to ``on_retry``).
RETRY_ACTION = "argus_retry"
STORE_DOWN = "I can't reach the database right now, so nothing was saved; please try again in a moment."
SIGNED_OUT = "Your session has no signed-in user; please sign in again."
ACCOUNT_GONE = "Your account no longer exists; please sign in again."
CONVERSATION_GONE = "That conversation is no longer available; send your message again to start a new one."
EMPTY_MESSAGE = "Send some text (or an image) and I'll answer."
WAITING_FOR_SLOT = "_Other answers are being generated right now; yours starts as soon as one finishes…_"


def text_only_notice(model_name: str, has_text: bool) -> str:
    """The note for an image sent to a model that reads text only (``"The local model"``…)."""
    if has_text:
        return f"{model_name} reads text only; I stored your image and answered the text."
    return f"{model_name} reads text only; I stored your image. Add some text to get an answer."


def fallback_notice(spec: ModelSpec, why: str) -> str:
    """The note shown when a remote model cannot answer and the local model does instead."""
    return f"_{spec.label} cannot answer right now ({why.rstrip('.')}), so the local model answers instead._"


def invalid_key_notice(lease: Lease) -> str:
    """What administrators are told when the provider rejected a key (fingerprint only)."""
    return (
        f"⚠️ The {lease.provider} API key {lease.fingerprint} was rejected as invalid and is now disabled. "
        f"Check it, then `/keys enable {lease.provider}:{lease.fingerprint}` or `/keys remove` it."
    )


def too_long_message(chars: int) -> str:
    """The one sentence refusing a message of ``chars`` characters."""
    return (
        f"Your message is too long ({chars:,} characters; the limit is {MAX_MESSAGE_CHARS:,}), "
        "so I did not save or answer it; please shorten it and send it again."
    )


async def _unstoppable(aw: Awaitable[T]) -> tuple[T, bool]:
    """Run ``aw`` to its end even if the calling task is cancelled meanwhile.

    Returns ``(result, cancelled)``; ``cancelled`` is True when a cancellation
    (the stop button) arrived while waiting: the caller finishes its
    bookkeeping and then raises ``CancelledError`` itself. Exceptions of
    ``aw`` propagate.
    """
    fut = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(fut), cancelled
        except asyncio.CancelledError:
            if fut.cancelled():  # the work itself was cancelled, not just us
                raise
            if fut.done():
                return fut.result(), True
            cancelled = True


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


def _element(f: OutFile) -> Any:
    """A file of a reply as Chainlit shows it: images and videos inline, anything else as a download."""
    if f.mime.startswith("image/"):
        return cl.Image(name=f.name, content=f.data, mime=f.mime, display="inline", size="large")
    if f.mime.startswith("video/"):
        return cl.Video(name=f.name, content=f.data, mime=f.mime, display="inline")
    return cl.File(name=f.name, content=f.data, mime=f.mime, display="inline")


class _Progress:
    """One progress line in the chat, sent on the first :meth:`show`, updated by later ones and
    removed by :meth:`close` (a command's reply follows it)."""

    def __init__(self) -> None:
        self._msg: Optional[cl.Message] = None

    async def show(self, text: str) -> None:
        try:
            if self._msg is None:
                self._msg = cl.Message(content=text, metadata={KIND_KEY: KIND_NOTICE})
                await self._msg.send()
            else:
                self._msg.content = text
                await self._msg.update()
        except Exception:  # progress is a courtesy: never fail the command for it
            log.debug("could not show progress", exc_info=True)

    async def close(self) -> None:
        if self._msg is not None:
            msg, self._msg = self._msg, None
            try:
                await msg.remove()
            except Exception:
                log.debug("could not remove the progress line", exc_info=True)


class _TaskBoard:
    """One Chainlit task list in the chat (``services["task_board"]``, used by ``/workers
    rebalance``): :meth:`show` sends it, then updates it in place."""

    def __init__(self) -> None:
        self._list: Optional[cl.TaskList] = None

    async def show(self, status: str, tasks: Sequence[tuple[str, str]]) -> None:
        """Show ``tasks`` (``(title, state)``, state one of ``ready``, ``running``, ``done``,
        ``failed``) under the overall ``status`` line."""
        try:
            if self._list is None:
                self._list = cl.TaskList()
            self._list.status = status
            self._list.tasks = [cl.Task(title=title, status=cl.TaskStatus(state)) for title, state in tasks]
            await self._list.send()
        except Exception:  # progress is a courtesy: never fail the command for it
            log.debug("could not show the task list", exc_info=True)


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

    def loaded(self) -> Optional[LocalModel]:
        """The model if it has finished loading (successfully), else None; never waits."""
        f = self._future
        if f.done() and f.exception() is None:
            return f.result()
        return None

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
        max_generations: answers generated at once over all sessions.

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
        #: Generation slots, shared by every session (see _take_slot).
        self.slots = asyncio.Semaphore(max_generations)
        self.model = ModelHolder(
            model_loader or (lambda: LocalModel.load(settings.model_path, settings.blocks_per_stage))
        )
        #: Chainlit's data layer over the same store (``@cl.data_layer`` returns it).
        self.data_layer = ArgusDataLayer(self.store)
        #: Each live chat session's state, by Chainlit session id: Chainlit replaces the
        #: user session when it resumes a thread on a reconnect; in-flight work keeps it.
        self._states: "weakref.WeakValueDictionary[str, SessionState]" = weakref.WeakValueDictionary()
        #: Server-wide objects commands use (CommandContext.services), by name.
        self.services: dict[str, Any] = {}
        #: Remote models: catalogue, API-key pool, providers (/keys, /image, /video use them too).
        self.remote = Remote(settings, self.store)
        self.remote.on_invalid = self._tell_admins_invalid
        self.services["keys"] = self.remote.pool
        self.services["remote"] = self.remote
        #: Chainlit contexts of administrators' live chats, by session id (key-pool notices go there).
        self._admin_chats: dict[str, Any] = {}
        #: /network and /workers: the local worker daemon, and the network the chat uses.
        self.services["daemon"] = ControlClient(settings.worker_data_dir)
        self.services["network_choice"] = NetworkChoice(settings.data_dir)
        #: /workers rebalance shows the distribution of blocks as a task list in the chat.
        self.services["task_board"] = _TaskBoard
        #: The network chosen with /network use, as a chat model (the default while one is chosen).
        self.cluster = ClusterProvider(settings, self.store, self.services, loaded_model=self.model.loaded)

    def start(self) -> None:
        """Start loading the model in a background thread (returns at once)."""
        self.model.start()

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

    # ---- session helpers -----------------------------------------------------
    @staticmethod
    def _session() -> Any:
        """The Chainlit session of this call, or None outside one."""
        try:
            return cl.context.session
        except ChainlitContextException:
            return None

    def _remember(self, state: SessionState) -> SessionState:
        session = self._session()
        if session is not None:
            self._states[session.id] = state
        cl.user_session.set(STATE_KEY, state)
        return state

    def _state(self) -> SessionState:
        state = cl.user_session.get(STATE_KEY)
        if not isinstance(state, SessionState):
            session = self._session()
            state = self._states.get(session.id) if session is not None else None
            if state is None:
                state = SessionState(thread_id=getattr(session, "thread_id", None))
            self._remember(state)
        return state

    def _thread_id(self, state: SessionState) -> str:
        """The thread (= id of the next conversation) this chat writes to."""
        if not state.thread_id:
            state.thread_id = getattr(self._session(), "thread_id", None) or new_thread_id()
        return state.thread_id

    async def _fresh_thread(self, state: SessionState, *, announce: bool = False) -> str:
        """Move the chat to a new, empty thread (its conversation is created by the next message).

        ``announce``: tell the browser now (a message is being handled in the new
        thread); otherwise Chainlit announces it with the next message.
        """
        state.conversation_id = None
        state.thread_id = new_thread_id()
        await self._sync_thread(state, announce=announce)
        return state.thread_id

    async def _sync_thread(self, state: SessionState, *, announce: bool = False) -> None:
        """Bring the Chainlit session (and the browser) to ``state.thread_id``.

        An existing conversation (``/select``) is shown like the sidebar resumes a
        thread: ``first_interaction`` with its id, then ``resume_thread`` with its
        messages (the browser redraws the chat, or opens ``/thread/<id>`` when it
        was showing another resumed thread). A new thread (``/new``, ``/delete``)
        is announced by Chainlit with the next message (``has_first_interaction``
        reset), unless ``announce``.
        """
        session = self._session()
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

    @staticmethod
    def _user_id() -> Optional[str]:
        user = cl.user_session.get("user")
        meta = getattr(user, "metadata", None) or {}
        uid = meta.get("user_id")
        return uid if isinstance(uid, str) and uid else None

    @staticmethod
    async def _say(
        content: str, *, kind: str = KIND_NOTICE, id: Optional[str] = None, files: Sequence[OutFile] = ()
    ) -> None:
        """Send a message; ``kind`` (``metadata["argus"]``) tells the data layer what it is."""
        elements = [_element(f) for f in files]
        await cl.Message(content=content, id=id, metadata={KIND_KEY: kind}, elements=elements).send()

    async def _models(self) -> list[ModelInfo]:
        """The chat models users may pick, the default first: the worker network chosen with
        ``/network use`` (when one is), the local model, and the catalogue's chat models that
        have a usable key."""
        local = self.model.info()
        remote = [ModelInfo(id=m.id, name=f"{m.label} ({m.provider})") for m in await self.remote.chat_models()]
        default = await self.remote.default_model()
        models = [local, *remote]
        first = next((m for m in models if default is not None and m.id == default.id), local)
        cluster = await self.cluster.spec()
        head = [ModelInfo(id=cluster.id, name=cluster.label)] if cluster is not None else []
        return [*head, first, *(m for m in models if m is not first)]

    async def _chosen_model(self, state: SessionState) -> Optional[ModelSpec]:
        """The catalogue chat model or worker network this session answers with, or None for
        the local model. A worker-network choice follows ``/network use`` (none chosen any
        more: the local model)."""
        if state.model_id:
            if is_cluster_model(state.model_id):
                return await self.cluster.spec()
            return self.remote.spec(state.model_id)  # a stale remote choice falls back when it is served
        return await self.cluster.spec() or await self.remote.default_model()

    async def _send_model_settings(self, state: SessionState) -> None:
        """Show the model picker in the composer's chat settings (Chainlit's ``ChatSettings``)."""
        models = await self._models()
        current = await self._chosen_model(state)
        current_id = current.id if current is not None else models[0].id
        if not any(m.id == current_id for m in models):
            current_id = models[0].id
        widget = cl.input_widget.Select(
            id="model", label="Model", items={m.name: m.id for m in models}, initial_value=current_id,
            description="The model that answers in this chat (also: /model <id>).",
        )
        session = self._session()
        if session is not None:
            session.chat_settings = {**(getattr(session, "chat_settings", None) or {}), "model": current_id}
        await cl.context.emitter.emit("chat_settings", [widget.to_dict()])

    async def on_settings_update(self, settings: dict) -> None:
        """The user picked a model in the chat settings: this chat uses it from now on."""
        wanted = settings.get("model") if isinstance(settings, dict) else None
        if not isinstance(wanted, str):
            return
        state = self._state()
        models = await self._models()
        if any(m.id == wanted for m in models):
            state.model_id = wanted

    async def _track_admin(self) -> None:
        """Remember this chat when its user is an administrator (key-pool notices go to it), and
        tell them about keys the providers rejected."""
        session, uid = self._session(), self._user_id()
        if session is None or uid is None:
            return
        user = await asyncio.to_thread(self.store.get_user, uid)
        if user is None or user.role != "admin":
            self._admin_chats.pop(session.id, None)
            return
        from chainlit.context import get_context

        self._admin_chats[session.id] = get_context()  # the real context, not Chainlit's lazy proxy
        try:
            invalid = [k for k in await asyncio.to_thread(self.remote.pool.list) if k.state == "invalid"]
        except StoreError:
            return
        if invalid:
            listed = ", ".join(f"{k.provider}:{k.fingerprint}" for k in invalid)
            await self._say(f"⚠️ API keys rejected by their provider and disabled: {listed}. See `/keys list`.")

    async def _tell_admins_invalid(self, leases: list[Lease]) -> None:
        """Tell every administrator's live chat that a provider rejected a key (fingerprint only);
        the pool has already logged it and disabled the key."""
        from chainlit.context import context_var
        from chainlit.session import WebsocketSession

        for sid, ctx in list(self._admin_chats.items()):
            if isinstance(ctx.session, WebsocketSession) and WebsocketSession.get_by_id(sid) is None:
                self._admin_chats.pop(sid, None)  # that chat is gone
                continue

            async def send(ctx: Any = ctx) -> None:
                context_var.set(ctx)
                for lease in leases:
                    await self._say(invalid_key_notice(lease))

            try:
                await asyncio.create_task(send())
            except Exception:
                log.warning("could not notify an administrator's chat", exc_info=True)

    # ---- hooks ---------------------------------------------------------------
    async def on_chat_start(self) -> None:
        """New chat session: fresh state, the command menu; checks the account still exists.

        When the browser asked to resume a thread that could not be resumed
        (missing, deleted, or another user's: Chainlit then starts a new chat
        but keeps that id), the session gets a fresh thread id instead.
        """
        session = self._session()
        if session is not None and getattr(session, "thread_id_to_resume", None):
            log.info("thread %s could not be resumed; starting a new one", session.thread_id_to_resume)
            session.thread_id = new_thread_id()
            session.thread_id_to_resume = None
        state = self._remember(SessionState(thread_id=getattr(session, "thread_id", None)))
        await cl.context.emitter.set_commands(menu())
        self.start()
        uid = self._user_id()
        if uid is None:
            return
        try:
            if await asyncio.to_thread(self.store.get_user, uid) is None:
                await self._say(ACCOUNT_GONE)
                return
            await self._send_model_settings(state)
            await self._track_admin()
        except StoreUnavailable as exc:
            log.warning("chat start: %s", exc)
        except StoreError:
            log.exception("store error at chat start")

    async def on_chat_resume(self, thread: dict) -> None:
        """A conversation opened from the history (Chainlit checked it is the user's, via
        ``ArgusDataLayer.get_thread``): continue it. Its stored messages are the
        model's memory, as for any conversation; the command menu is sent again.
        """
        session = self._session()
        uid = self._user_id()
        thread_id = thread.get("id") if isinstance(thread, dict) else None
        previous = self._states.get(session.id) if session is not None else None
        if previous is not None and previous.conversation_id == thread_id:
            state = previous  # a reconnect: keep the running answers' state
        else:
            state = SessionState(thread_id=getattr(session, "thread_id", None))
        self._remember(state)
        await cl.context.emitter.set_commands(menu())
        self.start()
        if uid is None or not isinstance(thread_id, str):
            return
        try:
            conv = await asyncio.to_thread(self.store.get_conversation, thread_id, uid)
        except NotFound:  # not theirs after all (or deleted meanwhile): a new thread
            await self._fresh_thread(state)
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
                await self.on_settings_update({"model": saved})
            await self._send_model_settings(state)
            await self._track_admin()
        except StoreError as exc:
            log.warning("chat resume: %s", exc)

    async def on_stop(self) -> None:
        """Chainlit's stop button: stop everything this session is doing.

        Chainlit cancels only the newest message task; this also stops the
        running generation (its partial text is kept) and cancels the
        session's other message tasks (waiting for the model, for the
        previous answer or for a slot). Each keeps its stored message and
        records an empty ``stopped`` answer.
        """
        state = cl.user_session.get(STATE_KEY)
        if not isinstance(state, SessionState):
            return
        handle = state.stream
        if isinstance(handle, StreamHandle):
            handle.cancel()
        current = asyncio.current_task()
        for task in list(state.tasks):
            if task is not current and not task.done() and not task.cancelling():
                task.cancel()

    async def on_message(self, message: cl.Message) -> None:
        """Answer one chat message: a command, or text (+ images) for the model.

        Never raises for expected failures (store down, model missing, bad
        upload, too long, too fast): each becomes one sentence in the chat.
        Re-raises ``CancelledError`` after the message (and any partial
        answer) is saved.
        """
        content = message.content or ""
        if self._conceals(content, getattr(message, "command", None)):
            message.content = ""  # the removal itself must not carry the secret back to the browser
            await self._remove_quietly(message)  # a secret (an API key) leaves the chat before anything else
        uid = self._user_id()
        if uid is None:
            await self._say(SIGNED_OUT)
            return
        if len(content) > MAX_MESSAGE_CHARS:
            await self._say(too_long_message(len(content)))
            return
        state = self._state()
        task = asyncio.current_task()
        state.tasks.add(task)
        try:
            parsed = parse_command(content, getattr(message, "command", None))
            if parsed is not None:
                if not self.command_limiter.hit(uid):
                    await self._say(
                        self.rate_limit_message(self.command_limiter.retry_after(uid), commands=True), kind=KIND_COMMAND
                    )
                    return
                files: list[OutFile] = []
                reply = await self.run_command(parsed, uid, state, files=files)
                await self._sync_thread(state)  # /new, /select, /delete move the chat
                await self._say(reply, kind=KIND_COMMAND, files=files)
                return
            if not self.limiter.hit(uid):
                await self._say(self.rate_limit_message(self.limiter.retry_after(uid)))
                return
            await self._chat(message, uid, state)
        except NotFound:  # the current conversation vanished meanwhile
            log.warning("conversation %s not found for user %s", state.conversation_id, uid)
            await self._fresh_thread(state)  # the next message starts a new conversation
            await self._say(CONVERSATION_GONE)
        except StoreUnavailable as exc:  # database down: one clear line, no traceback
            log.warning("message of user %s not saved: %s", uid, exc)
            await self._say(STORE_DOWN)
        except StoreError:
            log.exception("store error")
            await self._say(STORE_DOWN)
        finally:
            state.tasks.discard(task)

    @staticmethod
    def _conceals(content: str, command: Optional[str]) -> bool:
        """Whether the message is a command whose arguments hold a secret (``/keys add``)."""
        from argus.commands import COMMANDS

        parsed = parse_command(content, command)
        cmd = COMMANDS.get(parsed.name) if parsed is not None else None
        return cmd is not None and cmd.conceals is not None and cmd.conceals(parsed.args)

    def rate_limit_message(self, retry_after_s: float, *, commands: bool = False) -> str:
        """One sentence: the limit and how long to wait (chat messages, or commands)."""
        what, per = ("commands", COMMANDS_PER_MINUTE) if commands else ("messages", self.settings.messages_per_minute)
        return (
            f"You're sending {what} too fast (limit: {per} per minute); "
            f"please wait {humanize_wait(retry_after_s)} and try again."
        )

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
        progress = _Progress()
        ctx = CommandContext(
            store=self.store, user_id=user_id, state=state, models=await self._models(),
            root_path=config.run.root_path or "",
            is_admin=user is not None and user.role == "admin",
            services=self.services,
            progress=progress.show if self._session() is not None else None,
            keep=(lambda request, reply, kept: self._keep(state, user_id, request, reply, kept))
            if self._session() is not None else None,
        )
        try:
            reply = await run_command(ctx, parsed)
        finally:
            await progress.close()
        if files is not None:
            files.extend(ctx.files)
        if parsed.name == "model" and self._session() is not None:
            await self._send_model_settings(state)  # the picker shows the new choice
        return reply

    async def _keep(self, state: SessionState, user_id: str, request: str, reply: str, files: Sequence[OutFile]) -> None:
        """Store a command's result in the conversation (see CommandContext.keep)."""
        async with state.intake:
            model_id = self._model_id_now(state)
            if not state.conversation_id:  # after /new or /delete: the browser moves to the new thread now
                self._thread_id(state)
                await self._sync_thread(state, announce=True)
            conv_id = await self._ensure_conversation(state, user_id, request, UploadCheck(), model_id)
            att_ids = []
            for f in files:
                att = await asyncio.to_thread(self.store.save_attachment, user_id, f.name, f.mime, f.data)
                att_ids.append(att.id)
            await asyncio.to_thread(self.store.add_message, conv_id, user_id, "user", request, model=model_id)
            await asyncio.to_thread(
                self.store.add_message, conv_id, user_id, "assistant", reply, model=model_id, attachment_ids=att_ids,
            )

    # ---- chat ----------------------------------------------------------------
    def _model_id_now(self, state: SessionState) -> str:
        """The id to record for this session's model, without waiting for the load."""
        if state.model_id is None or is_cluster_model(state.model_id):
            cluster_id = self.cluster.model_id_now()
            if cluster_id is not None:
                return cluster_id
        spec = self.remote.spec(state.model_id)
        if spec is not None:
            return spec.id
        model = self.model.loaded()
        return model.model_id if model is not None else (state.model_id or LOCAL_MODEL_FALLBACK_ID)

    async def _chat(self, message: cl.Message, user_id: str, state: SessionState) -> None:
        text = (message.content or "").strip()
        # Store first, shielded: a stop (even a cancellation of this task while
        # it waits for the model or for the previous answer) keeps the message.
        intake, cancelled = await _unstoppable(self._store_user_message(message, text, user_id, state))
        turn = intake.turn
        try:
            if cancelled:
                raise asyncio.CancelledError()
            check = intake.check
            if not intake.stored:
                await self._say("\n".join(check.rejections) or EMPTY_MESSAGE)
                return
            notes = list(check.rejections)
            conv_id = intake.conv_id
            if check.images:
                spec = await self._chosen_model(state)
                if spec is not None and spec.vision:
                    if not text:
                        notes.append(IMAGE_NEEDS_TEXT)
                elif not text or conv_id not in state.text_only_notice:
                    state.text_only_notice.add(conv_id)
                    notes.append(text_only_notice(spec.label if spec is not None else "The local model", bool(text)))
            if notes:
                await self._say("\n\n".join(notes))
            if turn is None:  # an image without text: stored, nothing to answer
                return
            await self._respond(turn, state)
        except asyncio.CancelledError:
            if turn is not None and not turn.answered:  # stopped before the answer began
                try:
                    await _unstoppable(self._record_answer(turn, state, "", "stopped", self._model_id_now(state)))
                except StoreError:
                    log.exception("could not record the stop of message %s", turn.message_id)
            raise
        finally:
            if turn is not None and turn in state.turns:
                state.turns.remove(turn)

    async def _store_user_message(self, message: cl.Message, text: str, user_id: str, state: SessionState) -> Intake:
        """Check the uploads, then store conversation, attachments and message (run shielded)."""
        elements = list(getattr(message, "elements", None) or [])
        check = UploadCheck()
        if elements:
            check = await asyncio.to_thread(check_files, elements, self.settings.max_upload_bytes)
        if not text and not check.images:
            return Intake(check)
        async with state.intake:
            model_id = self._model_id_now(state)
            conv_id = await self._ensure_conversation(state, user_id, text, check, model_id)
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
        self, message: cl.Message, conv_id: str, user_id: str, text: str, model_id: str, attachment_ids: list[str]
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

    async def _record_answer(self, turn: Turn, state: SessionState, content: str, status: str, model_id: str) -> None:
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

    async def _respond(self, turn: Turn, state: SessionState) -> None:
        """Wait for the session's previous answer and the model, then answer ``turn``."""
        async with state.busy:  # answers of one session come one after the other, in order
            spec = await self._chosen_model(state)
            if spec is not None:
                answer = self._answer_cluster if is_cluster_model(spec.id) else self._answer_remote
                why = await answer(spec, turn, state)
                if why is None:
                    return
                await self._say(fallback_notice(spec, why))  # no key could answer: the local model does
            try:
                model = await self.model.get()
            except ModelLoadError as e:
                model_error = str(e) or GENERATION_FAILED
                await self._say(model_error, kind=KIND_ANSWER, id=turn.step_id)
                await _unstoppable(self._record_answer(
                    turn, state, model_error, "error", state.model_id or LOCAL_MODEL_FALLBACK_ID,
                ))
                return
            history = await self._history(turn.conv_id, turn.user_id, upto=turn.message_id)
            await self._answer(model, history, turn, state)

    async def _ensure_conversation(
        self, state: SessionState, user_id: str, text: str, check: UploadCheck, model_id: str
    ) -> str:
        """The current conversation; the first message creates it, with the chat's thread id
        as its id (the data layer then writes anything queued for that thread)."""
        if state.conversation_id:
            return state.conversation_id
        title = one_line(text, TITLE_CHARS) if text else f"Image: {check.images[0].name}"
        create = self.store.create_conversation
        thread_id = self._thread_id(state)
        try:
            conv = await asyncio.to_thread(create, user_id, title, model_id, conversation_id=thread_id)
        except NotFound:  # the id is another account's conversation: never write there
            log.warning("thread id %s is taken; this chat moves to a new thread", thread_id)
            thread_id = await self._fresh_thread(state, announce=True)
            conv = await asyncio.to_thread(create, user_id, title, model_id, conversation_id=thread_id)
        state.conversation_id = conv.id
        state.thread_id = conv.id
        await self.data_layer.conversation_created(conv)
        return conv.id

    async def _history(self, conv_id: str, user_id: str, upto: Optional[str] = None) -> list[dict]:
        """The conversation's recent messages, oldest first, as model messages.

        ``upto``: the id of the user message being answered; it is the last
        message of the history, and rows stored after it (messages sent while
        it waited, their placeholder answers) are left out. Error rows, empty
        rows (e.g. stopped before answering) and other roles are skipped.
        """
        rows = await self._history_rows(conv_id, user_id, upto)
        return [{"role": m.role, "content": m.content} for m in rows if m.content.strip()]

    async def _history_rows(self, conv_id: str, user_id: str, upto: Optional[str] = None) -> list:
        """The stored messages :meth:`_history` is made of (oldest first), keeping user messages
        that hold only images (a model that reads images sees them)."""
        limit = HISTORY_LIMIT if upto is None else HISTORY_LIMIT + HISTORY_SLACK
        page = await asyncio.to_thread(self.store.list_messages, conv_id, user_id, limit)
        items = page.items  # newest first
        if upto is not None:
            ids = [m.id for m in items]
            if upto in ids:
                items = items[ids.index(upto):]
            else:
                log.warning("message %s not among the last %d of conversation %s", upto, limit, conv_id)
            items = items[:HISTORY_LIMIT]
        return [
            m for m in reversed(items)
            if m.role in ("user", "assistant") and m.status != "error"
            and (m.content.strip() or (m.role == "user" and m.attachment_ids))
        ]

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

    # ---- generation slots ----------------------------------------------------
    async def _take_slot(self) -> None:
        """Wait for a generation slot; while waiting, show a short note (removed after).

        Cancellation while waiting propagates with no slot taken.
        """
        if not self.slots.locked():
            await self.slots.acquire()  # free: returns at once
            return
        note = cl.Message(content=WAITING_FOR_SLOT, metadata={KIND_KEY: KIND_NOTICE})
        await note.send()
        try:
            await self.slots.acquire()
        except BaseException:
            await self._remove_quietly(note)
            raise
        try:
            await self._remove_quietly(note)
        except BaseException:  # cancelled while removing the note: give the slot back
            self.slots.release()
            raise

    @staticmethod
    async def _remove_quietly(msg: cl.Message) -> None:
        try:
            await msg.remove()
        except Exception:
            log.warning("could not remove a note from the chat", exc_info=True)

    def _release_slot_after(self, producer: Optional[threading.Thread]) -> None:
        """Give the slot back once ``producer`` (the generation thread) has ended.

        After a stop the consumer returns at once while the thread finishes its
        current step; the slot (CPU, KV cache) is only free once it has.
        """
        if producer is None or not producer.is_alive():
            self.slots.release()
            return
        loop = asyncio.get_running_loop()

        def wait() -> None:
            producer.join()
            try:
                loop.call_soon_threadsafe(self.slots.release)
            except RuntimeError:  # the loop is closed: nobody waits for slots any more
                pass

        threading.Thread(target=wait, name="argus-slot-release", daemon=True).start()

    # ---- answering with a remote model ------------------------------------------
    async def _answer_remote(self, spec: ModelSpec, turn: Turn, state: SessionState) -> Optional[str]:
        """Answer ``turn`` with the remote model ``spec`` through the key pool.

        Keys are tried in the pool's order (``argus.keys.failover``): a key that fails before
        the first piece of text (rate limited, out of quota, invalid, server or network
        trouble) hands the request to the next one; the answer streams into the chat through
        the same queue as the local model's (``stream_async_pieces``; the stop button keeps
        the partial text). A failure after text was shown keeps that text, marks it
        (:data:`INTERRUPTED_MARK`) and offers a Retry button. A refusal (blocked prompt,
        bad request) is the answer.

        Returns None once the answer is shown and stored; otherwise, when no key could
        start an answer, the reason (nothing is shown or stored: the local model answers).
        Re-raises ``CancelledError`` after storing what was streamed.
        """
        rows = await self._history_rows(turn.conv_id, turn.user_id, upto=turn.message_id)
        try:
            request = await self.remote.chat_request(spec, rows, turn.user_id)
        except ValueError:  # nothing left to send (the message vanished from the history)
            return "the message to answer was not found"
        provider = self.remote.provider(spec.provider)
        failover = Failover(self.remote.pool, spec, tokens=estimate_tokens(request))
        handle = StreamHandle()
        state.stream = handle
        msg = cl.Message(content="", id=turn.step_id, metadata={KIND_KEY: KIND_ANSWER})
        result: Optional[StreamResult] = None
        error: Optional[ProviderError] = None
        try:
            while not handle.cancelled:
                lease = await failover.next()
                if lease is None:
                    break
                stream = provider.stream_chat(request, lease.secret)
                result = await stream_async_pieces(stream, msg.stream_token, handle)
                error = None
                if result.status == "error" and not result.sink_failed:
                    error = result.error if isinstance(result.error, ProviderError) else ProviderError(
                        "server_error", "The model failed while answering.", provider=spec.provider,
                        partial=result.pieces > 0, detail=self.remote.pool.scrub(repr(result.error)),
                    )
                    if result.pieces == 0:
                        if await failover.failed(lease, error) and not result.task_cancelled:
                            continue
                    else:
                        await _unstoppable(failover.failed(lease, error))
                elif result.pieces or result.status == "complete":
                    await _unstoppable(failover.succeeded(lease, stream.usage, turn.user_id))
                break
        finally:
            if state.stream is handle:
                state.stream = None
            await self.remote.report(failover)

        cancelled = bool(result and result.task_cancelled)
        if not cancelled and (result is None or (result.status == "error" and not result.pieces and not result.sink_failed)):
            if error is None or error.kind not in ("blocked", "bad_request"):
                if error is not None:
                    return str(error)
                return f"no {spec.provider} API key can take a request right now (busy, over its limits or disabled)"
        assert result is not None
        await self._show_answer(turn, state, msg, result, error, spec.id, cancelled)
        return None

    async def _answer_cluster(self, spec: ModelSpec, turn: Turn, state: SessionState) -> Optional[str]:
        """Answer ``turn`` on the worker network ``spec`` names (``argus.providers.cluster``).

        The conversation is one session on the workers (its KV caches stay between answers,
        so only new tokens are computed); the answer streams into the chat like a remote
        model's (``stream_async_pieces``; the stop button keeps the partial text and the
        daemon is told to stop). A failure after text was shown keeps that text, marks it
        (:data:`INTERRUPTED_MARK`) and offers a Retry button; a message too long for the
        model is answered with that sentence; the usage is recorded.

        Returns None once the answer is shown and stored; otherwise, when the network could
        not start an answer (no daemon, blocks not loaded, …), the reason (nothing is shown
        or stored: the local model answers). Re-raises ``CancelledError`` after storing what
        was streamed.
        """
        history = await self._history(turn.conv_id, turn.user_id, upto=turn.message_id)
        if not history:
            return "the message to answer was not found"
        stream = self.cluster.stream_chat(spec, history, turn.conv_id)
        handle = StreamHandle()
        state.stream = handle
        msg = cl.Message(content="", id=turn.step_id, metadata={KIND_KEY: KIND_ANSWER})
        try:
            result = await stream_async_pieces(stream, msg.stream_token, handle)
        finally:
            if state.stream is handle:
                state.stream = None
        error = result.error if isinstance(result.error, ProviderError) else None
        cancelled = result.task_cancelled
        if not cancelled and result.status == "error" and not result.pieces and not result.sink_failed:
            if error is None or error.kind != "bad_request":
                return str(result.error) or "the worker network failed"
        if result.pieces or result.status == "complete":
            _, again = await _unstoppable(self.cluster.record_usage(spec, stream, turn.user_id))
            cancelled = cancelled or again
        await self._show_answer(turn, state, msg, result, error, spec.id, cancelled, notice=stream.notice)
        return None

    async def _show_answer(
        self, turn: Turn, state: SessionState, msg: cl.Message, result: StreamResult, error: Optional[ProviderError],
        model_id: str, cancelled: bool, *, notice: Optional[str] = None,
    ) -> None:
        """Store and show an answer streamed from a remote model or a worker network: complete,
        stopped (marked), cut off by ``error`` (text kept, marked, a Retry button), refused
        (``error``'s sentence is the answer) or lost by the browser. ``notice``: a note shown
        after it. Re-raises ``CancelledError`` when ``cancelled`` or stopped while storing."""
        text, status, actions = result.text, result.status, []
        if status == "error" and result.sink_failed:
            log.error("sending the answer to the browser failed (conversation %s)", turn.conv_id, exc_info=result.error)
            stored = shown = f"{text}\n\n{GENERATION_FAILED}" if text.strip() else GENERATION_FAILED
        elif status == "error" and result.pieces:  # cut off mid-stream: keep the text, offer a retry
            log.warning("%s answer cut off (conversation %s): %s", model_id, turn.conv_id, error.detail if error else "")
            stored = shown = f"{text}\n\n{INTERRUPTED_MARK}"
            actions = [cl.Action(name=RETRY_ACTION, payload={"message_id": turn.message_id}, label="Retry", icon="refresh-cw")]
        elif status == "error":  # refused: blocked or a bad request; the provider's sentence is the answer
            stored = shown = str(error)
        elif status == "stopped":
            stored, shown = text, (f"{text}\n\n{STOPPED_MARK}" if text.strip() else STOPPED_MARK)
        else:
            stored, shown = text, (text if text.strip() else EMPTY_ANSWER)
        try:
            _, again = await _unstoppable(self._record_answer(turn, state, stored, status, model_id))
            cancelled = cancelled or again
        except StoreError:
            log.exception("could not store the answer")
            notice = (notice + " " if notice else "") + "The answer could not be saved."
        msg.content = shown
        msg.actions = actions
        try:
            await msg.send()
            if notice:
                await self._say(f"_{notice}_")
        except Exception:
            if not result.sink_failed:
                raise
            log.warning("could not show the answer either (the browser is likely gone)", exc_info=True)
        if cancelled:
            raise asyncio.CancelledError()

    async def on_retry(self, action: Any) -> None:
        """The Retry button of an interrupted answer: answer the same message again (a new
        answer row; the interrupted one stays, marked)."""
        uid = self._user_id()
        payload = getattr(action, "payload", None) or {}
        message_id = payload.get("message_id") if isinstance(payload, dict) else None
        if uid is None or not isinstance(message_id, str):
            return
        state = self._state()
        task = asyncio.current_task()
        state.tasks.add(task)
        turn: Optional[Turn] = None
        try:
            try:
                m = await asyncio.to_thread(self.store.get_message, message_id, uid)
            except NotFound:
                m = None
            if m is None or m.role != "user" or m.conversation_id != state.conversation_id:
                await self._say("That message is not in this conversation any more, so it cannot be retried; send it again.")
                return
            if not self.limiter.hit(uid):
                await self._say(self.rate_limit_message(self.limiter.retry_after(uid)))
                return
            with contextlib.suppress(Exception):
                await action.remove()
            turn = Turn(conv_id=m.conversation_id, user_id=uid, message_id=m.id)
            state.turns.append(turn)
            await self._respond(turn, state)
        except asyncio.CancelledError:
            if turn is not None and not turn.answered:
                with contextlib.suppress(StoreError):
                    await _unstoppable(self._record_answer(turn, state, "", "stopped", self._model_id_now(state)))
            raise
        except StoreError as exc:
            log.warning("retry of message %s failed: %s", message_id, exc)
            await self._say(STORE_DOWN)
        finally:
            state.tasks.discard(task)
            if turn is not None and turn in state.turns:
                state.turns.remove(turn)

    # ---- answering -----------------------------------------------------------
    async def _answer(self, model: LocalModel, history: list[dict], turn: Turn, state: SessionState) -> None:
        params = self.sampling_params()
        model_id = model.model_id
        await self._take_slot()  # a stop while waiting: _chat records "stopped before answering"
        handle = StreamHandle()
        state.stream = handle
        msg = cl.Message(content="", id=turn.step_id, metadata={KIND_KEY: KIND_ANSWER})
        result: Optional[StreamResult] = None
        try:
            result = await stream_pieces(
                lambda: model.chat(history, params, handle.cancel_event),
                msg.stream_token,
                handle,
                thread_name="argus-generate",
            )
        finally:
            if state.stream is handle:
                state.stream = None
            self._release_slot_after(result.producer if result is not None else None)

        gen = result.source
        finish = getattr(gen, "finish_reason", None)
        notice = getattr(gen, "notice", None)
        status = result.status
        text = result.text
        if status == "error":
            where = "sending the answer to the browser" if result.sink_failed else "generation"
            log.error("%s failed (conversation %s)", where, turn.conv_id, exc_info=result.error)
        elif status == "complete" and finish == "context" and not text:
            status = "error"  # the prompt did not fit: nothing was generated

        stored = text if text or status != "error" else (notice or GENERATION_FAILED)
        # Save first, shielded: a second stop must not lose the answer.
        cancelled = False
        try:
            _, cancelled = await _unstoppable(self._record_answer(turn, state, stored, status, model_id))
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
            shown = text if text.strip() else EMPTY_ANSWER
        msg.content = shown
        try:
            await msg.send()
            if notice:
                await self._say(f"_{notice}_")
        except Exception:
            if not result.sink_failed:
                raise
            log.warning("could not show the answer either (the browser is likely gone)", exc_info=True)
        if result.task_cancelled or cancelled:
            raise asyncio.CancelledError()

"""Shared pieces of the slash commands: parsing, the command record, the context.

A command is a plain ``async`` function ``run(ctx, args) -> str`` returning the
reply as Markdown. It gets everything through :class:`CommandContext` (the
store, the user's id, the per-chat :class:`SessionState`, the models), so it
can be called directly in tests without a Chainlit server. Files for the
reply (``/export``) go to ``ctx.files``.

Commands never talk to Chainlit: a command that moves the chat to another
conversation sets ``state.conversation_id`` and ``state.thread_id`` (the
Chainlit thread id, which IS the conversation id), and the chat handler
(``argus.chat``) brings the Chainlit session and the browser in line.

Commands raise :class:`CommandUsageError` for bad arguments; the dispatcher
(``argus.commands.run_command``) turns that into a short reply pointing at
``/help``. Store errors other than ``NotFound`` are left to the chat handler.
"""
from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Optional, Sequence

from argus.store.base import Store

#: A command name: a letter, then letters, digits, ``_`` or ``-``.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


class CommandUsageError(Exception):
    """Bad arguments; ``str(e)`` is one user-facing sentence."""


@dataclass
class SessionState:
    """Per chat session state (kept in ``cl.user_session`` under ``"argus"``).

    Attributes:
        conversation_id: the current conversation, or None until the first
            chat message creates one (``/new`` resets it to None).
        thread_id: the Chainlit thread this chat writes to; the next
            conversation is created with this id (a conversation id IS its
            Chainlit thread id). None: the chat handler takes the Chainlit
            session's. ``/new`` and ``/delete`` set a fresh one, ``/select``
            the selected conversation's.
        pending_delete: ``(conversation id, deadline)`` after ``/delete``,
            until ``/delete confirm`` (UNIX seconds).
        model_id: the model chosen with ``/model``; None means the default.
        text_only_notice: conversation ids in which the "text only" notice for
            images was already shown.
        stream: the running generation's stop handle (set by the chat handler).
        busy: held while a chat message is being answered, so messages of one
            session are answered one after the other (same conversation, and
            each answer sees the previous one in its history).
        intake: held briefly while a message is stored (conversation created,
            attachments and the message saved) and while an answer row is
            written, so two quick messages cannot create two conversations
            and rows keep a question → answer order.
        turns: the chat messages of this session that are stored but not yet
            answered (the chat handler's bookkeeping), oldest first.
        tasks: the ``on_message`` tasks still running for this session; the
            stop button stops all of them, not only the newest.
    """

    conversation_id: Optional[str] = None
    thread_id: Optional[str] = None
    pending_delete: Optional[tuple[str, float]] = None
    model_id: Optional[str] = None
    text_only_notice: set[str] = field(default_factory=set)
    stream: Any = None
    busy: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    intake: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    turns: list = field(default_factory=list, repr=False)
    tasks: set = field(default_factory=set, repr=False)


@dataclass(frozen=True)
class ModelInfo:
    """A model the user can pick with ``/model``.

    ``problem`` is a one-sentence reason when the model cannot answer (e.g. it
    failed to load); ``loading`` is True while it is still being loaded.
    """

    id: str
    name: str
    problem: Optional[str] = None
    loading: bool = False


@dataclass(frozen=True)
class OutFile:
    """A file sent with a command's reply (shown as a download in the chat)."""

    name: str
    mime: str
    data: bytes


@dataclass
class CommandContext:
    """What a command may use.

    Attributes:
        store: the persistence layer (blocking; use :meth:`call`).
        user_id: the signed-in user's id (owner of conversations).
        state: this chat session's state; commands may change it.
        models: the models available to this user (first one is the default).
        page_size: conversations per ``/convs`` page.
        files: files to send with the reply (commands append).
        root_path: Chainlit's root path, for links to ``/thread/<id>``.
        clock: UNIX seconds (for confirmations and export times).
        is_admin: the user's role is "admin" (read from the store for each
            command, so a demotion takes effect at once); admin-only commands
            refuse with :data:`ADMIN_ONLY` otherwise.
        services: server-wide objects commands may need, by name (e.g. the
            worker daemon's control client, the API-key pool); absent names
            mean the feature is not configured.
        progress: ``async (text)``: shows (then updates) one progress line in the
            chat while a long command runs (``/video``); None outside a chat.
        keep: ``async (request, reply, files) -> None``: stores a command's
            result in the current conversation (created if needed) as the
            user's request and an assistant message with ``files`` as its
            attachments, like uploads (``/image``, ``/video``); None outside a chat.
    """

    store: Store
    user_id: str
    state: SessionState
    models: Sequence[ModelInfo]
    page_size: int = 10
    files: list = field(default_factory=list)
    root_path: str = ""
    clock: Callable[[], float] = time.time
    is_admin: bool = False
    services: dict = field(default_factory=dict)
    progress: Optional[Callable[[str], Awaitable[None]]] = None
    keep: Optional[Callable[[str, str, Sequence["OutFile"]], Awaitable[None]]] = None

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking store call off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    @property
    def current_model(self) -> Optional[ModelInfo]:
        """The selected model, falling back to the default (first) one."""
        for m in self.models:
            if m.id == self.state.model_id:
                return m
        return self.models[0] if self.models else None


#: The reply of an admin-only command to anyone else.
ADMIN_ONLY = "Only an administrator can use this command."


@dataclass(frozen=True)
class Command:
    """One slash command.

    Attributes:
        name: what follows the slash (``"convs"``).
        usage: the synopsis shown by ``/help`` (``"/convs [page]"``).
        description: one line for ``/help`` and Chainlit's command menu.
        icon: a lucide icon name for the command menu.
        run: ``async (ctx, args) -> reply markdown``; raises CommandUsageError.
        conceals: ``(args) -> bool``: the message holds a secret (``/keys add``): the chat
            handler removes it from the chat before anything else (commands are never stored).
    """

    name: str
    usage: str
    description: str
    icon: str
    run: Callable[[CommandContext, str], Awaitable[str]]
    conceals: Optional[Callable[[str], bool]] = None


@dataclass(frozen=True)
class ParsedCommand:
    """A message recognised as a command: ``name`` (lower-case) and its ``args`` text."""

    name: str
    args: str


def parse_command(text: Optional[str], command: Optional[str] = None) -> Optional[ParsedCommand]:
    """Recognise a command in a chat message.

    Args:
        text: the message text. Typed commands look like ``"/convs 2"``.
        command: Chainlit's ``message.command`` when the user picked a command
            from the menu; then ``text`` holds only the arguments.

    Returns:
        The parsed command, or None for an ordinary chat message. Text starting
        with ``/`` followed by something that is not a command name (e.g.
        ``"/usr/bin is a folder"``) is an ordinary message.
    """
    text = text or ""
    if command:
        name = command.strip().lstrip("/")
        args = text.strip()
        # Some clients also keep the typed "/name" in the text: drop it.
        if args.lower().startswith("/" + name.lower()):
            rest = args[len(name) + 1 :]
            if not rest or rest[0].isspace():
                args = rest.strip()
        return ParsedCommand(name=name.lower(), args=args)
    m = re.match(r"/(\S*)\s*(.*)", text.strip(), re.S)
    if m is None:
        return None
    head, rest = m.group(1), m.group(2).strip()
    if head and not _NAME.fullmatch(head):
        return None
    return ParsedCommand(name=head.lower(), args=rest)


def format_time(ts: float) -> str:
    """UNIX seconds → ``"2025-01-31 14:05 UTC"``."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def one_line(text: str, limit: int) -> str:
    """Collapse whitespace and cut to ``limit`` characters (with an ellipsis)."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: max(0, limit - 1)].rstrip() + "…"


def new_thread_id() -> str:
    """A fresh Chainlit thread id (a UUID4 string, as Chainlit makes them)."""
    return str(uuid.uuid4())


def busy_reply(state: SessionState) -> Optional[str]:
    """A sentence refusing to leave the conversation while one of its answers is still
    being written (or waits), else None."""
    if state.turns:
        return "An answer is still being written here; wait for it (or press stop), then try again."
    return None


def escape_md(text: str) -> str:
    """Escape the Markdown characters that would change how a title renders."""
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)

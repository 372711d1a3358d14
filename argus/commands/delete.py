"""``/delete`` then ``/delete confirm`` — delete the current conversation for good."""
from __future__ import annotations

from argus.commands.base import (
    Command,
    CommandContext,
    CommandUsageError,
    busy_reply,
    escape_md,
    new_thread_id,
    one_line,
)
from argus.network_choice import drop_conversation_session
from argus.store.base import NotFound

#: Seconds a ``/delete`` waits for its ``/delete confirm``.
CONFIRM_WINDOW_S = 120.0

NO_CONVERSATION = "There is no saved conversation here to delete."
CONFIRM_FIRST = "Send `/delete` first; then confirm with `/delete confirm` within 2 minutes."


async def run(ctx: CommandContext, args: str) -> str:
    """``/delete``: ask for confirmation. ``/delete confirm`` (within
    :data:`CONFIRM_WINDOW_S`, same conversation): delete it with its messages,
    ratings and images; the next message starts a new conversation (new thread).

    Raises:
        CommandUsageError: any argument other than ``confirm``.
    """
    word = args.strip().lower()
    if word not in ("", "confirm"):
        raise CommandUsageError("Usage: /delete, then /delete confirm.")
    state = ctx.state
    conv_id = state.conversation_id
    if not conv_id:
        state.pending_delete = None
        return NO_CONVERSATION
    try:
        conv = await ctx.call(ctx.store.get_conversation, conv_id, ctx.user_id)
    except NotFound:
        state.conversation_id, state.pending_delete = None, None
        return "This conversation no longer exists; your next message starts a new one."
    title = escape_md(one_line(conv.title, 60)) or "_(untitled)_"
    if word == "":
        state.pending_delete = (conv.id, ctx.clock() + CONFIRM_WINDOW_S)
        return (
            f"Delete **{title}** (`{conv.id}`) with all its messages, ratings and images? "
            "This cannot be undone. To do it, send `/delete confirm` within 2 minutes."
        )
    pending = state.pending_delete
    if pending is None or pending[0] != conv.id or ctx.clock() > pending[1]:
        state.pending_delete = None
        return CONFIRM_FIRST
    if busy := busy_reply(state):
        return busy
    try:
        await ctx.call(ctx.store.delete_conversation, conv.id, ctx.user_id)
    except NotFound:
        pass  # gone already: the result is the same
    state.pending_delete = None
    state.conversation_id = None
    state.thread_id = new_thread_id()
    await _drop_network_session(ctx, conv.id)
    return f"Deleted **{title}**. Your next message starts a new conversation."


async def _drop_network_session(ctx: CommandContext, conversation_id: str) -> None:
    """Forget the conversation's KV-cache session on the network in use (the same path as a
    delete from the sidebar: ``argus.network_choice.drop_conversation_session``; best effort,
    logged, never shown: the conversation itself is already deleted)."""
    await drop_conversation_session(ctx.services, conversation_id)


COMMAND = Command(
    name="delete",
    usage="/delete",
    description="Delete the current conversation (asks you to confirm with /delete confirm).",
    icon="trash-2",
    run=run,
)

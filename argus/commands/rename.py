"""``/rename <title>`` — rename the current conversation."""
from __future__ import annotations

from argus.commands.base import Command, CommandContext, CommandUsageError, escape_md, one_line
from argus.store.base import NotFound

#: Longest title kept, in characters (longer ones are shortened with an ellipsis).
MAX_TITLE = 100

NO_CONVERSATION = "There is no saved conversation here yet: send a message first (or `/select` one)."
GONE = "This conversation no longer exists; your next message starts a new one."


async def run(ctx: CommandContext, args: str) -> str:
    """Give the current conversation a new title (as the history sidebar's rename does).

    Raises:
        CommandUsageError: no title.
    """
    title = one_line(args, MAX_TITLE)
    if not title:
        raise CommandUsageError("Usage: /rename <new title>.")
    if not ctx.state.conversation_id:
        return NO_CONVERSATION
    try:
        conv = await ctx.call(ctx.store.rename_conversation, ctx.state.conversation_id, ctx.user_id, title)
    except NotFound:
        ctx.state.conversation_id = None
        return GONE
    return f"Renamed this conversation to **{escape_md(conv.title)}**."


COMMAND = Command(
    name="rename",
    usage="/rename <title>",
    description="Rename the current conversation.",
    icon="pencil",
    run=run,
)

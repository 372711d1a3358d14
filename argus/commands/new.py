"""``/new`` — start a new conversation."""
from __future__ import annotations

from argus.commands.base import Command, CommandContext, CommandUsageError, new_thread_id


async def run(ctx: CommandContext, args: str) -> str:
    """Forget the current conversation; the next chat message starts a new one, in a
    new Chainlit thread (``state.thread_id``), so it gets its own entry in the history.

    Raises:
        CommandUsageError: when arguments are given (``/new`` takes none).
    """
    if args:
        raise CommandUsageError("/new takes no arguments.")
    ctx.state.conversation_id = None
    ctx.state.thread_id = new_thread_id()
    ctx.state.pending_delete = None
    return "Started a new conversation: your next message begins it."


COMMAND = Command(
    name="new",
    usage="/new",
    description="Start a new conversation.",
    icon="message-square-plus",
    run=run,
)

"""``/new`` — start a new conversation."""
from __future__ import annotations

from argus.commands.base import Command, CommandContext, CommandUsageError


async def run(ctx: CommandContext, args: str) -> str:
    """Forget the current conversation; the next chat message starts a new one.

    Raises:
        CommandUsageError: when arguments are given (``/new`` takes none).
    """
    if args:
        raise CommandUsageError("/new takes no arguments.")
    ctx.state.conversation_id = None
    return "Started a new conversation: your next message begins it."


COMMAND = Command(
    name="new",
    usage="/new",
    description="Start a new conversation.",
    icon="message-square-plus",
    run=run,
)

"""``/help`` — list the commands."""
from __future__ import annotations

from typing import Callable, Iterable

from argus.commands.base import Command, CommandContext


def help_command(commands: Callable[[], Iterable[Command]]) -> Command:
    """The ``/help`` command listing ``commands()`` (the registry, in its order; passed in so
    this module does not import the registry that imports it)."""

    async def run(ctx: CommandContext, args: str) -> str:
        """Reply with every registered command, its usage and what it does."""
        lines = ["**Commands**", ""]
        for cmd in commands():
            lines.append(f"- `{cmd.usage}` — {cmd.description}")
        lines += [
            "",
            "Your conversations are also in the history sidebar (open, rename, delete, search);"
            " `/select` opens one in this chat, like the sidebar does.",
            "",
            "Anything else you type is sent to the model.",
        ]
        return "\n".join(lines)

    return Command(name="help", usage="/help", description="Show the commands.", icon="circle-help", run=run)

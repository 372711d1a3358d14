"""``/help`` — list the commands."""
from __future__ import annotations

from argus.commands.base import Command, CommandContext


async def run(ctx: CommandContext, args: str) -> str:
    """Reply with every registered command, its usage and what it does."""
    from argus.commands import COMMANDS  # the registry imports this module

    lines = ["**Commands**", ""]
    for cmd in COMMANDS.values():
        lines.append(f"- `{cmd.usage}` — {cmd.description}")
    lines += [
        "",
        "Your conversations are also in the history sidebar (open, rename, delete, search);"
        " `/select` opens one in this chat, like the sidebar does.",
        "",
        "Anything else you type is sent to the model.",
    ]
    return "\n".join(lines)


COMMAND = Command(
    name="help",
    usage="/help",
    description="Show the commands.",
    icon="circle-help",
    run=run,
)

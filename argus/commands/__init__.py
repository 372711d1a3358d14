"""Slash commands: the registry and the dispatcher.

Adding a command = one new module exposing ``COMMAND`` (a
:class:`~argus.commands.base.Command`) + one line in :data:`COMMANDS` (``/help`` is
built here, from the registry).
Commands are answered directly: they are neither sent to the model nor stored
as chat messages.
"""
from __future__ import annotations

from argus.commands import convs, delete, export, help, model, network, new, rename, search, select, workers
from argus.commands import image, keys, video
from argus.commands.base import (
    Command,
    CommandContext,
    CommandUsageError,
    ModelInfo,
    OutFile,
    ParsedCommand,
    SessionState,
    parse_command,
)

#: name → command, in the order /help lists them.
COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        help.help_command(lambda: COMMANDS.values()),
        new.COMMAND,
        convs.COMMAND,
        select.COMMAND,
        search.COMMAND,
        rename.COMMAND,
        export.COMMAND,
        delete.COMMAND,
        model.COMMAND,
        network.COMMAND,
        workers.COMMAND,
        image.COMMAND,
        video.COMMAND,
        keys.COMMAND,
    )
}

HELP_HINT = "Type /help to see the commands."


async def run_command(ctx: CommandContext, parsed: ParsedCommand) -> str:
    """Run ``parsed`` and return the reply (Markdown).

    Unknown commands and bad arguments get a short reply pointing at ``/help``.
    Store failures (``StoreUnavailable``) propagate to the chat handler.
    """
    cmd = COMMANDS.get(parsed.name)
    if cmd is None:
        shown = f"/{parsed.name}" if parsed.name else "/"
        return f"Unknown command `{shown}`. {HELP_HINT}"
    try:
        return await cmd.run(ctx, parsed.args)
    except CommandUsageError as e:
        return f"{e} {HELP_HINT}"


def menu() -> list[dict]:
    """The commands in the shape Chainlit's ``emitter.set_commands`` expects."""
    return [
        {"id": c.name, "icon": c.icon, "description": c.description, "button": False, "persistent": False}
        for c in COMMANDS.values()
    ]


__all__ = [
    "COMMANDS",
    "Command",
    "CommandContext",
    "CommandUsageError",
    "HELP_HINT",
    "ModelInfo",
    "OutFile",
    "ParsedCommand",
    "SessionState",
    "menu",
    "parse_command",
    "run_command",
]

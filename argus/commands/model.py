"""``/model [id]`` — show or choose the model."""
from __future__ import annotations

from argus.commands.base import Command, CommandContext, CommandUsageError, ModelInfo


def _describe(m: ModelInfo, current: bool) -> str:
    line = f"- `{m.id}` — {m.name}"
    if m.loading:
        line += " (loading…)"
    if m.problem:
        line += f" (unavailable: {m.problem})"
    if current:
        line += " ← current"
    return line


def _listing(ctx: CommandContext) -> list[str]:
    cur = ctx.current_model
    return [_describe(m, cur is not None and m.id == cur.id) for m in ctx.models]


async def run(ctx: CommandContext, args: str) -> str:
    """No argument: show the current model and the available ones.
    With an id: make it this chat's model (``ctx.state.model_id``).

    Raises:
        CommandUsageError: more than one argument.
    """
    parts = args.split()
    if len(parts) > 1:
        raise CommandUsageError("Usage: /model [id], with an id from /model.")
    if not ctx.models:
        return "No model is available on this server."
    if not parts:
        cur = ctx.current_model
        assert cur is not None
        return "\n".join([f"Current model: **{cur.name}** (`{cur.id}`).", "", "Available:", *_listing(ctx)])
    wanted = parts[0].strip("`").lower()
    for m in ctx.models:
        if m.id.lower() == wanted:
            ctx.state.model_id = m.id
            reply = f"This chat now uses **{m.name}** (`{m.id}`)."
            if m.problem:
                reply += f" Note: it is unavailable right now ({m.problem})."
            return reply
    shown = parts[0] if len(parts[0]) <= 40 else parts[0][:39] + "…"
    return "\n".join([f"There is no model called `{shown.replace('`', '')}`. Available:", *_listing(ctx)])


COMMAND = Command(
    name="model",
    usage="/model [id]",
    description="Show the current model and list the available ones; /model <id> switches.",
    icon="cpu",
    run=run,
)

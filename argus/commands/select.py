"""``/select <id>`` — switch to one of the user's conversations.

The chat moves to that conversation's Chainlit thread (``state.thread_id``):
the chat handler then shows it in the browser the way the history sidebar
resumes a thread, and the next message continues it. The reply recaps its
last messages and links to ``/thread/<id>`` (the sidebar's page for it).
"""
from __future__ import annotations

from argus.commands.base import (
    Command,
    CommandContext,
    CommandUsageError,
    busy_reply,
    escape_md,
    one_line,
)
from argus.store.base import NotFound

#: How many recent messages to show after switching.
RECENT = 10
#: Characters shown per message.
SNIPPET = 300

NOT_FOUND = "No conversation with that id."


async def run(ctx: CommandContext, args: str) -> str:
    """Make conversation ``args`` current and show its last few messages.

    Another user's conversation is reported exactly like a missing one
    (:data:`NOT_FOUND`); the store enforces ownership.

    Raises:
        CommandUsageError: no id, or more than one word.
    """
    parts = args.split()
    if len(parts) != 1:
        raise CommandUsageError("Usage: /select <id>, with an id from /convs.")
    conv_id = parts[0].strip("`")
    if len(conv_id) > 100:
        return NOT_FOUND
    try:
        conv = await ctx.call(ctx.store.get_conversation, conv_id, ctx.user_id)
        page = await ctx.call(ctx.store.list_messages, conv.id, ctx.user_id, RECENT)
    except NotFound:
        return NOT_FOUND
    if conv.id != ctx.state.conversation_id and (busy := busy_reply(ctx.state)):
        return busy
    ctx.state.conversation_id = conv.id
    ctx.state.thread_id = conv.id
    ctx.state.pending_delete = None
    title = escape_md(one_line(conv.title, 60)) or "_(untitled)_"
    lines = [f"Switched to **{title}** (`{conv.id}`).", ""]
    messages = list(reversed(page.items))  # the store gives newest first
    if not messages:
        lines.append("It has no messages yet.")
    else:
        if page.next_cursor:
            lines.append(f"_Last {len(messages)} messages:_")
            lines.append("")
        for m in messages:
            who = "You" if m.role == "user" else "Assistant" if m.role == "assistant" else m.role.title()
            text = one_line(m.content, SNIPPET)
            if m.status == "stopped" and not text:
                text = "_(stopped before answering)_"
            else:
                text = text or "_(empty)_"
                if m.status == "stopped":
                    text += " _(stopped)_"
                elif m.status == "error":
                    text += " _(error)_"
            if m.attachment_ids:
                n = len(m.attachment_ids)
                text += f" _({n} image{'s' if n != 1 else ''})_"
            lines.append(f"> **{who}:** {text}")
            lines.append(">")
        if lines[-1] == ">":
            lines.pop()
        lines += ["", "Your next message continues this conversation."]
    lines += ["", f"It is also in the history sidebar: [open it]({ctx.root_path}/thread/{conv.id})."]
    return "\n".join(lines)


COMMAND = Command(
    name="select",
    usage="/select <id>",
    description="Open one of your conversations in this chat (like the history sidebar) and continue it.",
    icon="folder-open",
    run=run,
)

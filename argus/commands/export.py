"""``/export [md|json]`` — the current conversation as a file (Markdown by default)."""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from argus.commands.base import Command, CommandContext, CommandUsageError, OutFile, escape_md, format_time, one_line
from argus.store.base import Message, NotFound

#: Most messages exported (the newest ones).
MAX_MESSAGES = 10_000
FORMATS = {"md": "md", "markdown": "md", "json": "json"}
NO_CONVERSATION = "There is nothing to export yet: this chat has no saved conversation."


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def file_stem(title: str) -> str:
    """A safe file name stem from a title (letters of any script, digits, ``-``)."""
    stem = re.sub(r"[^\w-]+", "-", title, flags=re.UNICODE).strip("-_")[:50].strip("-_")
    return stem or "conversation"


def to_markdown(conv, messages: list[Message], exported_at: float) -> str:
    lines = [
        f"# {escape_md(conv.title) or 'Untitled conversation'}",
        "",
        f"_Exported from Jarvis Argus on {format_time(exported_at)} · conversation `{conv.id}` · "
        f"{len(messages)} message{'s' if len(messages) != 1 else ''}_",
    ]
    for m in messages:
        who = "You" if m.role == "user" else "Assistant" if m.role == "assistant" else m.role.title()
        mark = {"stopped": " _(stopped)_", "error": " _(error)_"}.get(m.status, "")
        lines += ["", f"### {who} — {format_time(m.created_at)}{mark}", ""]
        lines.append(m.content if m.content.strip() else "_(empty)_")
        if m.attachment_ids:
            n = len(m.attachment_ids)
            lines += ["", f"_({n} image{'s' if n != 1 else ''} attached)_"]
    return "\n".join(lines) + "\n"


def to_json(conv, messages: list[Message], exported_at: float) -> str:
    doc = {
        "format": "jarvis-argus-conversation",
        "version": 1,
        "exported_at": _iso(exported_at),
        "conversation": {
            "id": conv.id,
            "title": conv.title,
            "model": conv.model,
            "created_at": _iso(conv.created_at),
            "updated_at": _iso(conv.updated_at),
        },
        "messages": [
            {
                "id": m.id,
                "role": m.role,
                "content": m.content,
                "status": m.status,
                "model": m.model,
                "created_at": _iso(m.created_at),
                "attachment_ids": list(m.attachment_ids),
            }
            for m in messages
        ],
    }
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


async def run(ctx: CommandContext, args: str) -> str:
    """Attach the current conversation to the reply (``ctx.files``), as Markdown or JSON.

    Raises:
        CommandUsageError: a format other than ``md`` or ``json``.
    """
    fmt = FORMATS.get(args.strip().lower() or "md")
    if fmt is None:
        raise CommandUsageError("Usage: /export [md|json].")
    if not ctx.state.conversation_id:
        return NO_CONVERSATION
    try:
        conv = await ctx.call(ctx.store.get_conversation, ctx.state.conversation_id, ctx.user_id)
        items: list[Message] = []
        cursor = None
        while len(items) < MAX_MESSAGES:
            page = await ctx.call(ctx.store.list_messages, conv.id, ctx.user_id, 200, cursor)
            items.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
    except NotFound:
        ctx.state.conversation_id = None
        return "This conversation no longer exists; your next message starts a new one."
    messages = list(reversed(items[:MAX_MESSAGES]))
    now = ctx.clock()
    if fmt == "md":
        data, mime, label = to_markdown(conv, messages, now), "text/markdown", "Markdown"
    else:
        data, mime, label = to_json(conv, messages, now), "application/json", "JSON"
    ctx.files.append(OutFile(name=f"{file_stem(conv.title)}.{fmt}", mime=mime, data=data.encode("utf-8")))
    n = len(messages)
    title = escape_md(one_line(conv.title, 60)) or "_(untitled)_"
    return f"Here is **{title}** as {label} ({n} message{'s' if n != 1 else ''})."


COMMAND = Command(
    name="export",
    usage="/export [md|json]",
    description="Download the current conversation as Markdown (default) or JSON.",
    icon="download",
    run=run,
)

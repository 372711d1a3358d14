"""``/search <text>`` — find the user's own messages containing a text."""
from __future__ import annotations

from argus.commands.base import Command, CommandContext, CommandUsageError, escape_md, one_line
from argus.store.base import NotFound

#: Messages shown.
RESULTS = 10
#: Longest search text, in characters.
MAX_QUERY = 200
#: Characters of context shown on each side of the match.
CONTEXT = 50


def snippet(content: str, text: str) -> str:
    """The part of ``content`` around the first match of ``text`` (match in bold), as Markdown."""
    flat = " ".join(content.split())
    at = flat.lower().find(text.lower())
    if at < 0:  # matched by the store's case folding only: show the start
        return escape_md(one_line(flat, 2 * CONTEXT))
    start, end = max(0, at - CONTEXT), min(len(flat), at + len(text) + CONTEXT)
    if start > 0 and " " in flat[start:at]:  # cut at word boundaries
        start = flat.index(" ", start, at) + 1
    if end < len(flat) and " " in flat[at + len(text) : end]:
        end = flat.rindex(" ", at + len(text), end)
    before, match, after = flat[start:at], flat[at : at + len(text)], flat[at + len(text) : end]
    return (
        ("…" if start > 0 else "")
        + escape_md(before)
        + f"**{escape_md(match)}**"
        + escape_md(after)
        + ("…" if end < len(flat) else "")
    )


async def run(ctx: CommandContext, args: str) -> str:
    """The newest :data:`RESULTS` of the user's messages containing ``args``
    (case-insensitive), each with its conversation's title and id.

    Raises:
        CommandUsageError: no text, or longer than :data:`MAX_QUERY`.
    """
    text = " ".join(args.split())
    if not text:
        raise CommandUsageError("Usage: /search <text>.")
    if len(text) > MAX_QUERY:
        raise CommandUsageError(f"Search for at most {MAX_QUERY} characters.")
    hits = await ctx.call(ctx.store.search_messages, ctx.user_id, text, RESULTS)
    shown = escape_md(one_line(text, 60))
    if not hits:
        return f"None of your messages contain “{shown}”."
    titles: dict[str, str] = {}
    lines = [f"**Messages containing “{shown}”** (newest first)", ""]
    for m in hits:
        if m.conversation_id not in titles:
            try:
                conv = await ctx.call(ctx.store.get_conversation, m.conversation_id, ctx.user_id)
                titles[m.conversation_id] = escape_md(one_line(conv.title, 60)) or "_(untitled)_"
            except NotFound:  # deleted meanwhile
                titles[m.conversation_id] = ""
        if not titles[m.conversation_id]:
            continue
        who = "You" if m.role == "user" else "Assistant"
        lines.append(f"- **{titles[m.conversation_id]}** (`{m.conversation_id}`) — {who}: {snippet(m.content, text)}")
    lines += ["", "Open a conversation with `/select <id>`."]
    return "\n".join(lines)


COMMAND = Command(
    name="search",
    usage="/search <text>",
    description="Search your messages; shows each match's conversation and id.",
    icon="search",
    run=run,
)

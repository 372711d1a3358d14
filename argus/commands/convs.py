"""``/convs [page]`` — the user's conversations, most recently updated first."""
from __future__ import annotations

from argus.commands.base import (
    Command,
    CommandContext,
    CommandUsageError,
    escape_md,
    format_time,
    one_line,
)

#: The furthest page /convs shows (older conversations stay reachable with /select).
MAX_PAGE = 50
#: Conversations skipped per store call when walking to a later page.
SKIP_BATCH = 100


def parse_page(args: str) -> int:
    """``""`` → 1; ``"3"`` → 3.

    Raises:
        CommandUsageError: not a whole number from 1 to :data:`MAX_PAGE`.
    """
    if not args:
        return 1
    try:
        page = int(args.strip())
    except ValueError:
        raise CommandUsageError("Usage: /convs [page], where page is a whole number from 1.") from None
    if not 1 <= page <= MAX_PAGE:
        raise CommandUsageError(f"The page must be a whole number from 1 to {MAX_PAGE}.")
    return page


async def run(ctx: CommandContext, args: str) -> str:
    """List one page (``ctx.page_size`` items) of the user's conversations.

    Each line shows the id (for ``/select``), the title and the last update
    time; the current conversation is marked.

    Raises:
        CommandUsageError: bad page argument.
    """
    page = parse_page(args)
    no_page = f"There is no page {page}: you have fewer conversations than that. Try /convs."
    # Skip the earlier pages in a few large steps (not one query per page);
    # the store may return fewer than asked, so count what it really gave.
    cursor = None
    to_skip = (page - 1) * ctx.page_size
    while to_skip > 0:
        listing = await ctx.call(ctx.store.list_conversations, ctx.user_id, min(to_skip, SKIP_BATCH), cursor)
        to_skip -= len(listing.items)
        cursor = listing.next_cursor
        if cursor is None or not listing.items:
            return no_page
    listing = await ctx.call(ctx.store.list_conversations, ctx.user_id, ctx.page_size, cursor)
    if not listing.items:
        if page == 1:
            return "You have no conversations yet: send a message to start one."
        return no_page
    lines = [f"**Your conversations** (page {page}, newest first)", ""]
    for conv in listing.items:
        mark = " ← current" if conv.id == ctx.state.conversation_id else ""
        title = escape_md(one_line(conv.title, 60)) or "_(untitled)_"
        lines.append(f"- `{conv.id}` {title} — updated {format_time(conv.updated_at)}{mark}")
    lines.append("")
    if listing.next_cursor and page < MAX_PAGE:
        lines.append(f"More: `/convs {page + 1}`. ")
    elif listing.next_cursor:
        lines.append(f"Older conversations exist, but /convs lists only the first {MAX_PAGE} pages. ")
    lines.append("Open one with `/select <id>` (or from the history sidebar).")
    return "\n".join(lines)


COMMAND = Command(
    name="convs",
    usage="/convs [page]",
    description="List your conversations, newest first.",
    icon="list",
    run=run,
)

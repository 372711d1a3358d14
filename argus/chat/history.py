"""Conversation memory: the stored messages of a conversation, up to the one being answered.

The stored rows ARE the model's memory (the engine trims the oldest further to fit its
window). Error rows, empty rows (stopped before answering) and other roles are left out.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional, Sequence

from argus.store import Store
from argus.store.base import Message

log = logging.getLogger(__name__)

#: Stored messages fed to the model as history (the engine trims further).
HISTORY_LIMIT = 50
#: Extra stored rows read when looking for the message being answered (rows of
#: messages queued after it, which its history leaves out).
HISTORY_SLACK = 20


def as_messages(rows: Sequence[Message]) -> list[dict]:
    """``[{"role", "content"}]`` of ``rows`` (oldest first), leaving out rows without text."""
    return [{"role": m.role, "content": m.content} for m in rows if m.content.strip()]


class History:
    """Reads a conversation's recent messages from ``store``."""

    def __init__(self, store: Store):
        self.store = store

    async def rows(self, conv_id: str, user_id: str, upto: Optional[str] = None) -> list[Message]:
        """The stored messages of the history (oldest first), keeping user messages that hold
        only images (a model that reads images sees them).

        ``upto``: the id of the user message being answered; it is the last
        message of the history, and rows stored after it (messages sent while
        it waited, their placeholder answers) are left out. Raises StoreError.
        """
        limit = HISTORY_LIMIT if upto is None else HISTORY_LIMIT + HISTORY_SLACK
        page = await asyncio.to_thread(self.store.list_messages, conv_id, user_id, limit)
        items = page.items  # newest first
        if upto is not None:
            ids = [m.id for m in items]
            if upto in ids:
                items = items[ids.index(upto):]
            else:
                log.warning("message %s not among the last %d of conversation %s", upto, limit, conv_id)
            items = items[:HISTORY_LIMIT]
        return [
            m for m in reversed(items)
            if m.role in ("user", "assistant") and m.status != "error"
            and (m.content.strip() or (m.role == "user" and m.attachment_ids))
        ]

    async def messages(self, conv_id: str, user_id: str, upto: Optional[str] = None) -> list[dict]:
        """The history as model messages ``[{"role", "content"}]``, oldest first (see :meth:`rows`)."""
        return as_messages(await self.rows(conv_id, user_id, upto))

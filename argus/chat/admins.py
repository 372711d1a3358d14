"""Key-pool notices for administrators' live chats.

When a provider rejects an API key the pool disables it and logs it; every
administrator with a chat open is told (fingerprint only), and an administrator's
new chat lists the keys rejected earlier.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from argus.chat.sentences import invalid_key_notice, invalid_keys_listed
from argus.chat.session import current_session, current_user_id, say
from argus.keys import Lease
from argus.remote import Remote
from argus.store import Store, StoreError

log = logging.getLogger(__name__)


class AdminChats:
    """The Chainlit contexts of administrators' live chats, by session id."""

    def __init__(self, store: Store, remote: Remote):
        self.store, self.remote = store, remote
        self._chats: dict[str, Any] = {}

    async def track(self) -> None:
        """Remember this chat when its user is an administrator (key-pool notices go to it), and
        tell them about keys the providers rejected. Raises StoreError."""
        session, uid = current_session(), current_user_id()
        if session is None or uid is None:
            return
        user = await asyncio.to_thread(self.store.get_user, uid)
        if user is None or user.role != "admin":
            self._chats.pop(session.id, None)
            return
        from chainlit.context import get_context

        self._chats[session.id] = get_context()  # the real context, not Chainlit's lazy proxy
        try:
            invalid = [k for k in await asyncio.to_thread(self.remote.pool.list) if k.state == "invalid"]
        except StoreError:
            return
        if invalid:
            await say(invalid_keys_listed(", ".join(f"{k.provider}:{k.fingerprint}" for k in invalid)))

    async def tell_invalid(self, leases: list[Lease]) -> None:
        """Tell every administrator's live chat that a provider rejected a key (fingerprint only);
        the pool has already logged it and disabled the key."""
        from chainlit.context import context_var
        from chainlit.session import WebsocketSession

        for sid, ctx in list(self._chats.items()):
            if isinstance(ctx.session, WebsocketSession) and WebsocketSession.get_by_id(sid) is None:
                self._chats.pop(sid, None)  # that chat is gone
                continue

            async def send(ctx: Any = ctx) -> None:
                context_var.set(ctx)
                for lease in leases:
                    await say(invalid_key_notice(lease))

            try:
                await asyncio.create_task(send())
            except Exception:
                log.warning("could not notify an administrator's chat", exc_info=True)

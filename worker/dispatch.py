"""One message loop for every link role: a table message type -> handler, and the shared
code that reads, dispatches and answers failures with typed errors.

Each side of a link (the admin serving a joiner or a member, a worker serving its admin
or a peer, the control endpoint) builds a :class:`Dispatcher` from its table and calls
:meth:`Dispatcher.serve`. A handler is ``async (message) -> None | STOP``; returning
:data:`STOP` ends the loop (the connection is done). A handler that raises a
``ProtocolError`` is answered with that error (its code and sentence, the request's id)
and the loop goes on; other exceptions propagate to the caller's edge. A message whose
type is not in the table is answered ``unexpected_message``, except ``error`` messages,
which go to ``on_error`` (default: ignored).
"""
from __future__ import annotations

import logging
from typing import Awaitable, Callable, Mapping, Optional

from worker import protocol
from worker.link import Link
from worker.protocol import Message, ProtocolError

log = logging.getLogger(__name__)

#: A handler's answer that ends the loop.
STOP = object()

Handler = Callable[[Message], Awaitable[object]]


class Dispatcher:
    """Routes the messages of one link to the handlers of its role.

    Args:
        role: what this loop serves, for the unexpected-message sentence ("a member link").
        handlers: message type -> handler.
        on_error: handler for ``error`` messages not in ``handlers`` (may return STOP).
        on_message: called with every message before dispatch (e.g. to note the time).
        timeout_s: seconds to wait for each message (None: forever); a timeout raises
            asyncio.TimeoutError out of :meth:`serve`.
    """

    def __init__(self, role: str, handlers: Mapping[str, Handler], *, on_error: Optional[Handler] = None,
                 on_message: Optional[Callable[[Message], None]] = None, timeout_s: Optional[float] = None):
        self.role, self.handlers = role, dict(handlers)
        self.on_error, self.on_message, self.timeout_s = on_error, on_message, timeout_s

    async def dispatch(self, link: Link, m: Message) -> object:
        """Run the handler of one message; answer a ProtocolError it raises on ``link``.
        Returns the handler's answer (STOP ends the loop)."""
        handler = self.handlers.get(m.message_type)
        if handler is None and m.message_type == "error":
            handler = self.on_error
            if handler is None:
                log.info("%s: the peer reported: %s", self.role, m.payload.get("message"))
                return None
        if handler is None:
            await link.send_error(protocol.UnexpectedMessage(
                f"{m.message_type} is not expected on {self.role}", request_id=m.request_id))
            return None
        try:
            return await handler(m)
        except ProtocolError as e:
            await link.send_error(e, m.request_id)
            return None

    async def serve(self, link: Link) -> None:
        """Read and dispatch messages until a handler returns STOP. Raises LinkClosed when the
        link closes, asyncio.TimeoutError when nothing arrives within ``timeout_s``."""
        while True:
            m = await link.recv(timeout=self.timeout_s)
            if self.on_message is not None:
                self.on_message(m)
            if await self.dispatch(link, m) is STOP:
                return


__all__ = ["Dispatcher", "Handler", "STOP"]

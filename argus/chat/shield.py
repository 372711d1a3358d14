"""Finishing bookkeeping across the stop button."""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def unstoppable(aw: Awaitable[T]) -> tuple[T, bool]:
    """Run ``aw`` to its end even if the calling task is cancelled meanwhile.

    Returns ``(result, cancelled)``; ``cancelled`` is True when a cancellation
    (the stop button) arrived while waiting: the caller finishes its
    bookkeeping and then raises ``CancelledError`` itself. Exceptions of
    ``aw`` propagate.
    """
    fut = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(fut), cancelled
        except asyncio.CancelledError:
            if fut.cancelled():  # the work itself was cancelled, not just us
                raise
            if fut.done():
                return fut.result(), True
            cancelled = True

"""Generation slots: at most N answers computed on this machine at once, over all users.

Each local generation holds a KV cache of hundreds of MB at full context and a
share of few cores, so a server-wide semaphore bounds them; a message that has
to wait shows a short note (removed when its turn comes).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Optional

import chainlit as cl

from argus.chat.sentences import WAITING_FOR_SLOT
from argus.datalayer import KIND_KEY, KIND_NOTICE

log = logging.getLogger(__name__)

#: Answers generated at the same time over all users; each can hold a KV cache
#: of hundreds of MB at full context, and a small server has few cores.
MAX_CONCURRENT_GENERATIONS = 2


async def remove_quietly(msg: cl.Message) -> None:
    """Remove ``msg`` from the chat; a failure (the browser is gone) is logged, not raised."""
    try:
        await msg.remove()
    except Exception:
        log.warning("could not remove a note from the chat", exc_info=True)


class GenerationSlots:
    """A server-wide count of generation slots.

    Args:
        size: slots (answers generated at once), >= 1.
    """

    def __init__(self, size: int = MAX_CONCURRENT_GENERATIONS):
        self.size = size
        self._sem = asyncio.Semaphore(size)
        self._held = 0

    @property
    def free(self) -> int:
        """Slots nobody holds right now."""
        return self.size - self._held

    async def take(self) -> None:
        """Wait for a slot; while waiting, show :data:`WAITING_FOR_SLOT` (removed after).

        Cancellation while waiting propagates with no slot taken.
        """
        if not self._sem.locked():
            await self._sem.acquire()  # free: returns at once
            self._held += 1
            return
        note = cl.Message(content=WAITING_FOR_SLOT, metadata={KIND_KEY: KIND_NOTICE})
        await note.send()
        try:
            await self._sem.acquire()
        except BaseException:
            await remove_quietly(note)
            raise
        self._held += 1
        try:
            await remove_quietly(note)
        except BaseException:  # cancelled while removing the note: give the slot back
            self.release()
            raise

    def release(self) -> None:
        """Give one slot back (on the event loop's thread)."""
        self._held -= 1
        self._sem.release()

    def release_after(self, producer: Optional[threading.Thread]) -> None:
        """Give the slot back once ``producer`` (the generation thread) has ended.

        After a stop the consumer returns at once while the thread finishes its
        current step; the slot (CPU, KV cache) is only free once it has.
        """
        if producer is None or not producer.is_alive():
            self.release()
            return
        loop = asyncio.get_running_loop()

        def wait() -> None:
            producer.join()
            try:
                loop.call_soon_threadsafe(self.release)
            except RuntimeError:  # the loop is closed: nobody waits for slots any more
                pass

        threading.Thread(target=wait, name="argus-slot-release", daemon=True).start()

"""Slash commands in the chat: run one (``argus.commands``) with its progress line and task list.

Commands are answered directly, never sent to the model nor stored (unless the command
keeps its result, ``CommandContext.keep``). A command whose arguments hold a secret
(``/keys add``) is removed from the chat before anything else.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import chainlit as cl

from argus.commands import COMMANDS, parse_command
from argus.datalayer import KIND_KEY, KIND_NOTICE

log = logging.getLogger(__name__)

#: Slash commands a user may run per minute (cheap, but each hits the store).
COMMANDS_PER_MINUTE = 60


def conceals(content: str, command: Optional[str]) -> bool:
    """Whether the message is a command whose arguments hold a secret (``/keys add``)."""
    parsed = parse_command(content, command)
    cmd = COMMANDS.get(parsed.name) if parsed is not None else None
    return cmd is not None and cmd.conceals is not None and cmd.conceals(parsed.args)


class Progress:
    """One progress line in the chat, sent on the first :meth:`show`, updated by later ones and
    removed by :meth:`close` (a command's reply follows it)."""

    def __init__(self) -> None:
        self._msg: Optional[cl.Message] = None

    async def show(self, text: str) -> None:
        try:
            if self._msg is None:
                self._msg = cl.Message(content=text, metadata={KIND_KEY: KIND_NOTICE})
                await self._msg.send()
            else:
                self._msg.content = text
                await self._msg.update()
        except Exception:  # progress is a courtesy: never fail the command for it
            log.debug("could not show progress", exc_info=True)

    async def close(self) -> None:
        if self._msg is not None:
            msg, self._msg = self._msg, None
            try:
                await msg.remove()
            except Exception:
                log.debug("could not remove the progress line", exc_info=True)


class TaskBoard:
    """One Chainlit task list in the chat (``services["task_board"]``, used by ``/workers
    rebalance``): :meth:`show` sends it, then updates it in place."""

    def __init__(self) -> None:
        self._list: Optional[cl.TaskList] = None

    async def show(self, status: str, tasks: Sequence[tuple[str, str]]) -> None:
        """Show ``tasks`` (``(title, state)``, state one of ``ready``, ``running``, ``done``,
        ``failed``) under the overall ``status`` line."""
        try:
            if self._list is None:
                self._list = cl.TaskList()
            self._list.status = status
            self._list.tasks = [cl.Task(title=title, status=cl.TaskStatus(state)) for title, state in tasks]
            await self._list.send()
        except Exception:  # progress is a courtesy: never fail the command for it
            log.debug("could not show the task list", exc_info=True)

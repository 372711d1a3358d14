"""The one shape of a chat back-end: open a turn, then stream it.

A back-end answers one stored user message (a :class:`~argus.chat.intake.Turn`)
from the conversation's stored rows. :meth:`ChatBackend.open_turn` does the
cheap preparation that may refuse (model not loaded, no message to answer) and
:meth:`TurnStream.stream` streams the answer's text pieces into a sink, returning
a :class:`Streamed` for :func:`argus.chat.answering.Answering.answer_turn` to
classify, store and show. The stop button works through the
:class:`~argus.streaming.StreamHandle`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Optional, Protocol, Sequence, runtime_checkable

from argus.catalogue import ModelSpec
from argus.providers import ProviderError
from argus.store.base import Message
from argus.streaming import StreamHandle, StreamResult

if TYPE_CHECKING:
    from argus.chat.intake import Turn

#: Where the pieces of an answer go (``cl.Message.stream_token``).
Sink = Callable[[str], Awaitable[None]]


class BackendUnavailable(Exception):
    """The back-end cannot start an answer; ``str()`` says why, as a clause for the user
    (nothing was shown or stored)."""


@dataclass
class Streamed:
    """What streaming one answer gave.

    Attributes:
        result: the text streamed and how it ended (:class:`~argus.streaming.StreamResult`).
        model_id: the id stored with the answer.
        error: a provider's failure with its sentence (remote and network back-ends), or None.
        notice: a note shown after the answer (old messages left out, cut off…), or None.
        finish: the generation's finish reason when known (``"context"``: the prompt did not fit).
        cut_at: the max-new-tokens limit (tokens) when the answer ended by reaching it (each
            back-end maps its own finish reason: the engine's and the network's ``"length"``
            less the context-window case, which has its own notice; OpenAI's ``"length"``,
            Anthropic's ``"max_tokens"``, Gemini's ``"MAX_TOKENS"``), else None.
        cancelled: the stop button cancelled the task meanwhile (re-raise once stored).
        retryable: a failure after text was shown is a connection failure the user may
            retry (remote and network); False for the local model, whose failure is final.
    """

    result: StreamResult
    model_id: str
    error: Optional[ProviderError] = None
    notice: Optional[str] = None
    finish: Optional[str] = None
    cut_at: Optional[int] = None
    cancelled: bool = False
    retryable: bool = True


@runtime_checkable
class TurnStream(Protocol):
    """One prepared answer."""

    async def stream(self, sink: Sink, handle: StreamHandle) -> Streamed:
        """Stream the answer into ``sink`` until done, failed or stopped by ``handle``.

        Raises:
            BackendUnavailable: no answer could start (nothing reached ``sink``).
        """


@runtime_checkable
class ChatBackend(Protocol):
    """A source of chat answers: the local model, the remote providers, the worker network.

    ``holds_slot``: an answer computes on this machine and takes a generation slot.
    """

    holds_slot: bool

    async def open_turn(self, spec: Optional[ModelSpec], rows: Sequence[Message], turn: "Turn") -> TurnStream:
        """Prepare the answer to ``turn`` with the model ``spec`` (None: the back-end's own)
        from the conversation's stored ``rows`` (oldest first, the last the message answered).

        Raises:
            BackendUnavailable: this back-end cannot answer now.
        """

"""The remote providers as a chat back-end, through the API-key pool with failover.

Keys are tried in the pool's order (``argus.keys.failover``): a key that fails before
the first piece of text (rate limited, out of quota, invalid, server or network
trouble) hands the request to the next one; the answer streams through the same queue
as the local model's (``stream_async_pieces``; the stop button keeps the partial text).
A refusal (blocked prompt, bad request) is the answer. When no key can start an answer
the back-end is unavailable, with the reason (the local model answers instead).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from argus.chat.backends.base import BackendUnavailable, Sink, Streamed
from argus.chat.sentences import MESSAGE_NOT_FOUND
from argus.chat.shield import unstoppable
from argus.catalogue import ModelSpec
from argus.keys import Failover
from argus.providers import ProviderError
from argus.providers.base import ChatRequest
from argus.remote import Remote, estimate_tokens
from argus.store.base import Message
from argus.streaming import StreamHandle, StreamResult, stream_async_pieces

#: Failures that are the answer (the provider's sentence), not a reason to fall back.
REFUSALS = ("blocked", "bad_request")
#: The providers' finish reasons for "the output-token limit ended the answer", lower-cased:
#: OpenAI's ``"length"``, Anthropic's ``"max_tokens"``, Gemini's ``"MAX_TOKENS"``.
TOKEN_LIMIT_REASONS = frozenset({"length", "max_tokens"})


def hit_token_limit(finish_reason: Optional[str]) -> bool:
    """Whether a provider's own finish reason means the output-token limit cut the answer."""
    return finish_reason is not None and str(finish_reason).lower() in TOKEN_LIMIT_REASONS


class RemoteTurn:
    """One answer of the catalogue model ``spec`` to ``request``, for ``user_id``."""

    def __init__(self, remote: Remote, spec: ModelSpec, request: ChatRequest, user_id: str):
        self.remote, self.spec, self.request, self.user_id = remote, spec, request, user_id

    async def stream(self, sink: Sink, handle: StreamHandle) -> Streamed:
        """Stream through the keys in failover order. Raises BackendUnavailable when no key
        could start an answer (nothing was streamed)."""
        spec, remote = self.spec, self.remote
        provider = remote.provider(spec.provider)
        failover = Failover(remote.pool, spec, tokens=estimate_tokens(self.request))
        result: Optional[StreamResult] = None
        error: Optional[ProviderError] = None
        stream = None
        try:
            while not handle.cancelled:
                lease = await failover.next()
                if lease is None:
                    break
                stream = provider.stream_chat(self.request, lease.secret)
                result = await stream_async_pieces(stream, sink, handle)
                error = None
                if result.status == "error" and not result.sink_failed:
                    error = result.error if isinstance(result.error, ProviderError) else ProviderError(
                        "server_error", "The model failed while answering.", provider=spec.provider,
                        partial=result.pieces > 0, detail=remote.pool.scrub(repr(result.error)),
                    )
                    if result.pieces == 0:
                        if await failover.failed(lease, error) and not result.task_cancelled:
                            continue
                    else:
                        await unstoppable(failover.failed(lease, error))
                elif result.pieces or result.status == "complete":
                    await unstoppable(failover.succeeded(lease, stream.usage, self.user_id))
                break
        finally:
            await remote.report(failover)

        cancelled = bool(result and result.task_cancelled)
        if not cancelled and (result is None or (result.status == "error" and not result.pieces and not result.sink_failed)):
            if error is None or error.kind not in REFUSALS:
                if error is not None:
                    raise BackendUnavailable(str(error))
                raise BackendUnavailable(
                    f"no {spec.provider} API key can take a request right now (busy, over its limits or disabled)"
                )
        assert result is not None
        finish = stream.finish_reason if stream is not None else None
        cut_at = self.request.max_tokens if result.status == "complete" and hit_token_limit(finish) else None
        return Streamed(result, spec.id, error=error, finish=finish, cut_at=cut_at, cancelled=cancelled)


class RemoteBackend:
    """The catalogue's chat models (``argus.remote``) as a :class:`~argus.chat.backends.base.ChatBackend`."""

    holds_slot = False

    def __init__(self, remote: Remote):
        self.remote = remote

    async def open_turn(self, spec: Optional[ModelSpec], rows: Sequence[Message], turn: Any) -> RemoteTurn:
        """Build the provider request (images included). Raises BackendUnavailable when the
        message to answer is not among ``rows``."""
        assert spec is not None, "a remote answer needs its catalogue model"
        try:
            request = await self.remote.chat_request(spec, rows, turn.user_id)
        except ValueError:  # nothing left to send (the message vanished from the history)
            raise BackendUnavailable(MESSAGE_NOT_FOUND) from None
        return RemoteTurn(self.remote, spec, request, turn.user_id)

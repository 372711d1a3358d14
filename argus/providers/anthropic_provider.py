"""Anthropic Claude messages through the official ``anthropic`` SDK.

Sources: the ``anthropic`` SDK 2.12 (``AsyncAnthropic(api_key, base_url,
timeout, max_retries)``, ``messages.create(..., stream=True)`` yielding the
raw events; ``APIStatusError`` carries ``status_code`` and the body's
``error.type``; an ``event: error`` inside a stream becomes an
``APIStatusError`` of the stream's HTTP status 200, so its ``type`` decides)
and the Messages API reference (SSE events ``message_start`` (input tokens),
``content_block_start``, ``content_block_delta`` (``text_delta``),
``content_block_stop``, ``message_delta`` (``stop_reason``, cumulative output
tokens), ``message_stop``, ``ping``, ``error``).

The current Messages API takes no ``temperature``/``top_p`` (the SDK has no such
parameters), so a request's sampling settings are not sent. The system prompt
is the ``system`` parameter; images are ``{"type": "image", "source":
{"type": "base64", "media_type", "data"}}`` blocks. SDK retries are off
(``max_retries=0``); the key pool decides.

Mapping: 429 / ``rate_limit_error`` → ``rate_limited`` (``retry-after``);
``billing_error``, 402, or a "credit balance is too low" 400 →
``quota_exhausted``; 401, 403 / ``authentication_error``, ``permission_error``
→ ``invalid_key``; 5xx, 529 / ``overloaded_error``, ``api_error`` →
``server_error``; connection failures and timeouts → ``network_error``;
``stop_reason == "refusal"`` → ``blocked``; other 4xx → ``bad_request``.
"""
from __future__ import annotations

import base64
import os
from typing import Any, AsyncIterator, Optional

import anthropic

from argus.providers.transport import TRANSPORT_ERRORS, httpx2, retry_after_s
from argus.providers.base import ChatRequest, ChatStream, Provider, ProviderError, Usage

DEFAULT_BASE_URL = "https://api.anthropic.com"
BASE_URL_ENV = "ANTHROPIC_BASE_URL"
#: ``error.type`` → our kind, for errors whose HTTP status says nothing (mid-stream, status 200).
_TYPE_KINDS = {
    "rate_limit_error": "rate_limited",
    "overloaded_error": "server_error",
    "api_error": "server_error",
    "timeout_error": "server_error",
    "authentication_error": "invalid_key",
    "permission_error": "invalid_key",
    "billing_error": "quota_exhausted",
    "invalid_request_error": "bad_request",
    "not_found_error": "bad_request",
    "request_too_large": "bad_request",
}


def build_messages(request: ChatRequest) -> list[dict]:
    """The request's messages as Messages API ``messages``: text-only messages as a string,
    messages with images as image blocks followed by a text block (images first, as
    Anthropic recommends)."""
    out: list[dict] = []
    for m in request.messages:
        if not m.images:
            out.append({"role": m.role, "content": m.text})
            continue
        blocks: list[dict] = [
            {"type": "image", "source": {"type": "base64", "media_type": img.mime, "data": base64.b64encode(img.data).decode()}}
            for img in m.images
        ]
        if m.text:
            blocks.append({"type": "text", "text": m.text})
        out.append({"role": m.role, "content": blocks})
    return out


def _error_fields(body: Any) -> tuple[str, str]:
    """``(type, message)`` of an Anthropic error body ``{"type": "error", "error": {...}}``."""
    err = body.get("error", body) if isinstance(body, dict) else {}
    if not isinstance(err, dict):
        return "", str(body or "")
    return str(err.get("type") or ""), str(err.get("message") or "")


def map_error(exc: BaseException, api_key: Optional[str]) -> ProviderError:
    """Any exception out of the ``anthropic`` SDK as a ProviderError."""
    if isinstance(exc, ProviderError):
        return exc

    def make(kind: str, status: Optional[int] = None, retry: Optional[float] = None, detail: str = "") -> ProviderError:
        return ProviderError.of(kind, provider="anthropic", api_key=api_key, status=status, retry_after_s=retry, detail=detail)  # type: ignore[arg-type]

    if isinstance(exc, anthropic.APIConnectionError) or isinstance(exc, TRANSPORT_ERRORS):
        return make("network_error", detail=f"{type(exc).__name__}: {exc}")
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        kind_word, message = _error_fields(exc.body)
        retry = retry_after_s(exc.response.headers if exc.response is not None else None)
        http_status = status if status and status >= 400 else None
        if status == 429 or kind_word == "rate_limit_error":
            return make("rate_limited", http_status, retry, message)
        if status == 402 or kind_word == "billing_error" or "credit balance" in message.lower():
            return make("quota_exhausted", http_status, None, message)
        if status in (401, 403):
            return make("invalid_key", http_status, None, message)
        if status >= 500:  # 529 is "overloaded"
            return make("server_error", http_status, retry, message)
        kind = _TYPE_KINDS.get(kind_word)
        if kind is None:
            kind = "bad_request" if http_status else "server_error"
        return make(kind, http_status, retry if kind == "server_error" else None, message)
    return ProviderError.of(
        "server_error",
        provider="anthropic",
        api_key=api_key,
        detail=f"{type(exc).__name__}: {exc}",
        message="Anthropic's answer could not be read; please try again in a moment.",
    )


class AnthropicProvider(Provider):
    """Claude via ``anthropic.AsyncAnthropic``. ``base_url`` is the API root without
    ``/v1`` (e.g. ``https://api.anthropic.com``); None means ``$ANTHROPIC_BASE_URL`` or Anthropic's."""

    name = "anthropic"

    @property
    def api_root(self) -> str:
        """The base URL actually used."""
        return (self.base_url or os.environ.get(BASE_URL_ENV, "").rstrip("/") or DEFAULT_BASE_URL).rstrip("/")

    def _make_client(self, api_key: str) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=self.api_root,
            timeout=httpx2.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            max_retries=0,
        )

    def stream_chat(self, request: ChatRequest, api_key: str) -> ChatStream:
        """Stream the answer to ``request``. ``finish_reason`` is Anthropic's ``stop_reason``
        (``"end_turn"``, ``"max_tokens"``…); ``usage`` from ``message_start`` (input) and
        the last ``message_delta`` (cumulative output)."""
        self.require_key(api_key)
        messages = build_messages(request)
        extra = {"system": request.system} if request.system else {}

        async def source(stream: ChatStream) -> AsyncIterator[str]:
            client = self.client(api_key)
            response = await client.messages.create(
                model=request.model,
                max_tokens=request.max_tokens,
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                **extra,  # type: ignore[arg-type]
            )
            input_tokens = output_tokens = 0
            try:
                async for event in response:
                    if event.type == "message_start":
                        usage = event.message.usage
                        input_tokens = (usage.input_tokens or 0) + (usage.cache_read_input_tokens or 0) + (
                            usage.cache_creation_input_tokens or 0
                        )
                        output_tokens = usage.output_tokens or 0
                    elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                        if event.delta.text:
                            yield event.delta.text
                    elif event.type == "message_delta":
                        output_tokens = event.usage.output_tokens or output_tokens
                        if event.usage.input_tokens:
                            input_tokens = event.usage.input_tokens
                        if event.delta.stop_reason:
                            stream.finish_reason = event.delta.stop_reason
                    stream.usage = Usage(input_tokens, output_tokens, input_tokens + output_tokens)
                if stream.finish_reason == "refusal":
                    raise ProviderError.of("blocked", provider=self.name, api_key=api_key, detail="stop_reason refusal")
            finally:
                await response.close()

        return ChatStream(self.name, source, lambda exc: map_error(exc, api_key))

    async def list_models(self, api_key: str) -> list[str]:
        """The model ids ``GET /v1/models`` lists for this key, sorted."""
        client = self.client(api_key)
        try:
            return sorted([m.id async for m in client.models.list()])
        except Exception as exc:
            raise map_error(exc, api_key) from None

    async def _close_client(self, client: anthropic.AsyncAnthropic) -> None:
        await client.close()

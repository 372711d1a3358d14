"""OpenAI chat completions (and any OpenAI-compatible server) through the official ``openai`` SDK.

Sources: the ``openai`` SDK 3.54 (``AsyncOpenAI(api_key, base_url, timeout,
max_retries)``, ``chat.completions.create(stream=True, stream_options=
{"include_usage": True})``; its exceptions ``RateLimitError``,
``AuthenticationError``, ``PermissionDeniedError``, ``APIStatusError``,
``APIConnectionError``/``APITimeoutError`` and, for an error event inside a
stream, a bare ``APIError`` whose ``body`` is the ``error`` object) and the
Chat Completions API reference (SSE ``data: {chunk}`` lines ending with
``data: [DONE]``; with ``include_usage`` a last chunk has ``choices: []`` and
the ``usage``).

``base_url`` None means ``$OPENAI_BASE_URL`` or ``https://api.openai.com/v1``;
so any OpenAI-compatible server (llama.cpp, vLLM, Ollama, OpenRouter…) is
usable by setting it. The SDK's own retries are off (``max_retries=0``): the
key pool decides what to retry, with which key.

Images go as ``image_url`` parts holding ``data:`` URLs. The output limit is
sent as ``max_completion_tokens`` to OpenAI itself (its reasoning models refuse
``max_tokens``) and as ``max_tokens`` to other servers (which often know only that).

Mapping: 429 ``insufficient_quota`` → ``quota_exhausted``, other 429 →
``rate_limited`` (``retry-after-ms``/``retry-after``); 401, 403 →
``invalid_key``; 5xx → ``server_error``; connection failures and timeouts →
``network_error``; 400 ``content_filter``/``content_policy_violation`` and
``finish_reason == "content_filter"`` → ``blocked``; other 4xx → ``bad_request``.
"""
from __future__ import annotations

import base64
import os
from typing import Any, AsyncIterator, Optional

import openai

from argus.providers.transport import TRANSPORT_ERRORS, httpx2, retry_after_s
from argus.providers.base import ChatRequest, ChatStream, Provider, ProviderError, Usage

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BASE_URL_ENV = "OPENAI_BASE_URL"
#: Error codes/types meaning the content was refused by a filter.
_BLOCKED_CODES = frozenset({"content_filter", "content_policy_violation"})
_SERVER_TYPES = frozenset({"server_error", "api_error", "internal_error", "overloaded_error"})


def build_messages(request: ChatRequest) -> list[dict]:
    """The request as Chat Completions ``messages``: the system prompt first, then each
    message; a message with images becomes a list of ``text`` and ``image_url`` parts."""
    out: list[dict] = [{"role": "system", "content": request.system}] if request.system else []
    for m in request.messages:
        if not m.images:
            out.append({"role": m.role, "content": m.text})
            continue
        parts: list[dict] = [{"type": "text", "text": m.text}] if m.text else []
        parts += [
            {"type": "image_url", "image_url": {"url": f"data:{img.mime};base64,{base64.b64encode(img.data).decode()}"}}
            for img in m.images
        ]
        out.append({"role": m.role, "content": parts})
    return out


def _error_fields(body: Any) -> tuple[str, str, str]:
    """``(code, type, message)`` of an OpenAI error body (the ``error`` object or its wrapper)."""
    err = body.get("error", body) if isinstance(body, dict) else {}
    if not isinstance(err, dict):
        return "", "", str(body or "")
    return str(err.get("code") or ""), str(err.get("type") or ""), str(err.get("message") or "")


def map_error(exc: BaseException, api_key: Optional[str]) -> ProviderError:
    """Any exception out of the ``openai`` SDK as a ProviderError."""
    if isinstance(exc, ProviderError):
        return exc

    def make(kind: str, status: Optional[int] = None, retry: Optional[float] = None, detail: str = "") -> ProviderError:
        return ProviderError.of(kind, provider="openai", api_key=api_key, status=status, retry_after_s=retry, detail=detail)  # type: ignore[arg-type]

    if isinstance(exc, openai.APIConnectionError) or isinstance(exc, TRANSPORT_ERRORS):
        return make("network_error", detail=f"{type(exc).__name__}: {exc}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        code, kind, message = _error_fields(exc.body)
        retry = retry_after_s(exc.response.headers if exc.response is not None else None)
        if status == 429:
            quota = "insufficient_quota" in (code, kind)
            return make("quota_exhausted" if quota else "rate_limited", status, retry, message)
        if status in (401, 403):
            return make("invalid_key", status, None, message)
        if status >= 500:
            return make("server_error", status, retry, message)
        if code in _BLOCKED_CODES or kind in _BLOCKED_CODES:
            return make("blocked", status, None, message)
        return make("bad_request", status, None, message)
    if isinstance(exc, openai.APIError):  # an error event inside a stream: no status of its own
        code, kind, message = _error_fields(exc.body)
        if "rate_limit" in code or "rate_limit" in kind:
            return make("rate_limited", detail=message or str(exc))
        if "insufficient_quota" in (code, kind):
            return make("quota_exhausted", detail=message or str(exc))
        return make("server_error", detail=message or str(exc))
    return ProviderError.of(
        "server_error",
        provider="openai",
        api_key=api_key,
        detail=f"{type(exc).__name__}: {exc}",
        message="OpenAI's answer could not be read; please try again in a moment.",
    )


class OpenAIProvider(Provider):
    """Chat Completions via ``openai.AsyncOpenAI``. ``base_url`` ends in ``/v1``
    (e.g. ``http://127.0.0.1:8080/v1``); None means ``$OPENAI_BASE_URL`` or OpenAI's."""

    name = "openai"

    @property
    def api_root(self) -> str:
        """The base URL actually used."""
        return (self.base_url or os.environ.get(BASE_URL_ENV, "").rstrip("/") or DEFAULT_BASE_URL).rstrip("/")

    @property
    def is_openai(self) -> bool:
        """True when talking to OpenAI itself (not a compatible server)."""
        return self.api_root.startswith("https://api.openai.com")

    def _make_client(self, api_key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=api_key,
            base_url=self.api_root,
            timeout=httpx2.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            max_retries=0,
        )

    def stream_chat(self, request: ChatRequest, api_key: str) -> ChatStream:
        """Stream the answer to ``request``. ``finish_reason`` is OpenAI's (``"stop"``,
        ``"length"``…); ``usage`` from the final usage chunk (``prompt_tokens``,
        ``completion_tokens``, ``total_tokens``)."""
        self.require_key(api_key)
        limit = {"max_completion_tokens" if self.is_openai else "max_tokens": request.max_tokens}
        messages = build_messages(request)

        async def source(stream: ChatStream) -> AsyncIterator[str]:
            client = self.client(api_key)
            response = await client.chat.completions.create(
                model=request.model,
                messages=messages,  # type: ignore[arg-type]
                temperature=request.temperature,
                top_p=request.top_p,
                stream=True,
                stream_options={"include_usage": True},
                **limit,  # type: ignore[arg-type]
            )
            try:
                async for chunk in response:
                    if chunk.usage is not None:
                        u = chunk.usage
                        stream.usage = Usage(u.prompt_tokens or 0, u.completion_tokens or 0, u.total_tokens or 0)
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content
                    if choice.finish_reason:
                        stream.finish_reason = choice.finish_reason
                        if choice.finish_reason == "content_filter":
                            raise ProviderError.of("blocked", provider=self.name, api_key=api_key, detail="finish_reason content_filter")
            finally:
                await response.close()

        return ChatStream(self.name, source, lambda exc: map_error(exc, api_key))

    async def list_models(self, api_key: str) -> list[str]:
        """The ids ``GET /models`` lists for this key, sorted."""
        client = self.client(api_key)
        try:
            return sorted([m.id async for m in client.models.list()])
        except Exception as exc:
            raise map_error(exc, api_key) from None

    async def _close_client(self, client: openai.AsyncOpenAI) -> None:
        await client.close()

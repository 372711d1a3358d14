"""A fake of the OpenAI Chat Completions API on loopback.

Wire format as OpenAI sends it: ``POST /v1/chat/completions`` with
``stream: true`` answers SSE ``data: {chat.completion.chunk}`` lines (a first
chunk with the role, one per piece, one with ``finish_reason``, then — with
``stream_options.include_usage`` — a chunk with ``choices: []`` and the
``usage``), then ``data: [DONE]``. ``GET /v1/models`` lists models. Errors are
``{"error": {"message", "type", "param", "code"}}``.

The key is read from ``Authorization: Bearer``. Behaviours per key: ``ok``;
``429`` (rate limit, ``retry-after-ms: 1500``); ``quota`` (429
``insufficient_quota``); ``invalid`` (401 ``invalid_api_key``, the message
echoing the key); ``denied`` (403); ``badmodel`` (404 ``model_not_found``);
``filtered`` (400 ``content_policy_violation``); ``500``; ``503``;
``midstream`` (two chunks, then an error event); ``drop`` (two chunks, then
the connection is cut); ``slow``; ``content_filter`` (one chunk, then
``finish_reason: content_filter``).
"""
from __future__ import annotations

from typing import Any, Optional

from aiohttp import web

from tests.support.fakes.http import FakeApi, Recorded


def openai_error(message: str, type_: str, code: Optional[str], param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_for(behaviour: str, key: Optional[str], model: str) -> Optional[tuple[int, dict, dict]]:
    """(status, body, headers) OpenAI answers for an error behaviour; None for the others."""
    if behaviour == "429":
        return 429, openai_error(
            f"Rate limit reached for {model} in organization org-fake on requests per min (RPM): Limit 3, Used 3, Requested 1.",
            "requests",
            "rate_limit_exceeded",
        ), {"retry-after-ms": "1500", "x-ratelimit-remaining-requests": "0"}
    if behaviour == "quota":
        return 429, openai_error(
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        ), {}
    if behaviour == "invalid":
        return 401, openai_error(
            f"Incorrect API key provided: {key}. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            "invalid_api_key",
        ), {}
    if behaviour == "denied":
        return 403, openai_error("Project does not have access to this model.", "invalid_request_error", "model_not_found"), {}
    if behaviour == "badmodel":
        return 404, openai_error(
            f"The model `{model}` does not exist or you do not have access to it.", "invalid_request_error", "model_not_found"
        ), {}
    if behaviour == "filtered":
        return 400, openai_error(
            "Your request was rejected as a result of our safety system.", "invalid_request_error", "content_policy_violation"
        ), {}
    if behaviour == "500":
        return 500, openai_error("The server had an error while processing your request. Sorry about that!", "server_error", None), {}
    if behaviour == "503":
        return 503, openai_error("The engine is currently overloaded, please try again later.", "server_error", None), {}
    return None


class FakeOpenAI(FakeApi):
    """The OpenAI fake. ``usage`` is the final usage chunk's object; ``models`` the listed ids."""

    def __init__(self) -> None:
        super().__init__()
        self.key_prefix = "sk-proj-"
        self.usage = {"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25}
        self.models = ["gpt-4o-mini", "gpt-4.1", "text-embedding-3-small"]

    def key_of(self, request: web.Request) -> Optional[str]:
        auth = request.headers.get("Authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    async def handle(self, request: web.Request, rec: Recorded, behaviour: str) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/v1/models":
            failure = error_for(behaviour, rec.key, "")
            if failure:
                return self.json_response(*failure)
            return self.json_response(
                200,
                {"object": "list", "data": [{"id": m, "object": "model", "created": 1700000000, "owned_by": "openai"} for m in self.models]},
            )
        if request.method == "POST" and request.path == "/v1/chat/completions":
            body = rec.json or {}
            model = body.get("model", "")
            failure = error_for(behaviour, rec.key, model)
            if failure:
                return self.json_response(*failure)
            return await self._stream(request, behaviour, model, bool((body.get("stream_options") or {}).get("include_usage")))
        return self.json_response(404, openai_error(f"Invalid URL ({request.method} {request.path})", "invalid_request_error", None))

    def _chunk(self, model: str, delta: dict, finish: Optional[str] = None) -> dict:
        return {
            "id": "chatcmpl-fake1",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": None,
        }

    async def _stream(self, request: web.Request, behaviour: str, model: str, include_usage: bool) -> web.StreamResponse:
        resp = await self.open_sse(request)
        await self.send_sse(resp, self._chunk(model, {"role": "assistant", "content": "", "refusal": None}))
        pieces = self.pieces
        if behaviour in ("midstream", "drop"):
            for p in pieces[:2]:
                await self.send_sse(resp, self._chunk(model, {"content": p}))
            if behaviour == "drop":
                self.drop(request)
                return resp
            await self.send_sse(resp, openai_error("The server had an error while processing your request.", "server_error", None))
            return resp
        if behaviour == "content_filter":
            await self.send_sse(resp, self._chunk(model, {"content": pieces[0]}))
            await self.send_sse(resp, self._chunk(model, {}, "content_filter"))
        else:
            for p in pieces:
                await self.send_sse(resp, self._chunk(model, {"content": p}))
            await self.send_sse(resp, self._chunk(model, {}, "stop"))
        if include_usage:
            last: dict[str, Any] = self._chunk(model, {})
            last["choices"] = []
            last["usage"] = self.usage
            await self.send_sse(resp, last)
        await self.send_sse(resp, "[DONE]")
        return resp

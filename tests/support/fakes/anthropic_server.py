"""A fake of the Anthropic Messages API on loopback.

Wire format as Anthropic sends it: ``POST /v1/messages`` with ``stream: true``
answers named SSE events — ``message_start`` (with input token usage),
``content_block_start``, ``ping``, ``content_block_delta`` (``text_delta``) per
piece, ``content_block_stop``, ``message_delta`` (``stop_reason`` and the
output tokens), ``message_stop``. ``GET /v1/models`` lists models. Errors are
``{"type": "error", "error": {"type", "message"}, "request_id"}``; inside a
stream, ``event: error``.

The key is read from ``x-api-key`` or ``Authorization: Bearer`` (the API takes
both; anthropic 2.x sends the latter). Behaviours per key: ``ok``; ``429``
(``rate_limit_error``, ``retry-after: 3``); ``credit`` (400 "credit balance is
too low"); ``invalid`` (401 ``authentication_error``, echoing the key);
``denied`` (403 ``permission_error``); ``badmodel`` (404); ``500``
(``api_error``); ``529`` (``overloaded_error``); ``midstream`` (two deltas,
then an ``overloaded_error`` event); ``drop`` (two deltas, then the connection
is cut); ``slow``; ``refusal`` (one delta, then ``stop_reason: refusal``).
"""
from __future__ import annotations

from typing import Optional

from aiohttp import web

from tests.support.fakes.http import FakeApi, Recorded


def anthropic_error(type_: str, message: str) -> dict:
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": "req_fake01"}


def error_for(behaviour: str, key: Optional[str], model: str) -> Optional[tuple[int, dict, dict]]:
    """(status, body, headers) Anthropic answers for an error behaviour; None for the others."""
    table = {
        "429": (429, anthropic_error("rate_limit_error", "This request would exceed the rate limit for your organization of 50 requests per minute."), {"retry-after": "3"}),
        "credit": (400, anthropic_error("invalid_request_error", "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."), {}),
        "invalid": (401, anthropic_error("authentication_error", f"invalid x-api-key {key}"), {}),
        "denied": (403, anthropic_error("permission_error", "Your API key does not have permission to use the specified resource."), {}),
        "badmodel": (404, anthropic_error("not_found_error", f"model: {model}"), {}),
        "500": (500, anthropic_error("api_error", "Internal server error"), {}),
        "529": (529, anthropic_error("overloaded_error", "Overloaded"), {}),
    }
    return table.get(behaviour)


class FakeAnthropic(FakeApi):
    """The Anthropic fake. ``input_tokens``/``output_tokens`` are reported in the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.key_prefix = "sk-ant-api03-"
        self.input_tokens = 31
        self.output_tokens = 6
        self.models = ["claude-sonnet-4-6", "claude-haiku-4-5", "claude-opus-4-1"]

    def key_of(self, request: web.Request) -> Optional[str]:
        auth = request.headers.get("Authorization", "")
        return request.headers.get("x-api-key") or (auth[len("Bearer "):] if auth.startswith("Bearer ") else None)

    async def handle(self, request: web.Request, rec: Recorded, behaviour: str) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/v1/models":
            failure = error_for(behaviour, rec.key, "")
            if failure:
                return self.json_response(*failure)
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-09-29T00:00:00Z"} for m in self.models
            ]
            return self.json_response(200, {"data": data, "has_more": False, "first_id": self.models[0], "last_id": self.models[-1]})
        if request.method == "POST" and request.path == "/v1/messages":
            model = (rec.json or {}).get("model", "")
            failure = error_for(behaviour, rec.key, model)
            if failure:
                return self.json_response(*failure)
            return await self._stream(request, behaviour, model)
        return self.json_response(404, anthropic_error("not_found_error", "Not Found"))

    async def _stream(self, request: web.Request, behaviour: str, model: str) -> web.StreamResponse:
        resp = await self.open_sse(request)
        send = self.send_sse
        await send(
            resp,
            {
                "type": "message_start",
                "message": {
                    "id": "msg_fake01",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": model,
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": self.input_tokens, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
                },
            },
            "message_start",
        )
        await send(resp, {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}, "content_block_start")
        await send(resp, {"type": "ping"}, "ping")

        def delta(text: str) -> dict:
            return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}

        pieces = self.pieces
        if behaviour in ("midstream", "drop"):
            for p in pieces[:2]:
                await send(resp, delta(p), "content_block_delta")
            if behaviour == "drop":
                self.drop(request)
                return resp
            await send(resp, anthropic_error("overloaded_error", "Overloaded"), "error")
            return resp
        shown = pieces[:1] if behaviour == "refusal" else pieces
        for p in shown:
            await send(resp, delta(p), "content_block_delta")
        await send(resp, {"type": "content_block_stop", "index": 0}, "content_block_stop")
        stop = "refusal" if behaviour == "refusal" else "end_turn"
        await send(
            resp,
            {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": self.output_tokens}},
            "message_delta",
        )
        await send(resp, {"type": "message_stop"}, "message_stop")
        return resp

"""A fake of the Gemini API (``generativelanguage.googleapis.com``, ``v1beta``) on loopback.

Speaks the real wire format, as google-genai and Google's REST docs show it:

* ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``: SSE lines
  ``data: {GenerateContentResponse}``; the last chunk carries
  ``finishReason`` and ``usageMetadata``;
* ``POST /v1beta/models/{model}:generateContent``: one GenerateContentResponse
  (an image model answers with a text part and an ``inlineData`` PNG part);
* ``GET /v1beta/models``: ``{"models": [{"name": "models/…", "supportedGenerationMethods": [...]}]}``;
* ``POST /v1beta/models/{model}:predictLongRunning`` → ``{"name": "models/{model}/operations/{id}"}``,
  ``GET /v1beta/models/{model}/operations/{id}`` → not done (with
  ``metadata.progressPercent``) :attr:`FakeGemini.video_polls` times, then
  done with ``response.generateVideoResponse.generatedSamples[0].video.uri``;
* ``GET /v1beta/files/{id}:download?alt=media`` → 302 to the storage fake
  (another origin) when one is attached, else the MP4 bytes;
* errors exactly as Google sends them: ``{"error": {"code", "message", "status", "details": [...]}}``.

The key is read from ``x-goog-api-key`` (or ``?key=``). Behaviours per key:
``ok``; ``429`` (per-minute quota, ``RetryInfo`` 7s); ``quota`` (per-day quota, 20s);
``invalid`` (400 ``API_KEY_INVALID``); ``denied`` (403 ``PERMISSION_DENIED``);
``notfound`` (404 model); ``500``; ``503``; ``midstream`` (two chunks, then an
error event); ``drop`` (two chunks, then the connection is cut); ``slow``
(waits :attr:`slow_s` first); ``blocked`` (prompt blocked); ``safety`` (one
chunk, then ``finishReason: SAFETY``); ``noimage`` (image model answers text
only); ``video_never`` (the operation never finishes); ``video_failed`` (done
with an ``error``); ``video_filtered`` (done, every sample filtered).
Error messages echo the key, as a careless server might, so tests can prove
it is scrubbed.
"""
from __future__ import annotations

import base64
import itertools
import re
from typing import Any, Optional

from aiohttp import web

from tests.support.fakes.http import FakeApi, Recorded

#: A 1×1 PNG, the image the fake "draws".
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
#: The "video" the fake makes (an MP4 ftyp box header and some bytes).
VIDEO_BYTES = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(range(256)) * 4

_MODEL_CALL = re.compile(r"^/v1beta/models/([^/:]+):(\w+)$")
_OPERATION = re.compile(r"^/v1beta/(models/[^/]+/operations/[\w-]+)$")
_DOWNLOAD = re.compile(r"^/v1beta/files/([\w-]+):download$")


def google_error(code: int, status: str, message: str, details: Optional[list] = None) -> dict:
    """A Google API error body."""
    body: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        body["details"] = details
    return {"error": body}


def retry_info(seconds: int) -> dict:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{seconds}s"}


def quota_failure(quota_id: str, value: str) -> dict:
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
            {
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": quota_id,
                "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
                "quotaValue": value,
            }
        ],
    }


HELP = {
    "@type": "type.googleapis.com/google.rpc.Help",
    "links": [{"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}],
}


def error_for(behaviour: str, key: Optional[str], model: str = "gemini-2.5-flash") -> Optional[tuple[int, dict]]:
    """The (status, body) Google answers for an error behaviour; None for the others."""
    if behaviour == "429":
        return 429, google_error(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details. "
            "Quota exceeded for metric: generate_content_free_tier_requests, limit: 10. Please retry in 7.2s.",
            [quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "10"), HELP, retry_info(7)],
        )
    if behaviour == "quota":
        return 429, google_error(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details. "
            "Quota exceeded for metric: generate_content_free_tier_requests, limit: 250. Please retry in 20s.",
            [quota_failure("GenerateRequestsPerDayPerProjectPerModel-FreeTier", "250"), HELP, retry_info(20)],
        )
    if behaviour == "invalid":
        return 400, google_error(
            400,
            "INVALID_ARGUMENT",
            f"API key not valid. Please pass a valid API key. (key={key})",
            [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                },
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": "API key not valid. Please pass a valid API key."},
            ],
        )
    if behaviour == "denied":
        return 403, google_error(
            403,
            "PERMISSION_DENIED",
            f"Method doesn't allow unregistered callers (callers without established identity). Key {key} was suspended.",
        )
    if behaviour == "notfound":
        return 404, google_error(
            404,
            "NOT_FOUND",
            f"models/{model} is not found for API version v1beta, or is not supported for generateContent.",
        )
    if behaviour == "500":
        return 500, google_error(500, "INTERNAL", "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting")
    if behaviour == "503":
        return 503, google_error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
    return None


def chunk(text: Optional[str], *, finish: Optional[str] = None, usage: Optional[dict] = None, model: str = "gemini-2.5-flash") -> dict:
    """One GenerateContentResponse as streamed."""
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}] if text is not None else [], "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    body: dict[str, Any] = {"candidates": [candidate], "modelVersion": model, "responseId": "fake-response-1"}
    if usage:
        body["usageMetadata"] = usage
    return body


class FakeGemini(FakeApi):
    """The Gemini fake. See the module docstring for routes and behaviours.

    Attributes:
        video_polls: how many polls answer "not done" before "done".
        storage: a :class:`FakeStorage` the download redirects to (another origin), if any.
        usage: the ``usageMetadata`` of streamed answers.
        models: the model list ``GET /v1beta/models`` returns.
    """

    def __init__(self) -> None:
        super().__init__()
        self.key_prefix = "AIzaSy"
        self.video_polls = 2
        self.storage: Optional[FakeStorage] = None
        self.usage = {"promptTokenCount": 12, "candidatesTokenCount": 5, "totalTokenCount": 17}
        self.models = [
            ("models/gemini-2.5-flash", ["generateContent", "countTokens", "createCachedContent"]),
            ("models/gemini-2.5-pro", ["generateContent", "countTokens"]),
            ("models/text-embedding-004", ["embedContent"]),
            ("models/veo-3.0-generate-001", ["predictLongRunning"]),
        ]
        self._polls: dict[str, int] = {}
        self._ids = itertools.count(1)

    def key_of(self, request: web.Request) -> Optional[str]:
        return request.headers.get("x-goog-api-key") or request.query.get("key")

    async def handle(self, request: web.Request, rec: Recorded, behaviour: str) -> web.StreamResponse:
        path = request.path
        m = _MODEL_CALL.match(path)
        if request.method == "POST" and m:
            model, method = m.groups()
            failure = error_for(behaviour, rec.key, model)
            if failure:
                return self.json_response(*failure)
            if method == "streamGenerateContent":
                return await self._stream(request, behaviour, model)
            if method == "generateContent":
                return self._generate(behaviour, model)
            if method == "predictLongRunning":
                name = f"models/{model}/operations/op{next(self._ids)}"
                self._polls[name] = 0
                return self.json_response(200, {"name": name})
        m = _OPERATION.match(path)
        if request.method == "GET" and m:
            return self._operation(m.group(1), behaviour)
        m = _DOWNLOAD.match(path)
        if request.method == "GET" and m:
            if rec.key is None:
                return self.json_response(403, google_error(403, "PERMISSION_DENIED", "The caller does not have permission"))
            if self.storage is not None:
                raise web.HTTPFound(f"{self.storage.url}/blob/{m.group(1)}.mp4")
            return web.Response(body=VIDEO_BYTES, content_type="video/mp4")
        if request.method == "GET" and path == "/v1beta/models":
            failure = error_for(behaviour, rec.key)
            if failure:
                return self.json_response(*failure)
            return self.json_response(
                200,
                {
                    "models": [
                        {"name": name, "version": "001", "displayName": name.split("/")[1], "supportedGenerationMethods": methods}
                        for name, methods in self.models
                    ]
                },
            )
        return self.json_response(404, google_error(404, "NOT_FOUND", f"Requested entity was not found: {path}"))

    async def _stream(self, request: web.Request, behaviour: str, model: str) -> web.StreamResponse:
        resp = await self.open_sse(request)
        if behaviour == "blocked":
            await self.send_sse(resp, {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}, "modelVersion": model})
            return resp
        pieces = self.pieces
        if behaviour == "safety":
            await self.send_sse(resp, chunk(pieces[0], model=model))
            await self.send_sse(resp, chunk(None, finish="SAFETY", usage=self.usage, model=model))
            return resp
        if behaviour in ("midstream", "drop"):
            for p in pieces[:2]:
                await self.send_sse(resp, chunk(p, model=model))
            if behaviour == "drop":
                self.drop(request)
                return resp
            await self.send_sse(resp, google_error(500, "INTERNAL", "An internal error has occurred mid-stream."))
            return resp
        for p in pieces[:-1]:
            await self.send_sse(resp, chunk(p, model=model))
        await self.send_sse(resp, chunk(pieces[-1], finish="STOP", usage=self.usage, model=model))
        return resp

    def _generate(self, behaviour: str, model: str) -> web.Response:
        if behaviour == "blocked":
            return self.json_response(200, {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "modelVersion": model})
        parts: list[dict] = [{"text": "Here is your picture."}]
        if behaviour != "noimage":
            parts.append({"inlineData": {"mimeType": "image/png", "data": base64.b64encode(PNG_1X1).decode()}})
        return self.json_response(
            200,
            {
                "candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 1290, "totalTokenCount": 1297},
                "modelVersion": model,
            },
        )

    def _operation(self, name: str, behaviour: str) -> web.Response:
        if name not in self._polls:
            return self.json_response(404, google_error(404, "NOT_FOUND", f"Operation {name} not found."))
        failure = error_for(behaviour, None)
        if failure:
            return self.json_response(*failure)
        self._polls[name] += 1
        polls = self._polls[name]
        if behaviour == "video_never" or polls <= self.video_polls:
            percent = min(99, round(100 * polls / (self.video_polls + 1)))
            return self.json_response(200, {"name": name, "done": False, "metadata": {"progressPercent": percent}})
        done: dict[str, Any] = {"name": name, "done": True}
        if behaviour == "video_failed":
            done["error"] = {"code": 13, "message": "Video generation failed due to an internal error."}
        elif behaviour == "video_filtered":
            done["response"] = {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse",
                "generateVideoResponse": {
                    "raiMediaFilteredCount": 1,
                    "raiMediaFilteredReasons": ["We can't create videos of that. Try a different prompt."],
                },
            }
        else:
            file_id = name.rsplit("/", 1)[1]
            done["response"] = {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse",
                "generateVideoResponse": {
                    "generatedSamples": [{"video": {"uri": f"{self.url}/v1beta/files/{file_id}:download?alt=media"}}]
                },
            }
        return self.json_response(200, done)


class FakeStorage(FakeApi):
    """Where a video download is redirected to: another origin (its own port) serving
    ``/blob/{name}``. Records requests, so tests can see no key was sent here."""

    def key_of(self, request: web.Request) -> Optional[str]:
        return request.headers.get("x-goog-api-key") or request.query.get("key")

    async def handle(self, request: web.Request, rec: Recorded, behaviour: str) -> web.StreamResponse:
        if request.path.startswith("/blob/"):
            return web.Response(body=VIDEO_BYTES, content_type="video/mp4")
        return web.Response(status=404, text="no such blob")

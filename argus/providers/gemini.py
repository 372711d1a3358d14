"""Google Gemini: chat, image generation (google-genai SDK) and Veo video (REST).

Sources: the google-genai SDK 3.4 (``client.aio.models.generate_content_stream``,
``generate_content``, ``models.list``; its ``errors.ClientError/ServerError``
carry the HTTP ``code``, the ``status`` word and the whole error body in
``details``), the Gemini API REST reference (``v1beta``), Google's error model
(``google.rpc.RetryInfo``, ``QuotaFailure``, ``ErrorInfo`` in
``error.details``) and the Veo guide (``models/{model}:predictLongRunning``,
then polling the operation until ``done``, then downloading
``response.generateVideoResponse.generatedSamples[0].video.uri`` with the key
in ``x-goog-api-key``). The SDK no longer offers video to API-key clients, so
video is plain ``httpx``.

Conversation history is sent as ``types.Content`` objects built from our
:class:`ChatRequest` (roles ``user``/``model``), never through the SDK's chat
object, so the history is exactly what the caller stored.

Mapping of failures (``ProviderError.kind``):

* 429 ``RESOURCE_EXHAUSTED``: ``quota_exhausted`` when a ``QuotaFailure``
  violation is a per-day quota (or a quota of 0), else ``rate_limited``;
  ``retry_after_s`` from ``RetryInfo.retryDelay`` (``"17s"``);
* 400 with ``ErrorInfo.reason == "API_KEY_INVALID"`` (or the "API key not
  valid" message), 401 and 403: ``invalid_key``;
* 5xx: ``server_error``; transport failures and timeouts: ``network_error``;
* a blocked prompt (``prompt_feedback.block_reason``) or a safety finish
  reason (``SAFETY``, ``PROHIBITED_CONTENT``…): ``blocked``;
* any other 4xx: ``bad_request`` quoting Google's (scrubbed) message.
"""
from __future__ import annotations

import asyncio
import base64
import inspect
import os
import re
import time
import weakref
from typing import Any, AsyncIterator, Optional
from urllib.parse import urljoin, urlsplit

import httpx
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from argus.providers.transport import TRANSPORT_ERRORS, httpx2
from argus.providers.base import (
    ChatRequest,
    ChatStream,
    ImagePart,
    ProgressCallback,
    Provider,
    ProviderError,
    Usage,
    Video,
    VideoProgress,
)

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
API_VERSION = "v1beta"
#: The environment variable google-genai reads for its base URL; our REST calls honour it too.
BASE_URL_ENV = "GOOGLE_GEMINI_BASE_URL"
DEFAULT_IMAGE_MODEL = "gemini-2.5-flash-image"
DEFAULT_VIDEO_MODEL = "veo-3.0-generate-001"
#: Largest video accepted from a download, in bytes.
MAX_VIDEO_BYTES = 256 * 1024 * 1024
#: Finish reasons meaning a filter stopped the answer (any prompt ``block_reason`` means blocked).
BLOCKED_REASONS = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
        "JAILBREAK",
    }
)
_TYPE = "@type"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
#: google.rpc.Code numbers of a failed operation's ``error.code``, to HTTP statuses.
_RPC_TO_HTTP = {3: 400, 5: 404, 7: 403, 8: 429, 9: 400, 11: 400, 13: 500, 14: 503, 4: 504, 16: 401}


# ---------------------------------------------------------------------------
# Request building (pure).
# ---------------------------------------------------------------------------
def build_contents(request: ChatRequest) -> list[types.Content]:
    """The request's messages as Gemini ``Content`` objects, oldest first.

    ``assistant`` becomes Gemini's ``model`` role; each message's text comes
    first, then its images as inline ``Part.from_bytes`` parts. A message with
    neither text nor images gets an empty text part (Gemini refuses empty parts lists).
    """
    contents = []
    for m in request.messages:
        parts = [types.Part.from_text(text=m.text)] if m.text else []
        parts += [types.Part.from_bytes(data=img.data, mime_type=img.mime) for img in m.images]
        contents.append(types.Content(role="model" if m.role == "assistant" else "user", parts=parts or [types.Part.from_text(text="")]))
    return contents


def build_config(request: ChatRequest) -> types.GenerateContentConfig:
    """Sampling settings and the system instruction of ``request``."""
    return types.GenerateContentConfig(
        system_instruction=request.system or None,
        max_output_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
    )


def _parse_duration(value: Any) -> Optional[float]:
    """Seconds of a protobuf JSON Duration (``"17s"``, ``"0.5s"``); None if unreadable."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)s\s*", value)
        if m:
            return float(m.group(1))
    return None


# ---------------------------------------------------------------------------
# Error mapping (pure: a Google error body in, a ProviderError out).
# ---------------------------------------------------------------------------
def error_from_google(code: Optional[int], body: Any, api_key: Optional[str]) -> ProviderError:
    """The ProviderError for an HTTP ``code`` and a Google error body
    (``{"error": {"code", "message", "status", "details": [...]}}`` or its inner object)."""
    err = body.get("error", body) if isinstance(body, dict) else {}
    if not isinstance(err, dict):
        err = {}
    message = str(err.get("message") or (body if isinstance(body, str) else "") or "")
    status_word = str(err.get("status") or "")
    code = code or (err.get("code") if isinstance(err.get("code"), int) else None)
    details = [d for d in (err.get("details") or []) if isinstance(d, dict)]

    retry = None
    reasons: set[str] = set()
    violations: list[dict] = []
    for d in details:
        kind = d.get(_TYPE)
        if kind == _RETRY_INFO:
            retry = _parse_duration(d.get("retryDelay"))
        elif kind == _ERROR_INFO and d.get("reason"):
            reasons.add(str(d["reason"]))
        elif kind == _QUOTA_FAILURE:
            violations += [v for v in d.get("violations") or [] if isinstance(v, dict)]

    def make(kind: str) -> ProviderError:
        return ProviderError.of(kind, provider="gemini", api_key=api_key, status=code, retry_after_s=retry, detail=message)  # type: ignore[arg-type]

    if code == 429 or status_word == "RESOURCE_EXHAUSTED":
        return make("quota_exhausted" if _is_quota_exhausted(violations, message) else "rate_limited")
    if "API_KEY_INVALID" in reasons or "API key not valid" in message or code in (401, 403):
        return make("invalid_key")
    if status_word in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return make("invalid_key")
    if code is not None and code >= 500:
        return make("server_error")
    return make("bad_request")


def _is_quota_exhausted(violations: list[dict], message: str) -> bool:
    """A 429 is a used-up quota (not a short rate limit) when a violated quota is per day,
    or has a limit of 0 (the key's project has no quota at all for the model)."""
    for v in violations:
        quota_id = str(v.get("quotaId", "")) + " " + str(v.get("quotaMetric", ""))
        if re.search(r"per[_ ]?day", quota_id, re.IGNORECASE) or str(v.get("quotaValue", "")) == "0":
            return True
    return bool(not violations and re.search(r"per[ -]day|daily", message, re.IGNORECASE))


def map_error(exc: BaseException, api_key: Optional[str]) -> ProviderError:
    """Any exception out of the SDK or httpx, as a ProviderError."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, genai_errors.APIError):
        return error_from_google(exc.code, exc.details, api_key)
    if isinstance(exc, TRANSPORT_ERRORS) or isinstance(exc, (asyncio.TimeoutError, ConnectionError)):
        return ProviderError.of("network_error", provider="gemini", api_key=api_key, detail=f"{type(exc).__name__}: {exc}")
    if isinstance(exc, genai_errors.UnknownApiResponseError):
        return ProviderError.of("server_error", provider="gemini", api_key=api_key, detail=str(exc))
    return ProviderError.of(
        "server_error",
        provider="gemini",
        api_key=api_key,
        detail=f"{type(exc).__name__}: {exc}",
        message="Gemini's answer could not be read; please try again in a moment.",
    )


def _finish_reason(candidate: Any) -> Optional[str]:
    reason = getattr(candidate, "finish_reason", None)
    if reason is None:
        return None
    return str(getattr(reason, "value", reason))


def _block_reason(response: Any) -> Optional[str]:
    feedback = getattr(response, "prompt_feedback", None)
    reason = getattr(feedback, "block_reason", None) if feedback is not None else None
    return str(getattr(reason, "value", reason)) if reason is not None else None


def _usage(meta: Any) -> Optional[Usage]:
    if meta is None:
        return None
    inp = meta.prompt_token_count or 0
    out = (meta.candidates_token_count or 0) + (getattr(meta, "thoughts_token_count", None) or 0)
    return Usage(input_tokens=inp, output_tokens=out, total_tokens=meta.total_token_count or inp + out)


def _blocked(api_key: str, why: str) -> ProviderError:
    return ProviderError.of("blocked", provider="gemini", api_key=api_key, detail=why)


# ---------------------------------------------------------------------------
# The provider.
# ---------------------------------------------------------------------------
class GeminiProvider(Provider):
    """Gemini through google-genai (chat, images) and REST (Veo video).

    ``base_url`` None means ``$GOOGLE_GEMINI_BASE_URL`` or Google's endpoint.
    ``timeout_s`` bounds every wait on the network (to connect, for the next
    bytes of a stream; google-genai passes one number per request, so it also
    bounds connecting); ``connect_timeout_s`` further limits connecting where
    we make the request ourselves (video).
    """

    name = "gemini"
    can_generate_images = True
    can_generate_video = True

    def __init__(self, base_url: Optional[str] = None, *, timeout_s: float = 120.0, connect_timeout_s: float = 10.0):
        super().__init__(base_url, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
        #: each genai client's own httpx2 client, which google-genai does not close
        self._http_clients: "weakref.WeakKeyDictionary[genai.Client, Any]" = weakref.WeakKeyDictionary()

    @property
    def api_root(self) -> str:
        """The base URL actually used: ``base_url``, ``$GOOGLE_GEMINI_BASE_URL`` or Google's."""
        return (self.base_url or os.environ.get(BASE_URL_ENV, "").rstrip("/") or DEFAULT_BASE_URL).rstrip("/")

    def _make_client(self, api_key: str) -> genai.Client:
        """A google-genai client for ``api_key`` talking through our own ``httpx2`` client
        (so aiohttp is never picked, and our timeouts apply)."""
        http_client = (httpx2 or httpx).AsyncClient(
            timeout=(httpx2 or httpx).Timeout(self.timeout_s, connect=self.connect_timeout_s)
        )
        options = types.HttpOptions(
            api_version=API_VERSION,
            base_url=self.api_root + "/",
            timeout=int(self.timeout_s * 1000),  # milliseconds; None would mean "no timeout" per request
            httpx_async_client=http_client,
        )
        client = genai.Client(api_key=api_key, vertexai=False, http_options=options)
        self._http_clients[client] = http_client
        return client

    async def _close_client(self, client: genai.Client) -> None:
        # google-genai leaves a caller's own HTTP client open: close it here.
        http_client = self._http_clients.pop(client, None)
        try:
            await client.aio.aclose()
            client.close()
        finally:
            if http_client is not None:
                await http_client.aclose()

    # -- chat -------------------------------------------------------------
    def stream_chat(self, request: ChatRequest, api_key: str) -> ChatStream:
        """Stream the answer to ``request`` (``streamGenerateContent?alt=sse``).

        Raises ProviderError from iteration (status errors on the first step,
        ``partial=True`` after text). ``finish_reason`` is Gemini's word
        (``"STOP"``, ``"MAX_TOKENS"``…); ``usage`` comes from ``usage_metadata``.
        """
        self.require_key(api_key)
        contents = build_contents(request)
        config = build_config(request)

        async def source(stream: ChatStream) -> AsyncIterator[str]:
            client = self.client(api_key)
            response = await client.aio.models.generate_content_stream(
                model=request.model, contents=contents, config=config
            )
            try:
                async for chunk in response:
                    stream.usage = _usage(chunk.usage_metadata) or stream.usage
                    blocked = _block_reason(chunk)
                    if blocked:
                        stream.finish_reason = blocked
                        raise _blocked(api_key, f"prompt blocked: {blocked}")
                    candidate = chunk.candidates[0] if chunk.candidates else None
                    text = _text_of(candidate)
                    if text:
                        yield text
                    reason = _finish_reason(candidate)
                    if reason:
                        stream.finish_reason = reason
                        if reason in BLOCKED_REASONS:
                            raise _blocked(api_key, f"answer stopped: {reason}")
            finally:
                await response.aclose()

        return ChatStream(self.name, source, lambda exc: map_error(exc, api_key))

    async def list_models(self, api_key: str) -> list[str]:
        """Ids (without ``models/``) of the models this key may call ``generateContent`` on, sorted."""
        client = self.client(api_key)
        try:
            names = []
            async for model in await client.aio.models.list(config={"page_size": 100}):
                actions = model.supported_actions or []
                if model.name and (not actions or "generateContent" in actions):
                    names.append(model.name.removeprefix("models/"))
        except Exception as exc:
            raise map_error(exc, api_key) from None
        return sorted(names)

    # -- images -----------------------------------------------------------
    async def generate_image(self, prompt: str, api_key: str, *, model: str = DEFAULT_IMAGE_MODEL) -> list[ImagePart]:
        """Images drawn from ``prompt`` by ``model`` (``generateContent`` with IMAGE and TEXT
        output); the images' bytes and MIME types, in the order returned.

        Raises ProviderError: ``blocked`` when refused by a filter, ``bad_request``
        when the model answered without an image (its text is quoted).
        """
        client = self.client(api_key)
        try:
            response = await client.aio.models.generate_content(
                model=model,
                contents=prompt,
                config=types.GenerateContentConfig(response_modalities=["IMAGE", "TEXT"]),
            )
        except Exception as exc:
            raise map_error(exc, api_key) from None
        blocked = _block_reason(response)
        if blocked:
            raise _blocked(api_key, f"prompt blocked: {blocked}")
        candidate = response.candidates[0] if response.candidates else None
        parts = (candidate.content.parts or []) if candidate is not None and candidate.content else []
        images = [
            ImagePart(mime=p.inline_data.mime_type or "image/png", data=p.inline_data.data)
            for p in parts
            if p.inline_data is not None and p.inline_data.data
        ]
        if images:
            return images
        reason = _finish_reason(candidate)
        if reason in BLOCKED_REASONS:
            raise _blocked(api_key, f"image stopped: {reason}")
        said = " ".join(p.text for p in parts if p.text)
        raise ProviderError.of(
            "bad_request",
            provider=self.name,
            api_key=api_key,
            detail=said,
            message="Gemini answered without an image" + (f": {said[:200]}" if said else "."),
        )

    # -- video (REST) -----------------------------------------------------
    async def generate_video(
        self,
        prompt: str,
        api_key: str,
        *,
        model: str = DEFAULT_VIDEO_MODEL,
        parameters: Optional[dict] = None,
        poll_interval_s: float = 10.0,
        timeout_s: float = 600.0,
        progress: Optional[ProgressCallback] = None,
        max_bytes: int = MAX_VIDEO_BYTES,
    ) -> Video:
        """A video of ``prompt`` made by Veo: start, poll, download.

        Args:
            parameters: Veo's ``parameters`` object (e.g. ``{"aspectRatio": "16:9",
                "negativePrompt": "..."}``), sent as is.
            poll_interval_s: seconds between polls of the operation.
            timeout_s: give up (``server_error``) when not done after this many seconds.
            progress: called (sync or async) with a :class:`VideoProgress` after
                each poll that is not done yet.
            max_bytes: refuse (``bad_request``) a larger download.

        Returns:
            ``Video(mime, data)``; ``mime`` from the download's Content-Type
            (``video/mp4`` if absent).

        Raises:
            ProviderError: mapped HTTP errors of any step; ``blocked`` when Veo
            filtered every sample; ``server_error`` on a failed operation, a
            done operation without a video, or the timeout (the Gemini API has
            no way to cancel the operation; Google may still finish and bill it).
        """
        if poll_interval_s <= 0 or timeout_s <= 0:
            raise ValueError("poll_interval_s and timeout_s must be positive")
        self.require_key(api_key)
        root = f"{self.api_root}/{API_VERSION}"
        headers = {"x-goog-api-key": api_key.strip()}
        started = time.monotonic()
        timeout = httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as http:
            body = {"instances": [{"prompt": prompt}], "parameters": dict(parameters or {})}
            op = await self._rest_json(http, "POST", f"{root}/models/{model}:predictLongRunning", headers, api_key, json=body)
            name = op.get("name")
            if not op.get("done") and not name:
                raise self._video_failed(api_key, "the start answer had no operation name")
            polls = 0
            while not op.get("done"):
                elapsed = time.monotonic() - started
                if elapsed + poll_interval_s > timeout_s:
                    raise ProviderError.of(
                        "server_error",
                        provider=self.name,
                        api_key=api_key,
                        detail=f"operation {name} not done after {elapsed:.0f}s and {polls} polls",
                        message=f"Gemini did not finish the video within {timeout_s:g} seconds; please try again later.",
                    )
                await asyncio.sleep(poll_interval_s)
                op = await self._rest_json(http, "GET", f"{root}/{name}", headers, api_key)
                polls += 1
                if not op.get("done") and progress is not None:
                    percent = (op.get("metadata") or {}).get("progressPercent")
                    report = progress(
                        VideoProgress(
                            elapsed_s=time.monotonic() - started,
                            polls=polls,
                            percent=float(percent) if isinstance(percent, (int, float)) else None,
                        )
                    )
                    if inspect.isawaitable(report):
                        await report
            return await self._video_result(http, op, headers, api_key, max_bytes)

    async def _video_result(self, http: httpx.AsyncClient, op: dict, headers: dict, api_key: str, max_bytes: int) -> Video:
        """The video of a done operation (downloaded), or the ProviderError it stands for."""
        if op.get("error"):
            err = op["error"] if isinstance(op["error"], dict) else {"message": str(op["error"])}
            code = _RPC_TO_HTTP.get(err.get("code"), 500) if isinstance(err.get("code"), int) else 500
            raise error_from_google(code, {"error": {**err, "code": code}}, api_key)
        response = (op.get("response") or {}).get("generateVideoResponse") or {}
        samples = response.get("generatedSamples") or []
        video = (samples[0].get("video") or {}) if samples and isinstance(samples[0], dict) else {}
        if not video:
            if response.get("raiMediaFilteredCount") or response.get("raiMediaFilteredReasons"):
                raise _blocked(api_key, "; ".join(map(str, response.get("raiMediaFilteredReasons") or [])))
            raise self._video_failed(api_key, "the finished operation holds no video")
        inline = video.get("bytesBase64Encoded") or video.get("encodedVideo")
        if inline:
            return Video(video.get("mimeType") or "video/mp4", base64.b64decode(inline))
        uri = video.get("uri")
        if not uri:
            raise self._video_failed(api_key, "the video has neither a uri nor bytes")
        return await self._download(http, uri, headers, api_key, max_bytes, video.get("mimeType"))

    async def _download(
        self, http: httpx.AsyncClient, uri: str, headers: dict, api_key: str, max_bytes: int, mime: Optional[str]
    ) -> Video:
        """GET ``uri``, following up to 5 redirects; the key goes only to the API's own origin
        (a redirect to a storage host gets no key)."""
        own = _origin(self.api_root)
        url = urljoin(self.api_root + "/", uri)
        for _ in range(6):
            try:
                async with http.stream("GET", url, headers=headers if _origin(url) == own else {}) as resp:
                    if resp.is_redirect:
                        url = urljoin(url, resp.headers.get("location", ""))
                        continue
                    if resp.status_code != 200:
                        await resp.aread()
                        raise error_from_google(resp.status_code, _json_or_text(resp), api_key)
                    declared = int(resp.headers.get("content-length") or 0)
                    if declared > max_bytes:
                        raise self._too_big(api_key, max_bytes)
                    data = bytearray()
                    async for block in resp.aiter_bytes():
                        data += block
                        if len(data) > max_bytes:
                            raise self._too_big(api_key, max_bytes)
                    ctype = resp.headers.get("content-type", "").split(";")[0].strip()
                    if not ctype.startswith("video/"):
                        ctype = mime or "video/mp4"
                    return Video(ctype, bytes(data))
            except ProviderError:
                raise
            except Exception as exc:
                raise map_error(exc, api_key) from None
        raise self._video_failed(api_key, "too many redirects downloading the video")

    async def _rest_json(
        self, http: httpx.AsyncClient, method: str, url: str, headers: dict, api_key: str, json: Any = None
    ) -> dict:
        """One REST call returning its JSON object; errors mapped to ProviderError."""
        try:
            resp = await http.request(method, url, headers=headers, json=json)
        except Exception as exc:
            raise map_error(exc, api_key) from None
        body = _json_or_text(resp)
        if resp.status_code != 200:
            raise error_from_google(resp.status_code, body, api_key)
        if not isinstance(body, dict):
            raise ProviderError.of("server_error", provider=self.name, api_key=api_key, detail=f"not JSON: {str(body)[:200]}")
        return body

    def _video_failed(self, api_key: str, why: str) -> ProviderError:
        return ProviderError.of(
            "server_error",
            provider=self.name,
            api_key=api_key,
            detail=why,
            message="Gemini could not make the video; please try again later.",
        )

    def _too_big(self, api_key: str, max_bytes: int) -> ProviderError:
        return ProviderError.of(
            "bad_request",
            provider=self.name,
            api_key=api_key,
            message=f"The generated video is larger than {max_bytes // (1024 * 1024)} MB, so it was not downloaded.",
        )


def _text_of(candidate: Any) -> str:
    """The visible text of a candidate's parts (thought summaries left out)."""
    content = getattr(candidate, "content", None) if candidate is not None else None
    parts = getattr(content, "parts", None) or []
    return "".join(p.text for p in parts if p.text and not p.thought)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _json_or_text(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text

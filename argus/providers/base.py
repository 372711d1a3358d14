"""What every remote model provider (Gemini, OpenAI, Anthropic) offers, and its one error type.

A provider turns a :class:`ChatRequest` (our own, SDK-free description of a
conversation) into a :class:`ChatStream` of text pieces, using *one API key
per call*: the key pool (``argus.keys``) picks the key, the provider never
stores keys beyond the SDK client it keeps for each (cached by the key's
SHA-256, so a key's connection pool is reused and not garbage-collected
mid-stream).

Every failure reaches the caller as :class:`ProviderError`, whose ``kind`` says
what to do about it (another key, later, never), whose ``str()`` is one human
sentence and never contains a key (:func:`scrub`), and whose ``partial`` tells
whether some text had already been streamed. SDK exceptions are not chained
(``from None``): their messages and request objects may carry the key.

A key is only ever shown as its :func:`fingerprint`.
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, ClassVar, Iterable, Literal, NamedTuple, Optional, Union

ErrorKind = Literal[
    "rate_limited", "quota_exhausted", "invalid_key", "server_error", "network_error", "blocked", "bad_request"
]
ERROR_KINDS: tuple[str, ...] = (
    "rate_limited",
    "quota_exhausted",
    "invalid_key",
    "server_error",
    "network_error",
    "blocked",
    "bad_request",
)
#: Kinds caused by the key itself: another key may well succeed at once.
KEY_KINDS = frozenset({"rate_limited", "quota_exhausted", "invalid_key"})
#: Kinds that may go away by themselves (retry later, or with another key).
TRANSIENT_KINDS = frozenset({"rate_limited", "server_error", "network_error"})

Role = Literal["user", "assistant"]


# ---------------------------------------------------------------------------
# Keys: fingerprints and scrubbing.
# ---------------------------------------------------------------------------
def fingerprint(key: str) -> str:
    """How a key is shown: ``"…"`` + the last 4 hex digits of its SHA-256 (e.g. ``"…a1b2"``).

    Four hex digits identify a key among a handful for a human; they reveal
    nothing about it. Never use it as a unique id (use :func:`key_digest`).
    """
    return "…" + hashlib.sha256(key.encode("utf-8")).hexdigest()[-4:]


def key_digest(key: str) -> str:
    """The full SHA-256 hex digest of ``key``: a collision-free cache/dict id for it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


#: Substrings that look like API keys of the providers we speak to (Google ``AIza…``,
#: OpenAI ``sk-…``/``sk-proj-…``, Anthropic ``sk-ant-…``) and keys in URLs (``key=…``).
_KEY_LIKE = (
    re.compile(r"AIza[0-9A-Za-z_\-]{20,}"),
    re.compile(r"sk-[0-9A-Za-z_\-]{16,}"),
    re.compile(r"(?<=[?&]key=)[^&\s\"']+"),
)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret replaced by its :func:`fingerprint`, and any other
    key-like substring (see ``_KEY_LIKE``) replaced by ``"…"``.

    Use it on every string that came from an SDK or a server before it goes into
    an exception, a log line or a user's chat. Secrets shorter than 4 characters
    are ignored (replacing them would mangle ordinary words).
    """
    out = str(text)
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        out = out.replace(secret, fingerprint(secret))
    for pattern in _KEY_LIKE:
        out = pattern.sub("…", out)
    return out


# ---------------------------------------------------------------------------
# The error.
# ---------------------------------------------------------------------------
class ProviderError(Exception):
    """A provider call failed.

    ``str(e)`` is one sentence for a person (no key in it, ever).

    Attributes:
        kind: one of :data:`ERROR_KINDS`:
            ``rate_limited`` (too many requests now; see ``retry_after_s``),
            ``quota_exhausted`` (the key's daily/billing quota is used up),
            ``invalid_key`` (rejected, revoked or not permitted),
            ``server_error`` (5xx, overloaded), ``network_error`` (no answer,
            connection or timeout), ``blocked`` (safety filters refused the
            prompt or the answer), ``bad_request`` (the request itself is
            wrong: unknown model, too long, unsupported feature).
        provider: ``"gemini"``, ``"openai"`` or ``"anthropic"``.
        status: the HTTP status, when there was one.
        retry_after_s: seconds the server asked us to wait (Gemini
            ``google.rpc.RetryInfo.retryDelay``, HTTP ``Retry-After``), if any.
        partial: True when raised after some text of the answer was already
            streamed (the text so far is kept by the caller).
        key_fingerprint: :func:`fingerprint` of the key used, when one was.
        detail: the server's own message, scrubbed, for the server log.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        provider: str,
        status: Optional[int] = None,
        retry_after_s: Optional[float] = None,
        partial: bool = False,
        key_fingerprint: Optional[str] = None,
        detail: str = "",
    ):
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown ProviderError kind {kind!r}; expected one of {ERROR_KINDS}")
        self.kind: ErrorKind = kind
        self.message = scrub(message)
        self.provider = provider
        self.status = status
        self.retry_after_s = retry_after_s
        self.partial = partial
        self.key_fingerprint = key_fingerprint
        self.detail = scrub(detail)
        super().__init__(self.message)

    @classmethod
    def of(
        cls,
        kind: ErrorKind,
        *,
        provider: str,
        api_key: Optional[str] = None,
        status: Optional[int] = None,
        retry_after_s: Optional[float] = None,
        detail: str = "",
        message: Optional[str] = None,
    ) -> "ProviderError":
        """A ProviderError with the standard sentence for ``kind`` (or ``message``), ``detail``
        scrubbed of ``api_key`` and the key's fingerprint recorded."""
        secrets = [api_key] if api_key else []
        detail = scrub(detail, secrets)
        if message is None:
            message = _sentence(kind, provider, status=status, retry_after_s=retry_after_s, detail=detail)
        return cls(
            kind,
            scrub(message, secrets),
            provider=provider,
            status=status,
            retry_after_s=retry_after_s,
            key_fingerprint=fingerprint(api_key) if api_key else None,
            detail=detail,
        )

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"ProviderError(kind={self.kind!r}, provider={self.provider!r}, status={self.status!r}, "
            f"retry_after_s={self.retry_after_s!r}, partial={self.partial!r}, key={self.key_fingerprint!r}, "
            f"message={self.message!r})"
        )

    @property
    def key_related(self) -> bool:
        """The key caused it (rate limit, quota, invalid): another key may work right away."""
        return self.kind in KEY_KINDS

    @property
    def transient(self) -> bool:
        """It may go away by itself (rate limit, server or network trouble)."""
        return self.kind in TRANSIENT_KINDS


#: How each provider is named in sentences.
LABELS = {"gemini": "Gemini", "openai": "OpenAI", "anthropic": "Anthropic"}
#: Longest piece of a server's own message quoted in a sentence, in characters.
QUOTE_CHARS = 200


def _seconds(value: float) -> str:
    return f"{value:.0f} second{'s' if round(value) != 1 else ''}" if value >= 1 else "a moment"


def _sentence(
    kind: str, provider: str, *, status: Optional[int], retry_after_s: Optional[float], detail: str
) -> str:
    """The one-sentence message of a ProviderError of ``kind``."""
    who = LABELS.get(provider, provider)
    quote = " ".join(detail.split())
    if len(quote) > QUOTE_CHARS:
        quote = quote[: QUOTE_CHARS - 1] + "…"
    code = f" ({status})" if status else ""
    if kind == "rate_limited":
        wait = f"try again in {_seconds(retry_after_s)}" if retry_after_s is not None else "try again shortly"
        return f"{who} is limiting how fast this API key may send requests; {wait}."
    if kind == "quota_exhausted":
        return f"This {who} API key has used up its quota (a daily or billing limit); another key or a later day is needed."
    if kind == "invalid_key":
        return f"{who} rejected the API key{code}: it is invalid, revoked or not allowed to use this model."
    if kind == "server_error":
        return f"{who} had a server problem{code}; please try again in a moment."
    if kind == "network_error":
        return f"{who} could not be reached (the connection failed or timed out); please try again in a moment."
    if kind == "blocked":
        return f"{who}'s safety filters blocked this request or its answer."
    return f"{who} refused the request{code}" + (f": {quote}" if quote else ".") + ("" if not quote or quote.endswith((".", "!", "?")) else ".")


# ---------------------------------------------------------------------------
# Requests and results.
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePart:
    """An image sent with a message or returned by image generation.

    ``mime`` e.g. ``"image/png"``; ``data`` the encoded file bytes (not base64).
    """

    mime: str
    data: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"ImagePart(mime={self.mime!r}, {len(self.data)} bytes)"


@dataclass(frozen=True)
class ChatMessage:
    """One turn of the conversation: ``role`` ``"user"`` or ``"assistant"``, its text and images."""

    role: Role
    text: str
    images: list[ImagePart] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"ChatMessage.role must be 'user' or 'assistant', got {self.role!r}")


@dataclass(frozen=True)
class ChatRequest:
    """A chat completion to stream.

    Attributes:
        model: the provider's model id (``"gemini-2.5-flash"``, ``"gpt-4o-mini"``…).
        messages: the conversation, oldest first; the last one is normally the
            user's message being answered.
        system: the system prompt/instruction, if any.
        max_tokens: most output tokens.
        temperature: sampling temperature (0 … 2; providers clamp to their range).
        top_p: nucleus sampling mass (0 < top_p ≤ 1).
    """

    model: str
    messages: list[ChatMessage]
    system: Optional[str] = None
    max_tokens: int = 1024
    temperature: float = 0.7
    top_p: float = 0.95

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("ChatRequest.model must not be empty")
        if not self.messages:
            raise ValueError("ChatRequest.messages must hold at least one message")
        if self.max_tokens < 1:
            raise ValueError(f"ChatRequest.max_tokens must be at least 1, got {self.max_tokens}")


@dataclass(frozen=True)
class Usage:
    """Tokens counted by the provider for one call."""

    input_tokens: int
    output_tokens: int
    total_tokens: int


class Video(NamedTuple):
    """A generated video: ``mime`` (e.g. ``"video/mp4"``) and the file bytes. Unpacks as ``(mime, data)``."""

    mime: str
    data: bytes


@dataclass(frozen=True)
class VideoProgress:
    """Reported to the ``progress`` callback after each poll of a video operation.

    ``elapsed_s`` since the request started; ``polls`` so far; ``percent`` when
    the server reports one (0–100), else None.
    """

    elapsed_s: float
    polls: int
    percent: Optional[float] = None


ProgressCallback = Callable[[VideoProgress], Union[None, Awaitable[None]]]


# ---------------------------------------------------------------------------
# The stream.
# ---------------------------------------------------------------------------
class ChatStream:
    """Async iterator of the answer's text pieces (``str``, never empty).

    Made by :meth:`Provider.stream_chat`; nothing is sent before the first
    ``__anext__`` (so status errors such as 429 arrive on the first iteration).

    After iteration ends: ``usage`` (when the provider reported it),
    ``finish_reason`` (the provider's own word, e.g. ``"STOP"``, ``"stop"``,
    ``"end_turn"``, ``"MAX_TOKENS"``) and ``text`` (all pieces so far).

    Every exception other than cancellation comes out as :class:`ProviderError`
    (``map_error`` converts foreign ones); ``partial`` is set on it when pieces
    were already yielded. ``aclose()`` stops the request (idempotent).

    Args:
        provider: the provider's name, for errors.
        source: ``source(stream)`` returns the async iterator of pieces; it may
            set ``stream.usage`` and ``stream.finish_reason`` as it goes.
        map_error: turns a foreign exception into a ProviderError.
    """

    def __init__(
        self,
        provider: str,
        source: Callable[["ChatStream"], AsyncIterator[str]],
        map_error: Callable[[BaseException], ProviderError],
    ):
        self.provider = provider
        self.usage: Optional[Usage] = None
        self.finish_reason: Optional[str] = None
        self.text = ""
        self.pieces = 0
        self._source = source
        self._map_error = map_error
        self._it: Optional[AsyncIterator[str]] = None
        self._closed = False

    def __aiter__(self) -> "ChatStream":
        return self

    async def __anext__(self) -> str:
        if self._closed:
            raise StopAsyncIteration
        try:
            if self._it is None:
                self._it = self._source(self)
            while True:
                piece = await self._it.__anext__()
                if piece:
                    break
        except StopAsyncIteration:
            await self.aclose()
            raise
        except ProviderError as exc:
            await self.aclose()
            exc.partial = exc.partial or self.pieces > 0
            raise
        except Exception as exc:
            await self.aclose()
            err = self._map_error(exc)
            err.partial = err.partial or self.pieces > 0
            raise err from None
        except BaseException:  # cancelled: release the connection, then let it through
            await self.aclose()
            raise
        self.text += piece
        self.pieces += 1
        return piece

    async def aclose(self) -> None:
        """Stop the request and release its connection (safe to call more than once)."""
        if self._closed:
            return
        self._closed = True
        it, self._it = self._it, None
        close = getattr(it, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:  # closing a broken stream may raise again; it is closed either way
                pass

    async def collect(self) -> str:
        """Read the whole stream and return its text (raises like iteration does)."""
        async for _ in self:
            pass
        return self.text


# ---------------------------------------------------------------------------
# The provider.
# ---------------------------------------------------------------------------
class Provider(ABC):
    """A remote model API, reached through its official SDK.

    Args:
        base_url: the API's root (e.g. ``"https://generativelanguage.googleapis.com"``,
            ``"https://api.openai.com/v1"``); None means the SDK's default (or its
            own environment variable). Tests point it at a fake on 127.0.0.1.
        timeout_s: longest wait for any single read/response, in seconds.
        connect_timeout_s: longest wait to connect, in seconds.

    One SDK client is kept per key (keyed by :func:`key_digest`) and per event
    loop (an HTTP connection pool belongs to the loop that opened it), for as
    long as the provider and the loop live; :meth:`aclose` closes the running
    loop's clients. SDK clients are made lazily, inside
    the running loop, on the first request with a key.
    """

    name: ClassVar[str]
    #: Whether :meth:`generate_image` / :meth:`generate_video` are implemented.
    can_generate_images: ClassVar[bool] = False
    can_generate_video: ClassVar[bool] = False

    def __init__(self, base_url: Optional[str] = None, *, timeout_s: float = 120.0, connect_timeout_s: float = 10.0):
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        self.base_url = base_url.rstrip("/") if base_url else None
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self._clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]]" = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # -- what callers use -------------------------------------------------
    @abstractmethod
    def stream_chat(self, request: ChatRequest, api_key: str) -> ChatStream:
        """A stream of the answer to ``request`` using ``api_key``. Sends nothing until iterated."""

    async def list_models(self, api_key: str) -> list[str]:
        """The model ids this key may use (sorted). Raises ProviderError."""
        raise ProviderError("bad_request", f"The {self.name} provider cannot list models.", provider=self.name)

    async def generate_image(self, prompt: str, api_key: str, **options: Any) -> list[ImagePart]:
        """Images generated from ``prompt``. Raises ProviderError (``bad_request`` when unsupported)."""
        raise ProviderError("bad_request", f"The {self.name} provider cannot generate images.", provider=self.name)

    async def generate_video(self, prompt: str, api_key: str, **options: Any) -> Video:
        """A video generated from ``prompt``. Raises ProviderError (``bad_request`` when unsupported)."""
        raise ProviderError("bad_request", f"The {self.name} provider cannot generate videos.", provider=self.name)

    async def aclose(self) -> None:
        """Close the SDK clients made in the running loop (other loops' clients are closed
        by calling this from them; a loop's clients are forgotten when the loop is gone)."""
        mine = self._clients.pop(asyncio.get_running_loop(), {})
        for client in mine.values():
            try:
                await self._close_client(client)
            except Exception:  # closing is best effort; the client is dropped either way
                pass

    # -- for subclasses ---------------------------------------------------
    def require_key(self, api_key: str) -> None:
        """Raise ProviderError(``invalid_key``) for an empty key, before anything is sent."""
        if not api_key or not api_key.strip():
            raise ProviderError("invalid_key", f"No {LABELS.get(self.name, self.name)} API key was given.", provider=self.name)

    def client(self, api_key: str) -> Any:
        """The SDK client for ``api_key`` in the running event loop (made by
        :meth:`_make_client` on first use). Call it from inside the loop."""
        self.require_key(api_key)
        per_loop = self._clients.setdefault(asyncio.get_running_loop(), {})
        digest = key_digest(api_key)
        client = per_loop.get(digest)
        if client is None:
            client = per_loop[digest] = self._make_client(api_key)
        return client

    @abstractmethod
    def _make_client(self, api_key: str) -> Any:
        """A new SDK client bound to ``api_key``, ``base_url`` and the timeouts."""

    async def _close_client(self, client: Any) -> None:  # pragma: no cover - per SDK
        close = getattr(client, "close", None)
        if close is not None:
            result = close()
            if hasattr(result, "__await__"):
                await result

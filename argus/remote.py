"""Remote models for the chat: the catalogue, the key pool, the providers, and what a turn sends.

:class:`Remote` is server-wide (one per :class:`~argus.chat.hooks.JarvisArgus`): it
loads the catalogue, opens the secret box, builds the :class:`KeyPool` and
makes one provider object per provider on first use (their SDK clients are
bound to the event loop that first uses them, Chainlit's). The chat handler
asks it which models can be offered, builds each turn's :class:`ChatRequest`
from the stored conversation (:func:`chat_messages`), and generates images and
videos through the pool (:meth:`Remote.generate_image`, :meth:`Remote.generate_video`).

Errors: :class:`MediaError` (one sentence for the user) from the generators;
``ConfigError`` from the constructor when the catalogue or the secret is unusable.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Optional, Sequence

from argus.catalogue import Catalogue, CatalogueError, ModelSpec, load_catalogue
from argus.config import ConfigError, Settings
from argus.keys import Failover, KeyPool, Lease, SecretKeyError, open_box
from argus.providers import ChatMessage, ChatRequest, ImagePart, Provider, ProviderError, Video, make_provider
from argus.store.base import Message, NotFound, Store, StoreError

log = logging.getLogger(__name__)

#: Images of the conversation sent to a vision model, at most (the newest ones).
MAX_HISTORY_IMAGES = 8
#: Their total size, at most, in bytes (Gemini's inline request limit is 20 MB).
MAX_HISTORY_IMAGE_BYTES = 15 * 1024 * 1024
#: Tokens one image is counted as when estimating a request (Gemini's figure for small images).
IMAGE_TOKENS = 258
#: Keys tried for one video (each attempt may take minutes).
VIDEO_ATTEMPTS = 2


class MediaError(Exception):
    """Image or video generation failed; ``str(e)`` is one sentence for the user (no key in it)."""


def estimate_tokens(request: ChatRequest) -> int:
    """A rough input-token count of ``request`` (4 characters a token, :data:`IMAGE_TOKENS` an image)."""
    chars = len(request.system or "") + sum(len(m.text) for m in request.messages)
    return chars // 4 + IMAGE_TOKENS * sum(len(m.images) for m in request.messages)


def chat_messages(rows: Sequence[Message], images: dict[str, ImagePart]) -> list[ChatMessage]:
    """The provider messages for stored ``rows`` (oldest first): ``images`` maps attachment ids
    to the images to send (ids missing from it are left out). Consecutive messages of one role
    are merged (an image sent alone, then a question) and leading assistant messages dropped,
    so roles alternate and the first is the user's, as every API accepts."""
    out: list[ChatMessage] = []
    for m in rows:
        role = "user" if m.role == "user" else "assistant"
        pics = [images[a] for a in m.attachment_ids if a in images] if role == "user" else []
        text = m.content
        if not text.strip() and not pics:
            continue
        if out and out[-1].role == role:
            prev = out[-1]
            joined = "\n\n".join(t for t in (prev.text, text) if t.strip())
            out[-1] = ChatMessage(role, joined, [*prev.images, *pics])
        elif out or role == "user":
            out.append(ChatMessage(role, text, pics))
    return out


class Remote:
    """The remote side of the chat.

    Args:
        settings: base URLs, tier, timeouts, default model, environment keys, secret.
        store: the store the key pool keeps its records in.
        catalogue: defaults to ``load_catalogue(settings.catalogue_path)``.
        provider_factory: ``(name, **options) -> Provider`` (``make_provider``).

    Raises:
        ConfigError: the catalogue cannot be loaded or ``ARGUS_SECRET_KEY`` (or its file) is unusable.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        catalogue: Optional[Catalogue] = None,
        provider_factory: Callable[..., Provider] = make_provider,
    ):
        self.settings = settings
        self.store = store
        try:
            self.catalogue = catalogue or load_catalogue(settings.catalogue_path)
            box = open_box(settings.data_dir, settings.secret_key)
        except (CatalogueError, SecretKeyError) as exc:
            raise ConfigError(str(exc)) from None
        self.pool = KeyPool(store, box, self.catalogue, env_keys=settings.api_keys, tier=settings.api_tier)
        self._factory = provider_factory
        self._providers: dict[str, Provider] = {}
        self._synced = False
        self._sync_lock = asyncio.Lock()
        #: Seconds between polls of a video operation.
        self.video_poll_s = 10.0
        #: Called with the leases of keys found invalid (the chat handler tells the admins).
        self.on_invalid: Optional[Callable[[list[Lease]], Awaitable[None]]] = None

    # ---- set-up -----------------------------------------------------------
    async def ensure_synced(self) -> None:
        """Register the environment keys in the store once (retried at the next call while the
        store is down; the failure is logged, not raised)."""
        if self._synced:
            return
        async with self._sync_lock:
            if self._synced:
                return
            try:
                await asyncio.to_thread(self.pool.sync_env)
            except StoreError as exc:
                log.warning("API keys from the environment not registered yet: %s", exc)
                return
            self._synced = True

    def provider(self, name: str) -> Provider:
        """The provider object of ``name`` (made on first use, with its base URL and timeouts)."""
        p = self._providers.get(name)
        if p is None:
            p = self._providers[name] = self._factory(
                name, base_url=self.settings.base_urls.get(name), timeout_s=self.settings.provider_timeout_s,
            )
        return p

    async def aclose(self) -> None:
        """Close every provider's clients."""
        providers, self._providers = list(self._providers.values()), {}
        for p in providers:
            await p.aclose()

    # ---- models -------------------------------------------------------------
    async def available(self) -> frozenset[str]:
        """Providers with a usable key now (empty while the store is unreachable)."""
        await self.ensure_synced()
        try:
            return await asyncio.to_thread(self.pool.available_providers)
        except StoreError as exc:
            log.warning("cannot list the API keys: %s", exc)
            return frozenset()

    async def chat_models(self) -> list[ModelSpec]:
        """The catalogue's chat models that have a usable key, in catalogue order."""
        return self.catalogue.of_kind("chat", await self.available())

    async def default_model(self) -> Optional[ModelSpec]:
        """The chat model new chats use: ``ARGUS_DEFAULT_MODEL`` when it has a usable key, else the
        first chat model with one; None (the local model) when no key is usable."""
        models = await self.chat_models()
        wanted = self.catalogue.get(self.settings.default_model) if self.settings.default_model else None
        if wanted is not None and wanted in models:
            return wanted
        return models[0] if models else None

    def spec(self, model_id: Optional[str], kind: str = "chat") -> Optional[ModelSpec]:
        """The catalogue entry of ``model_id`` when it is of ``kind``, else None."""
        spec = self.catalogue.get(model_id) if model_id else None
        return spec if spec is not None and spec.kind == kind else None

    # ---- chat -------------------------------------------------------------
    async def chat_request(self, spec: ModelSpec, rows: Sequence[Message], user_id: str) -> ChatRequest:
        """The request answering the last of ``rows`` (the stored history, oldest first) with
        ``spec``: the images of user messages go along when the model reads images (the newest
        :data:`MAX_HISTORY_IMAGES`, at most :data:`MAX_HISTORY_IMAGE_BYTES` in all)."""
        images: dict[str, ImagePart] = {}
        if spec.vision:
            budget = MAX_HISTORY_IMAGE_BYTES
            wanted = [a for m in reversed(rows) if m.role == "user" for a in reversed(m.attachment_ids)]
            for att_id in wanted[:MAX_HISTORY_IMAGES]:
                try:
                    att, data = await asyncio.to_thread(self.store.get_attachment, att_id, user_id)
                except NotFound:
                    continue
                if not att.mime.startswith("image/") or len(data) > budget:
                    continue
                budget -= len(data)
                images[att_id] = ImagePart(att.mime, data)
        s = self.settings
        return ChatRequest(
            model=spec.id, messages=chat_messages(rows, images), max_tokens=s.max_new_tokens,
            temperature=s.temperature, top_p=s.top_p,
        )

    # ---- images and videos ----------------------------------------------------
    async def media_model(self, kind: str) -> ModelSpec:
        """The first catalogue model of ``kind`` ("image"/"video") whose provider has a usable
        key and can make it. Raises MediaError when there is none."""
        available = await self.available()
        for spec in self.catalogue.of_kind(kind, available):
            return spec
        names = ", ".join(sorted({m.provider for m in self.catalogue.of_kind(kind)})) or "none"
        raise MediaError(
            f"No {kind} model can be used: it needs an API key of {names}; an administrator can add one with /keys add."
        )

    async def _generate(
        self, kind: str, user_id: str, call: Callable[[Provider, ModelSpec, str], Awaitable[Any]], attempts: int
    ) -> tuple[Any, ModelSpec]:
        spec = await self.media_model(kind)
        provider = self.provider(spec.provider)
        failover = Failover(self.pool, spec, tokens=0, max_attempts=attempts)
        try:
            while True:
                lease = await failover.next()
                if lease is None:
                    last = failover.last_error
                    raise MediaError(
                        str(last) if last is not None
                        else f"Every {spec.provider} API key is busy or over its limits right now; please try again later."
                    )
                try:
                    result = await call(provider, spec, lease.secret)
                except ProviderError as exc:
                    if await failover.failed(lease, exc):
                        continue
                    raise MediaError(str(exc)) from None
                await failover.succeeded(lease, None, user_id)
                return result, spec
        finally:
            await self.report(failover)

    async def report(self, failover: Failover) -> None:
        """Tell :attr:`on_invalid` about keys a request found invalid (never raises)."""
        if failover.invalid and self.on_invalid is not None:
            try:
                await self.on_invalid(list(failover.invalid))
            except Exception:
                log.exception("could not tell the administrators about an invalid API key")

    async def generate_image(self, prompt: str, user_id: str) -> tuple[list[ImagePart], ModelSpec]:
        """Images drawn for ``prompt`` through the pool. Raises MediaError, StoreUnavailable."""

        async def call(provider: Provider, spec: ModelSpec, key: str) -> list[ImagePart]:
            return await provider.generate_image(prompt, key, model=spec.id)

        return await self._generate("image", user_id, call, attempts=3)

    async def generate_video(
        self, prompt: str, user_id: str, progress: Optional[Callable[[Any], Any]] = None
    ) -> tuple[Video, ModelSpec]:
        """A video of ``prompt`` through the pool; ``progress`` gets each
        :class:`~argus.providers.VideoProgress`. Raises MediaError, StoreUnavailable."""

        async def call(provider: Provider, spec: ModelSpec, key: str) -> Video:
            return await provider.generate_video(
                prompt, key, model=spec.id, poll_interval_s=self.video_poll_s,
                timeout_s=self.settings.video_timeout_s, progress=progress,
            )

        return await self._generate("video", user_id, call, attempts=VIDEO_ATTEMPTS)

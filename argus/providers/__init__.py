"""Remote model providers: the registry.

Adding a provider = one new module with a :class:`~argus.providers.base.Provider`
subclass + one line in :data:`PROVIDERS`. Modules are imported on first use
(each SDK takes about a second to import), so ``import argus.providers`` stays
light.
"""
from __future__ import annotations

import importlib
from typing import Any

from argus.providers.base import (
    ChatMessage,
    ChatRequest,
    ChatStream,
    ImagePart,
    Provider,
    ProviderError,
    Usage,
    Video,
    VideoProgress,
    fingerprint,
    scrub,
)

#: name → "module:Class".
PROVIDERS: dict[str, str] = {
    "gemini": "argus.providers.gemini:GeminiProvider",
    "openai": "argus.providers.openai_provider:OpenAIProvider",
    "anthropic": "argus.providers.anthropic_provider:AnthropicProvider",
}


def provider_class(name: str) -> type[Provider]:
    """The Provider subclass registered as ``name``. Raises KeyError naming the known ones."""
    try:
        module, cls = PROVIDERS[name].split(":")
    except KeyError:
        raise KeyError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}") from None
    return getattr(importlib.import_module(module), cls)


def make_provider(name: str, **options: Any) -> Provider:
    """A new provider ``name`` built with ``options`` (``base_url``, ``timeout_s``, ``connect_timeout_s``)."""
    return provider_class(name)(**options)


__all__ = [
    "PROVIDERS",
    "ChatMessage",
    "ChatRequest",
    "ChatStream",
    "ImagePart",
    "Provider",
    "ProviderError",
    "Usage",
    "Video",
    "VideoProgress",
    "fingerprint",
    "make_provider",
    "provider_class",
    "scrub",
]

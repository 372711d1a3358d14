"""Pytest fixtures: the fake APIs on 127.0.0.1 and providers pointed at them.

Import the ones a test module needs (``from fakes.fixtures import gemini_fake,
gemini_provider, loopback_only``); ``loopback_only`` should be made autouse in
the module (``pytestmark = pytest.mark.usefixtures("loopback_only")``).

Network rule: nothing may reach Google, OpenAI or Anthropic. ``loopback_only``

* refuses to resolve any host but ``127.0.0.1``/``localhost`` (every HTTP
  client resolves through ``socket.getaddrinfo``), so a real endpoint cannot
  be reached even by mistake;
* points the SDKs' own base-URL variables at a closed loopback port and
  removes their API-key variables, so a provider built without ``base_url``
  fails on loopback instead of silently calling the real API.

The provider fixtures also assert that their ``base_url`` is on 127.0.0.1.
"""
from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pytest

from argus.providers.anthropic_provider import AnthropicProvider
from argus.providers.gemini import GeminiProvider
from argus.providers.openai_provider import OpenAIProvider
from tests.support.fakes.anthropic_server import FakeAnthropic
from tests.support.fakes.gemini_server import FakeGemini, FakeStorage
from tests.support.fakes.openai_server import FakeOpenAI

#: A loopback port nothing listens on (the "discard" port; connections are refused).
DEAD_URL = "http://127.0.0.1:9"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", None, ""}
_ENV_URLS = ("GOOGLE_GEMINI_BASE_URL", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL")
_ENV_SECRETS = (
    "GOOGLE_API_KEY",
    "GEMINI_API_KEY",
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "GOOGLE_GENAI_USE_VERTEXAI",
    "GOOGLE_CLOUD_PROJECT",
    "GOOGLE_CLOUD_LOCATION",
    "GOOGLE_GENAI_HTTP_CLIENT",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
)


class RealNetworkRefused(OSError):
    """A test tried to resolve a host other than loopback."""


def assert_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    assert host == "127.0.0.1", f"tests may only talk to 127.0.0.1, not {url!r}"


@pytest.fixture
def loopback_only(monkeypatch):
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in _LOOPBACK_HOSTS:
            raise RealNetworkRefused(f"test network guard: refusing to resolve {name!r} (only 127.0.0.1 is allowed)")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    for name in _ENV_URLS:
        monkeypatch.setenv(name, DEAD_URL)
    for name in _ENV_SECRETS:
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture
async def gemini_fake(loopback_only):
    """A started :class:`FakeGemini` whose video downloads redirect to a :class:`FakeStorage`
    on another port (``fake.storage``)."""
    fake, storage = FakeGemini(), FakeStorage()
    await storage.start()
    await fake.start()
    fake.storage = storage
    yield fake
    await fake.stop()
    await storage.stop()


@pytest.fixture
async def gemini_provider(gemini_fake):
    provider = GeminiProvider(base_url=gemini_fake.url, timeout_s=5.0, connect_timeout_s=2.0)
    assert_loopback(provider.api_root)
    yield provider
    await provider.aclose()


@pytest.fixture
async def openai_fake(loopback_only):
    fake = FakeOpenAI()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def openai_provider(openai_fake):
    provider = OpenAIProvider(base_url=openai_fake.url + "/v1", timeout_s=5.0, connect_timeout_s=2.0)
    assert_loopback(provider.base_url)
    yield provider
    await provider.aclose()


@pytest.fixture
async def anthropic_fake(loopback_only):
    fake = FakeAnthropic()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def anthropic_provider(anthropic_fake):
    provider = AnthropicProvider(base_url=anthropic_fake.url, timeout_s=5.0, connect_timeout_s=2.0)
    assert_loopback(provider.base_url)
    yield provider
    await provider.aclose()

"""The provider layer's shared pieces: key fingerprints and scrubbing, ProviderError,
the request values, ChatStream's contract, the registry."""
from __future__ import annotations

import hashlib

import pytest

from argus.providers import PROVIDERS, make_provider, provider_class
from argus.providers.transport import retry_after_s
from argus.providers.base import (
    ERROR_KINDS,
    ChatMessage,
    ChatRequest,
    ChatStream,
    Provider,
    ProviderError,
    fingerprint,
    scrub,
)


def test_fingerprint_is_an_ellipsis_and_the_last_four_hex_digits_of_the_sha256():
    key = "AIzaSyExampleExampleExampleExample123"

    assert fingerprint(key) == "…" + hashlib.sha256(key.encode()).hexdigest()[-4:]
    assert len(fingerprint(key)) == 5


def test_scrub_replaces_given_secrets_with_their_fingerprints():
    key = "plain-secret-without-a-known-shape"

    assert scrub(f"bad key {key}!", [key]) == f"bad key {fingerprint(key)}!"


@pytest.mark.parametrize(
    "text",
    [
        "key AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW was refused",
        "Incorrect API key provided: sk-proj-abcdefghijklmnopqrstuvwxyz012345",
        "invalid x-api-key sk-ant-api03-abcdefghijklmnopqrstuvwxyz",
        "GET https://example.test/v1beta/models?key=whatever-it-is&alt=sse",
    ],
)
def test_scrub_removes_key_shaped_strings_it_was_not_told_about(text):
    cleaned = scrub(text)

    assert "…" in cleaned
    for secret in ("AIzaSyA1b2C3d4", "sk-proj-abcdef", "sk-ant-api03-abc", "whatever-it-is"):
        assert secret not in cleaned


def test_provider_error_never_shows_the_key_it_was_built_with():
    key = "plain-secret-without-a-known-shape"

    err = ProviderError.of("bad_request", provider="gemini", api_key=key, status=400, detail=f"echo {key}", message=f"oops {key}")

    assert key not in str(err) + repr(err) + err.detail
    assert err.key_fingerprint == fingerprint(key)


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_every_kind_has_a_one_sentence_message(kind):
    err = ProviderError.of(kind, provider="anthropic", status=500, retry_after_s=3)

    assert str(err).startswith(("Anthropic", "This Anthropic")) and str(err).endswith(".")
    assert "\n" not in str(err)


def test_unknown_error_kind_is_a_programming_error():
    with pytest.raises(ValueError):
        ProviderError("teapot", "I'm a teapot.", provider="gemini")  # type: ignore[arg-type]


def test_key_kinds_and_transient_kinds():
    assert ProviderError.of("quota_exhausted", provider="openai").key_related
    assert not ProviderError.of("quota_exhausted", provider="openai").transient
    assert ProviderError.of("network_error", provider="openai").transient
    assert not ProviderError.of("blocked", provider="openai").key_related


def test_requests_reject_what_no_provider_accepts():
    with pytest.raises(ValueError):
        ChatMessage("system", "no")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ChatRequest(model="m", messages=[])
    with pytest.raises(ValueError):
        ChatRequest(model="m", messages=[ChatMessage("user", "x")], max_tokens=0)


@pytest.mark.parametrize(
    "headers,seconds",
    [({"retry-after-ms": "1500"}, 1.5), ({"retry-after": "7"}, 7.0), ({"retry-after": "soon"}, None), ({}, None)],
)
def test_retry_after_headers(headers, seconds):
    assert retry_after_s(headers) == seconds


def test_retry_after_as_an_http_date():
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, now=1445412500.0) == 10.0


# -- ChatStream -----------------------------------------------------------------
def _stream(pieces, fail=None):
    async def source(stream):
        for p in pieces:
            yield p
        if fail is not None:
            raise fail
        stream.finish_reason = "done"

    return ChatStream("gemini", source, lambda exc: ProviderError.of("server_error", provider="gemini", detail=str(exc)))


async def test_chat_stream_skips_empty_pieces_and_keeps_the_text():
    stream = _stream(["a", "", "b"])

    assert [p async for p in stream] == ["a", "b"]
    assert (stream.text, stream.pieces, stream.finish_reason) == ("ab", 2, "done")


async def test_chat_stream_turns_foreign_errors_into_provider_errors_marked_partial():
    stream = _stream(["a"], fail=RuntimeError("boom"))

    with pytest.raises(ProviderError) as info:
        async for _ in stream:
            pass

    assert (info.value.kind, info.value.partial, info.value.__cause__) == ("server_error", True, None)


async def test_chat_stream_error_before_any_text_is_not_partial():
    stream = _stream([], fail=ProviderError.of("rate_limited", provider="gemini"))

    with pytest.raises(ProviderError) as info:
        await stream.collect()

    assert info.value.partial is False


async def test_chat_stream_lets_cancellation_through():
    import asyncio

    stream = _stream([], fail=asyncio.CancelledError())

    with pytest.raises(asyncio.CancelledError):
        await stream.collect()


# -- registry -------------------------------------------------------------------
def test_registry_has_one_class_per_provider_named_as_registered():
    for name in PROVIDERS:
        cls = provider_class(name)
        assert issubclass(cls, Provider) and cls.name == name


def test_registry_refuses_unknown_names():
    with pytest.raises(KeyError, match="unknown provider 'mistral'"):
        make_provider("mistral")

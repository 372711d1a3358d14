"""AnthropicProvider with the real anthropic SDK against the Anthropic fake on 127.0.0.1."""
from __future__ import annotations

import base64
import traceback

import pytest

from argus.providers.anthropic_provider import AnthropicProvider
from argus.providers.base import ChatMessage, ChatRequest, ImagePart, ProviderError, Usage
from tests.support.fakes.fixtures import DEAD_URL, anthropic_fake, anthropic_provider, loopback_only  # noqa: F401
from tests.support.fakes.gemini_server import PNG_1X1

pytestmark = pytest.mark.usefixtures("loopback_only")


def ask(text: str = "Hi", **kw) -> ChatRequest:
    return ChatRequest(model="claude-sonnet-4-6", messages=[ChatMessage("user", text)], **kw)


async def failure(provider, request, key) -> tuple[ProviderError, str]:
    stream = provider.stream_chat(request, key)
    with pytest.raises(ProviderError) as info:
        async for _ in stream:
            pass
    return info.value, stream.text


# -- streaming ------------------------------------------------------------------
async def test_answer_streams_in_pieces_with_usage_and_stop_reason(anthropic_fake, anthropic_provider):
    stream = anthropic_provider.stream_chat(ask(), anthropic_fake.key_for("ok"))

    pieces = [p async for p in stream]

    assert pieces == ["Hello", ", ", "world", "!"]
    assert stream.finish_reason == "end_turn"
    assert stream.usage == Usage(input_tokens=31, output_tokens=6, total_tokens=37)


async def test_request_has_the_system_parameter_and_history_in_order(anthropic_fake, anthropic_provider):
    request = ChatRequest(
        model="claude-haiku-4-5",
        messages=[ChatMessage("user", "What is 2+2?"), ChatMessage("assistant", "4."), ChatMessage("user", "And times 3?")],
        system="Answer tersely.",
        max_tokens=77,
    )

    await anthropic_provider.stream_chat(request, anthropic_fake.key_for("ok")).collect()

    sent = anthropic_fake.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.json == {
        "model": "claude-haiku-4-5",
        "max_tokens": 77,
        "system": "Answer tersely.",
        "stream": True,
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And times 3?"},
        ],
    }
    assert sent.headers["anthropic-version"]


async def test_images_go_as_base64_blocks_before_the_text(anthropic_fake, anthropic_provider):
    request = ChatRequest(model="claude-sonnet-4-6", messages=[ChatMessage("user", "What is this?", [ImagePart("image/png", PNG_1X1)])])

    await anthropic_provider.stream_chat(request, anthropic_fake.key_for("ok")).collect()

    image, text = anthropic_fake.requests[-1].json["messages"][0]["content"]
    assert (image["type"], image["source"]["type"], image["source"]["media_type"]) == ("image", "base64", "image/png")
    assert base64.b64decode(image["source"]["data"]) == PNG_1X1
    assert text == {"type": "text", "text": "What is this?"}


async def test_the_key_reaches_the_api(anthropic_fake, anthropic_provider):
    key = anthropic_fake.key_for("ok")

    await anthropic_provider.stream_chat(ask(), key).collect()

    sent = anthropic_fake.requests[-1]
    assert sent.key == key
    # anthropic 2.x authenticates with a bearer token (older SDKs sent x-api-key)
    assert sent.headers.get("authorization") == f"Bearer {key}" or sent.headers.get("x-api-key") == key


async def test_list_models_lists_the_ids(anthropic_fake, anthropic_provider):
    assert await anthropic_provider.list_models(anthropic_fake.key_for("ok")) == [
        "claude-haiku-4-5",
        "claude-opus-4-1",
        "claude-sonnet-4-6",
    ]


# -- errors ---------------------------------------------------------------------
async def test_429_is_rate_limited_with_retry_after(anthropic_fake, anthropic_provider):
    err, text = await failure(anthropic_provider, ask(), anthropic_fake.key_for("429"))

    assert (err.kind, err.status, err.retry_after_s, err.partial, text) == ("rate_limited", 429, 3.0, False, "")


async def test_low_credit_balance_is_quota_exhausted(anthropic_fake, anthropic_provider):
    err, _ = await failure(anthropic_provider, ask(), anthropic_fake.key_for("credit"))

    assert (err.kind, err.status) == ("quota_exhausted", 400)


@pytest.mark.parametrize("behaviour,status", [("invalid", 401), ("denied", 403)])
async def test_401_and_403_are_invalid_key(anthropic_fake, anthropic_provider, behaviour, status):
    err, _ = await failure(anthropic_provider, ask(), anthropic_fake.key_for(behaviour))

    assert (err.kind, err.status) == ("invalid_key", status)


@pytest.mark.parametrize("behaviour,status", [("500", 500), ("529", 529)])
async def test_500_and_529_overloaded_are_server_errors(anthropic_fake, anthropic_provider, behaviour, status):
    err, _ = await failure(anthropic_provider, ask(), anthropic_fake.key_for(behaviour))

    assert (err.kind, err.status, err.transient) == ("server_error", status, True)


async def test_unknown_model_is_bad_request(anthropic_fake, anthropic_provider):
    err, _ = await failure(anthropic_provider, ask(), anthropic_fake.key_for("badmodel"))

    assert (err.kind, err.status) == ("bad_request", 404)


async def test_overloaded_event_after_some_text_is_a_partial_server_error(anthropic_fake, anthropic_provider):
    err, text = await failure(anthropic_provider, ask(), anthropic_fake.key_for("midstream"))

    assert (err.kind, err.status, err.partial, text) == ("server_error", None, True, "Hello, ")


async def test_connection_cut_mid_answer_is_a_partial_network_error(anthropic_fake, anthropic_provider):
    err, text = await failure(anthropic_provider, ask(), anthropic_fake.key_for("drop"))

    assert (err.kind, err.partial, text) == ("network_error", True, "Hello, ")


async def test_refusal_is_blocked(anthropic_fake, anthropic_provider):
    err, text = await failure(anthropic_provider, ask(), anthropic_fake.key_for("refusal"))

    assert (err.kind, err.partial, text) == ("blocked", True, "Hello")


async def test_server_too_slow_is_a_network_error(anthropic_fake):
    anthropic_fake.slow_s = 3.0
    provider = AnthropicProvider(base_url=anthropic_fake.url, timeout_s=0.3)
    try:
        err, _ = await failure(provider, ask(), anthropic_fake.key_for("slow"))
    finally:
        await provider.aclose()

    assert err.kind == "network_error"
    assert len(anthropic_fake.requests) == 1  # the SDK's own retries are off


async def test_unreachable_server_is_a_network_error():
    provider = AnthropicProvider(base_url=DEAD_URL)
    try:
        err, _ = await failure(provider, ask(), "sk-ant-api03-unreachable000000000000")
    finally:
        await provider.aclose()

    assert err.kind == "network_error"


@pytest.mark.parametrize("behaviour", ["429", "credit", "invalid", "denied", "badmodel", "500", "529", "midstream", "drop", "refusal"])
async def test_no_error_ever_shows_the_key(anthropic_fake, anthropic_provider, behaviour):
    key = anthropic_fake.key_for(behaviour)

    err, _ = await failure(anthropic_provider, ask(), key)

    shown = " ".join([str(err), repr(err), err.detail, "".join(traceback.format_exception(err))])
    assert key not in shown

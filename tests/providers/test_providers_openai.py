"""OpenAIProvider with the real openai SDK against the OpenAI fake on 127.0.0.1."""
from __future__ import annotations

import base64
import traceback

import pytest

from argus.providers.base import ChatMessage, ChatRequest, ImagePart, ProviderError, Usage
from argus.providers.openai_provider import OpenAIProvider
from tests.support.fakes.fixtures import DEAD_URL, loopback_only, openai_fake, openai_provider  # noqa: F401
from tests.support.fakes.gemini_server import PNG_1X1

pytestmark = pytest.mark.usefixtures("loopback_only")


def ask(text: str = "Hi", **kw) -> ChatRequest:
    return ChatRequest(model="gpt-4o-mini", messages=[ChatMessage("user", text)], **kw)


async def failure(provider, request, key) -> tuple[ProviderError, str]:
    stream = provider.stream_chat(request, key)
    with pytest.raises(ProviderError) as info:
        async for _ in stream:
            pass
    return info.value, stream.text


# -- streaming ------------------------------------------------------------------
async def test_answer_streams_in_pieces_with_usage_and_finish_reason(openai_fake, openai_provider):
    stream = openai_provider.stream_chat(ask(), openai_fake.key_for("ok"))

    pieces = [p async for p in stream]

    assert pieces == ["Hello", ", ", "world", "!"]
    assert stream.finish_reason == "stop"
    assert stream.usage == Usage(input_tokens=21, output_tokens=4, total_tokens=25)


async def test_request_has_system_first_then_history_in_order_and_asks_for_usage(openai_fake, openai_provider):
    request = ChatRequest(
        model="gpt-4.1",
        messages=[ChatMessage("user", "What is 2+2?"), ChatMessage("assistant", "4."), ChatMessage("user", "And times 3?")],
        system="Answer tersely.",
        max_tokens=77,
        temperature=0.3,
        top_p=0.8,
    )

    await openai_provider.stream_chat(request, openai_fake.key_for("ok")).collect()

    sent = openai_fake.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json["messages"] == [
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And times 3?"},
    ]
    assert (sent.json["model"], sent.json["stream"], sent.json["stream_options"]) == ("gpt-4.1", True, {"include_usage": True})
    assert (sent.json["max_tokens"], sent.json["temperature"], sent.json["top_p"]) == (77, 0.3, 0.8)


async def test_images_go_as_data_urls_of_their_exact_bytes(openai_fake, openai_provider):
    request = ChatRequest(model="gpt-4o-mini", messages=[ChatMessage("user", "What is this?", [ImagePart("image/png", PNG_1X1)])])

    await openai_provider.stream_chat(request, openai_fake.key_for("ok")).collect()

    text, image = openai_fake.requests[-1].json["messages"][0]["content"]
    assert text == {"type": "text", "text": "What is this?"}
    prefix, data = image["image_url"]["url"].split(",", 1)
    assert (image["type"], prefix, base64.b64decode(data)) == ("image_url", "data:image/png;base64", PNG_1X1)


async def test_key_travels_as_a_bearer_token(openai_fake, openai_provider):
    key = openai_fake.key_for("ok")

    await openai_provider.stream_chat(ask(), key).collect()

    assert openai_fake.requests[-1].headers["authorization"] == f"Bearer {key}"


async def test_openai_itself_gets_max_completion_tokens():
    assert OpenAIProvider(base_url="https://api.openai.com/v1").is_openai
    assert not OpenAIProvider(base_url="http://127.0.0.1:8080/v1").is_openai


async def test_openai_base_url_variable_points_at_any_compatible_server(openai_fake, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", openai_fake.url + "/v1")
    provider = OpenAIProvider()
    try:
        assert await provider.stream_chat(ask(), openai_fake.key_for("ok")).collect() == "Hello, world!"
    finally:
        await provider.aclose()


async def test_list_models_lists_the_ids(openai_fake, openai_provider):
    assert await openai_provider.list_models(openai_fake.key_for("ok")) == ["gpt-4.1", "gpt-4o-mini", "text-embedding-3-small"]


# -- errors ---------------------------------------------------------------------
async def test_429_is_rate_limited_with_retry_after_ms(openai_fake, openai_provider):
    err, text = await failure(openai_provider, ask(), openai_fake.key_for("429"))

    assert (err.kind, err.status, err.retry_after_s, err.partial, text) == ("rate_limited", 429, 1.5, False, "")


async def test_insufficient_quota_is_quota_exhausted(openai_fake, openai_provider):
    err, _ = await failure(openai_provider, ask(), openai_fake.key_for("quota"))

    assert (err.kind, err.status) == ("quota_exhausted", 429)


@pytest.mark.parametrize("behaviour,status", [("invalid", 401), ("denied", 403)])
async def test_401_and_403_are_invalid_key(openai_fake, openai_provider, behaviour, status):
    err, _ = await failure(openai_provider, ask(), openai_fake.key_for(behaviour))

    assert (err.kind, err.status) == ("invalid_key", status)


@pytest.mark.parametrize("behaviour,status", [("500", 500), ("503", 503)])
async def test_5xx_is_server_error(openai_fake, openai_provider, behaviour, status):
    err, _ = await failure(openai_provider, ask(), openai_fake.key_for(behaviour))

    assert (err.kind, err.status) == ("server_error", status)


async def test_unknown_model_is_bad_request_quoting_openai(openai_fake, openai_provider):
    err, _ = await failure(openai_provider, ask(), openai_fake.key_for("badmodel"))

    assert (err.kind, err.status) == ("bad_request", 404)
    assert "does not exist" in str(err)


async def test_content_policy_refusal_is_blocked(openai_fake, openai_provider):
    err, _ = await failure(openai_provider, ask(), openai_fake.key_for("filtered"))

    assert (err.kind, err.status) == ("blocked", 400)


async def test_content_filter_finish_after_text_is_blocked_and_partial(openai_fake, openai_provider):
    err, text = await failure(openai_provider, ask(), openai_fake.key_for("content_filter"))

    assert (err.kind, err.partial, text) == ("blocked", True, "Hello")


async def test_error_event_after_some_text_is_a_partial_server_error(openai_fake, openai_provider):
    err, text = await failure(openai_provider, ask(), openai_fake.key_for("midstream"))

    assert (err.kind, err.partial, text) == ("server_error", True, "Hello, ")


async def test_connection_cut_mid_answer_is_a_partial_network_error(openai_fake, openai_provider):
    err, text = await failure(openai_provider, ask(), openai_fake.key_for("drop"))

    assert (err.kind, err.partial, text) == ("network_error", True, "Hello, ")


async def test_server_too_slow_is_a_network_error(openai_fake):
    openai_fake.slow_s = 3.0
    provider = OpenAIProvider(base_url=openai_fake.url + "/v1", timeout_s=0.3)
    try:
        err, _ = await failure(provider, ask(), openai_fake.key_for("slow"))
    finally:
        await provider.aclose()

    assert err.kind == "network_error"
    assert len(openai_fake.requests) == 1  # the SDK's own retries are off


async def test_unreachable_server_is_a_network_error():
    provider = OpenAIProvider(base_url=DEAD_URL + "/v1")
    try:
        err, _ = await failure(provider, ask(), "sk-proj-unreachable0000000000000000")
    finally:
        await provider.aclose()

    assert err.kind == "network_error"


@pytest.mark.parametrize("behaviour", ["429", "quota", "invalid", "denied", "badmodel", "filtered", "500", "midstream", "drop", "content_filter"])
async def test_no_error_ever_shows_the_key(openai_fake, openai_provider, behaviour):
    key = openai_fake.key_for(behaviour)

    err, _ = await failure(openai_provider, ask(), key)

    shown = " ".join([str(err), repr(err), err.detail, "".join(traceback.format_exception(err))])
    assert key not in shown

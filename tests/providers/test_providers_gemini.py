"""GeminiProvider with the real google-genai SDK against the Gemini fake on 127.0.0.1."""
from __future__ import annotations

import socket
import traceback

import pytest

from argus.providers import make_provider
from argus.providers.base import ChatMessage, ChatRequest, ImagePart, ProviderError, Usage, fingerprint
from argus.providers.gemini import GeminiProvider
from tests.support.fakes.fixtures import DEAD_URL, RealNetworkRefused, gemini_fake, gemini_provider, loopback_only  # noqa: F401
from tests.support.fakes.gemini_server import PNG_1X1, FakeGemini

pytestmark = pytest.mark.usefixtures("loopback_only")


def ask(text: str = "Hi", **kw) -> ChatRequest:
    return ChatRequest(model="gemini-2.5-flash", messages=[ChatMessage("user", text)], **kw)


async def failure(provider, request, key) -> tuple[ProviderError, str]:
    """The ProviderError streaming ``request`` raises, and the text streamed before it."""
    stream = provider.stream_chat(request, key)
    with pytest.raises(ProviderError) as info:
        async for _ in stream:
            pass
    return info.value, stream.text


def leaks(err: ProviderError, key: str) -> bool:
    shown = " ".join([str(err), repr(err), err.detail, "".join(traceback.format_exception(err))])
    return key in shown


# -- streaming ------------------------------------------------------------------
async def test_answer_streams_in_pieces_with_usage_and_finish_reason(gemini_fake, gemini_provider):
    stream = gemini_provider.stream_chat(ask(), gemini_fake.key_for("ok"))

    pieces = [p async for p in stream]

    assert pieces == ["Hello", ", ", "world", "!"]
    assert stream.text == "Hello, world!"
    assert stream.finish_reason == "STOP"
    assert stream.usage == Usage(input_tokens=12, output_tokens=5, total_tokens=17)


async def test_request_carries_history_in_order_with_model_role_and_system_instruction(gemini_fake, gemini_provider):
    request = ChatRequest(
        model="gemini-2.5-pro",
        messages=[
            ChatMessage("user", "What is 2+2?"),
            ChatMessage("assistant", "4."),
            ChatMessage("user", "And times 3?"),
        ],
        system="Answer tersely.",
        max_tokens=77,
        temperature=0.3,
        top_p=0.8,
    )

    await gemini_provider.stream_chat(request, gemini_fake.key_for("ok")).collect()

    sent = gemini_fake.requests[-1]
    assert sent.path == "/v1beta/models/gemini-2.5-pro:streamGenerateContent"
    assert sent.query.get("alt") == "sse"
    assert [(c["role"], c["parts"][0]["text"]) for c in sent.json["contents"]] == [
        ("user", "What is 2+2?"),
        ("model", "4."),
        ("user", "And times 3?"),
    ]
    assert sent.json["systemInstruction"]["parts"] == [{"text": "Answer tersely."}]
    assert sent.json["generationConfig"] == {"maxOutputTokens": 77, "temperature": 0.3, "topP": 0.8}


async def test_images_go_inline_as_their_exact_bytes_after_the_text(gemini_fake, gemini_provider):
    import base64

    request = ChatRequest(
        model="gemini-2.5-flash",
        messages=[ChatMessage("user", "What is this?", [ImagePart("image/png", PNG_1X1), ImagePart("image/jpeg", b"\xff\xd8\xff\xe0jpeg")])],
    )

    await gemini_provider.stream_chat(request, gemini_fake.key_for("ok")).collect()

    parts = gemini_fake.requests[-1].json["contents"][0]["parts"]
    assert parts[0] == {"text": "What is this?"}
    inline = [p["inlineData"] for p in parts[1:]]
    # google-genai sends URL-safe base64 (the API accepts either alphabet)
    assert [base64.urlsafe_b64decode(i["data"]) for i in inline] == [PNG_1X1, b"\xff\xd8\xff\xe0jpeg"]
    assert [i.get("mimeType") or i.get("mime_type") for i in inline] == ["image/png", "image/jpeg"]


async def test_key_travels_in_the_x_goog_api_key_header_not_the_url(gemini_fake, gemini_provider):
    key = gemini_fake.key_for("ok")

    await gemini_provider.stream_chat(ask(), key).collect()

    sent = gemini_fake.requests[-1]
    assert sent.headers["x-goog-api-key"] == key
    assert "key" not in sent.query


async def test_nothing_is_sent_until_the_stream_is_iterated(gemini_fake, gemini_provider):
    stream = gemini_provider.stream_chat(ask(), gemini_fake.key_for("ok"))
    await stream.aclose()

    assert gemini_fake.requests == []
    assert [p async for p in stream] == []


async def test_closing_the_stream_early_keeps_the_text_so_far(gemini_fake, gemini_provider):
    stream = gemini_provider.stream_chat(ask(), gemini_fake.key_for("ok"))

    first = await stream.__anext__()
    await stream.aclose()

    assert first == "Hello" and stream.text == "Hello"
    assert [p async for p in stream] == []


async def test_one_sdk_client_is_kept_per_key(gemini_fake, gemini_provider):
    a, b = gemini_fake.key_for("ok"), gemini_fake.key_for("ok")

    assert gemini_provider.client(a) is gemini_provider.client(a)
    assert gemini_provider.client(a) is not gemini_provider.client(b)


async def test_registry_builds_the_gemini_provider(gemini_fake):
    provider = make_provider("gemini", base_url=gemini_fake.url)
    try:
        assert isinstance(provider, GeminiProvider)
        assert await provider.stream_chat(ask(), gemini_fake.key_for("ok")).collect() == "Hello, world!"
    finally:
        await provider.aclose()


async def test_list_models_names_the_models_that_can_chat(gemini_fake, gemini_provider):
    models = await gemini_provider.list_models(gemini_fake.key_for("ok"))

    assert models == ["gemini-2.5-flash", "gemini-2.5-pro"]
    assert gemini_fake.requests[-1].path == "/v1beta/models"


# -- errors ---------------------------------------------------------------------
async def test_per_minute_429_is_rate_limited_with_google_retry_delay(gemini_fake, gemini_provider):
    err, text = await failure(gemini_provider, ask(), gemini_fake.key_for("429"))

    assert (err.kind, err.status, err.retry_after_s, err.partial, text) == ("rate_limited", 429, 7.0, False, "")
    assert err.provider == "gemini" and err.key_related and err.transient
    assert "7 seconds" in str(err)


async def test_per_day_429_is_quota_exhausted(gemini_fake, gemini_provider):
    err, _ = await failure(gemini_provider, ask(), gemini_fake.key_for("quota"))

    assert (err.kind, err.status, err.retry_after_s) == ("quota_exhausted", 429, 20.0)
    assert "quota" in str(err)


async def test_api_key_invalid_is_invalid_key_and_names_only_the_fingerprint(gemini_fake, gemini_provider):
    key = gemini_fake.key_for("invalid")

    err, _ = await failure(gemini_provider, ask(), key)

    assert (err.kind, err.status) == ("invalid_key", 400)
    assert err.key_fingerprint == fingerprint(key)
    assert fingerprint(key) in err.detail  # the server echoed the key; we show its fingerprint
    assert not leaks(err, key)


async def test_permission_denied_is_invalid_key(gemini_fake, gemini_provider):
    err, _ = await failure(gemini_provider, ask(), gemini_fake.key_for("denied"))

    assert (err.kind, err.status) == ("invalid_key", 403)


@pytest.mark.parametrize("behaviour,status", [("500", 500), ("503", 503)])
async def test_5xx_is_server_error(gemini_fake, gemini_provider, behaviour, status):
    err, _ = await failure(gemini_provider, ask(), gemini_fake.key_for(behaviour))

    assert (err.kind, err.status, err.transient) == ("server_error", status, True)


async def test_unknown_model_is_bad_request_quoting_google(gemini_fake, gemini_provider):
    err, _ = await failure(gemini_provider, ask(), gemini_fake.key_for("notfound"))

    assert (err.kind, err.status) == ("bad_request", 404)
    assert "is not found" in str(err)


async def test_error_event_after_some_text_is_a_partial_server_error(gemini_fake, gemini_provider):
    stream = gemini_provider.stream_chat(ask(), gemini_fake.key_for("midstream"))
    got = []

    with pytest.raises(ProviderError) as info:
        async for piece in stream:
            got.append(piece)

    assert got == ["Hello", ", "] and stream.text == "Hello, "
    assert (info.value.kind, info.value.partial) == ("server_error", True)


async def test_connection_cut_mid_answer_is_a_partial_network_error(gemini_fake, gemini_provider):
    err, text = await failure(gemini_provider, ask(), gemini_fake.key_for("drop"))

    assert (err.kind, err.partial, text) == ("network_error", True, "Hello, ")


async def test_server_too_slow_is_a_network_error(gemini_fake):
    gemini_fake.slow_s = 3.0
    provider = GeminiProvider(base_url=gemini_fake.url, timeout_s=0.3)
    try:
        err, _ = await failure(provider, ask(), gemini_fake.key_for("slow"))
    finally:
        await provider.aclose()

    assert (err.kind, err.partial) == ("network_error", False)


async def test_unreachable_server_is_a_network_error():
    provider = GeminiProvider(base_url=DEAD_URL, timeout_s=2.0)
    try:
        err, _ = await failure(provider, ask(), "AIzaSyUnreachable0000000000000000000")
    finally:
        await provider.aclose()

    assert err.kind == "network_error"


async def test_blocked_prompt_is_blocked(gemini_fake, gemini_provider):
    err, text = await failure(gemini_provider, ask("something nasty"), gemini_fake.key_for("blocked"))

    assert (err.kind, err.partial, text) == ("blocked", False, "")


async def test_safety_stop_after_some_text_is_blocked_and_partial(gemini_fake, gemini_provider):
    err, text = await failure(gemini_provider, ask(), gemini_fake.key_for("safety"))

    assert (err.kind, err.partial, text) == ("blocked", True, "Hello")


async def test_empty_key_is_refused_without_a_request(gemini_fake, gemini_provider):
    with pytest.raises(ProviderError) as info:
        gemini_provider.stream_chat(ask(), "  ")

    assert info.value.kind == "invalid_key"
    assert gemini_fake.requests == []


@pytest.mark.parametrize("behaviour", ["429", "quota", "invalid", "denied", "notfound", "500", "503", "midstream", "drop", "blocked", "safety"])
async def test_no_error_ever_shows_the_key(gemini_fake, gemini_provider, behaviour):
    key = gemini_fake.key_for(behaviour)

    err, _ = await failure(gemini_provider, ask(), key)

    assert not leaks(err, key)
    assert err.__cause__ is None


# -- the network guard itself -------------------------------------------------------
def test_tests_cannot_resolve_real_hosts():
    with pytest.raises(RealNetworkRefused):
        socket.getaddrinfo("generativelanguage.googleapis.com", 443)


async def test_a_provider_without_base_url_cannot_reach_google_in_tests():
    provider = GeminiProvider()
    try:
        assert provider.api_root == DEAD_URL
        err, _ = await failure(provider, ask(), "AIzaSyNoBaseUrl000000000000000000000")
    finally:
        await provider.aclose()

    assert err.kind == "network_error"


async def test_the_fake_also_serves_from_its_own_thread():
    fake = FakeGemini()
    with fake.running_in_thread() as url:
        provider = GeminiProvider(base_url=url)
        try:
            assert await provider.stream_chat(ask(), fake.key_for("ok")).collect() == "Hello, world!"
        finally:
            await provider.aclose()
    assert len(fake.requests) == 1


async def test_a_provider_can_be_used_from_another_event_loop_too(gemini_fake, gemini_provider):
    import asyncio

    key = gemini_fake.key_for("ok")
    assert await gemini_provider.stream_chat(ask(), key).collect() == "Hello, world!"

    async def elsewhere() -> str:
        try:
            return await gemini_provider.stream_chat(ask(), key).collect()
        finally:
            await gemini_provider.aclose()

    assert await asyncio.to_thread(asyncio.run, elsewhere()) == "Hello, world!"
    assert await gemini_provider.stream_chat(ask(), key).collect() == "Hello, world!"

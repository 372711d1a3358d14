"""Image generation (google-genai) and Veo video generation (REST) against the Gemini fake on 127.0.0.1."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from argus.providers import make_provider
from argus.providers.base import ProviderError, Video, VideoProgress
from tests.support.fakes.fixtures import gemini_fake, gemini_provider, loopback_only  # noqa: F401
from tests.support.fakes.gemini_server import PNG_1X1, VIDEO_BYTES

pytestmark = pytest.mark.usefixtures("loopback_only")

FAST = {"poll_interval_s": 0.01, "timeout_s": 5.0}


# -- images ---------------------------------------------------------------------
async def test_image_generation_returns_the_png_bytes(gemini_fake, gemini_provider):
    images = await gemini_provider.generate_image("a red square", gemini_fake.key_for("ok"))

    assert [(i.mime, i.data) for i in images] == [("image/png", PNG_1X1)]
    assert Image.open(io.BytesIO(images[0].data)).size == (1, 1)


async def test_image_generation_asks_the_image_model_for_image_and_text(gemini_fake, gemini_provider):
    key = gemini_fake.key_for("ok")

    await gemini_provider.generate_image("a red square", key, model="gemini-2.5-flash-image")

    sent = gemini_fake.requests[-1]
    assert sent.path == "/v1beta/models/gemini-2.5-flash-image:generateContent"
    assert sent.json["contents"][0]["parts"] == [{"text": "a red square"}]
    assert sent.json["generationConfig"]["responseModalities"] == ["IMAGE", "TEXT"]
    assert sent.headers["x-goog-api-key"] == key


async def test_an_answer_without_an_image_is_a_bad_request_quoting_the_model(gemini_fake, gemini_provider):
    with pytest.raises(ProviderError) as info:
        await gemini_provider.generate_image("a red square", gemini_fake.key_for("noimage"))

    assert info.value.kind == "bad_request"
    assert "Here is your picture." in str(info.value)


async def test_a_refused_image_prompt_is_blocked(gemini_fake, gemini_provider):
    with pytest.raises(ProviderError) as info:
        await gemini_provider.generate_image("something nasty", gemini_fake.key_for("blocked"))

    assert info.value.kind == "blocked"


async def test_image_generation_maps_a_rate_limit(gemini_fake, gemini_provider):
    with pytest.raises(ProviderError) as info:
        await gemini_provider.generate_image("a red square", gemini_fake.key_for("429"))

    assert (info.value.kind, info.value.retry_after_s) == ("rate_limited", 7.0)


async def test_providers_without_images_say_so(loopback_only):
    provider = make_provider("openai", base_url="http://127.0.0.1:9/v1")

    with pytest.raises(ProviderError) as info:
        await provider.generate_image("a red square", "sk-unused")

    assert info.value.kind == "bad_request" and not provider.can_generate_images


# -- video ----------------------------------------------------------------------
async def test_video_is_started_polled_until_done_and_downloaded(gemini_fake, gemini_provider):
    gemini_fake.video_polls = 2
    reports: list[VideoProgress] = []

    video = await gemini_provider.generate_video("a cat surfing", gemini_fake.key_for("ok"), progress=reports.append, **FAST)

    assert video == Video("video/mp4", VIDEO_BYTES)
    mime, data = video
    assert (mime, data) == ("video/mp4", VIDEO_BYTES)
    assert [(r.polls, r.percent) for r in reports] == [(1, 33.0), (2, 67.0)]
    assert [r.method + " " + r.path for r in gemini_fake.requests] == [
        "POST /v1beta/models/veo-3.0-generate-001:predictLongRunning",
        "GET /v1beta/models/veo-3.0-generate-001/operations/op1",
        "GET /v1beta/models/veo-3.0-generate-001/operations/op1",
        "GET /v1beta/models/veo-3.0-generate-001/operations/op1",
        "GET /v1beta/files/op1:download",
    ]


async def test_video_request_has_the_veo_shape_and_the_key_header(gemini_fake, gemini_provider):
    key = gemini_fake.key_for("ok")

    await gemini_provider.generate_video(
        "a cat surfing", key, model="veo-3.0-fast-generate-001", parameters={"aspectRatio": "16:9"}, **FAST
    )

    start = gemini_fake.requests[0]
    assert start.path == "/v1beta/models/veo-3.0-fast-generate-001:predictLongRunning"
    assert start.json == {"instances": [{"prompt": "a cat surfing"}], "parameters": {"aspectRatio": "16:9"}}
    assert all(r.headers.get("x-goog-api-key") == key for r in gemini_fake.requests)


async def test_the_key_is_not_sent_to_the_storage_host_a_download_redirects_to(gemini_fake, gemini_provider):
    await gemini_provider.generate_video("a cat surfing", gemini_fake.key_for("ok"), **FAST)

    (blob,) = gemini_fake.storage.requests
    assert blob.path == "/blob/op1.mp4"
    assert blob.key is None and "x-goog-api-key" not in blob.headers


async def test_progress_callback_may_be_async(gemini_fake, gemini_provider):
    seen = []

    async def progress(report: VideoProgress) -> None:
        seen.append(report.polls)

    await gemini_provider.generate_video("a cat surfing", gemini_fake.key_for("ok"), progress=progress, **FAST)

    assert seen == [1, 2]


async def test_a_video_that_never_finishes_times_out_with_a_clear_error(gemini_fake, gemini_provider):
    with pytest.raises(ProviderError) as info:
        await gemini_provider.generate_video(
            "a cat surfing", gemini_fake.key_for("video_never"), poll_interval_s=0.05, timeout_s=0.3
        )

    assert info.value.kind == "server_error"
    assert "did not finish the video within 0.3 seconds" in str(info.value)
    assert gemini_fake.find(":download") == []


async def test_a_failed_video_operation_is_a_server_error(gemini_fake, gemini_provider):
    with pytest.raises(ProviderError) as info:
        await gemini_provider.generate_video("a cat surfing", gemini_fake.key_for("video_failed"), **FAST)

    assert info.value.kind == "server_error"


async def test_a_filtered_video_is_blocked(gemini_fake, gemini_provider):
    with pytest.raises(ProviderError) as info:
        await gemini_provider.generate_video("something nasty", gemini_fake.key_for("video_filtered"), **FAST)

    assert info.value.kind == "blocked"
    assert "We can't create videos of that" in info.value.detail


@pytest.mark.parametrize("behaviour,kind", [("429", "rate_limited"), ("quota", "quota_exhausted"), ("invalid", "invalid_key"), ("503", "server_error")])
async def test_video_start_errors_are_mapped_and_never_show_the_key(gemini_fake, gemini_provider, behaviour, kind):
    key = gemini_fake.key_for(behaviour)

    with pytest.raises(ProviderError) as info:
        await gemini_provider.generate_video("a cat surfing", key, **FAST)

    assert info.value.kind == kind
    assert key not in str(info.value) + repr(info.value) + info.value.detail


async def test_an_unreachable_video_api_is_a_network_error(loopback_only):
    provider = make_provider("gemini", base_url="http://127.0.0.1:9")

    with pytest.raises(ProviderError) as info:
        await provider.generate_video("a cat surfing", "AIzaSyUnreachable0000000000000000000", **FAST)

    assert info.value.kind == "network_error"

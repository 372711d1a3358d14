"""The model catalogue (argus/catalogue.json read by argus.catalogue): the models the issue asks
for, their capabilities and limits, and clear errors for a broken replacement file."""
from __future__ import annotations

import json

import pytest

from argus.catalogue import CatalogueError, Limits, load_catalogue, local_spec


def test_the_catalogue_lists_the_models_with_kinds_capabilities_and_limits():
    cat = load_catalogue()
    chat = {m.id for m in cat.of_kind("chat")}
    assert {"gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.0-flash"} <= chat
    assert {"gpt-4o-mini", "claude-sonnet-4-6"} <= chat
    assert [m.id for m in cat.of_kind("image")] == ["gemini-2.5-flash-image"]
    assert [m.id for m in cat.of_kind("video")] == ["veo-3.0-generate-001"]
    assert cat.get("GEMINI-2.5-FLASH").label == "Gemini 2.5 Flash"  # ids compare case-insensitively
    assert cat.get("gemini-2.5-flash-image").capabilities == {"vision", "image_output"}
    assert "video_output" in cat.get("veo-3.0-generate-001").capabilities
    assert all(m.vision for m in cat.of_kind("chat"))
    assert cat.get("gemini-2.5-flash").limits_for("free") == Limits(rpm=10, tpm=250_000, rpd=250)
    assert cat.get("gemini-2.5-pro").limits_for("tier1").rpm == 150
    assert cat.get("gemini-2.5-flash").day_resets == "America/Los_Angeles"  # Google's RPD reset
    assert cat.get("gpt-4o-mini").provider == "openai" and cat.get("claude-sonnet-4-6").provider == "anthropic"
    assert cat.providers == ["gemini", "openai", "anthropic"]
    assert [m.id for m in cat.of_kind("chat", ["openai"])] == ["gpt-4o-mini"]
    assert set(cat.sources) == {"gemini", "openai", "anthropic"}  # where the numbers come from


def test_the_local_model_entry_comes_from_the_engine():
    spec = local_spec("SmolLM2-135M-Instruct", "SmolLM2 (local)", 8192)
    assert (spec.is_local, spec.kind, spec.vision, spec.limits_for("free")) == (True, "chat", False, Limits())


@pytest.mark.parametrize(
    "models, says",
    [
        ([{"provider": "gemini", "id": "x", "label": "X", "kind": "music"}], "kind must be one of"),
        ([{"provider": "gemini", "id": "x", "label": "X"}], "lacks 'kind'"),
        ([{"provider": "gemini", "id": "x", "label": "X", "kind": "chat", "capabilities": ["telepathy"]}], "capabilities"),
        ([{"provider": "gemini", "id": "x", "label": "X", "kind": "chat", "limits": {"free": {"rpm": 0}}}], "rpm must be"),
        ([{"provider": "gemini", "id": "x", "label": "X", "kind": "chat", "limits": {"gold": {}}}], "keyed by tier"),
        ([{"provider": "local", "id": "x", "label": "X", "kind": "chat"}], "comes from the engine"),
        ([{"provider": "gemini", "id": "x", "label": "X", "kind": "chat"}] * 2, "listed twice"),
    ],
)
def test_a_broken_catalogue_names_the_file_and_the_entry(tmp_path, models, says):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"models": models}))
    with pytest.raises(CatalogueError) as info:
        load_catalogue(path)
    assert says in str(info.value) and str(path) in str(info.value)


def test_unreadable_catalogues_are_one_sentence(tmp_path):
    with pytest.raises(CatalogueError, match="cannot read"):
        load_catalogue(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(CatalogueError, match="not valid JSON"):
        load_catalogue(tmp_path / "bad.json")
    (tmp_path / "zone.json").write_text(json.dumps({"day_resets": {"gemini": "Mars/Olympus"}, "models": []}))
    with pytest.raises(CatalogueError, match="unknown time zone"):
        load_catalogue(tmp_path / "zone.json")

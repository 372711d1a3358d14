"""The UI's Persian catalogue and the assets the page loads, checked without a browser.

* ``.chainlit/translations/fa-IR.json`` has exactly the keys of the installed Chainlit's
  ``en-US.json``, every value translated (Persian letters, not the English text) except a few
  that are the same in every language, with the same ``{{placeholders}}``, and Persian letters
  (ی and ک, not the Arabic ي and ك).
* The committed ``en-US.json`` is the installed Chainlit's with our brand, same keys.
* ``chainlit_fa-IR.md`` is Persian and names every command ``chainlit.md`` names.
* Everything the page's stylesheets and theme point at is served from ``public/``, with the
  fonts' licences beside them.
"""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import chainlit
import pytest

from tests.support.paths import REPO

INSTALLED = Path(chainlit.__file__).parent / "translations" / "en-US.json"
OURS = REPO / ".chainlit" / "translations"
PLACEHOLDER = re.compile(r"\{\{\s*[\w.]+\s*\}\}")
PERSIAN_LETTER = re.compile(r"[\u0600-\u06FF]")
#: Values that are the same in every language: an example address and a keyboard shortcut.
SAME_IN_EVERY_LANGUAGE = {
    "auth.login.form.email.placeholder",  # me@example.com
    "navigation.user.menu.settingsKey",  # the "S" key
}


def _leaves(tree: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_leaves(value, path))
        else:
            out[path] = value
    return out


def _load(path: Path) -> dict[str, str]:
    return _leaves(json.loads(path.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def english() -> dict[str, str]:
    return _load(INSTALLED)


@pytest.fixture(scope="module")
def persian() -> dict[str, str]:
    return _load(OURS / "fa-IR.json")


def test_persian_has_every_key_of_the_installed_chainlit_and_no_other(english, persian):
    assert sorted(set(english) - set(persian)) == [], "missing in fa-IR.json"
    assert sorted(set(persian) - set(english)) == [], "not in Chainlit's en-US.json"


def test_chainlits_own_linter_finds_nothing(english):
    from chainlit.translations import compare_json_structures

    truth = json.loads(INSTALLED.read_text(encoding="utf-8"))
    for name in ("fa-IR.json", "en-US.json"):
        assert compare_json_structures(truth, json.loads((OURS / name).read_text(encoding="utf-8"))) == [], name


def test_every_persian_value_is_translated(english, persian):
    for key, value in persian.items():
        assert isinstance(value, str) and value.strip(), key
        if key in SAME_IN_EVERY_LANGUAGE:
            continue
        assert value != english[key], f"{key} is left in English: {value!r}"
        assert PERSIAN_LETTER.search(value), f"{key} has no Persian letter: {value!r}"


def test_placeholders_are_kept(english, persian):
    for key, value in english.items():
        assert sorted(PLACEHOLDER.findall(persian[key])) == sorted(PLACEHOLDER.findall(value)), key


def test_persian_uses_persian_letters_not_arabic_ones(persian):
    for key, value in persian.items():
        assert not re.search("[يك]", value), f"{key}: Arabic ي/ك instead of Persian ی/ک: {value!r}"
    assert (REPO / "chainlit_fa-IR.md").read_text(encoding="utf-8").count("ي") == 0


def test_committed_english_is_chainlits_with_our_brand(english):
    ours = _load(OURS / "en-US.json")
    assert set(ours) == set(english)
    assert ours["auth.login.title"] == "Sign in to Jarvis Argus"
    changed = {k for k in english if ours[k] != english[k]}
    assert changed <= {"auth.login.title", "navigation.newChat.dialog.description"}, changed


def test_persian_readme_is_persian_and_names_every_command():
    english = (REPO / "chainlit.md").read_text(encoding="utf-8")
    persian = (REPO / "chainlit_fa-IR.md").read_text(encoding="utf-8")
    assert len(PERSIAN_LETTER.findall(persian)) > len(persian) // 3
    commands = set(re.findall(r"`(/[a-z]+)", english))
    assert commands and commands <= set(re.findall(r"`(/[a-z]+)", persian)), commands


def test_config_points_at_our_assets():
    ui = tomllib.loads((REPO / ".chainlit" / "config.toml").read_text(encoding="utf-8"))["UI"]
    for key in ("custom_css", "custom_js", "login_page_image"):
        assert ui[key].startswith("/public/") and (REPO / ui[key].lstrip("/")).is_file(), key
    for theme in ("light", "dark"):
        assert (REPO / "public" / f"logo_{theme}.svg").is_file()
    assert (REPO / "public" / "favicon.svg").is_file()


def test_fonts_are_served_from_this_server_with_their_licences():
    theme = json.loads((REPO / "public" / "theme.json").read_text(encoding="utf-8"))
    assert theme["custom_fonts"], "theme.json's custom_fonts replaces Chainlit's Google Fonts link"
    for href in theme["custom_fonts"]:
        assert href.startswith("/public/"), href
        css = (REPO / href.lstrip("/")).read_text(encoding="utf-8")
        urls = re.findall(r'url\("?([^")]+)"?\)', css)
        assert urls
        for url in urls:
            assert url.startswith("/public/") and (REPO / url.lstrip("/")).is_file(), url
    for family in ("vazirmatn", "inter"):
        licence = (REPO / "public" / "fonts" / family / "OFL.txt").read_text(encoding="utf-8")
        assert "SIL Open Font License" in licence or "SIL OPEN FONT LICENSE" in licence
    for path in (REPO / "public").rglob("*.css"):
        assert not re.search(r"https?://", path.read_text(encoding="utf-8")), f"{path} links off this server"

"""The UI's language and direction as a person meets them in Chromium.

With the browser language fa-IR the login page, the sign-up journey and the chat are Persian
and right to left (sidebar on the right, code left to right); with en-US they stay English and
left to right; each message takes its own text's direction in either UI; and the page asks
nothing of any host but this server. Screenshots (desktop 1280x800 and phone 390x844, both
languages) go to docs/screenshots/ and to the test's tmp dir.
"""
from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.browser.conftest import DESKTOP, KNOWN_OUTSIDE, PHONE
from tests.support.live_server import PASSWORD
from tests.support.paths import REPO

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

TRANSLATIONS = REPO / ".chainlit" / "translations"
FA = json.loads((TRANSLATIONS / "fa-IR.json").read_text(encoding="utf-8"))
EN = json.loads((TRANSLATIONS / "en-US.json").read_text(encoding="utf-8"))
REPLY_TIMEOUT_MS = 300_000  # the model's first load included; the 2 cores are shared

# A paragraph's reading direction as the browser laid it out: where its first and last
# characters are drawn (right of the last for a right-to-left paragraph); null until laid out.
# Only a text mixing both scripts tells the paragraph's direction apart (a purely Persian text
# runs right to left in any paragraph), so the messages below start in one and end in the other.
_READING_DIRECTION = """el => {
  const text = el.firstChild && el.firstChild.nodeType === 3 ? el.firstChild : el;
  const node = text.nodeType === 3 ? text : document.createTreeWalker(el, NodeFilter.SHOW_TEXT).nextNode();
  const r = document.createRange();
  r.setStart(node, 0); r.setEnd(node, 1);
  const first = r.getBoundingClientRect();
  r.setStart(node, node.length - 1); r.setEnd(node, node.length);
  const last = r.getBoundingClientRect();
  if (!first.width || !last.width || first.left === last.left) return null;
  return first.left > last.left ? "rtl" : "ltr";
}"""


def reading_direction(locator, timeout_s: float = 10.0) -> str:
    """``"rtl"`` or ``"ltr"``, as the browser drew the text of ``locator`` (waits for its layout)."""
    deadline = time.monotonic() + timeout_s
    while (found := locator.evaluate(_READING_DIRECTION)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def _page_state(page) -> dict:
    return page.evaluate(
        """() => ({lang: document.documentElement.lang, dir: document.documentElement.dir,
                   direction: getComputedStyle(document.body).direction,
                   font: getComputedStyle(document.body).fontFamily})"""
    )


def _open_login(open_page, base, locale, viewport=DESKTOP):
    page = open_page(locale, viewport)
    page.goto(base + "/login")
    page.wait_for_selector("form input[type=password]")
    page.wait_for_selector("#argus-login-subtitle")
    return page


def _sign_up_and_in(page, base: str, name: str) -> str:
    """Through our sign-up form, then Chainlit's login form; returns the email."""
    email = f"{name.lower()}-{uuid.uuid4().hex[:8]}@example.com"
    page.goto(base + "/signup")
    page.fill("#name", name)
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.fill("#confirm", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/login")
    page.wait_for_selector("form input[type=password]")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("form button[type=submit]")
    page.wait_for_selector("#chat-input")
    return email


def _send(page, text: str):
    """Type and send a message; returns the locator of its bubble's text."""
    page.wait_for_selector("#chat-input:not([disabled])")
    page.fill("#chat-input", text)
    page.keyboard.press("Enter")
    bubble = page.locator("[data-step-type=user_message] [role=article]", has_text=text).last
    bubble.wait_for()
    return bubble


def _wait_for_answers(page, count: int):
    """Until ``count`` assistant answers are shown and the last is complete (no stop button)."""
    page.wait_for_function(
        f"document.querySelectorAll('[data-step-type=assistant_message]').length >= {count}"
        " && !document.querySelector('#stop-button')",
        timeout=REPLY_TIMEOUT_MS,
    )


def _settled_box(page, selector: str, timeout_s: float = 10.0) -> dict:
    """The bounding box of ``selector`` once it stopped moving (sidebar transitions, sheet slide-in)."""
    page.locator(selector).first.wait_for()
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        box = page.locator(selector).first.bounding_box()
        if box is not None and box == last:
            return box
        last = box
        time.sleep(0.3)
    return last


@pytest.mark.parametrize("viewport, label", [(DESKTOP, "desktop"), (PHONE, "phone")])
def test_login_page_is_persian_and_right_to_left_under_fa_IR(live, open_page, shoot, viewport, label):
    page = _open_login(open_page, live.base, "fa-IR", viewport)
    state = _page_state(page)
    assert state["lang"] == "fa-IR" and state["dir"] == "rtl" and state["direction"] == "rtl", state
    assert state["font"].startswith('Vazirmatn'), state
    assert page.locator("h1").inner_text() == FA["auth"]["login"]["title"]
    assert page.locator("label[for=password]").inner_text() == FA["auth"]["login"]["form"]["password"]["label"]
    assert "ثبت‌نام" in page.locator("#argus-signup-link").inner_text()
    assert page.evaluate("getComputedStyle(document.querySelector('form')).direction") == "rtl"
    # e-mail is typed left to right, even in the Persian form
    assert page.evaluate("getComputedStyle(document.querySelector('#email')).direction") == "ltr"
    shoot(page, f"login-fa-{label}", publish=True)


@pytest.mark.parametrize("viewport, label", [(DESKTOP, "desktop"), (PHONE, "phone")])
def test_login_page_stays_english_and_left_to_right_under_en_US(live, open_page, shoot, viewport, label):
    page = _open_login(open_page, live.base, "en-US", viewport)
    state = _page_state(page)
    assert state["lang"] == "en-US" and state["dir"] == "ltr" and state["direction"] == "ltr", state
    assert page.locator("h1").inner_text() == EN["auth"]["login"]["title"] == "Sign in to Jarvis Argus"
    assert page.locator("#argus-signup-link").inner_text().startswith("No account?")
    assert page.locator("#argus-login-subtitle").inner_text().startswith("Your private assistant")
    shoot(page, f"login-en-{label}", publish=True)


def test_the_brand_replaces_chainlits_logo_and_favicon(live, open_page):
    page = open_page("en-US")
    for path, kind in (("/logo?theme=light", "svg"), ("/logo?theme=dark", "svg"), ("/favicon", "svg")):
        r = page.request.get(live.base + path)
        assert r.ok and kind in r.headers["content-type"], (path, r.headers)
        assert b"Jarvis Argus" in r.body(), path
    page.goto(live.base + "/login")
    assert page.title() == "Jarvis Argus"


def test_sign_up_then_sign_in_lands_on_a_persian_right_to_left_chat(live, open_page, shoot):
    page = open_page("fa-IR")
    _sign_up_and_in(page, live.base, "Dariush")
    assert page.get_attribute("#chat-input", "placeholder") == FA["chat"]["input"]["placeholder"]
    state = _page_state(page)
    assert state["dir"] == "rtl" and state["direction"] == "rtl", state
    sidebar = _settled_box(page, "[data-sidebar=sidebar]")
    assert sidebar and sidebar["x"] > DESKTOP["width"] / 2, f"sidebar not on the right: {sidebar}"

    # An English message in the Persian UI still reads left to right; a Persian one right to left.
    english = _send(page, "Hello there, how are you? سلام")
    assert reading_direction(english) == "ltr"
    _wait_for_answers(page, 1)
    persian = _send(page, "سلام، حالت چطور است؟ OK")
    assert reading_direction(persian) == "rtl"
    _wait_for_answers(page, 2)
    shoot(page, "chat-fa-desktop", publish=True)

    page.set_viewport_size(PHONE)
    page.wait_for_timeout(500)
    assert _page_state(page)["dir"] == "rtl"
    shoot(page, "chat-fa-phone", publish=True)
    # On a phone the sidebar is a sheet: it opens from the right edge.
    page.click("#sidebar-trigger-button")
    box = _settled_box(page, "[data-mobile=true][data-sidebar=sidebar]")
    assert box and abs(box["x"] + box["width"] - PHONE["width"]) < 2, f"sheet not at the right edge: {box}"
    shoot(page, "sidebar-fa-phone", publish=True)


def test_the_english_chat_stays_left_to_right_and_shows_a_persian_message_right_to_left(live, open_page, shoot):
    page = open_page("en-US")
    _sign_up_and_in(page, live.base, "Emma")
    assert page.get_attribute("#chat-input", "placeholder") == EN["chat"]["input"]["placeholder"]
    state = _page_state(page)
    assert state["dir"] == "ltr" and state["direction"] == "ltr", state
    sidebar = _settled_box(page, "[data-sidebar=sidebar]")
    assert sidebar and sidebar["x"] < DESKTOP["width"] / 2, f"sidebar not on the left: {sidebar}"

    persian = _send(page, "کتاب خوبی برای خواندن پیشنهاد بده, please")
    assert reading_direction(persian) == "rtl"
    font = persian.evaluate("el => getComputedStyle(el).fontFamily")
    assert font.startswith('"Vazirmatn Arabic"'), font
    _wait_for_answers(page, 1)
    shoot(page, "chat-en-desktop", publish=True)

    page.set_viewport_size(PHONE)
    page.wait_for_timeout(500)
    shoot(page, "chat-en-phone", publish=True)


def test_code_stays_left_to_right_in_the_persian_ui(live, open_page):
    page = open_page("fa-IR")
    page.goto(live.base + "/login")
    page.wait_for_selector("form")
    page.wait_for_function("document.documentElement.dir === 'rtl'")
    page.evaluate("""() => {
        const pre = document.createElement('pre'); pre.id = 'probe';
        pre.innerHTML = '<code>x = 1  # تست</code>'; document.body.appendChild(pre);
    }""")
    assert page.evaluate("getComputedStyle(document.querySelector('#probe code')).direction") == "ltr"


def test_the_page_asks_nothing_outside_this_server(live, open_page, outside):
    page = open_page("fa-IR")
    page.goto(live.base + "/login")
    page.wait_for_selector("form input[type=password]")
    page.wait_for_load_state("networkidle")
    assert not outside.urls, f"the page asked outside this server: {outside.urls}"

"""A real Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright) against a real
``chainlit run app.py`` on a loopback port, with the real model.

* :func:`live` starts one server for the module (``tests/support/live_server``'s
  :func:`serve` and :func:`history_env`, plus ``chainlit_fa-IR.md`` in its private app root).
* :func:`chromium` launches the browser once per module: ``executable_path`` is Debian's
  Chromium, ``--no-sandbox`` because CI runs as root; nothing is ever downloaded
  (``playwright install`` is never run). Without Playwright or ``/usr/bin/chromium`` the
  tests are skipped with the command that installs them (``.ci/run`` does).
* :func:`open_page` opens a page with a browser language (``locale``) and a viewport. Every
  request the page makes goes through a route: requests to 127.0.0.1 / localhost / ::1 go on,
  any other is aborted and counted, and the test fails at teardown if one was made
  (:data:`KNOWN_OUTSIDE` excepted, each tracked by a strict xfail test).
* Screenshots: :func:`shoot` writes ``<name>.png`` into the test's tmp dir (a test artefact)
  and, when asked, into ``docs/screenshots/``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional
from urllib.parse import urlsplit

import pytest

from tests.support.live_server import Server, history_env, serve
from tests.support.paths import REPO

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = REPO / "docs" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}

#: Outside requests the page may still make, each with its reason (none today). Tolerated by the
#: journeys; test_the_page_asks_nothing_outside_this_server fails on any outside request at all.
KNOWN_OUTSIDE: set[str] = set()  # argus/page.py strips Chainlit's CDN links from the page


def _is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about", "chrome-extension"):
        return True
    return (parts.hostname or "") in LOOPBACK


@dataclass
class Outside:
    """Requests (and WebSockets) the pages of one test tried to send off this machine."""

    urls: list[str] = field(default_factory=list)

    def unexpected(self) -> list[str]:
        return [u for u in self.urls if u not in KNOWN_OUTSIDE]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Server]:
    """``chainlit run app.py`` for the module's tests (real model, private data and app root)."""
    tmp = tmp_path_factory.mktemp("browser_server")
    env = history_env(tmp)
    shutil.copy(REPO / "chainlit_fa-IR.md", Path(env["CHAINLIT_APP_ROOT"]) / "chainlit_fa-IR.md")
    with serve(tmp, env) as srv:
        yield srv


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium under Playwright (skipped, with the fix, when either is missing)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-dev.txt")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def outside() -> Iterator[Outside]:
    """The outside requests of this test's pages; the test fails if one is not known."""
    seen = Outside()
    yield seen
    assert not seen.unexpected(), f"the page sent requests off this machine: {seen.unexpected()}"


@pytest.fixture
def open_page(chromium, outside) -> Iterator[Callable]:
    """``open_page(locale, viewport=DESKTOP)``: a page in a fresh context (own cookies)."""
    contexts = []

    def _open(locale: str, viewport: Optional[dict] = None):
        ctx = chromium.new_context(locale=locale, viewport=viewport or DESKTOP)
        contexts.append(ctx)

        def route(r):
            if _is_loopback(r.request.url):
                r.continue_()
            else:
                outside.urls.append(r.request.url)
                r.abort("blockedbyclient")

        ctx.route("**/*", route)
        page = ctx.new_page()
        page.on("websocket", lambda ws: None if _is_loopback(ws.url) else outside.urls.append(ws.url))
        page.set_default_timeout(30_000)
        return page

    yield _open
    for ctx in contexts:
        with contextlib.suppress(Exception):
            ctx.close()


@pytest.fixture
def shoot(tmp_path) -> Callable:
    """``shoot(page, name, publish=False)``: a full-viewport PNG in tmp_path (and docs/screenshots)."""

    def _shoot(page, name: str, publish: bool = False) -> Path:
        path = tmp_path / f"{name}.png"
        page.screenshot(path=str(path))
        if publish:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, SCREENSHOTS / f"{name}.png")
        return path

    return _shoot

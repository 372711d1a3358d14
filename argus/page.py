"""The page the browser loads: nothing fetched from outside this server, the UI language.

Chainlit 2.12's ``frontend/dist/index.html`` links KaTeX's stylesheet from cdn.jsdelivr.net and
preconnects to Google Fonts unconditionally (outside any placeholder ``config.toml`` can
replace). On a firewalled LAN that makes the page slow or broken, and it tells a third party
who opens the app. :func:`install_local_page` wraps Chainlit's ``get_html_template`` (which its
catch-all route looks up by name on every request) so every ``<link>`` to another origin is
dropped; fonts are served from ``public/fonts`` (``public/theme.json``), and LaTeX rendering is
off (``latex = false`` in ``.chainlit/config.toml``), so nothing needs KaTeX's CSS.

``ARGUS_UI_LANGUAGE`` (e.g. ``fa-IR``, ``en-US``; empty = the browser's language) forces the
language of Chainlit's interface for everyone (Chainlit's ``config.ui.language``).
"""
from __future__ import annotations

import os
import re

from argus.config import ConfigError

#: A ``<link ...>`` element whose href points at another origin (http:, https: or protocol-relative).
_OUTSIDE_LINK = re.compile(r"""<link\b[^>]*\bhref\s*=\s*["'](?:https?:)?//[^"']*["'][^>]*/?>\s*""", re.I | re.S)
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Z]{2})?$")


class UiLanguageError(ConfigError):
    """``ARGUS_UI_LANGUAGE`` is not a language code like ``fa-IR`` or ``en-US``."""


def strip_outside_links(html: str) -> str:
    """``html`` without ``<link>`` elements that load from another origin (stylesheets,
    preconnects); links to this server's own paths are kept."""
    return _OUTSIDE_LINK.sub("", html)


def install_local_page() -> None:
    """Serve Chainlit's page without outside links, and apply ``ARGUS_UI_LANGUAGE``.

    Idempotent. Raises UiLanguageError for a malformed ``ARGUS_UI_LANGUAGE``.
    """
    import chainlit.server as server
    from chainlit.config import config

    language = os.environ.get("ARGUS_UI_LANGUAGE", "").strip()
    if language:
        if not _LANGUAGE.match(language):
            raise UiLanguageError(f"ARGUS_UI_LANGUAGE must be a language code like fa-IR or en-US, not {language!r}")
        config.ui.language = language
    original = server.get_html_template
    if getattr(original, "argus_local", False):
        return

    def local_html_template(root_path):
        return strip_outside_links(original(root_path))

    local_html_template.argus_local = True
    server.get_html_template = local_html_template

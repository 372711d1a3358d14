"""argus/page.py: the page Chainlit serves asks nothing outside this server; ARGUS_UI_LANGUAGE."""
import pytest

from argus.page import UiLanguageError, install_local_page, strip_outside_links


def test_outside_links_are_dropped_and_own_links_kept():
    html = ('<link rel="preconnect" href="https://fonts.googleapis.com" />\n'
            '<link\n  rel="stylesheet"\n  href="https://cdn.jsdelivr.net/npm/katex@0.16.22/dist/katex.min.css"\n/>\n'
            '<link rel="stylesheet" href="//cdn.example/x.css">'
            '<link rel="stylesheet" href="/public/argus.css">')
    assert strip_outside_links(html) == '<link rel="stylesheet" href="/public/argus.css">'


def test_chainlits_real_page_has_no_outside_link_once_installed(monkeypatch):
    import chainlit.server as server

    monkeypatch.setattr(server, "get_html_template", server.get_html_template)  # undone after the test
    monkeypatch.delenv("ARGUS_UI_LANGUAGE", raising=False)
    before = server.get_html_template("")
    assert "cdn.jsdelivr.net" in before  # Chainlit's page as shipped: the reason this module exists
    install_local_page()
    after = server.get_html_template("")
    assert "jsdelivr" not in after and "fonts.googleapis.com" not in after and "<script" in after


def test_ui_language_is_forced_or_refused(monkeypatch):
    import chainlit.server as server
    from chainlit.config import config

    monkeypatch.setattr(server, "get_html_template", server.get_html_template)
    monkeypatch.setattr(config.ui, "language", None)
    monkeypatch.setenv("ARGUS_UI_LANGUAGE", "fa-IR")
    install_local_page()
    assert config.ui.language == "fa-IR"
    monkeypatch.setenv("ARGUS_UI_LANGUAGE", "farsi please")
    with pytest.raises(UiLanguageError, match="ARGUS_UI_LANGUAGE"):
        install_local_page()

"""A logging filter that keeps API keys out of every log line, whoever logs it.

Our own code logs fingerprints only; this is the second line of defence for
third-party libraries (SDKs and HTTP clients logging a URL or an error body).
``install`` adds it to the root logger's handlers; every record passing them is
formatted once and any key the pool knows is replaced by its fingerprint (any
other key-like string by ``…``, see ``argus.providers.base.scrub``).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable


class RedactKeys(logging.Filter):
    """Rewrites each record's message with ``secrets()`` scrubbed out (never drops a record)."""

    def __init__(self, scrub: Callable[[str], str]):
        super().__init__("argus-redact-keys")
        self._scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a broken format string: let the handler report it as usual
            return True
        clean = self._scrub(text)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._scrub(record.exc_text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


def install(scrub: Callable[[str], str], handlers: Iterable[logging.Handler] = ()) -> RedactKeys:
    """Add one :class:`RedactKeys` to ``handlers`` (default: the root logger's) and return it."""
    f = RedactKeys(scrub)
    for h in list(handlers) or logging.getLogger().handlers:
        if not any(isinstance(x, RedactKeys) for x in h.filters):
            h.addFilter(f)
    return f

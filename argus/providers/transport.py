"""Small helpers shared by the providers: transport errors and ``Retry-After`` headers.

The SDKs talk HTTP through ``httpx2`` (the httpx fork google-genai, openai and
anthropic now use), our own REST calls through ``httpx``; a dropped connection
or a timeout surfaces as a transport error of either, which every provider maps
to ``network_error``.
"""
from __future__ import annotations

import email.utils
import time
from typing import Any, Mapping, Optional

import httpx

try:  # the SDKs' HTTP library; absent only in unusual installs
    import httpx2
except ImportError:  # pragma: no cover
    httpx2 = None  # type: ignore[assignment]

#: Exceptions meaning "no (complete) answer came over the wire": connect/read
#: failures, timeouts, a connection closed mid-response.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (httpx.TransportError,) + (
    (httpx2.TransportError,) if httpx2 is not None else ()
)


def retry_after_s(headers: Optional[Mapping[str, Any]], *, now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or an
    HTTP date), or None when absent or unreadable. Never negative."""
    if not headers:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))

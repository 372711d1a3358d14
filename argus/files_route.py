"""``GET /argus/files/{attachment_id}``: a stored attachment (an uploaded image), for its owner only.

Resumed threads show their images through this route (see
``argus.datalayer.file_url``). The caller is the user of the request's
Chainlit session token (the ``access_token`` cookie the browser sends, or a
``Bearer`` header), checked exactly like Chainlit checks it (signature,
expiry) and then looked up by email in the store; the store's owner check
does the rest:

* no or invalid token: ``401``;
* missing attachment, or someone else's: ``404`` (indistinguishable);
* store down: ``503``.

The answer is the stored bytes with the stored MIME type (detected by
decoding the upload, never the browser's claim), ``nosniff``, a sandboxing
CSP and ``Cache-Control: private, no-cache`` (so a deleted conversation's
images are not served from a shared cache).

Chainlit's single-page app has a catch-all ``GET /{full_path:path}`` route,
so :func:`install_file_route` puts this route at the *front* of the router
(idempotent, like ``argus.signup``).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable
from urllib.parse import quote

from fastapi import APIRouter, Request, Response

from argus.datalayer import FILES_PATH, ArgusDataLayer, token_from_scope
from argus.store.base import NotFound, StoreError

log = logging.getLogger(__name__)

#: Route name (deliberately not starting with ``argus_``: argus.signup replaces those).
ROUTE_NAME = "jarvis_argus_files"


def _plain(status: int, text: str) -> Response:
    return Response(text, status_code=status, media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-store"})


def install_file_route(get_data_layer: Callable[[], ArgusDataLayer], app=None) -> None:
    """Register ``GET <root>/argus/files/{attachment_id}`` ahead of Chainlit's catch-all.

    Args:
        get_data_layer: returns the data layer (its store and user lookup are used).
        app: the FastAPI app; default ``chainlit.server.app``.
    """
    from chainlit.config import config

    if app is None:
        from chainlit.server import app
    router = APIRouter(prefix=config.run.root_path or "")

    async def get_file(attachment_id: str, request: Request) -> Response:
        layer = get_data_layer()
        try:
            caller = await layer.caller_from_token(token_from_scope(request.scope))
        except StoreError:
            log.exception("file route: store error")
            return _plain(503, "The database cannot be reached right now.")
        if caller is None:
            return _plain(401, "Sign in to see this file.")
        try:
            att, data = await asyncio.to_thread(layer.store.get_attachment, attachment_id, caller.user_id)
        except NotFound:
            return _plain(404, "Not found.")
        except StoreError:
            log.exception("file route: store error")
            return _plain(503, "The database cannot be reached right now.")
        disposition = "inline" if att.mime.startswith("image/") else "attachment"
        return Response(
            data,
            media_type=att.mime,
            headers={
                "Content-Disposition": f"{disposition}; filename*=UTF-8''{quote(att.name, safe='')}",
                "Cache-Control": "private, no-cache",
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; sandbox",
            },
        )

    router.add_api_route(FILES_PATH + "{attachment_id}", get_file, methods=["GET"], name=ROUTE_NAME, include_in_schema=False)
    routes = app.router.routes
    routes[:] = [r for r in routes if getattr(r, "name", None) != ROUTE_NAME]
    routes[0:0] = router.routes

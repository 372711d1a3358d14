"""Jarvis Argus — the Chainlit app. Run: ``chainlit run app.py``.

Thin on purpose: every hook forwards to :class:`argus.chat.hooks.JarvisArgus`.
A configuration problem at start-up (bad ``ARGUS_*`` value, weak
``JWT_SECRET_KEY``, malformed ``MONGO_URI``, unusable data directory) ends the
process with one line on stderr and exit status 1, without a traceback.

A MongoDB server that is down (or refuses us) is not a configuration problem:
the server starts anyway with one WARNING line in the log; sign-in and sign-up
answer 503 and the chat answers "storage unavailable" until the database is back.
"""
import os

os.umask(0o077)  # first: uploads (.files/), the database and everything else we write are owner-only

import contextlib  # noqa: E402
import logging  # noqa: E402
from typing import Optional  # noqa: E402

import chainlit as cl  # noqa: E402
from chainlit.config import FILES_DIRECTORY  # noqa: E402

from argus.auth import AuthSecretError, ensure_auth_secret  # noqa: E402
from argus.config import ConfigError, Settings  # noqa: E402
from argus.chat.hooks import RETRY_ACTION, JarvisArgus  # noqa: E402
from argus.datalayer import ArgusDataLayer, install_caller_middleware  # noqa: E402
from argus.files_route import install_file_route  # noqa: E402
from argus.keys.redact import install as redact_keys  # noqa: E402
from argus.limits import install_body_limits  # noqa: E402
from argus.origins import restrict_origins  # noqa: E402
from argus.page import install_local_page  # noqa: E402
from argus.quotas import install_upload_quota, session_ended  # noqa: E402
from argus.signup import install_signup_routes  # noqa: E402
from argus.store import StoreUnavailable, check_store  # noqa: E402

log = logging.getLogger("argus.app")


def _start() -> tuple[Settings, JarvisArgus]:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("argus", "worker"):  # basicConfig is a no-op once Chainlit has configured logging
        logging.getLogger(name).setLevel(settings.log_level)
    ensure_auth_secret(settings)  # sets CHAINLIT_AUTH_SECRET before Chainlit checks it
    with contextlib.suppress(OSError):  # Chainlit made it before this module ran, with the old umask
        FILES_DIRECTORY.chmod(0o700)
    install_local_page()  # no CDN links in the page; ARGUS_UI_LANGUAGE
    restrict_origins()  # CORS and socket.io: CHAINLIT_URL's origin, or this host/port only
    install_body_limits(settings.max_upload_bytes)  # 413 before Chainlit reads an oversized body
    install_upload_quota(settings.max_upload_bytes)  # per-session and per-user upload caps (ARGUS_UPLOAD_*)
    argus = JarvisArgus(settings)
    redact_keys(argus.remote.pool.scrub)  # no log line shows an API key, whoever writes it
    if (problem := check_store(argus.store)) is not None:  # MongoDB down: serve anyway, say so once
        log.warning("%s", problem)
    argus.start()  # loads the model in the background
    install_signup_routes(lambda: argus.auth)
    install_caller_middleware()  # the data layer learns who calls Chainlit's REST API
    install_file_route(lambda: argus.data_layer)  # images of resumed threads, owner only
    return settings, argus


try:
    settings, argus = _start()
except (ConfigError, AuthSecretError, StoreUnavailable) as _exc:  # StoreUnavailable: SQLite only
    raise SystemExit(f"Jarvis Argus cannot start: {_exc}") from None


@cl.data_layer
def data_layer() -> ArgusDataLayer:
    return argus.data_layer


@cl.password_auth_callback
async def password_auth(username: str, password: str) -> Optional[cl.User]:
    return await argus.password_auth(username, password)


@cl.on_chat_start
async def on_chat_start() -> None:
    await argus.on_chat_start()


@cl.on_chat_resume
async def on_chat_resume(thread: cl.types.ThreadDict) -> None:
    await argus.on_chat_resume(thread)


@cl.on_message
async def on_message(message: cl.Message) -> None:
    await argus.on_message(message)


@cl.on_chat_end
async def on_chat_end() -> None:
    await session_ended()  # a disconnected session's uploads leave the disk (ARGUS_UPLOAD_KEEP_S)


@cl.on_stop
async def on_stop() -> None:
    await argus.on_stop()


@cl.on_settings_update
async def on_settings_update(settings: dict) -> None:
    await argus.on_settings_update(settings)


@cl.action_callback(RETRY_ACTION)
async def on_retry(action: cl.Action) -> None:
    await argus.on_retry(action)

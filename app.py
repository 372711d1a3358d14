"""Jarvis Argus — the Chainlit app. Run: ``chainlit run app.py``.

Thin on purpose: every hook forwards to :class:`argus.core.JarvisArgus`.
"""
import logging
from typing import Optional

import chainlit as cl

from argus.auth import ensure_auth_secret
from argus.config import Settings
from argus.core import JarvisArgus
from argus.signup import install_signup_routes

settings = Settings.from_env()
logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
for _name in ("argus", "worker"):  # basicConfig is a no-op once Chainlit has configured logging
    logging.getLogger(_name).setLevel(settings.log_level)
ensure_auth_secret(settings)  # sets CHAINLIT_AUTH_SECRET before Chainlit checks it
argus = JarvisArgus(settings)
argus.start()  # loads the model in the background
install_signup_routes(lambda: argus.auth)


@cl.password_auth_callback
async def password_auth(username: str, password: str) -> Optional[cl.User]:
    return await argus.password_auth(username, password)


@cl.on_chat_start
async def on_chat_start() -> None:
    await argus.on_chat_start()


@cl.on_message
async def on_message(message: cl.Message) -> None:
    await argus.on_message(message)


@cl.on_stop
async def on_stop() -> None:
    await argus.on_stop()

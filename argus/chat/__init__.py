"""The chat server behind the Chainlit hooks (``app.py`` -> :class:`argus.chat.hooks.JarvisArgus`)."""

"""Every sentence the chat says to its users, in one place.

Constants are shown as they are; functions fill in a number or a name. Marks
(``STOPPED_MARK``, ``INTERRUPTED_MARK``) are appended to an answer's text, live and
stored. The data layer's own sentences (``EMPTY_ANSWER``, ``GENERATION_FAILED``,
``STOPPED_MARK``) are re-exported from :mod:`argus.datalayer`.
"""
from __future__ import annotations

import re
from typing import Optional

from argus.catalogue import ModelSpec
from argus.datalayer import EMPTY_ANSWER, GENERATION_FAILED, STOPPED_MARK
from argus.keys import Lease
from worker.protocol.units import format_wait

#: Longest chat message accepted, in characters (Chainlit itself takes ~1 MB).
MAX_MESSAGE_CHARS = 16_000

TEXT_ONLY_NOTICE = "The local model reads text only; I stored your image and answered the text."
TEXT_ONLY_NOTICE_NO_TEXT = "The local model reads text only; I stored your image. Add some text to get an answer."
IMAGE_NEEDS_TEXT = "I stored your image; send a question about it to get an answer."
#: How an answer cut off by a provider failure is marked (live and stored); the user can retry.
INTERRUPTED_MARK = "_(interrupted: the connection to the model failed; press Retry or send your message again)_"
STORE_DOWN = "I can't reach the database right now, so nothing was saved; please try again in a moment."
SIGNED_OUT = "Your session has no signed-in user; please sign in again."
ACCOUNT_GONE = "Your account no longer exists; please sign in again."
CONVERSATION_GONE = "That conversation is no longer available; send your message again to start a new one."
EMPTY_MESSAGE = "Send some text (or an image) and I'll answer."
WAITING_FOR_SLOT = "_Other answers are being generated right now; yours starts as soon as one finishes…_"
NOT_SAVED = "The answer could not be saved."
RETRY_GONE = "That message is not in this conversation any more, so it cannot be retried; send it again."
#: The model asked for by a message whose history is gone (a back-end cannot start).
MESSAGE_NOT_FOUND = "the message to answer was not found"


def text_only_notice(model_name: str, has_text: bool) -> str:
    """The note for an image sent to a model that reads text only (``"The local model"``…)."""
    if has_text:
        return f"{model_name} reads text only; I stored your image and answered the text."
    return f"{model_name} reads text only; I stored your image. Add some text to get an answer."


def upload_not_accepted(names: list[str], why: str) -> str:
    """Files of a message refused by an upload quota (``why``: the quota's sentence)."""
    return f"Not accepted: {', '.join(names)}. {why}"


def fallback_notice(spec: ModelSpec, why: str) -> str:
    """The note shown when a remote model cannot answer and the local model does instead."""
    return f"_{spec.label} cannot answer right now ({why.rstrip('.')}), so the local model answers instead._"


def invalid_key_notice(lease: Lease) -> str:
    """What administrators are told when the provider rejected a key (fingerprint only)."""
    return (
        f"⚠️ The {lease.provider} API key {lease.fingerprint} was rejected as invalid and is now disabled. "
        f"Check it, then `/keys enable {lease.provider}:{lease.fingerprint}` or `/keys remove` it."
    )


def invalid_keys_listed(listed: str) -> str:
    """What an administrator's new chat says about keys the providers rejected earlier."""
    return f"⚠️ API keys rejected by their provider and disabled: {listed}. See `/keys list`."


def too_long_message(chars: int) -> str:
    """The one sentence refusing a message of ``chars`` characters."""
    return (
        f"Your message is too long ({chars:,} characters; the limit is {MAX_MESSAGE_CHARS:,}), "
        "so I did not save or answer it; please shorten it and send it again."
    )


def rate_limit_message(what: str, per_minute: int, retry_after_s: float) -> str:
    """One sentence: the limit on ``what`` ("messages", "commands") and how long to wait."""
    return (
        f"You're sending {what} too fast (limit: {per_minute} per minute); "
        f"please wait {format_wait(retry_after_s)} and try again."
    )


def marked(text: str, mark: str) -> str:
    """``text`` followed by ``mark`` on its own paragraph, or ``mark`` alone for blank text."""
    return f"{text}\n\n{mark}" if text.strip() else mark


# ---- What the answers can be worth (issue 12: the token limit, the local model's languages) ----
#: How an answer cut by the max-new-tokens limit ends (live and stored, after a blank line);
#: ``token_limit_mark(512)``. :data:`TOKEN_LIMIT_MARK_RE` finds it again.
def token_limit_mark(limit: int) -> str:
    """The note under an answer that the ``limit``-token limit cut (not the context window,
    which has its own notice)."""
    return f"_(cut at the {limit:,}-token limit; ask me to continue)_"


TOKEN_LIMIT_MARK_RE = re.compile(r"\n\n_\(cut at the [\d,]+-token limit; ask me to continue\)_\Z")


def without_token_limit_mark(text: str) -> str:
    """``text`` less a trailing :func:`token_limit_mark` (what the model is given back as its
    own earlier answer: the note is for the reader, not part of what the model wrote)."""
    return TOKEN_LIMIT_MARK_RE.sub("", text)


def weak_persian_notice(remote_label: Optional[str]) -> str:
    """Said once per conversation when someone writes Persian (or Arabic script) to the local
    model; ``remote_label``: a remote chat model that has a key (suggested), or None."""
    if remote_label:
        english = f"For Persian, pick **{remote_label}** with `/model` (or in the settings panel)."
        persian = f"برای فارسی، **{remote_label}** را با ‎`/model`‎ انتخاب کنید."
    else:
        english = ("For Persian, an administrator can add an API key for a remote model "
                   "or run a larger model on a worker network.")
        persian = "برای فارسی، مدیر سرور می‌تواند کلید یک مدل راه دور را اضافه کند."
    return (
        "_The local model (a small English-only model) writes Persian poorly: its answers in "
        f"Persian are mostly wrong or meaningless. {english}_\n\n"
        f"_مدل محلی فارسی را خوب نمی‌فهمد و پاسخ‌هایش به فارسی بیشتر نادرست یا بی‌معنی است. {persian}_"
    )


__all__ = [
    "ACCOUNT_GONE", "CONVERSATION_GONE", "EMPTY_ANSWER", "EMPTY_MESSAGE", "GENERATION_FAILED", "IMAGE_NEEDS_TEXT",
    "INTERRUPTED_MARK", "MAX_MESSAGE_CHARS", "MESSAGE_NOT_FOUND", "NOT_SAVED", "RETRY_GONE", "SIGNED_OUT",
    "STOPPED_MARK", "STORE_DOWN", "TEXT_ONLY_NOTICE", "TEXT_ONLY_NOTICE_NO_TEXT", "WAITING_FOR_SLOT",
    "fallback_notice", "invalid_key_notice", "invalid_keys_listed", "marked", "rate_limit_message",
    "text_only_notice", "too_long_message", "upload_not_accepted",
    "TOKEN_LIMIT_MARK_RE", "token_limit_mark", "weak_persian_notice", "without_token_limit_mark",
]

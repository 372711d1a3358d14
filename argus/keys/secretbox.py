"""Encryption at rest of the API keys an admin adds in the app (AES-256-GCM).

The server secret is ``ARGUS_SECRET_KEY`` (at least :data:`MIN_SECRET_CHARS`
characters). When it is unset, one is generated on first start into
``<data dir>/secret_key`` (``secrets.token_urlsafe(48)``, created with
``O_EXCL`` and mode 0600) and reused, exactly as the sign-in secret is
(``argus.auth.ensure_auth_secret``). Every server process sharing a database
must use the same secret: set ``ARGUS_SECRET_KEY`` when they do not share the
data directory.

Two 256-bit keys are derived from the secret with HKDF-SHA256 (distinct
``info`` strings): one for AES-256-GCM, one for HMAC-SHA256 digests that give
each API key a stable id without storing anything that reveals it.

A sealed value is ``b"\\x01" + 12-byte random nonce + ciphertext-with-tag``;
the caller's ``aad`` (the key's id and provider) is authenticated with it, so a
ciphertext copied onto another record does not open.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger(__name__)

SECRET_FILE = "secret_key"
MIN_SECRET_CHARS = 32
VERSION = b"\x01"
NONCE_BYTES = 12


class SecretKeyError(Exception):
    """``ARGUS_SECRET_KEY`` (or the generated secret file) is unusable; the message says why
    and never contains the secret."""


class SealedKeyError(Exception):
    """A sealed value does not open: damaged, or sealed under another server secret."""


def _derive(secret: str, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret.encode("utf-8"))


class SecretBox:
    """Seals and opens short secrets (API keys) with the server secret.

    Args:
        secret: the server secret (at least :data:`MIN_SECRET_CHARS` characters).

    Raises:
        SecretKeyError: the secret is too short.
    """

    def __init__(self, secret: str):
        if len(secret) < MIN_SECRET_CHARS:
            raise SecretKeyError(
                f"ARGUS_SECRET_KEY must be at least {MIN_SECRET_CHARS} characters; "
                'generate one with: python -c "import secrets; print(secrets.token_urlsafe(48))"'
            )
        self._aead = AESGCM(_derive(secret, b"jarvis-argus api keys v1: aes-256-gcm"))
        self._mac = _derive(secret, b"jarvis-argus api keys v1: key ids")

    def __repr__(self) -> str:
        return "SecretBox(<secret>)"

    def seal(self, plaintext: str, aad: bytes) -> bytes:
        """``plaintext`` encrypted and authenticated together with ``aad``."""
        nonce = os.urandom(NONCE_BYTES)
        return VERSION + nonce + self._aead.encrypt(nonce, plaintext.encode("utf-8"), aad)

    def open(self, sealed: bytes, aad: bytes) -> str:
        """The plaintext of :meth:`seal`'s output.

        Raises:
            SealedKeyError: wrong version, damaged, another ``aad``, or another secret.
        """
        if len(sealed) < 1 + NONCE_BYTES + 16 or sealed[:1] != VERSION:
            raise SealedKeyError("the stored key is damaged or of an unknown format")
        try:
            data = self._aead.decrypt(sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :], aad)
        except InvalidTag:
            raise SealedKeyError(
                "the stored key does not open with this server's secret (ARGUS_SECRET_KEY changed, or the data was altered)"
            ) from None
        return data.decode("utf-8")

    def digest(self, text: str) -> str:
        """HMAC-SHA256 of ``text`` under the server secret, as hex (reveals nothing about ``text``)."""
        return hmac.new(self._mac, text.encode("utf-8"), hashlib.sha256).hexdigest()


def load_secret(data_dir: Path, configured: Optional[str]) -> str:
    """The server secret: ``configured`` (``ARGUS_SECRET_KEY``) when set, else the one in
    ``<data_dir>/secret_key``, generated there (mode 0600) on first use.

    Raises:
        SecretKeyError: too short, or the file cannot be created or read.
    """
    if configured:
        if len(configured) < MIN_SECRET_CHARS:
            raise SecretKeyError(f"ARGUS_SECRET_KEY must be at least {MIN_SECRET_CHARS} characters.")
        return configured
    path = Path(data_dir) / SECRET_FILE
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return _read_secret(path)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secret + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise SecretKeyError(f"Cannot create the API-key secret file {path}: {exc.strerror}.") from exc
    log.info(
        "Generated a new secret for stored API keys in %s (mode 0600). Keep it private and back it up with the "
        "database; set ARGUS_SECRET_KEY to manage it yourself.",
        path,
    )
    return secret


def _read_secret(path: Path) -> str:
    # Another process may have created the file a moment ago and still be writing it.
    for _ in range(20):
        try:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
                log.warning("The API-key secret file %s was readable by others; its mode is now 0600.", path)
            secret = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretKeyError(f"Cannot read the API-key secret file {path}: {exc}.") from None
        if secret:
            if len(secret) < MIN_SECRET_CHARS:
                raise SecretKeyError(
                    f"The API-key secret in {path} is shorter than {MIN_SECRET_CHARS} characters; "
                    "set ARGUS_SECRET_KEY, or restore the file (a new one makes stored keys unreadable)."
                )
            return secret
        time.sleep(0.05)
    raise SecretKeyError(f"The API-key secret file {path} is empty; delete it to generate a new one.")


def open_box(data_dir: Path, configured: Optional[str]) -> SecretBox:
    """The :class:`SecretBox` of this server (see :func:`load_secret`). Raises SecretKeyError."""
    return SecretBox(load_secret(data_dir, configured))

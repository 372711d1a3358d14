"""Accounts: password hashing, the sign-in secret, login throttling, sign-up and password change.

Passwords are hashed with bcrypt. bcrypt only looks at the first 72 bytes of
a password, so longer passwords are refused instead of silently truncated.

All methods here are blocking (bcrypt takes ~0.25 s at the default cost and
the store does disk I/O): call them via ``asyncio.to_thread`` from async code.
Nothing in this module logs a password, a hash or the secret.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import time
import unicodedata
from pathlib import Path
from typing import Callable, Optional

import bcrypt

from argus.config import Settings
from argus.ratelimit import SlidingWindowLimiter
from argus.store import NotFound, Store, StoreUnavailable, User, UserExists
from worker.protocol.units import format_wait

log = logging.getLogger(__name__)

MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_BYTES = 72  # bcrypt ignores everything after this
MAX_NAME_CHARS = 80
MAX_EMAIL_CHARS = 254
DEFAULT_BCRYPT_ROUNDS = 12
SECRET_FILE = "auth_secret"
MIN_SECRET_CHARS = 32
_SECRET_HINT = "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+")
#: Progressive sign-in delay per email: recent failures for an email before any delay, the
#: first delay (seconds) and its ceiling; each further failure doubles it.
LOGIN_DELAY_AFTER_FAILURES = 3
LOGIN_DELAY_BASE_S = 0.25
LOGIN_DELAY_MAX_S = 4.0


class AuthError(Exception):
    """Base class; ``str(exc)`` is a sentence that can be shown to the user."""


class PasswordPolicyError(AuthError, ValueError):
    """The password is too short or too long (message says which)."""


class SignupError(AuthError):
    """Sign-up refused; ``message`` is a user-facing sentence."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class SignupThrottled(SignupError):
    """Too many sign-ups from one client address; retry after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: float):
        self.retry_after_s = retry_after_s
        super().__init__(f"Too many sign-ups from your network. Try again in {format_wait(retry_after_s)}.")


class LoginThrottled(AuthError):
    """Too many failed sign-ins from this client address.

    ``retry_after_s``: seconds until the next attempt is allowed.
    """

    def __init__(self, retry_after_s: float):
        self.retry_after_s = retry_after_s
        self.message = f"Too many failed sign-in attempts. Try again in {format_wait(retry_after_s)}."
        super().__init__(self.message)


class AuthSecretError(AuthError):
    """The stored sign-in secret cannot be created or read."""


class WrongPassword(AuthError):
    """The current password given to :meth:`Authenticator.change_password` is wrong."""


# ---- passwords -------------------------------------------------------------
def check_password_policy(password: str) -> None:
    """Raise PasswordPolicyError unless 8 <= characters and UTF-8 bytes <= 72."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise PasswordPolicyError(f"Password must be at least {MIN_PASSWORD_CHARS} characters long.")
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        raise PasswordPolicyError(
            f"Password is too long: at most {MAX_PASSWORD_BYTES} bytes "
            "(72 Latin letters; letters of other scripts count 2 to 4 bytes each)."
        )


def hash_password(password: str, rounds: int = DEFAULT_BCRYPT_ROUNDS) -> str:
    """bcrypt hash (ASCII ``$2b$...``) of ``password``.

    Args:
        rounds: bcrypt cost (log2 of iterations, 4..31); 12 takes ~0.25 s.
    Raises:
        PasswordPolicyError: shorter than 8 characters or longer than 72 UTF-8 bytes.
    """
    check_password_policy(password)
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds)).decode("ascii")


def verify_password(password: str, password_hash: str) -> bool:
    """True when ``password`` matches ``password_hash``. Never raises: an
    over-long password or a malformed hash is simply False."""
    pw = password.encode("utf-8")
    if len(pw) > MAX_PASSWORD_BYTES:
        pw = pw[:MAX_PASSWORD_BYTES]  # still do the work (timing), then refuse
        too_long = True
    else:
        too_long = False
    try:
        ok = bcrypt.checkpw(pw, password_hash.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False
    return ok and not too_long


# ---- the JWT secret ----------------------------------------------------------
def ensure_auth_secret(settings: Settings) -> str:
    """Return the secret that signs Chainlit's session tokens, and export it as
    ``CHAINLIT_AUTH_SECRET``.

    ``JWT_SECRET_KEY`` (``settings.jwt_secret``) wins when set. Otherwise the
    secret is read from ``<data_dir>/auth_secret``; on first run it is generated
    (``secrets.token_urlsafe(48)``, 64 characters) and written there with mode
    0600 (created with ``O_EXCL``, never world-readable), and one notice is
    logged (without the secret).

    Raises:
        AuthSecretError: ``JWT_SECRET_KEY`` (or the file's secret) is shorter
            than :data:`MIN_SECRET_CHARS` characters; or the file cannot be
            created or read, or is empty. The message never contains the secret.
    """
    if settings.jwt_secret:
        if len(settings.jwt_secret) < MIN_SECRET_CHARS:
            raise AuthSecretError(f"JWT_SECRET_KEY must be at least {MIN_SECRET_CHARS} characters; {_SECRET_HINT}.")
        secret = settings.jwt_secret
    else:
        path = Path(settings.data_dir) / SECRET_FILE
        secret = _file_secret(path)
        if len(secret) < MIN_SECRET_CHARS:
            raise AuthSecretError(
                f"The sign-in secret in {path} must be at least {MIN_SECRET_CHARS} characters; "
                "delete the file to generate a new one, or set JWT_SECRET_KEY "
                f"({_SECRET_HINT})."
            )
    os.environ["CHAINLIT_AUTH_SECRET"] = secret
    return secret


def _file_secret(path: Path) -> str:
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
        raise AuthSecretError(f"Cannot create the sign-in secret file {path}: {exc.strerror}.") from exc
    log.info(
        "Generated a new sign-in secret in %s (mode 0600). Keep it private; set JWT_SECRET_KEY to manage it yourself.",
        path,
    )
    return secret


def _read_secret(path: Path) -> str:
    # Another process may have created the file a moment ago and still be writing it.
    for _ in range(20):
        try:
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                os.chmod(path, 0o600)
                log.warning("The sign-in secret file %s was readable by others; its mode is now 0600.", path)
            secret = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthSecretError(f"Cannot read the sign-in secret file {path}: {exc}.") from exc
        if secret:
            return secret
        time.sleep(0.05)
    raise AuthSecretError(f"The sign-in secret file {path} is empty; delete it to generate a new secret.")


# ---- accounts ------------------------------------------------------------------
def normalize_email(email: str) -> str:
    """Stripped and lower-cased, as the store keys it."""
    return email.strip().lower()


def validate_account(email: str, name: str, password: str) -> tuple[str, str]:
    """Check sign-up fields; return ``(normalised email, cleaned name)``.

    Raises:
        SignupError: with a user-facing sentence naming the first problem.
    """
    email = normalize_email(email)
    if len(email) > MAX_EMAIL_CHARS or not _EMAIL_RE.fullmatch(email):
        raise SignupError("Enter a valid email address, like name@example.com.")
    name = " ".join(name.split())
    if not name or len(name) > MAX_NAME_CHARS or any(unicodedata.category(c) == "Cc" for c in name):
        raise SignupError(f"Enter your name (1 to {MAX_NAME_CHARS} characters).")
    try:
        check_password_policy(password)
    except PasswordPolicyError as exc:
        raise SignupError(str(exc)) from None
    return email, name


class Authenticator:
    """Sign-in, sign-up and password change against a :class:`Store`, with throttling.

    Failed sign-ins are refused after ``settings.login_attempts`` per
    ``settings.login_window_s`` seconds *per client address*. Per email they are
    only slowed down, never refused (anyone can type someone else's email, and
    behind a proxy every client may share one address): :meth:`login_delay`
    grows from :data:`LOGIN_DELAY_BASE_S` after :data:`LOGIN_DELAY_AFTER_FAILURES`
    failures in the window, doubling with each further failure up to
    :data:`LOGIN_DELAY_MAX_S`, and the caller waits that long (``asyncio.sleep``)
    before the password is checked, so the right password still works from any
    address that is not itself throttled. Sign-ups are limited to
    ``signups_per_window`` per ``signup_window_s`` seconds per client address.
    Limits live in this process's memory.

    Args:
        store: where users live.
        settings: provides login_attempts and login_window_s (seconds).
        bcrypt_rounds: cost for new hashes (tests use 4).
        signups_per_window, signup_window_s: sign-up limit per client address.
        clock: monotonic seconds, for the limiters (injectable for tests).

    All methods block (bcrypt, disk); they may raise StoreUnavailable.
    """

    #: Failures remembered per email (the delay is at its ceiling long before this).
    _FAILURES_KEPT = 64

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        bcrypt_rounds: int = DEFAULT_BCRYPT_ROUNDS,
        signups_per_window: int = 5,
        signup_window_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.bcrypt_rounds = bcrypt_rounds
        self._failures = SlidingWindowLimiter(self._FAILURES_KEPT, settings.login_window_s, clock)  # per email
        self._by_ip = SlidingWindowLimiter(settings.login_attempts, settings.login_window_s, clock)
        self._signups = SlidingWindowLimiter(signups_per_window, signup_window_s, clock)
        # Unknown emails are checked against this so they cost the same time as real ones.
        self._dummy_hash = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(bcrypt_rounds)).decode("ascii")

    @staticmethod
    def _keys(email: str, client_ip: Optional[str]) -> tuple[str, str]:
        return normalize_email(email)[:MAX_EMAIL_CHARS], client_ip or "unknown"

    def check_login_allowed(self, email: str, client_ip: Optional[str]) -> None:
        """Raise LoginThrottled if sign-ins from ``client_ip`` are blocked now (``email``
        never blocks: see :meth:`login_delay`)."""
        wait = self._by_ip.retry_after(self._keys(email, client_ip)[1])
        if wait > 0:
            raise LoginThrottled(wait)

    def login_delay(self, email: str) -> float:
        """Seconds to wait before checking a password for ``email``: 0 below
        :data:`LOGIN_DELAY_AFTER_FAILURES` recent failures, then
        ``LOGIN_DELAY_BASE_S * 2**(failures - LOGIN_DELAY_AFTER_FAILURES)``, at most
        :data:`LOGIN_DELAY_MAX_S`. Unknown emails count the same (no account probing).
        Never blocks; the caller sleeps (``await asyncio.sleep(delay)``)."""
        extra = self._failures.count(self._keys(email, None)[0]) - LOGIN_DELAY_AFTER_FAILURES
        if extra < 0:
            return 0.0
        return min(LOGIN_DELAY_MAX_S, LOGIN_DELAY_BASE_S * 2.0 ** min(extra, 32))

    def login(self, email: str, password: str, client_ip: Optional[str]) -> Optional[User]:
        """The user when email and password match, else None (unknown email and
        wrong password are indistinguishable, in result and in timing).

        Every attempt first *reserves* a slot against ``client_ip`` (so parallel
        attempts from one address cannot all reach bcrypt before the first failure
        is counted); a success gives the slot back and forgets the email's failures,
        a failure is also counted against the email (:meth:`login_delay`). This
        method does not wait the delay itself: the async caller does, first.

        Raises:
            LoginThrottled: too many recent failures from this address (raised
                before any password check).
            StoreUnavailable: the store failed (the reserved slot is given back).
        """
        ekey, ikey = self._keys(email, client_ip)
        if not self._by_ip.hit(ikey):
            raise LoginThrottled(self._by_ip.retry_after(ikey))
        try:
            email = normalize_email(email)
            user = self.store.get_user_by_email(email) if len(email) <= MAX_EMAIL_CHARS else None
            ok = verify_password(password, user.password_hash if user else self._dummy_hash)
        except BaseException:
            self._by_ip.undo(ikey)
            raise
        if user is not None and ok:
            self._failures.reset(ekey)
            self._by_ip.undo(ikey)
            return user
        self._failures.hit(ekey)
        return None

    def change_password(
        self, email: str, current_password: str, new_password: str, client_ip: Optional[str]
    ) -> User:
        """Replace a user's password; every session of theirs ends (the store bumps the
        token version with the hash). The current password is checked like a sign-in
        (same throttling and failure counting, :meth:`login_delay` applies).

        Raises:
            WrongPassword: ``current_password`` does not match (or no such user).
            PasswordPolicyError: ``new_password`` is too short or too long.
            LoginThrottled: too many failures from ``client_ip``.
            StoreUnavailable: the store failed.
        """
        check_password_policy(new_password)
        user = self.login(email, current_password, client_ip)
        if user is None:
            raise WrongPassword("The current password is wrong.")
        try:
            return self.store.set_password_hash(user.id, hash_password(new_password, self.bcrypt_rounds))
        except NotFound:  # deleted a moment ago
            raise WrongPassword("The current password is wrong.") from None

    def end_sessions(self, user_id: str) -> int:
        """Sign the user out everywhere: bump their token version (``Store.bump_token_version``)
        so every session token issued so far is refused; the new version.

        Raises NotFound (no such user), StoreUnavailable."""
        return self.store.bump_token_version(user_id)

    def create_user(self, email: str, name: str, password: str, role: Optional[str] = None) -> User:
        """Validate, hash and store a user, without throttling (admin CLI).

        ``role=None``: admin if first user, else "user".

        Raises:
            SignupError: invalid field, or "An account with this email already exists."
        """
        email, name = validate_account(email, name, password)
        password_hash = hash_password(password, self.bcrypt_rounds)
        try:
            return self.store.create_user(email, name, password_hash, role)
        except UserExists:
            raise SignupError("An account with this email already exists.") from None

    def signup(self, email: str, name: str, password: str, client_ip: Optional[str]) -> User:
        """Self-service sign-up; the first account ever becomes admin.

        Every well-formed attempt counts against ``client_ip`` (so the
        "already exists" answer cannot be used to probe many emails).

        Raises:
            SignupError: invalid field or existing email (user-facing message).
            SignupThrottled: too many sign-ups from ``client_ip``.
        """
        validate_account(email, name, password)
        ikey = client_ip or "unknown"
        if not self._signups.hit(ikey):
            raise SignupThrottled(self._signups.retry_after(ikey))
        try:
            return self.create_user(email, name, password)
        except StoreUnavailable:
            self._signups.undo(ikey)  # an outage must not lock the address out after it ends
            raise

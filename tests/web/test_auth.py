"""Password hashing, the sign-in secret, login throttling and sign-up validation."""
from __future__ import annotations

import dataclasses
import logging
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from argus.auth import (
    Authenticator,
    AuthSecretError,
    LOGIN_DELAY_AFTER_FAILURES,
    LOGIN_DELAY_MAX_S,
    LoginThrottled,
    PasswordPolicyError,
    SignupError,
    SignupThrottled,
    ensure_auth_secret,
    hash_password,
    verify_password,
)
from argus.config import Settings
from argus.store import SQLiteStore, StoreUnavailable

PASSWORD = "correct horse"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(tmp_path, monkeypatch):
    for var in ("JWT_SECRET_KEY", "ARGUS_LOGIN_ATTEMPTS", "ARGUS_LOGIN_WINDOW_S"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ARGUS_DATA_DIR", str(tmp_path / "data"))
    s = Settings.from_env(dotenv=False)
    return dataclasses.replace(s, login_attempts=3, login_window_s=300.0)


@pytest.fixture
def store(settings):
    s = SQLiteStore(settings.data_dir)
    yield s
    s.close()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def auth(store, settings, clock):
    return Authenticator(store, settings, bcrypt_rounds=4, clock=clock)


@pytest.fixture
def alice(auth):
    return auth.create_user("alice@example.com", "Alice", PASSWORD)


# ---- hashing ----
def test_hash_does_not_contain_password_and_verifies():
    h = hash_password(PASSWORD, rounds=4)
    assert h.startswith("$2b$04$") and PASSWORD not in h
    assert verify_password(PASSWORD, h)
    assert not verify_password("wrong password", h)
    assert hash_password(PASSWORD, rounds=4) != h  # salted


def test_password_length_rules():
    with pytest.raises(PasswordPolicyError, match="at least 8 characters"):
        hash_password("short", rounds=4)
    with pytest.raises(PasswordPolicyError, match="72 bytes"):
        hash_password("a" * 73, rounds=4)
    with pytest.raises(PasswordPolicyError, match="72 bytes"):
        hash_password("ش" * 37, rounds=4)  # 37 chars but 74 bytes in UTF-8
    assert verify_password("ش" * 36, hash_password("ش" * 36, rounds=4))


def test_verify_never_raises():
    assert not verify_password(PASSWORD, "not a bcrypt hash")
    h = hash_password("a" * 72, rounds=4)
    assert not verify_password("a" * 80, h)  # would match after bcrypt's truncation


# ---- login ----
def test_login_success_and_failures(auth, alice):
    assert auth.login("  ALICE@example.com", PASSWORD, "10.0.0.1") == alice
    assert auth.login("alice@example.com", "wrong password", "10.0.0.1") is None
    assert auth.login("nobody@example.com", PASSWORD, "10.0.0.1") is None


def test_overlong_email_never_matches_a_truncated_one(auth):
    long_local = "a" * 242  # 242 + len("@example.com") == 254, the maximum
    user = auth.create_user(long_local + "@example.com", "Long", PASSWORD)
    assert auth.login(long_local + "@example.com", PASSWORD, "1.1.1.1") == user
    assert auth.login(long_local + "@example.com" + "x" * 50, PASSWORD, "1.1.1.1") is None


def test_unknown_email_is_checked_against_a_dummy_hash(auth, monkeypatch):
    import argus.auth as mod

    seen = []
    real = mod.verify_password
    monkeypatch.setattr(mod, "verify_password", lambda pw, h: seen.append(h) or real(pw, h))
    assert auth.login("nobody@example.com", PASSWORD, "1.2.3.4") is None
    assert seen and seen[0].startswith("$2b$04$")  # same cost as real hashes: same time


def test_failures_for_an_email_slow_it_down_but_never_lock_it(auth, alice, clock):
    """Anyone can type alice's email: many failures from many addresses delay her sign-in
    (progressive, capped) but the right password from another address still works."""
    delays = []
    for i in range(12):  # different addresses: no address is throttled
        delays.append(auth.login_delay("ALICE@example.com "))
        assert auth.login("alice@example.com", "wrong password", f"10.0.0.{i}") is None
    assert delays[:LOGIN_DELAY_AFTER_FAILURES] == [0.0] * LOGIN_DELAY_AFTER_FAILURES
    assert delays[LOGIN_DELAY_AFTER_FAILURES:LOGIN_DELAY_AFTER_FAILURES + 3] == [0.25, 0.5, 1.0]
    assert delays == sorted(delays) and max(delays) == LOGIN_DELAY_MAX_S == 4.0
    assert auth.login_delay("alice@example.com") == LOGIN_DELAY_MAX_S
    auth.check_login_allowed("alice@example.com", "10.0.0.99")  # not refused
    assert auth.login("alice@example.com", PASSWORD, "10.0.0.99") == alice  # the right password works
    assert auth.login_delay("alice@example.com") == 0.0  # and a success forgets the failures


def test_email_delay_counts_unknown_emails_alike_and_expires(auth, alice, clock):
    for i in range(5):
        auth.login("nobody@example.com", "wrong password", f"10.9.0.{i}")
        auth.login("alice@example.com", "wrong password", f"10.8.0.{i}")
    assert auth.login_delay("nobody@example.com") == auth.login_delay("alice@example.com") > 0  # no account probing
    clock.now += 301  # settings.login_window_s
    assert auth.login_delay("alice@example.com") == 0.0


def test_throttle_per_address(auth, alice, clock):
    for i in range(3):  # different emails from one address
        assert auth.login(f"guess{i}@example.com", "wrong password", "6.6.6.6") is None
    with pytest.raises(LoginThrottled, match="Too many failed sign-in attempts"):
        auth.login("alice@example.com", PASSWORD, "6.6.6.6")
    assert auth.login("alice@example.com", PASSWORD, "7.7.7.7") == alice  # other addresses unaffected
    clock.now += 290
    with pytest.raises(LoginThrottled, match="Try again in 10 seconds"):
        auth.check_login_allowed("x@example.com", "6.6.6.6")


class CountingVerify:
    """Wraps the real bcrypt check and counts the calls (the real hashing still runs)."""

    def __init__(self, real):
        self.real, self.calls, self._lock = real, 0, threading.Lock()

    def __call__(self, password, password_hash):
        with self._lock:
            self.calls += 1
        return self.real(password, password_hash)


def test_parallel_wrong_passwords_cannot_outrun_the_throttle(store, settings, monkeypatch):
    import argus.auth as mod

    auth = Authenticator(store, settings, bcrypt_rounds=10)  # ~60 ms per check: attempts really overlap
    auth.create_user("alice@example.com", "Alice", PASSWORD)
    counting = CountingVerify(mod.verify_password)
    monkeypatch.setattr(mod, "verify_password", counting)
    start = threading.Barrier(20)

    def attempt(i):
        start.wait()
        try:  # one address, several emails: the address limit holds
            return auth.login(f"user{i % 4}@example.com", "wrong password", "10.1.0.1")
        except LoginThrottled as exc:
            return exc

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(attempt, range(20)))
    assert counting.calls <= 3  # settings.login_attempts
    assert sum(r is None for r in results) == counting.calls
    throttled = [r for r in results if isinstance(r, LoginThrottled)]
    assert len(throttled) == 20 - counting.calls and all(r.retry_after_s > 0 for r in throttled)


def test_success_gives_the_address_slot_back(auth, alice):
    for _ in range(2):
        assert auth.login(f"x{_}@example.com", "wrong password", "5.5.5.5") is None
    for _ in range(5):  # successes do not count against the address
        assert auth.login("alice@example.com", PASSWORD, "5.5.5.5") == alice
    assert auth.login("y@example.com", "wrong password", "5.5.5.5") is None  # the 3rd failure
    with pytest.raises(LoginThrottled):
        auth.login("alice@example.com", PASSWORD, "5.5.5.5")


def test_store_failure_gives_the_reserved_slots_back(store, settings, clock):
    auth = Authenticator(store, settings, bcrypt_rounds=4, clock=clock)
    store.close()  # every store call now raises StoreUnavailable
    for _ in range(5):
        with pytest.raises(StoreUnavailable):
            auth.login("alice@example.com", PASSWORD, "4.4.4.4")
    auth.check_login_allowed("alice@example.com", "4.4.4.4")  # not throttled
    assert auth.login_delay("alice@example.com") == 0.0  # an outage is no failed password


def test_success_resets_email_counter(auth, alice):
    for i in range(2):
        assert auth.login("alice@example.com", "wrong password", f"10.0.0.{i}") is None
    assert auth.login("alice@example.com", PASSWORD, "10.0.1.1") == alice
    for i in range(2):  # the two earlier failures were forgotten
        assert auth.login("alice@example.com", "wrong password", f"10.0.2.{i}") is None
    assert auth.login("alice@example.com", PASSWORD, "10.0.3.1") == alice


# ---- sign-up ----
def test_signup_first_user_is_admin(auth):
    first = auth.signup("Owner@Example.com", "  Owner  Name ", PASSWORD, "1.1.1.1")
    second = auth.signup("guest@example.com", "Guest", PASSWORD, "1.1.1.2")
    assert (first.role, first.email, first.name) == ("admin", "owner@example.com", "Owner Name")
    assert second.role == "user"
    assert auth.login("owner@example.com", PASSWORD, "1.1.1.1") == first


@pytest.mark.parametrize(
    "email, name, password, message",
    [
        ("not-an-email", "A", PASSWORD, "Enter a valid email address"),
        ("a@b", "A", PASSWORD, "Enter a valid email address"),
        ("a b@example.com", "A", PASSWORD, "Enter a valid email address"),
        ("a@example.com", "   ", PASSWORD, "Enter your name (1 to 80 characters)."),
        ("a@example.com", "x" * 81, PASSWORD, "Enter your name (1 to 80 characters)."),
        ("a@example.com", "A", "short", "Password must be at least 8 characters long."),
        ("a@example.com", "A", "é" * 40, "Password is too long"),
    ],
)
def test_signup_validation(auth, email, name, password, message):
    with pytest.raises(SignupError) as info:
        auth.signup(email, name, password, "1.1.1.1")
    assert message in info.value.message
    assert auth.store.count_users() == 0


def test_signup_existing_email(auth, alice):
    with pytest.raises(SignupError) as info:
        auth.signup("ALICE@example.com", "Alice 2", PASSWORD, "1.1.1.1")
    assert info.value.message == "An account with this email already exists."


def test_signup_throttled_per_address(store, settings, clock):
    auth = Authenticator(store, settings, bcrypt_rounds=4, clock=clock, signups_per_window=2, signup_window_s=3600)
    auth.signup("a@example.com", "A", PASSWORD, "9.9.9.9")
    auth.signup("b@example.com", "B", PASSWORD, "9.9.9.9")
    with pytest.raises(SignupThrottled) as info:
        auth.signup("c@example.com", "C", PASSWORD, "9.9.9.9")
    assert info.value.message == "Too many sign-ups from your network. Try again in 60 minutes."
    assert auth.signup("c@example.com", "C", PASSWORD, "9.9.9.8").role == "user"


def test_nothing_sensitive_is_logged(auth, caplog):
    caplog.set_level(logging.DEBUG)
    user = auth.signup("a@example.com", "A", PASSWORD, "1.1.1.1")
    auth.login("a@example.com", "wrong password", "1.1.1.1")
    auth.login("a@example.com", PASSWORD, "1.1.1.1")
    for record in caplog.records:
        text = record.getMessage()
        assert PASSWORD not in text and "wrong password" not in text and user.password_hash not in text


# ---- the JWT secret ----
def test_secret_generated_private_reused_and_not_logged(settings, monkeypatch, caplog):
    monkeypatch.delenv("CHAINLIT_AUTH_SECRET", raising=False)
    caplog.set_level(logging.DEBUG, logger="argus")
    secret = ensure_auth_secret(settings)
    path = settings.data_dir / "auth_secret"
    assert len(secret) >= 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == secret
    assert os.environ["CHAINLIT_AUTH_SECRET"] == secret
    notices = [r for r in caplog.records if r.name.startswith("argus")]
    assert len(notices) == 1 and str(path) in notices[0].getMessage()
    assert all(secret not in r.getMessage() for r in caplog.records)

    caplog.clear()
    monkeypatch.delenv("CHAINLIT_AUTH_SECRET")
    assert ensure_auth_secret(settings) == secret
    assert os.environ["CHAINLIT_AUTH_SECRET"] == secret
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


def test_secret_file_is_never_group_readable_even_with_lax_umask(settings, monkeypatch):
    monkeypatch.delenv("CHAINLIT_AUTH_SECRET", raising=False)
    old = os.umask(0)
    try:
        ensure_auth_secret(settings)
    finally:
        os.umask(old)
    assert stat.S_IMODE((settings.data_dir / "auth_secret").stat().st_mode) == 0o600


def test_explicit_jwt_secret_wins(settings, monkeypatch):
    monkeypatch.delenv("CHAINLIT_AUTH_SECRET", raising=False)
    s = dataclasses.replace(settings, jwt_secret="from-the-environment-0123456789abcdef")
    assert ensure_auth_secret(s) == "from-the-environment-0123456789abcdef"
    assert os.environ["CHAINLIT_AUTH_SECRET"] == "from-the-environment-0123456789abcdef"
    assert not (settings.data_dir / "auth_secret").exists()


def test_loose_secret_file_is_tightened(settings, monkeypatch):
    monkeypatch.delenv("CHAINLIT_AUTH_SECRET", raising=False)
    settings.data_dir.mkdir(parents=True)
    path = settings.data_dir / "auth_secret"
    path.write_text(EXISTING_SECRET + "\n")
    path.chmod(0o644)
    assert ensure_auth_secret(settings) == EXISTING_SECRET
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


EXISTING_SECRET = "existing-secret-0123456789abcdefghijkl"  # 37 characters
WEAK_SECRET = "too-short-secret-0123456789"  # 27 characters


def test_short_jwt_secret_key_is_refused_without_printing_it(settings, monkeypatch):
    monkeypatch.delenv("CHAINLIT_AUTH_SECRET", raising=False)
    with pytest.raises(AuthSecretError) as info:
        ensure_auth_secret(dataclasses.replace(settings, jwt_secret=WEAK_SECRET))
    message = str(info.value)
    assert message == (
        "JWT_SECRET_KEY must be at least 32 characters; generate one with "
        "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`."
    )
    assert WEAK_SECRET not in message
    assert "CHAINLIT_AUTH_SECRET" not in os.environ  # nothing exported
    assert ensure_auth_secret(dataclasses.replace(settings, jwt_secret="x" * 32)) == "x" * 32  # 32 is enough


def test_short_secret_in_the_file_is_refused(settings, monkeypatch):
    monkeypatch.delenv("CHAINLIT_AUTH_SECRET", raising=False)
    settings.data_dir.mkdir(parents=True)
    (settings.data_dir / "auth_secret").write_text(WEAK_SECRET + "\n")
    with pytest.raises(AuthSecretError, match="must be at least 32 characters; delete the file") as info:
        ensure_auth_secret(settings)
    assert WEAK_SECRET not in str(info.value)


def test_signup_during_a_storage_outage_does_not_use_up_the_address_quota(tmp_path):
    """Five sign-ups that fail because storage is down must not lock the address out afterwards."""
    from argus.auth import Authenticator
    from argus.config import Settings
    from argus.store import SQLiteStore, StoreUnavailable

    class DownThenUp(SQLiteStore):
        down = True

        def create_user(self, *a, **kw):
            if self.down:
                raise StoreUnavailable("storage unavailable")
            return super().create_user(*a, **kw)

    store = DownThenUp(tmp_path / "d")
    auth = Authenticator(store, Settings.from_env(dotenv=False), bcrypt_rounds=4, signups_per_window=2)
    for _ in range(5):
        with pytest.raises(StoreUnavailable):
            auth.signup("a@example.com", "Ann", "long enough password", "10.0.0.9")
    store.down = False
    assert auth.signup("a@example.com", "Ann", "long enough password", "10.0.0.9").email == "a@example.com"


# ---- password change and sign-out ----
def test_change_password_checks_the_current_one_and_ends_sessions(auth, alice, store):
    from argus.auth import WrongPassword

    with pytest.raises(WrongPassword, match="current password is wrong"):
        auth.change_password("alice@example.com", "wrong password", "new password 1", "10.0.0.1")
    with pytest.raises(PasswordPolicyError):
        auth.change_password("alice@example.com", PASSWORD, "short", "10.0.0.1")
    assert store.get_user(alice.id).token_version == 0  # nothing changed so far
    updated = auth.change_password("alice@example.com", PASSWORD, "new password 1", "10.0.0.1")
    assert updated.token_version == 1 and store.get_user(alice.id) == updated
    assert auth.login("alice@example.com", PASSWORD, "10.0.0.1") is None
    assert auth.login("alice@example.com", "new password 1", "10.0.0.1") == updated


def test_change_password_guesses_are_throttled_like_sign_ins(auth, alice):
    from argus.auth import WrongPassword

    for _ in range(3):  # settings.login_attempts
        with pytest.raises(WrongPassword):
            auth.change_password("alice@example.com", "guess guess", "new password 1", "6.6.6.7")
    with pytest.raises(LoginThrottled):
        auth.change_password("alice@example.com", PASSWORD, "new password 1", "6.6.6.7")


def test_end_sessions_bumps_the_version(auth, alice, store):
    assert auth.end_sessions(alice.id) == 1
    assert auth.end_sessions(alice.id) == 2
    assert store.get_user(alice.id).token_version == 2

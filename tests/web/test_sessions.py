"""argus.sessions without a server: the lifetime setting, the claims, which tokens are current,
and how a refused token is taken out of the request."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from argus.config import ConfigError
from argus.sessions import (
    CLAIMS_KEY,
    VERSION_CACHE_TTL_S,
    SessionBook,
    SessionGuard,
    session_lifetime_s,
    stamp,
    token_and_stripped_headers,
)
from argus.store import SQLiteStore

HASH = "$2b$04$" + "x" * 53
NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture
def alice(store):
    return store.create_user("alice@example.com", "Alice", HASH)


@pytest.fixture
def book(store):
    return SessionBook(lambda: store, 24 * 3600, clock=Clock(100.0), wall=Clock(NOW))


def payload(user, **override) -> dict:
    """A decoded token of ``user`` signed in a minute ago (claims overridden as given)."""
    claims = {"uid": user.id, "v": user.token_version, "at": NOW - 60} | override
    return {"identifier": user.email, "metadata": {"role": user.role, CLAIMS_KEY: claims}}


# ---- lifetime ----
@pytest.mark.parametrize("raw, seconds", [("", 86400), ("24", 86400), ("0.5", 1800), (" 360 ", 360 * 3600), ("0.1", 360)])
def test_session_lifetime_from_the_environment(raw, seconds):
    assert session_lifetime_s({"ARGUS_SESSION_HOURS": raw}) == seconds
    assert session_lifetime_s({}) == 86400


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "361", "nan", "inf"])
def test_bad_session_lifetime_is_a_config_error(raw):
    with pytest.raises(ConfigError, match="ARGUS_SESSION_HOURS"):
        session_lifetime_s({"ARGUS_SESSION_HOURS": raw})


# ---- claims ----
def test_stamp_adds_claims_and_keeps_those_of_a_reissued_token(alice):
    meta = stamp({"role": "admin"}, alice, now=5.0)
    assert meta == {"role": "admin", CLAIMS_KEY: {"uid": alice.id, "v": 0, "at": 5.0}}
    assert stamp(dict(meta), dataclasses.replace(alice, token_version=3), now=9.0) == meta  # /auth/jwt keeps them
    other = dataclasses.replace(alice, id="someone-else")
    assert stamp(dict(meta), other, now=9.0)[CLAIMS_KEY] == {"uid": "someone-else", "v": 0, "at": 9.0}
    assert stamp({CLAIMS_KEY: {"uid": alice.id, "v": "0", "at": 1}}, alice, now=9.0)[CLAIMS_KEY]["v"] == 0  # malformed


# ---- which tokens are current ----
def test_current_token_until_the_version_moves_on(book, store, alice):
    assert asyncio.run(book.current_user(payload(alice))) == alice
    store.bump_token_version(alice.id)
    book.forget(alice.email)
    assert asyncio.run(book.current_user(payload(alice))) is None
    assert asyncio.run(book.current_user(payload(store.get_user(alice.id)))) is not None


def test_tokens_that_are_not_current(book, store, alice):
    assert asyncio.run(book.current_user({"identifier": alice.email, "metadata": {"role": "admin"}})) is None  # legacy
    assert asyncio.run(book.current_user(payload(alice, at=NOW - 25 * 3600))) is None  # signed in too long ago
    assert asyncio.run(book.current_user(payload(alice, at=NOW + 3600))) is None  # from the future
    assert asyncio.run(book.current_user(payload(alice, uid="old-id"))) is None  # account deleted and re-created
    assert asyncio.run(book.current_user(payload(alice, v=True))) is None
    assert asyncio.run(book.current_user({"identifier": "nobody@example.com", "metadata": payload(alice)["metadata"]})) is None


def test_versions_are_cached_briefly(store, alice):
    clock = Clock(100.0)
    book = SessionBook(lambda: store, 24 * 3600, clock=clock, wall=Clock(NOW))
    p = payload(alice)
    assert asyncio.run(book.current_user(p)) == alice
    store.bump_token_version(alice.id)  # by another process: this one learns within the cache time
    assert asyncio.run(book.current_user(p)) == alice
    clock.now += VERSION_CACHE_TTL_S + 0.1
    assert asyncio.run(book.current_user(p)) is None


def test_during_a_store_outage_the_last_known_version_decides(store, alice, caplog):
    clock = Clock(100.0)
    book = SessionBook(lambda: store, 24 * 3600, clock=clock, wall=Clock(NOW))
    bob = store.create_user("bob@example.com", "Bob", HASH)
    assert asyncio.run(book.current_user(payload(alice))) == alice
    store.bump_token_version(alice.id)
    clock.now += VERSION_CACHE_TTL_S + 0.1
    assert asyncio.run(book.current_user(payload(alice))) is None  # seen: version 1 now
    ended = payload(alice)  # a token of version 0
    current = payload(store.get_user(alice.id))
    store.close()  # the database goes away
    clock.now += VERSION_CACHE_TTL_S + 0.1
    assert asyncio.run(book.current_user(ended)) is None  # still ended
    assert asyncio.run(book.current_user(current)).id == alice.id  # still signed in
    assert asyncio.run(book.current_user(payload(bob))).id == bob.id  # never seen: well-formed claims pass
    assert asyncio.run(book.current_user({"identifier": bob.email, "metadata": {}})) is None  # no claims: never
    assert asyncio.run(book.current_user(payload(bob, at=NOW - 25 * 3600))) is None  # nor too old
    assert sum("last known versions" in r.message for r in caplog.records) == 1  # one line per outage


def test_end_bumps_and_forgets(book, store, alice):
    p = payload(alice)
    assert asyncio.run(book.current_user(p)) == alice  # cached now
    assert asyncio.run(book.end(alice)) == 1
    assert asyncio.run(book.current_user(p)) is None  # no waiting for the cache in this process
    gone = dataclasses.replace(alice, id="nope")
    assert asyncio.run(book.end(gone)) is None  # logged, not raised


# ---- taking a refused token out of the request ----
def test_token_and_stripped_headers():
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"cookie", b"theme=dark; access_token=abc.def; access_token_0=x; other=1"),
        (b"authorization", b"Bearer zzz"),
    ]
    token, stripped = token_and_stripped_headers(headers)
    assert token == "abc.def"
    assert stripped == [(b"host", b"127.0.0.1:8000"), (b"cookie", b"theme=dark; other=1")]
    token, stripped = token_and_stripped_headers([(b"authorization", b"Bearer zzz"), (b"cookie", b"access_token=q")])
    assert (token, stripped) == ("q", [])
    token, _ = token_and_stripped_headers([(b"cookie", b"access_token_0=ab; access_token_1=cd")])
    assert token == "abcd"  # Chainlit's chunked cookie
    token, stripped = token_and_stripped_headers([(b"authorization", b"Basic dXNlcg==")])
    assert (token, stripped) == ("", [(b"authorization", b"Basic dXNlcg==")])


def test_guard_passes_requests_without_a_token_untouched(book):
    seen = []

    async def app(scope, receive, send):
        seen.append(scope)

    guard = SessionGuard(app, book)
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"cookie", b"theme=dark")]}
    asyncio.run(guard(scope, None, None))
    assert seen == [scope]
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"cookie", b"access_token=forged")]}
    asyncio.run(guard(scope, None, None))
    assert seen[-1]["headers"] == []  # an invalid token is removed too (Chainlit would refuse it anyway)
    asyncio.run(guard({"type": "lifespan"}, None, None))
    assert seen[-1] == {"type": "lifespan"}


# ---- installation ----
def test_guard_is_outermost_and_the_caller_middleware_sits_inside_it(monkeypatch, store):
    from chainlit.config import config
    from fastapi import FastAPI

    from argus.datalayer import CallerMiddleware, install_caller_middleware
    from argus.sessions import install_session_guard

    monkeypatch.setattr(config.project, "user_session_timeout", config.project.user_session_timeout)
    monkeypatch.setenv("ARGUS_SESSION_HOURS", "2")
    app = FastAPI()
    install_caller_middleware(app)  # either order gives the same stack
    install_session_guard(lambda: store, app)
    install_session_guard(lambda: store, app)  # idempotent
    install_caller_middleware(app)
    assert [m.cls for m in app.user_middleware] == [SessionGuard, CallerMiddleware]
    assert config.project.user_session_timeout == 2 * 3600  # token expiry and cookie max-age

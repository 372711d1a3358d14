"""The API-key pool (argus.keys): encryption at rest, rotation over a shared store (two real
processes), limits, cooldown and recovery, invalid keys, failover with backoff.

Real components throughout: SQLiteStore in tmp_path, the real catalogue format, real
AES-256-GCM. The "provider" here is only its error type (ProviderError): what the pool
does with a failure does not depend on who raised it. Time is an injected clock.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from argus.catalogue import load_catalogue
from argus.keys import Failover, KeyPool, KeyPoolError, SecretBox, SecretKeyError, UnknownKey, open_box
from argus.keys.failover import BACKOFF_BASE_S, BACKOFF_MAX_S
from argus.keys.pool import RATE_LIMIT_COOLDOWN_S, TRANSIENT_COOLDOWN_S, quota_day, seconds_to_next_day
from argus.keys.redact import RedactKeys
from argus.keys.secretbox import SECRET_FILE, SealedKeyError
from argus.providers import ProviderError, Usage, fingerprint
from argus.store import SQLiteStore
from argus.store.base import KeyExists

from tests.support.paths import REPO
SECRET = "s" * 40
KEYS = [f"AIzaSyTEST{i}" + "x" * 29 for i in range(3)]  # shaped like Google keys; fake
T0 = 1_750_000_040.0  # UNIX seconds, 20 s into a minute


def write_catalogue(path: Path, **limits) -> Path:
    """A one-model catalogue (gemini "test-flash") with the given free-tier limits."""
    path.write_text(json.dumps({
        "day_resets": {"gemini": "America/Los_Angeles"},
        "models": [{
            "provider": "gemini", "id": "test-flash", "label": "Test Flash", "kind": "chat", "capabilities": ["vision"],
            "context_tokens": 1000, "limits": {"free": {"rpm": None, "tpm": None, "rpd": None, **limits}},
        }],
    }))
    return path


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_pool(tmp_path, store, clock):
    def make(keys=KEYS, secret=SECRET, **limits) -> KeyPool:
        catalogue = load_catalogue(write_catalogue(tmp_path / "catalogue.json", **limits))
        pool = KeyPool(store, SecretBox(secret), catalogue, env_keys={"gemini": keys}, clock=clock)
        pool.sync_env()
        return pool

    return make


def err(kind: str, retry_after_s=None, partial=False) -> ProviderError:
    return ProviderError(kind, f"test {kind}", provider="gemini", retry_after_s=retry_after_s, partial=partial)


def raw_bytes(data_dir: Path) -> bytes:
    """Every byte the store wrote (databases, their WAL files, attachments)."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file())


# ---- encryption at rest -------------------------------------------------------------
def test_sealed_key_opens_only_with_the_same_secret_and_record():
    box = SecretBox(SECRET)
    sealed = box.seal(KEYS[0], b"k1|gemini")
    assert KEYS[0].encode() not in sealed and sealed[:1] == b"\x01"
    assert box.open(sealed, b"k1|gemini") == KEYS[0]
    with pytest.raises(SealedKeyError):
        box.open(sealed, b"k2|gemini")  # copied onto another record
    with pytest.raises(SealedKeyError):
        SecretBox("t" * 40).open(sealed, b"k1|gemini")
    with pytest.raises(SealedKeyError):
        box.open(sealed[:-1] + bytes([sealed[-1] ^ 1]), b"k1|gemini")
    assert box.seal(KEYS[0], b"a") != box.seal(KEYS[0], b"a")  # a fresh nonce each time


def test_secret_is_generated_once_owner_only_and_reused(tmp_path):
    first = open_box(tmp_path, None)
    path = tmp_path / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    sealed = first.seal("k", b"a")
    assert open_box(tmp_path, None).open(sealed, b"a") == "k"  # a restart reads the same secret
    with pytest.raises(SecretKeyError) as info:
        open_box(tmp_path, "short")
    assert "short" not in str(info.value)


def test_added_key_is_stored_encrypted_and_never_in_clear(make_pool, store, tmp_path):
    pool = make_pool(keys=[])
    key = "AIzaSyADMIN" + "y" * 28
    rec = pool.add("gemini", key)
    assert (rec.source, rec.state, rec.fingerprint) == ("app", "enabled", fingerprint(key))
    assert rec.ciphertext and key.encode() not in rec.ciphertext
    store.close()
    assert key.encode() not in raw_bytes(tmp_path)  # not in argus.db, its WAL, or anywhere else
    again = SQLiteStore(tmp_path)
    fresh = KeyPool(again, SecretBox(SECRET), pool.catalogue, clock=pool.clock)
    lease = fresh.acquire(pool.catalogue.get("test-flash"))
    assert lease.secret == key and key not in repr(lease)
    with pytest.raises(KeyExists):
        fresh.add("gemini", key)
    again.close()


def test_bad_keys_and_providers_are_refused_without_echoing_them(make_pool):
    pool = make_pool(keys=[])
    for provider, key in (("gemini", "has space inside"), ("gemini", ""), ("gemini", 'quo"te'), ("nope", "AIzaOK")):
        with pytest.raises(KeyPoolError) as info:
            pool.add(provider, key)
        assert not key or key not in str(info.value)


def test_environment_keys_are_registered_once_without_ciphertext(make_pool, store, clock, tmp_path):
    pool = make_pool()
    second = KeyPool(store, SecretBox(SECRET), pool.catalogue, env_keys={"gemini": KEYS}, clock=clock)
    second.sync_env()  # another process with the same environment
    keys = store.list_api_keys()
    assert len(keys) == 3 and {k.source for k in keys} == {"env"} and all(k.ciphertext is None for k in keys)
    assert {k.fingerprint for k in keys} == {fingerprint(k) for k in KEYS}
    assert all(k not in raw_bytes(tmp_path).decode("latin-1") for k in KEYS)


def test_a_key_that_no_longer_opens_is_disabled_and_skipped(make_pool, store, clock):
    pool = make_pool(keys=[])
    pool.add("gemini", "AIzaSyA" + "a" * 32)
    pool.add("gemini", "AIzaSyB" + "b" * 32)
    other = KeyPool(store, SecretBox("another secret " * 3), pool.catalogue, clock=clock)  # ARGUS_SECRET_KEY changed
    assert other.acquire(pool.catalogue.get("test-flash")) is None
    assert {(k.state, k.last_error) for k in store.list_api_keys()} == {("disabled", "undecryptable")}


def test_find_resolves_fingerprints(make_pool):
    pool = make_pool()
    fp = fingerprint(KEYS[1])
    assert pool.find(fp).fingerprint == fp
    assert pool.find(fp.lstrip("…")).fingerprint == fp
    assert pool.find(f"gemini:{fp}").fingerprint == fp
    with pytest.raises(UnknownKey):
        pool.find("…zzzz")
    with pytest.raises(UnknownKey):
        pool.find(f"openai:{fp}")


# ---- rotation ----------------------------------------------------------------------------
_WORKER = textwrap.dedent(
    """
    import json, sys
    from argus.catalogue import load_catalogue
    from argus.keys import KeyPool, SecretBox
    from argus.store import SQLiteStore

    data_dir, catalogue, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    keys = json.loads(sys.stdin.readline())
    store = SQLiteStore(data_dir)
    cat = load_catalogue(catalogue)
    pool = KeyPool(store, SecretBox("s" * 40), cat, env_keys={"gemini": keys})
    pool.sync_env()
    print("ready", flush=True)
    sys.stdin.readline()  # "go": both processes start asking at the same moment
    spec = cat.get("test-flash")
    got = []
    for _ in range(n):
        lease = pool.acquire(spec)
        got.append(lease.fingerprint)
        pool.succeeded(lease, None, "u1")
    store.close()
    print(json.dumps(got), flush=True)
    """
)


@pytest.mark.e2e
def test_rotation_is_even_over_1000_requests_from_two_processes(tmp_path):
    """Two server processes share one SQLite file: every key gets its turn, whoever asks."""
    data_dir = tmp_path / "data"
    SQLiteStore(data_dir).close()  # created (and migrated) once
    catalogue = write_catalogue(tmp_path / "catalogue.json")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(data_dir), str(catalogue), "500"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
        )
        for _ in range(2)
    ]
    for p in procs:  # keys arrive on stdin, never on a command line
        p.stdin.write(json.dumps(KEYS) + "\n")
        p.stdin.flush()
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, errout) in zip(procs, outs, strict=True):
        assert p.returncode == 0, errout
    per_process = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [len(g) for g in per_process] == [500, 500]
    assert all(len(set(g)) == 3 for g in per_process)  # both processes used every key
    store = SQLiteStore(data_dir)
    counts = {k.fingerprint: k.requests_total for k in store.list_api_keys()}
    assert sum(counts.values()) == 1000
    assert max(counts.values()) - min(counts.values()) <= 1, counts  # strict turns across processes
    usage = store.list_api_usage()
    assert sum(u.requests for u in usage) == 1000
    store.close()
    for out, errout in outs:
        assert not any(k in out + errout for k in KEYS)


def test_keys_near_their_limits_are_skipped_until_the_window_moves(make_pool, clock):
    pool = make_pool(keys=KEYS[:2], rpm=2, rpd=3)
    spec = pool.catalogue.get("test-flash")
    got = [pool.acquire(spec) for _ in range(5)]
    assert [bool(x) for x in got] == [True, True, True, True, False]  # 2 keys × 2 per minute
    clock.t += 120
    more = [pool.acquire(spec) for _ in range(3)]
    assert [bool(x) for x in more] == [True, True, False]  # 3 a day each: one more each
    clock.t += seconds_to_next_day(clock.t, "America/Los_Angeles")  # Pacific midnight: a new quota day
    assert pool.acquire(spec) is not None


def test_tokens_per_minute_count_against_the_limit(make_pool, clock):
    pool = make_pool(keys=KEYS[:1], tpm=1000)
    spec = pool.catalogue.get("test-flash")
    lease = pool.acquire(spec, tokens=10)
    pool.succeeded(lease, Usage(input_tokens=900, output_tokens=50, total_tokens=950), "u1")
    assert pool.acquire(spec, tokens=100) is None
    assert pool.acquire(spec, tokens=40) is not None
    clock.t += 120
    assert pool.acquire(spec, tokens=500) is not None


# ---- failures ------------------------------------------------------------------------------
def test_rate_limited_key_cools_down_as_asked_then_recovers(make_pool, store, clock):
    pool = make_pool(keys=KEYS[:2])
    spec = pool.catalogue.get("test-flash")
    a = pool.acquire(spec)
    pool.failed(a, err("rate_limited", retry_after_s=7))
    assert store.get_api_key(a.key_id).cooldown_until == T0 + 7
    assert {pool.acquire(spec).key_id for _ in range(3)} == {k.id for k in store.list_api_keys()} - {a.key_id}
    clock.t += 7
    assert a.key_id in {pool.acquire(spec).key_id for _ in range(2)}
    b = pool.acquire(spec)
    pool.failed(b, err("rate_limited"))  # no RetryInfo: the default cooldown
    assert store.get_api_key(b.key_id).cooldown_until == clock.t + RATE_LIMIT_COOLDOWN_S


def test_exhausted_daily_quota_cools_down_until_pacific_midnight(make_pool, store, clock):
    pool = make_pool(keys=KEYS[:1])
    spec = pool.catalogue.get("test-flash")
    lease = pool.acquire(spec)
    pool.failed(lease, err("quota_exhausted", retry_after_s=20))
    until = store.get_api_key(lease.key_id).cooldown_until
    assert quota_day(until, "America/Los_Angeles") != quota_day(T0, "America/Los_Angeles")
    assert quota_day(until - 1, "America/Los_Angeles") == quota_day(T0, "America/Los_Angeles")


def test_invalid_key_is_disabled_and_logged_by_fingerprint_only(make_pool, store, caplog):
    pool = make_pool(keys=KEYS[:2])
    spec = pool.catalogue.get("test-flash")
    lease = pool.acquire(spec)
    caplog.set_level(logging.INFO)
    assert pool.failed(lease, err("invalid_key")) == "invalid"
    rec = store.get_api_key(lease.key_id)
    assert (rec.state, rec.last_error) == ("invalid", "invalid_key")
    assert lease.fingerprint in caplog.text and lease.secret not in caplog.text
    assert {pool.acquire(spec).key_id for _ in range(3)} == {k.id for k in store.list_api_keys()} - {lease.key_id}
    pool.set_state(lease.key_id, "enabled")  # an admin's override
    assert store.get_api_key(lease.key_id).last_error == ""


def test_server_errors_cool_a_key_briefly_and_request_errors_not_at_all(make_pool, store, clock):
    pool = make_pool(keys=KEYS[:1])
    spec = pool.catalogue.get("test-flash")
    lease = pool.acquire(spec)
    pool.failed(lease, err("server_error"))
    assert store.get_api_key(lease.key_id).cooldown_until == T0 + TRANSIENT_COOLDOWN_S
    clock.t += TRANSIENT_COOLDOWN_S
    lease = pool.acquire(spec)
    pool.failed(lease, err("blocked"))
    pool.failed(lease, err("bad_request"))
    assert store.get_api_key(lease.key_id).cooldown_until == T0 + TRANSIENT_COOLDOWN_S  # unchanged


async def test_failover_moves_to_the_next_key_and_backs_off_on_server_errors(make_pool):
    pool = make_pool()
    spec = pool.catalogue.get("test-flash")
    slept: list[float] = []

    async def sleep(s):
        slept.append(s)

    fo = Failover(pool, spec, sleep=sleep, rng=lambda: 0.0)
    first = await fo.next()
    assert await fo.failed(first, err("rate_limited"))
    second = await fo.next()
    assert second.key_id != first.key_id and slept == []  # key errors: at once
    assert await fo.failed(second, err("server_error"))
    assert slept == [BACKOFF_BASE_S * 0.5]  # jittered backoff: base × [0.5, 1)
    third = await fo.next()
    assert third.key_id not in (first.key_id, second.key_id)
    assert await fo.failed(third, err("network_error"))
    assert slept[-1] == min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2) * 0.5
    fourth = await fo.next()  # only the flaky one is left (the others cool down or were rate limited)
    assert fourth is None or fourth.key_id in (second.key_id, third.key_id)
    assert fo.attempts <= 4


async def test_failover_is_bounded_and_stops_at_request_errors(make_pool):
    pool = make_pool(keys=KEYS)

    async def sleep(s):
        pass

    fo = Failover(pool, pool.catalogue.get("test-flash"), max_attempts=2, sleep=sleep)
    a = await fo.next()
    assert await fo.failed(a, err("quota_exhausted"))
    b = await fo.next()
    assert not await fo.failed(b, err("rate_limited"))  # attempts used up
    assert await fo.next() is None
    fo2 = Failover(pool, pool.catalogue.get("test-flash"), sleep=sleep)
    c = await fo2.next()
    assert not await fo2.failed(c, err("blocked"))
    assert fo2.errors[-1].kind == "blocked" and fo2.attempts == 1  # a blocked prompt is not retried


async def test_failover_reports_invalid_keys(make_pool):
    pool = make_pool(keys=KEYS[:2])
    fo = Failover(pool, pool.catalogue.get("test-flash"))
    a = await fo.next()
    await fo.failed(a, err("invalid_key"))
    assert [x.key_id for x in fo.invalid] == [a.key_id]


# ---- logs ------------------------------------------------------------------------------------
def test_log_filter_replaces_known_keys_by_fingerprints(make_pool, caplog):
    pool = make_pool()
    f = RedactKeys(pool.scrub)
    record = logging.LogRecord("httpx", logging.INFO, __file__, 1, "GET %s failed", (f"https://x/?key={KEYS[0]}",), None)
    assert f.filter(record)
    assert KEYS[0] not in record.getMessage()
    other = logging.LogRecord("sdk", logging.INFO, __file__, 1, "using %s", (KEYS[1],), None)
    f.filter(other)
    assert other.getMessage() == f"using {fingerprint(KEYS[1])}"

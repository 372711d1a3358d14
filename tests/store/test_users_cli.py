"""``python -m argus users ...`` as a real subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from argus.auth import Authenticator
from argus.config import Settings
from argus.store import SQLiteStore

from tests.support.paths import REPO

pytestmark = pytest.mark.e2e  # every test here starts processes
PASSWORD = "s3cret password"


@pytest.fixture
def run(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARGUS_", "JWT_", "MONGO_"))}
    env.update(ARGUS_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(REPO))

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "argus", *args],
            input=stdin, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
        )

    return run


def _login(tmp_path, email, password):
    settings = Settings.from_env(dotenv=False)
    store = SQLiteStore(tmp_path / "data")
    try:
        return Authenticator(store, settings, bcrypt_rounds=4).login(email, password, "127.0.0.1")
    finally:
        store.close()


def test_create_then_login(run, tmp_path):
    r = run("users", "create", "Admin@Example.com", "--name", "Ada", stdin=PASSWORD + "\nignored second line\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Created admin user admin@example.com"
    assert PASSWORD not in r.stdout + r.stderr
    user = _login(tmp_path, "admin@example.com", PASSWORD)
    assert user is not None and user.name == "Ada" and user.role == "admin"
    assert _login(tmp_path, "admin@example.com", "wrong password") is None

    r = run("users", "create", "guest@example.com", stdin=PASSWORD)
    assert (r.returncode, r.stdout.strip()) == (0, "Created user guest@example.com")
    r = run("users", "create", "boss@example.com", "--admin", stdin=PASSWORD + "\r\n")
    assert (r.returncode, r.stdout.strip()) == (0, "Created admin user boss@example.com")
    assert _login(tmp_path, "boss@example.com", PASSWORD).role == "admin"

    r = run("users", "list")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["admin@example.com", "admin"], ["guest@example.com", "user"], ["boss@example.com", "admin"]
    ]
    assert "guest" in lines[1]  # default name: the part before @


def test_duplicate_email_exits_2(run):
    assert run("users", "create", "a@example.com", stdin=PASSWORD).returncode == 0
    r = run("users", "create", "A@EXAMPLE.COM", stdin=PASSWORD)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: An account with this email already exists."
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "email, stdin, message",
    [
        ("a@example.com", "short\n", "error: Password must be at least 8 characters long."),
        ("a@example.com", "", "error: No password given on standard input."),
        ("nope", PASSWORD, "error: Enter a valid email address, like name@example.com."),
    ],
)
def test_bad_input_exits_2(run, email, stdin, message):
    r = run("users", "create", email, stdin=stdin)
    assert (r.returncode, r.stderr.strip()) == (2, message)


def test_unusable_data_dir_exits_2(run, tmp_path):
    (tmp_path / "data").write_text("a file, not a directory")
    r = run("users", "list")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_list_empty(run):
    r = run("users", "list")
    assert (r.returncode, r.stdout.strip()) == (0, "No users yet.")

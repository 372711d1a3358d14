"""Fixtures shared by every area: the real model (loaded once per test session), a fresh
SQLite store with two users, and the rule that a test starting a process is marked ``e2e``.

``pytest -m "not e2e"`` is the fast loop: it runs every test that starts no child process.
A test that starts one (a server, a daemon, a CLI, a linter) without the ``e2e`` mark fails
with a sentence saying so, so the fast loop stays fast and the mark stays true.
"""
from __future__ import annotations

import multiprocessing
import subprocess

import pytest

from tests.support.users import PLACEHOLDER_HASH

_current: dict = {"item": None}
_real_popen_init = subprocess.Popen.__init__
_real_process_start = multiprocessing.process.BaseProcess.start


class UnmarkedProcessTest(AssertionError):
    """A test without the ``e2e`` mark started a child process."""


def _check_marked(what: str) -> None:
    item = _current["item"]
    if item is not None and item.get_closest_marker("e2e") is None:
        raise UnmarkedProcessTest(f"{item.nodeid} starts a process ({what}) but is not marked e2e: "
                                  "add @pytest.mark.e2e (or pytestmark = pytest.mark.e2e for the module)")


def _guarded_popen_init(self, args, *a, **kw):
    _check_marked(f"subprocess {args if isinstance(args, str) else ' '.join(map(str, args))[:80]}")
    return _real_popen_init(self, args, *a, **kw)


def _guarded_process_start(self):
    _check_marked("multiprocessing.Process")
    return _real_process_start(self)


subprocess.Popen.__init__ = _guarded_popen_init
multiprocessing.process.BaseProcess.start = _guarded_process_start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Remember which test runs (its fixtures' set-up included) for the process guard."""
    _current["item"] = item
    try:
        yield
    finally:
        _current["item"] = None


@pytest.fixture(scope="session")
def local_model():
    """The packaged SmolLM2-135M as a :class:`worker.engine.LocalModel`, loaded once."""
    from worker.engine import LocalModel

    return LocalModel.load()


@pytest.fixture
def store(tmp_path):
    """A fresh SQLiteStore in tmp_path (modules needing another store override this fixture)."""
    from argus.store import SQLiteStore

    s = SQLiteStore(tmp_path)
    yield s
    s.close()


@pytest.fixture
def alice(store):
    return store.create_user("alice@example.com", "Alice", PLACEHOLDER_HASH)


@pytest.fixture
def bob(store):
    return store.create_user("bob@example.com", "Bob", PLACEHOLDER_HASH)

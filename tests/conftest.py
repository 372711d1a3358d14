"""Shared fixtures: the real model (loaded once per test session) and reference outputs."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Path(os.environ.get("ARGUS_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


def reference(name: str) -> dict:
    """A reference case from ../shared/reference (llama.cpp on exact f32 math)."""
    return json.loads((REFERENCE / f"{name}.json").read_text(encoding="utf-8"))


def reference_logits(name: str) -> np.ndarray:
    return np.load(REFERENCE / f"{name}_final_logits.npy")


@pytest.fixture(scope="session")
def local_model():
    from worker.engine import LocalModel

    return LocalModel.load()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: A syntactically valid bcrypt hash that matches no password (for users that never sign in).
PLACEHOLDER_HASH = "$2b$04$notarealhashnotarealhashnotarealhashnotarealhashnot"


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

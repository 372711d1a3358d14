"""Where the repository is, for tests that start processes from it."""
from __future__ import annotations

from pathlib import Path

#: The repository's root folder (the parent of ``tests/``).
REPO = Path(__file__).resolve().parents[2]
